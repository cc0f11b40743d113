"""The ``dac`` command line: ``dac crop``, ``dac predict``, ``dac fit-saliency``, ``dac demo``, ``dac train``, ``dac cv``.

Each subcommand parses its arguments and calls one library function; errors the user
can fix are one line on stderr, reported before anything is written. Exit status: 0 all
done, 1 some inputs failed (crop, predict) or the run did not finish (interrupted with
Ctrl-C, or diverged in train/cv; the same command resumes it), 2 usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

from ._checks import DACInputError
from ._files import shown_path

__all__ = ["main"]


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 200x370, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return h, w


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes or 'auto', got {text!r}") from None


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH like 1,99, got {text!r}") from None
    return low, high


def _archive_options(cmd: argparse.ArgumentParser, what: str) -> None:
    """Options ``dac crop`` and ``dac predict`` share: reading, batching, workers, shards."""
    cmd.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8; memory grows with it)")
    cmd.add_argument("--workers", type=_workers, default="auto", metavar="N|auto",
                     help="processes decoding files ahead of the " + what + " (default auto: none up to 4 cores, "
                     "a quarter of the cores beyond, all but one with a GPU; 0: a read-ahead thread of this process "
                     "decodes, which suits PNG/JPEG/TIFF; DICOM is faster with processes)")
    cmd.add_argument("--device", default="cpu", help="torch device of the " + what + " (default cpu)")
    cmd.add_argument("--dicom", choices=("window", "range", "percentiles"), default="window",
                     help="DICOM intensities: the file's VOI LUT / window as a viewer shows it (default), the stored "
                     "range without windowing, or a stretch between --percentiles")
    cmd.add_argument("--percentiles", type=_pair, default=(1.0, 99.0), metavar="LOW,HIGH",
                     help="percentiles that become black and white with --dicom percentiles (default 1,99)")
    cmd.add_argument("--overlays", action="store_true", help="also write OUT/overlays/: each image with its box drawn")
    cmd.add_argument("--shard", metavar="i/n",
                     help="take every n-th input from the i-th on (0 <= i < n) and merge into the one table; "
                     "default: RANK/WORLD_SIZE under torchrun, else all inputs")
    bar = cmd.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show a progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .saliency import FIT_DEFAULTS, LEARNED_DEFAULTS

    parser = _Parser(prog="dac", description="Differentiable auto-cropping (DAC).")
    sub = parser.add_subparsers(dest="command", required=True)

    crop = sub.add_parser(
        "crop",
        help="crop every image to its region of interest",
        description="Crop images (files, folders searched recursively, or glob patterns) to their "
        "region of interest at a fixed size. Writes OUT/crops/*.png and OUT/boxes.csv (one row per "
        "input, keyed by its resolved path: path, status, error, size, box x1,y1,x2,y2 in input pixels, "
        "final cost, iterations, crop, intensity, settings, file_stat, sha256; columns you add are kept). "
        "Re-running skips files already cropped from the same content with the same settings and crops the "
        "rest (changed files, other settings, failures). Nothing inside OUT is an input. Exit status: 0 all "
        "cropped, 1 some failed or interrupted, 2 usage error.",
    )
    crop.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
    crop.add_argument("--out", required=True, metavar="DIR", help="results folder")
    crop.add_argument("--size", type=_size, default=None, metavar="HxW",
                      help="crop size (default 200x370, the paper's, or the --saliency file's); the box always has "
                      "this aspect")
    crop.add_argument("--pool-size", type=int, default=None, help="max-min pooling window k (default 10, or the "
                      "--saliency file's); a box ends at most at k*(W//k)")
    crop.add_argument("--min-width", type=float, default=None, metavar="FRACTION",
                      help="narrowest box, as a fraction of the image width (default 2/3.5 = 0.571, the paper's, "
                      "for panoramic radiographs, or the --saliency file's; lower it for images whose region is "
                      "narrower); never more than the widest box of the crop's aspect that fits")
    crop.add_argument("--sharpness-factor", type=float, default=None, metavar="F",
                      help="schedule: sharpness grows by F per stage (default 2, the paper's text: 0.025 -> 0.2, or "
                      "the --saliency file's; 4 is the paper's Algorithm 1)")
    crop.add_argument("--search", choices=("paper", "global"), default=None,
                      help="how the box is found: paper (default; Algorithm 1's staged ascent) or global (every "
                      "feasible box scored on a grid, the best polished by Newton steps: the maximum of the cost)")
    crop.add_argument("--saliency", metavar="FILE",
                      help="a learned saliency stage (saliency.pt of dac fit-saliency): the box is searched on its "
                      "map, with the crop size, pooling window, minimum width and schedule it was trained with "
                      "unless given here")
    crop.add_argument("--bits", type=int, choices=(8, 16), default=8, help="PNG bit depth of the crops (default 8)")
    crop.add_argument("--gray8", action="store_true", help="convert every image to 8-bit gray first (the paper's preprocessing)")
    _archive_options(crop, "search")

    predict = sub.add_parser(
        "predict",
        help="classify images with a model trained by dac train or dac cv",
        description="Apply a trained pipeline (a dac train / dac cv results folder, a pipeline or fold folder in "
        "it, or its checkpoint.pt) to images (files, folders searched recursively, or glob patterns). Writes "
        "OUT/predictions.csv (one row per input: path, status, error, size, box x1,y1,x2,y2 in input pixels, "
        "predicted class, prob_<class> per class, label (the file's folder, where it names a class), crop, "
        "intensity, settings, file_stat, sha256) and OUT/crops/. Prints the accuracy on labelled images "
        "(class sub-folders). Re-running skips files already predicted by the same model from the same "
        "content. Exit status: 0 all predicted, 1 some failed or interrupted, 2 usage error (also: a model "
        "whose training did not finish).",
    )
    predict.add_argument("model", metavar="MODEL", help="results folder of dac train / dac cv, a pipeline or fold folder in it, or a checkpoint.pt")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
    predict.add_argument("--out", required=True, metavar="DIR", help="results folder")
    predict.add_argument("--pipeline", metavar="NAME", help="which pipeline, where MODEL holds several (default: the only one)")
    predict.add_argument("--fold", type=int, metavar="K", help="which fold's model, for a dac cv folder")
    predict.add_argument("--any-size", action="store_true",
                         help="predict images whose size is far (over 2x) from the phantom sizes the model was trained on")
    _archive_options(predict, "model")

    fit = sub.add_parser(
        "fit-saliency",
        help="train a saliency stage from labelled boxes (phantoms by default)",
        description="Train a learned saliency stage (dac.saliency.SaliencyNet) so that the boxes DAC finds on its "
        "map fit labelled regions; the gradient reaches it through the box. Trains on generated phantoms "
        "(--count) or on --data, a CSV of path,x1,y1,x2,y2 (xyxy in input pixels; relative paths from the CSV's "
        "folder; UTF-8, or file names in the file system's own bytes). Writes OUT/saliency.pt (for dac crop "
        "--saliency and dac.saliency.load_dacrop) and OUT/fit.json. The same --seed and options on the same machine "
        "and thread count give the same saliency.pt, bit for bit (without --time-limit). Exit status: 0 done, "
        "1 interrupted, 2 usage error.",
    )
    fit.add_argument("--out", required=True, metavar="DIR", help="results folder")
    fit.add_argument("--count", type=int, default=FIT_DEFAULTS["count"], help="phantoms to train on (default %(default)s; ignored with --data)")
    fit.add_argument("--data", metavar="CSV", help="labelled real images: path,x1,y1,x2,y2 per row")
    fit.add_argument("--image-size", type=_size, default=(1536, 2836), metavar="HxW", help="phantom size (default 1536x2836)")
    fit.add_argument("--size", type=_size, default=(200, 370), metavar="HxW", help="crop size: the box's aspect (default 200x370)")
    fit.add_argument("--pool-size", type=int, default=10, help="pooling window k (default 10)")
    fit.add_argument("--min-width", type=float, default=2 * LEARNED_DEFAULTS["r_min_fraction"], metavar="FRACTION",
                     help="narrowest box as a fraction of the image width (default %(default)s)")
    fit.add_argument("--sharpness-factor", type=float, default=LEARNED_DEFAULTS["sharpness_factor"], metavar="F",
                     help="gamma multiplier per stage (default %(default)s, the paper's Algorithm 1)")
    fit.add_argument("--search", choices=("paper", "global"), default=LEARNED_DEFAULTS["search"],
                     help="how the box is found in training, stored with the stage for dac crop (default %(default)s)")
    fit.add_argument("--members", type=int, default=FIT_DEFAULTS["members"],
                     help="gates trained side by side and averaged: their boxes scatter less (default %(default)s)")
    fit.add_argument("--steps", type=int, default=FIT_DEFAULTS["steps"],
                     help="Adam steps through the box (default %(default)s; 0: the warm start alone)")
    fit.add_argument("--mask-steps", type=int, default=FIT_DEFAULTS["mask_steps"],
                     help="steps of the mask warm start before them (default %(default)s; 0: none)")
    fit.add_argument("--time-limit", type=float, default=None, metavar="SECONDS", help="stop training after this long")
    fit.add_argument("--coverage-weight", type=float, default=FIT_DEFAULTS["coverage_weight"],
                     help="weight of teeth (region) cut off by the box in the loss (default %(default)s; lower: tighter "
                     "boxes that cut more often)")
    fit.add_argument("--margin", type=float, default=FIT_DEFAULTS["margin"], metavar="FRACTION",
                     help="the target box is the region grown by this fraction of the image width per side "
                     "(default %(default)s)")
    fit.add_argument("--stretch", type=float, default=FIT_DEFAULTS["stretch"], metavar="FRACTION",
                     help="augmentation: stretch each labelled image left-right about its region by a factor in "
                     "[1 - FRACTION, 1 + FRACTION] (default %(default)s; 0: not)")
    fit.add_argument("--shift", type=float, default=FIT_DEFAULTS["shift"], metavar="FRACTION",
                     help="augmentation: then move it by up to this fraction of the image width in x and y "
                     "(default %(default)s; 0: not)")
    fit.add_argument("--clip-norm", type=float, default=FIT_DEFAULTS["clip_norm"], metavar="NORM",
                     help="largest gradient norm of a step through the box (default %(default)s; inf: no clipping): "
                     "a box on a nearly flat ridge of the cost has a huge implicit gradient")
    fit.add_argument("--border", type=float, default=FIT_DEFAULTS["border"], metavar="SHARE",
                     help="share of training images given a flat collimator border beside one end of their region "
                     "(default %(default)s; 0: none): films whose border comes close to the region")
    fit.add_argument("--seed", type=int, default=0,
                     help="phantoms, initial weights, batches and augmentation (default %(default)s)")
    fit.add_argument("--overwrite", action="store_true", help="replace OUT/saliency.pt if OUT holds one (default: refuse)")
    fit.add_argument("--quiet", action="store_true", help="no progress lines")

    demo = sub.add_parser(
        "demo",
        help="crop generated panoramic phantoms with the paper's map and a learned saliency, side by side",
        description="Generate panoramic-radiograph phantoms at the paper's sizes, find each one's box on the paper's "
        "max-min map and on a learned saliency stage (the one that ships with dac unless --saliency), and write "
        "figures of both side by side, their crops and a boxes table with IoU and every-tooth-inside to OUT.",
    )
    demo.add_argument("--out", default="dac-demo", metavar="DIR", help="results folder (default ./dac-demo)")
    demo.add_argument("--count", type=int, default=6, help="number of phantoms (default 6)")
    demo.add_argument("--seed", type=int, default=0, help="the first phantom's seed (default 0)")
    demo.add_argument("--saliency", metavar="FILE", help="the learned stage shown beside the paper's map (default: the "
                      "stage that ships with dac, trained on other phantoms)")

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
        cmd.add_argument("--regions", metavar="CSV", help="every image's true region: a CSV of path,x1,y1,x2,y2 (overrides "
                         "data.regions; the oracle pipeline crops them)")
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
    commands = {"crop": _crop, "predict": _predict, "fit-saliency": _fit_saliency, "demo": _demo, "train": _train, "cv": _cv}
    try:
        with _console_log(quiet=bool(getattr(args, "quiet", False))):
            return commands[args.command](args)
    except DACInputError as exc:
        print(f"dac {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in ("crop", "predict", "train", "cv"):
            print(f"dac {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
            return 1
        if args.command == "fit-saliency":  # saliency.pt is written once, at the end
            print("dac fit-saliency: interrupted; nothing saved (a new run trains from the start)", file=sys.stderr)
            return 1
        raise
    except RuntimeError as exc:
        if args.command in ("train", "cv"):
            print(f"dac {args.command}: failed: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        raise


@contextlib.contextmanager
def _console_log(quiet: bool) -> Iterator[None]:
    """Show the library's ``dac.*`` log records on stderr while a command runs (warnings only when ``quiet``)."""
    logger = logging.getLogger("dac")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[dac] %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _archive_checks(args: argparse.Namespace) -> tuple[tuple[int, int] | None, str]:
    """Checks of the options crop and predict share; (shard, device)."""
    from ._checks import check_device, check_int, check_percentiles, check_shard
    from .jobs import check_out_dir, shard_from_environment

    check_int(args.batch_size, "--batch-size", 1)
    if args.workers != "auto":
        check_int(args.workers, "--workers", 0)
    check_percentiles(args.percentiles, "--percentiles")
    shard = check_shard(args.shard, "--shard") if args.shard is not None else shard_from_environment()
    device = args.device
    local = os.environ.get("LOCAL_RANK", "")
    if device == "cuda" and shard is not None and local.isdigit():
        device = f"cuda:{local}"  # torchrun: one GPU per process
    check_device(device, "--device")
    check_out_dir(args.out, "--out")
    return shard, device


