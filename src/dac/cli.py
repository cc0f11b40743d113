"""The ``dac`` command line: ``dac crop``, ``dac demo``, ``dac train`` and ``dac cv``.

Each subcommand parses its arguments and calls one library function; errors the user
can fix are one line on stderr, reported before anything is written. Exit status: 0 all
done, 1 some inputs failed (crop) or the run did not finish (interrupted with Ctrl-C,
or diverged in train/cv; the same command resumes it), 2 usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
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


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dac", description="Differentiable auto-cropping (DAC).")
    sub = parser.add_subparsers(dest="command", required=True)

    crop = sub.add_parser(
        "crop",
        help="crop every image to its region of interest",
        description="Crop images (files, folders searched recursively, or glob patterns) to their "
        "region of interest at a fixed size. Writes OUT/crops/*.png and OUT/boxes.csv (one row per "
        "input, keyed by its resolved path: path, status, error, size, box x1,y1,x2,y2 in input pixels, "
        "final cost, iterations, crop, settings, file_stat, sha256; columns you add are kept). Re-running "
        "skips files already cropped from the same content with the same settings and crops the rest "
        "(changed files, other settings, failures). Nothing inside OUT is an input. Exit status: 0 all "
        "cropped, 1 some failed or interrupted, 2 usage error.",
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

    for name, summary, text in (
        ("train", "train one pipeline (DAC, resize, DAC end to end or STN) and test it on a held-out part",
         "Train one pipeline of a config on all images but a stratified hold-out (train.holdout), then "
         "test it. Writes OUT/<pipeline>/checkpoint.pt, metrics.json and predictions.csv. Re-running the "
         "same command resumes. Runs under torchrun for several processes."),
        ("cv", "k-fold comparison of the pipelines: accuracy, ROC/AUC, figures",
         "Stratified k-fold cross-validation of every pipeline of a config (resize, dac, dac_e2e, stn) "
         "on the same folds. Writes OUT/summary.json, summary.md, folds.csv, figures/ and per-fold "
         "checkpoints and metrics. Re-running the same command skips finished folds and resumes the "
         "unfinished one. Runs under torchrun for several processes."),
    ):
        cmd = sub.add_parser(name, help=summary, description=text)
        cmd.add_argument("--config", required=True, metavar="PATH", help="YAML config (e.g. configs/quick.yaml, configs/paper.yaml)")
        cmd.add_argument("--data", metavar="DIR|CSV", help="images: a folder with one sub-folder per class, or a CSV of path,label (overrides the config's data.source)")
        cmd.add_argument("--out", required=True, metavar="DIR", help="results folder")
        cmd.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides train.device)")
        cmd.add_argument("--quiet", action="store_true", help="no progress lines")
        if name == "train":
            cmd.add_argument("--pipeline", metavar="NAME", help="which of the config's pipelines (default: dac)")
        else:
            cmd.add_argument("--pipelines", metavar="A,B", help="comma-separated subset of the config's pipelines (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"crop": _crop, "demo": _demo, "train": _train, "cv": _cv}
    try:
        return commands[args.command](args)
    except DACInputError as exc:
        print(f"dac {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in ("crop", "train", "cv"):
            print(f"dac {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
            return 1
        raise
    except RuntimeError as exc:
        if args.command in ("train", "cv"):
            print(f"dac {args.command}: failed: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        raise


def _shown(path: str) -> str:
    """A path for the terminal: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _needs_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DACInputError("needs matplotlib for its figures, which is not installed: pip install 'dac[viz]'") from None


def _crop(args: argparse.Namespace) -> int:
    from ._checks import check_device, check_int
    from .archive import check_out_dir, crop_archive
    from .layer import DACrop

    check_int(args.pool_size, "--pool-size", 1)
    check_int(args.batch_size, "--batch-size", 1)
    check_int(args.workers, "--workers", 0)
    check_device(args.device, "--device")
    check_out_dir(args.out, "--out")
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
        f"{summary.failed} failed -> {_shown(os.path.join(args.out, 'boxes.csv'))}",
        file=sys.stderr,
    )
    for path, reason in summary.failures[:10]:
        print(f"  failed: {_shown(path)}: {reason}", file=sys.stderr)
    if len(summary.failures) > 10:
        print(f"  ... and {len(summary.failures) - 10} more (see boxes.csv)", file=sys.stderr)
    return 1 if summary.failed else 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _needs_matplotlib()
    run_demo(args.out, count=args.count, seed=args.seed)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import load_config, train_pipeline

    config = load_config(args.config, data=args.data, device=args.device)
    metrics = train_pipeline(config, args.out, pipeline=args.pipeline, verbose=not args.quiet)
    if "accuracy" in metrics and os.environ.get("RANK", "0") == "0":
        print(f"dac train: {metrics['pipeline']}: held-out accuracy {metrics['accuracy']:.3f}, "
              f"macro AUC {metrics['macro_auc']:.3f} -> {args.out}", file=sys.stderr)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from .train import load_config, run_cv

    _needs_matplotlib()
    config = load_config(args.config, data=args.data, device=args.device)
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()] if args.pipelines else None
    run_cv(config, args.out, pipelines=pipelines, verbose=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        print(Path(args.out, "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
