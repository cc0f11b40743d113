"""Throughput of ``dac crop`` on a folder of phantom radiographs.

Run (from the repository root)::

    .venv/bin/python benchmarks/crop_throughput.py --count 200 --json crop_throughput.json

Writes ``--count`` 8-bit phantoms (``dac.phantoms.make_phantom``, 1536 x 2836 by default)
as PNG files into a temporary folder (not timed), then times the command
``dac crop FOLDER --out OUT`` end to end in this process (``dac.cli.main``): reading
and decoding the PNGs, the search, the crops and the atomic writes. Reports images/s,
the floor of just decoding every file (``dac.io.read_image``) timed in the same run,
and the mean IoU of the boxes in ``boxes.csv`` against the phantoms' true regions.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dac import io as dio
from dac.cli import main as dac_main
from dac.phantoms import make_phantom
from dac.demo import box_iou


def run(count: int, height: int, width: int, batch_size: int, workers: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        root.mkdir()
        truth = {}
        for i in range(count):
            p = make_phantom(seed + i, height, width)
            path = root / f"phantom_{i:04d}.png"
            dio.write_png(path, p.image, bits=8)
            truth[str(path)] = p.roi
        start = time.perf_counter()
        for path in sorted(root.iterdir()):
            dio.read_image(path)
        decode_s = time.perf_counter() - start
        out = Path(tmp) / "out"
        args = ["crop", str(root), "--out", str(out), "--batch-size", str(batch_size),
                "--workers", str(workers), "--no-progress"]
        start = time.perf_counter()
        status = dac_main(args)
        crop_s = time.perf_counter() - start
        rows = list(csv.DictReader(open(out / "boxes.csv")))
        found = torch.tensor([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in rows])
        true = torch.stack([truth[r["path"]] for r in rows]).to(found.dtype)
        iou = box_iou(found, true)
    return {
        "count": count, "image_size": [height, width], "batch_size": batch_size, "workers": workers,
        "exit_status": status, "crop_s": crop_s, "images_per_s": count / crop_s,
        "decode_s": decode_s, "decode_images_per_s": count / decode_s,
        "crop_over_decode": crop_s / decode_s, "mean_iou": float(iou.mean()), "ok": sum(r["status"] == "ok" for r in rows),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--width", type=int, default=2836)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    r = run(args.count, args.height, args.width, args.batch_size, args.workers, args.seed)
    print(f"dac crop on {r['count']} phantom PNGs of {args.width}x{args.height}: {r['crop_s']:.1f} s, "
          f"{r['images_per_s']:.2f} images/s (decoding alone: {r['decode_images_per_s']:.2f} images/s, "
          f"crop / decode = {r['crop_over_decode']:.2f}); {r['ok']}/{r['count']} ok; mean IoU {r['mean_iou']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