def _report(command: str, summary, table: str, args: argparse.Namespace, done: str) -> None:
    share = f" (shard {summary.shard[0]}/{summary.shard[1]} of {summary.found})" if summary.shard[1] > 1 else ""
    processed = summary.ok + summary.failed
    speed = f" in {summary.seconds:.1f} s ({1000 * summary.seconds / processed:.0f} ms per image)" if processed else ""
    print(
        f"dac {command}: {summary.total} inputs{share}, {summary.ok} {done}, {summary.skipped} already done, "
        f"{summary.failed} failed{speed} -> {shown_path(os.path.join(args.out, table))}",
        file=sys.stderr,
    )
    for path, reason in summary.failures[:10]:
        print(f"  failed: {shown_path(path)}: {reason}", file=sys.stderr)
    if len(summary.failures) > 10:
        print(f"  ... and {len(summary.failures) - 10} more (see {table})", file=sys.stderr)
    if summary.warnings:
        _say_some(f"dac {command}: {_inputs(len(summary.warnings))} read with a warning (see the intensity column of {table}):",
                  [f"{shown_path(path)}: {intensity.partition('warning: ')[2]}" for path, intensity in summary.warnings])
    if summary.frozen:
        _say_some(f"dac {command}: {_inputs(len(summary.frozen))} with no region to find (a flat map: blank or "
                  f"uniform; the box is the start box, frozen=1 in {table}):", [shown_path(p) for p in summary.frozen])


