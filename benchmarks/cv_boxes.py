"""Where the trained fronts of a ``dac cv`` run look: IoU of their boxes with the true region.

Run (from the repository root), on a results folder of ``dac cv`` on generated data
(``data.source: phantom`` or ``distractors``, whose images carry their true region)::

    .venv/bin/python benchmarks/cv_boxes.py results-distractors --pipelines dac_global,dac_e2e_candidates

For every fold of each pipeline: its trained front's boxes on that fold's test images
(eval mode, the boxes ``dac predict`` would crop), and the same front untrained (the
pipeline as built before training: for ``dac_e2e`` the paper's map, since an untrained
``SaliencyNet`` is that map; for ``stn`` the initial box, set by the head's bias alone),
each scored by IoU with the true region; then the mean
over the folds. A box learned from the task loss alone that looks where the label is
decided moves toward the true region; one that learned nothing keeps its IoU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def fold_boxes(folder: Path, name: str) -> list[dict]:
    from dac.train import build_pipeline, load_config, load_pipeline
    from dac.train.folds import build_dataset

    config = load_config(folder / "config.yaml")
    if config.data.source not in ("phantom", "distractors"):
        raise SystemExit(f"{folder}: trained on {config.data.source!r}, whose true regions are not known")
    data = build_dataset(config.data, seed=config.seed)
    folds = json.loads((folder / "folds.json").read_text())
    # the same for every fold: its boxes do not depend on the random weights (see the docstring)
    untrained = build_pipeline(config.pipelines[name], arch=config.model.arch, width=config.model.width).eval()
    rows = []
    for fold, test in enumerate(folds):
        trained = load_pipeline(folder, name, fold)
        items = [data[i] for i in test]
        images = torch.stack([item["image"] for item in items])
        truth = torch.stack([torch.as_tensor(item["roi"]) for item in items]).float()
        with torch.no_grad():
            found = {k: torch.cat([net.front.locate(images[i : i + 25]) for i in range(0, len(items), 25)]).float()
                     for k, net in (("trained", trained), ("untrained", untrained))}
        iou = {k: box_iou(b, truth).diag() for k, b in found.items()}
        rows.append({"fold": fold, "images": len(items), "iou_untrained": float(iou["untrained"].mean()),
                     "iou_trained": float(iou["trained"].mean()), "iou_over_half": float((iou["trained"] > 0.5).float().mean()),
                     "moved_px": float((found["trained"] - found["untrained"]).abs().mean())})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="dac cv results folders (e.g. one per seed)")
    parser.add_argument("--pipelines", default="dac_e2e_candidates", help="comma-separated pipelines with a DAC or STN front")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {"command": " ".join(sys.argv), "machine": machine(torch.device("cpu")), "results": {}}
    print("| pipeline | folder | IoU untrained -> trained (mean over folds) | trained IoU > 0.5 | mean box move px |")
    print("|---|---|---:|---:|---:|")
    for name in args.pipelines.split(","):
        for folder in args.folders:
            rows = fold_boxes(Path(folder), name)
            record["results"].setdefault(name, {})[folder] = rows
            mean = {k: statistics.mean(r[k] for r in rows) for k in ("iou_untrained", "iou_trained", "iou_over_half", "moved_px")}
            print(f"| {name} | {folder} | {mean['iou_untrained']:.3f} -> {mean['iou_trained']:.3f} | "
                  f"{100 * mean['iou_over_half']:.0f} % | {mean['moved_px']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
