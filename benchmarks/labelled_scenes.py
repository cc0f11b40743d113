"""Write generated images with their true regions as a labelled set: PNGs and a ``path,x1,y1,x2,y2`` CSV.

The table is what ``dac fit-saliency --data`` trains on and what ``dac cv --regions``
reads, so a stage can be fitted on a generated task as a clinic fits one on its own
labelled images (``docs/training_end_to_end.md``, the warm start from a labelled stage).
Images are ``PhantomDataset`` / ``DistractorDataset`` items of ``--seed`` (item seeds
``seed * 1_000_003 + i``): choose a seed whose items no cross-validation run uses.

    python benchmarks/labelled_scenes.py --task distractors --seed 7 --count 32 --out labelled-distractors
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from dac.data.datasets import DistractorDataset, PhantomDataset
from dac.jobs import check_out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("phantoms", "distractors"), required=True)
    parser.add_argument("--seed", type=int, required=True, help="dataset seed (keep it apart from the CV's)")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size", default="192x354", metavar="HxW")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    out = check_out_dir(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "phantoms":
        dataset = PhantomDataset(args.count, seed=args.seed, sizes=(size,), bits=8)
    else:
        dataset = DistractorDataset(args.count, seed=args.seed, sizes=(size,))
    rows = ["path,x1,y1,x2,y2"]
    for i in range(len(dataset)):
        item = dataset[i]
        Image.fromarray(item["image"][0].numpy()).save(out / f"{i}.png")
        rows.append(f"{i}.png," + ",".join(f"{v:g}" for v in item["roi"].tolist()))
    (out / "boxes.csv").write_text("\n".join(rows) + "\n")
    print(f"{len(dataset)} images and boxes.csv in {out}")


if __name__ == "__main__":
    main()