def _inputs(count: int) -> str:
    return f"{count} input{'s' if count > 1 else ''}"


def _say_some(header: str, lines: list[str], shown: int = 3) -> None:
    """``header``, then the first ``shown`` of ``lines`` indented, then how many more (stderr)."""
    print(header, file=sys.stderr)
    for line in lines[:shown]:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > shown:
        print(f"  ... and {len(lines) - shown} more", file=sys.stderr)


def _job_stopped(command: str, exc: OSError) -> int:
    """A run stopped by the system (a full disk, say): one line, exit 1 (the journal keeps
    what was done; the same command resumes)."""
    where = f": {shown_path(os.fsdecode(exc.filename))}" if exc.filename else ""
    reason = exc.strerror or " ".join(str(exc).split())
    print(f"dac {command}: stopped: {reason}{where}; what was done is kept: free the cause and run the same "
          "command again to resume", file=sys.stderr)
    return 1


def _crop(args: argparse.Namespace) -> int:
    from .layer import DACrop
    from .tasks.crop import crop_archive

    given = _search_options(args)
    shard, device = _archive_checks(args)
    if args.saliency is not None:
        from .saliency import load_dacrop

        layer = load_dacrop(args.saliency, **given)
    else:
        layer = DACrop(**({"output_size": (200, 370), "pool_size": 10} | given))
    try:
        summary = crop_archive(
            args.inputs,
            args.out,
            layer=layer,
            batch_size=args.batch_size,
            device=device,
            workers=args.workers,
            bits=args.bits,
            gray8=args.gray8,
            overlays=args.overlays,
            dicom=args.dicom,
            percentiles=args.percentiles,
            progress=args.progress,
            shard=shard,
        )
    except OSError as exc:
        return _job_stopped("crop", exc)
    _report("crop", summary, "boxes.csv", args, "cropped")
    return 1 if summary.failed else 0


