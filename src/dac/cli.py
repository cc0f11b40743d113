"""The ``dac`` command line: ``dac crop`` and ``dac demo``.

Each subcommand parses its arguments and calls one library function; errors the user
can fix are one line on stderr. Exit status: 0 all done, 1 some inputs failed,
2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._checks import DACInputError

__all__ = ["main"]


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 200x370, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return h, w


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dac", description="Differentiable auto-cropping (DAC).")
    sub = parser.add_subparsers(dest="command", required=True)

    crop = sub.add_parser(
        "crop",
        help="crop every image to its region of interest",
        description="Crop images (files, folders searched recursively, or glob patterns) to their "
        "region of interest at a fixed size. Writes OUT/crops/*.png and OUT/boxes.csv (one row per "
        "input: path, status, error, size, box x1,y1,x2,y2 in input pixels, final cost, iterations). "
        "Re-running the same command skips finished files. Exit status: 0 all cropped, 1 some "
        "failed, 2 usage error.",
    )
    crop.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
    crop.add_argument("--out", required=True, metavar="DIR", help="results folder")
    crop.add_argument("--size", type=_size, default=(200, 370), metavar="HxW", help="crop size (default 200x370, the paper's)")
    crop.add_argument("--pool-size", type=int, default=10, help="max-min pooling window (default 10)")
    crop.add_argument("--batch-size", type=int, default=8, help="images per search batch (default 8)")
    crop.add_argument("--device", default="cpu", help="torch device for the search (default cpu)")
    crop.add_argument("--workers", type=int, default=0, help="processes decoding files ahead (default 0)")
    crop.add_argument("--bits", type=int, choices=(8, 16), default=8, help="PNG bit depth of the crops (default 8)")
    crop.add_argument("--gray8", action="store_true", help="convert every image to 8-bit gray first (the paper's preprocessing)")
    crop.add_argument("--overlays", action="store_true", help="also write OUT/overlays/: each image with its box drawn")
    bar = crop.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show a progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")

    demo = sub.add_parser(
        "demo",
        help="crop generated panoramic phantoms and write figures",
        description="Generate panoramic-radiograph phantoms, crop them, and write figures, crops and "
        "a boxes table with IoU against the true regions to OUT.",
    )
    demo.add_argument("--out", default="dac-demo", metavar="DIR", help="results folder (default ./dac-demo)")
    demo.add_argument("--count", type=int, default=6, help="number of phantoms (default 6)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "crop":
            return _crop(args)
        return _demo(args)
    except DACInputError as exc:
        print(f"dac {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _crop(args: argparse.Namespace) -> int:
    from .archive import crop_archive
    from .layer import DACrop

    layer = DACrop(output_size=args.size, pool_size=args.pool_size)
    summary = crop_archive(
        args.inputs,
        args.out,
        layer=layer,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        bits=args.bits,
        gray8=args.gray8,
        overlays=args.overlays,
        progress=args.progress,
    )
    print(
        f"dac crop: {summary.total} inputs, {summary.ok} cropped, {summary.skipped} already done, "
        f"{summary.failed} failed -> {args.out}/boxes.csv",
        file=sys.stderr,
    )
    for path, reason in summary.failures[:10]:
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    if len(summary.failures) > 10:
        print(f"  ... and {len(summary.failures) - 10} more (see boxes.csv)", file=sys.stderr)
    return 1 if summary.failed else 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, count=args.count, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