def _search_options(args: argparse.Namespace) -> dict:
    """The DACrop settings given on the command line (checked), by DACrop's names."""
    from ._checks import check_int

    given: dict = {}
    if args.size is not None:
        given["output_size"] = args.size
    if args.pool_size is not None:
        given["pool_size"] = check_int(args.pool_size, "--pool-size", 1)
    if args.min_width is not None:
        if not 0 < args.min_width <= 1:
            raise DACInputError(f"--min-width: expected a fraction of the image width in (0, 1], got {args.min_width:g}")
        given["r_min_fraction"] = args.min_width / 2
    if args.sharpness_factor is not None:
        if not 0 < args.sharpness_factor < float("inf"):
            raise DACInputError(f"--sharpness-factor: expected a finite number > 0, got {args.sharpness_factor:g}")
        given["sharpness_factor"] = args.sharpness_factor
    if getattr(args, "search", None) is not None:
        given["search"] = args.search
    return given


def _fit_saliency(args: argparse.Namespace) -> int:
    from .saliency import FitOptions
    from .tasks.fit_saliency import train_saliency

    options = FitOptions(steps=args.steps, mask_steps=args.mask_steps, time_limit=args.time_limit, coverage_weight=args.coverage_weight,
                         margin=args.margin, stretch=args.stretch, shift=args.shift, clip_norm=args.clip_norm,
                         border=args.border, flags=True)
    given = _search_options(args)
    summary = train_saliency(  # progress through the dac.saliency logger (main shows it unless --quiet)
        args.out, options, count=args.count, data=args.data, seed=args.seed, image_size=args.image_size,
        output_size=given["output_size"], pool_size=given["pool_size"], r_min_fraction=given["r_min_fraction"],
        sharpness_factor=given["sharpness_factor"], search=given["search"], members=args.members, overwrite=args.overwrite, flags=True,
    )
    loss = f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}" if summary["steps"] else f"{summary['mask_steps']} warm-start steps only"
    print(f"dac fit-saliency: {summary['steps']} steps in {summary['seconds']:.0f} s on {summary['source']}, {loss} -> "
          f"{shown_path(os.path.join(args.out, 'saliency.pt'))}", file=sys.stderr)
    print(f"dac fit-saliency: on its {summary['images']} labelled images: mean IoU {summary['labelled_iou']:.3f}, "
          f"labelled region inside the box in {100 * summary['labelled_region_inside']:.0f} %", file=sys.stderr)
    if summary["steps"]:
        print(f"dac fit-saliency: boxes in training: {summary['boxes_note']}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .tasks.predict import Predictor, predict_archive

    shard, device = _archive_checks(args)
    predictor = Predictor.load(args.model, pipeline=args.pipeline, fold=args.fold, device=device)
    try:
        summary = predict_archive(
            args.inputs,
            args.out,
            predictor,
            batch_size=args.batch_size,
            workers=args.workers,
            overlays=args.overlays,
            dicom=args.dicom,
            percentiles=args.percentiles,
            any_size=args.any_size,
            progress=args.progress,
            shard=shard,
        )
    except OSError as exc:
        return _job_stopped("predict", exc)
    _report("predict", summary, "predictions.csv", args, "predicted")
    if summary.accuracy is not None:
        print(f"dac predict: accuracy {summary.accuracy:.3f} ({summary.correct}/{summary.labelled} images whose "
              f"folder names a class)", file=sys.stderr)
    return 1 if summary.failed else 0


def _demo(args: argparse.Namespace) -> int:
    from .tasks.demo import run_demo
    from .viz import require_matplotlib

    require_matplotlib()
    run_demo(args.out, count=args.count, seed=args.seed, saliency=args.saliency)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import load_config, train_pipeline

    config = load_config(args.config, data=args.data, regions=args.regions, device=args.device)
    metrics = train_pipeline(config, args.out, pipeline=args.pipeline)
    if "accuracy" in metrics and os.environ.get("RANK", "0") == "0":
        print(f"dac train: {metrics['pipeline']}: held-out accuracy {metrics['accuracy']:.3f}, "
              f"macro AUC {metrics['macro_auc']:.3f} -> {args.out}", file=sys.stderr)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from .train import load_config, run_cv
    from .viz import require_matplotlib

    require_matplotlib()
    config = load_config(args.config, data=args.data, regions=args.regions, device=args.device)
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()] if args.pipelines else None
    run_cv(config, args.out, pipelines=pipelines)
    if os.environ.get("RANK", "0") == "0":
        print(Path(args.out, "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
