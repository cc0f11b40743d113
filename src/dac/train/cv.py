"""What ``dac cv`` and ``dac train`` run: k-fold comparison of pipelines, or one training.

:func:`run_cv` trains every pipeline of the config on the same stratified folds
(seeded) and writes, under ``OUT``::

    run.json, config.yaml          the config, its fingerprint and the data's digest
    folds.json                     each fold's test indices
    <pipeline>/fold_<k>/checkpoint.pt   after every epoch (resume point, then the model)
    <pipeline>/fold_<k>/metrics.json    when the fold is done (its presence = done)
    <pipeline>/fold_<k>/predictions.csv index, label, prob_<class>...
    summary.json, folds.csv, summary.md, figures/*.png

Every pipeline of one fold starts from the same initial ResNet and sees the same sample
order (paired comparison). An interrupted run, re-run with the same command, skips the
finished folds and resumes the unfinished one from its last epoch; a folder of another
config, of other data (file list, labels) or, for an unfinished fold, of another number
of processes is refused. The report covers every pipeline of the config whose folds
are all done, also those a run with ``pipelines=`` did not touch. Where a front has
nothing to learn (resize; DAC without a learned saliency or RoI rotation) its output is
computed once per run and cached in memory; augmentation follows it at every step. With
``data.cache_images`` the raw images are held in memory for the run.

:func:`train_pipeline` trains one pipeline on all images (less a stratified
``train.holdout`` it then evaluates) into ``OUT/<pipeline>/``.
"""
from __future__ import annotations

import csv
import importlib
import io
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import DACInputError
from ._io import write_json, write_text
from .config import ExperimentConfig, config_to_dict
from ..data.datasets import MemoryDataset
from .folds import build_dataset, data_digest, holdout_split, load_images, stratified_folds
from .distributed import Runtime, barrier, init_runtime
from .engine import EvalModeGapWarning, fit, load_checkpoint, precompute_front, predict, seed_for
from .metrics import classification_metrics
from .pipelines import Pipeline, build_pipeline
from .report import write_report

__all__ = ["load_pipeline", "run_cv", "train_pipeline"]

Callback = Callable[[str, dict], None]


def run_cv(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    pipelines: list[str] | None = None,
    callback: Callback | None = None,
    verbose: bool = True,
    figures: bool = True,
) -> dict[str, Any]:
    """Stratified k-fold cross-validation of each pipeline; writes the results folder.

    Args:
        config: the experiment (see :mod:`dac.train.config`).
        out_dir: the results folder; an existing one from the same config is resumed.
        pipelines: names of ``config.pipelines`` to run (default: all, in order).
        callback: ``callback(event, info)`` for ``"fold_start"``, ``"fit_start"``,
            ``"epoch_end"`` and ``"fold_end"``; info holds ``pipeline`` and ``fold``.
        verbose: print one line per epoch and fold to stderr (rank 0).
        figures: draw figures/*.png at the end (needs matplotlib).

    Returns:
        The summary (as summary.json): pipeline -> ``accuracy_mean``, ``accuracy_std``,
        ``macro_auc_mean``, ``macro_auc_std``, ``per_class_auc_mean``, ``folds``, ...
        (on rank 0; other ranks of a torchrun get ``{}``).

    Raises:
        DACInputError: a bad pipeline name, data that cannot be split into k folds or
            holds an unreadable image, a missing optional package (scikit-learn,
            PyYAML, matplotlib for figures; checked before any work), or an
            ``out_dir`` holding a run of a different config or other data.
    """
    names = _pipeline_names(config, pipelines)
    _require_packages(figures=figures)
    rt = init_runtime(config.train.device, config.train.threads, name="train.device")
    began = time.perf_counter()
    out = Path(out_dir)
    dataset = build_dataset(config.data, config.seed)
    labels, classes = np.asarray(dataset.labels), list(dataset.classes)
    k = config.train.folds
    folds = stratified_folds(labels, k, config.seed)
    _prepare_out(out, config, rt, "cv", classes, len(labels), data_digest(dataset))
    if rt.is_main:
        write_json(out / "folds.json", [f.tolist() for f in folds])
    log = _logger(rt, verbose)
    raw = _RawImages(dataset, config, rt)
    for name in names:
        todo = [f for f in range(k) if not (out / name / f"fold_{f}" / "metrics.json").is_file()]
        if not todo:
            log(f"{name}: all {k} folds done")
            continue
        source, fronted = _source(name, config, raw, len(classes), rt, log)
        for fold in todo:
            test = folds[fold]
            train = np.setdiff1d(np.arange(len(labels)), test)
            info = {"pipeline": name, "fold": fold}
            if callback:
                callback("fold_start", dict(info))
            _train_and_evaluate(
                config, name, out / name / f"fold_{fold}", source, fronted, labels, classes, train, test,
                rt=rt, seed=seed_for(config.seed, "fold", fold), tag=f"{name} fold {fold + 1}/{k}",
                callback=_tagged(callback, info), log=log, extra={"fold": fold},
            )
            if callback:
                callback("fold_end", dict(info))
    barrier(rt)
    # every pipeline of the config with all its folds done, not only those run now
    done = [n for n in config.pipelines if all((out / n / f"fold_{f}" / "metrics.json").is_file() for f in range(k))]
    for n in config.pipelines:
        if n not in done and (out / n).is_dir():
            log(f"{n}: not in the report yet (some folds unfinished)")
    described = {n: {"kind": config.pipelines[n].kind, "input_size": config.pipelines[n].input_size, "epochs": config.pipelines[n].epochs} for n in done}
    summary = write_report(out, described, classes, k, figures=figures) if rt.is_main else {}
    if rt.is_main:
        run = json.loads((out / "run.json").read_text())
        run["last_seconds"] = time.perf_counter() - began
        write_json(out / "run.json", run)
        log(f"done in {time.perf_counter() - began:.0f} s -> {out}/summary.md")
    barrier(rt)
    return summary


def train_pipeline(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    pipeline: str | None = None,
    callback: Callback | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train one pipeline on every image but a stratified ``train.holdout``, then test it.

    Writes ``OUT/<pipeline>/checkpoint.pt`` (resumed if present), ``metrics.json``
    (test metrics on the held-out images, or only the history when ``holdout`` is 0)
    and ``predictions.csv``.

    Args:
        config: the experiment.
        out_dir: the results folder.
        pipeline: a name in ``config.pipelines`` (default: ``"dac"`` if there, else the first).
        callback, verbose: as :func:`run_cv`.

    Returns:
        The metrics dict written to metrics.json.
    """
    if pipeline is None:
        pipeline = "dac" if "dac" in config.pipelines else next(iter(config.pipelines))
    (name,) = _pipeline_names(config, [pipeline])
    _require_packages(figures=False)
    rt = init_runtime(config.train.device, config.train.threads, name="train.device")
    out = Path(out_dir)
    dataset = build_dataset(config.data, config.seed)
    labels, classes = np.asarray(dataset.labels), list(dataset.classes)
    train, test = holdout_split(labels, config.train.holdout, config.seed)
    _prepare_out(out, config, rt, "train", classes, len(labels), data_digest(dataset))
    log = _logger(rt, verbose)
    raw = _RawImages(dataset, config, rt)
    source, fronted = _source(name, config, raw, len(classes), rt, log)
    metrics = _train_and_evaluate(
        config, name, out / name, source, fronted, labels, classes, train, test,
        rt=rt, seed=seed_for(config.seed, "train"), tag=name, callback=_tagged(callback, {"pipeline": name}), log=log, extra={},
    )
    barrier(rt)
    return metrics


def load_pipeline(out_dir: str | Path, pipeline: str, fold: int | None = None) -> Pipeline:
    """A trained network from a results folder, ready for raw images (eval mode, CPU).

    Args:
        out_dir: a folder written by :func:`run_cv` (give ``fold``) or :func:`train_pipeline`.
        pipeline: the pipeline's name.
        fold: which fold's model (cv folders only).

    Returns:
        The :class:`~dac.train.pipelines.Pipeline`: ``model(images)`` -> logits.

    Raises:
        DACInputError: no such folder, pipeline or fold, a checkpoint whose training
            did not finish (an interrupted run: re-run its command to complete it), or a
            folder written by an older version of the training code.
    """
    from .config import load_config

    out = Path(out_dir)
    if not (out / "run.json").is_file():
        raise DACInputError(f"out_dir: {str(out)!r} is not a dac results folder (no run.json)")
    config = load_config(out / "config.yaml")
    run = json.loads((out / "run.json").read_text())
    if run.get("fingerprint") != config.fingerprint():
        raise DACInputError(
            f"out_dir: {str(out)!r} was trained by another version of dac's training (config fingerprint "
            f"{run.get('fingerprint', '?')}, this version makes {config.fingerprint()}): its models do not fit this code; train them again"
        )
    classes = run["classes"]
    _pipeline_names(config, [pipeline])
    folder = out / pipeline / (f"fold_{fold}" if fold is not None else "")
    if not (folder / "checkpoint.pt").is_file():
        raise DACInputError(f"pipeline, fold: no checkpoint at {str(folder / 'checkpoint.pt')!r}")
    state = load_checkpoint(folder / "checkpoint.pt")
    if not state.get("finished"):
        raise DACInputError(
            f"pipeline, fold: the checkpoint {str(folder / 'checkpoint.pt')!r} is unfinished (epoch {state.get('epoch', '?')} "
            f"of {state.get('epochs', '?')}): its run was interrupted; run the same command again to complete it"
        )
    model = _build(config, pipeline, len(classes))
    model.load_state_dict(state["model"])
    return model.eval()


# ----------------------------------------------------------------------------- internals


class _RawImages:
    """The raw-image dataset, read into memory on first use when ``data.cache_images``."""

    def __init__(self, dataset, config: ExperimentConfig, rt: Runtime) -> None:
        self.dataset, self.config, self.rt = dataset, config, rt
        self._cached = None

    def get(self, log: Callable[[str], None]):
        if not self.config.data.cache_images:
            return self.dataset
        if self._cached is None:
            started = time.perf_counter()
            images = load_images(self.dataset, range(len(self.dataset)), self.rt, workers=self.config.data.workers)
            self._cached = MemoryDataset(images, self.dataset.labels, self.dataset.classes)
            log(f"read {len(images)} images into memory in {time.perf_counter() - started:.1f} s")
        return self._cached


#: Packages the training commands import, and what for (module -> (pip name, use)).
_PACKAGES = {"sklearn": ("scikit-learn", "stratified folds"), "yaml": ("PyYAML", "config files")}
_FIGURES = {"matplotlib": ("matplotlib", "the figures")}


def _require_packages(*, figures: bool) -> None:
    """Fail before any work when an optional package the run will need is missing."""
    missing = []
    for module, (package, use) in {**_PACKAGES, **(_FIGURES if figures else {})}.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{package} (for {use})")
    if missing:
        names = " ".join(m.split(" ")[0] for m in missing)
        raise DACInputError(f"missing package(s): {', '.join(missing)}; install with: pip install {names}")


def _pipeline_names(config: ExperimentConfig, names: list[str] | None) -> list[str]:
    if names is None:
        return list(config.pipelines)
    unknown = [n for n in names if n not in config.pipelines]
    if unknown or not names:
        raise DACInputError(f"pipelines: {unknown or names} not in the config's pipelines {list(config.pipelines)}")
    return list(names)


def _build(config: ExperimentConfig, name: str, num_classes: int) -> Pipeline:
    return build_pipeline(config.pipelines[name], arch=config.model.arch, width=config.model.width, num_classes=num_classes)


def _source(name: str, config: ExperimentConfig, raw: _RawImages, num_classes: int, rt: Runtime, log) -> tuple[Any, bool]:
    """The dataset a pipeline trains on: its cached front outputs if the front is fixed, else raw images."""
    probe = _build(config, name, num_classes)
    images = raw.get(log)
    if not probe.front_is_fixed:
        return images, False
    started = time.perf_counter()
    cached = precompute_front(probe, images, rt=rt, batch_size=config.train.eval_batch_size, workers=_workers(config, images))
    log(f"{name}: front output of {len(cached)} images cached ({tuple(cached.shape[1:])}) in {time.perf_counter() - started:.1f} s")
    return MemoryDataset(cached, images.labels, images.classes, dtype=torch.float32), True


def _workers(config: ExperimentConfig, dataset) -> int:
    return 0 if isinstance(dataset, MemoryDataset) else config.data.workers


def _train_and_evaluate(
    config: ExperimentConfig, name: str, folder: Path, source, fronted: bool, labels: np.ndarray, classes: list[str],
    train: np.ndarray, test: np.ndarray, *, rt: Runtime, seed: int, tag: str, callback, log, extra: dict[str, Any],
) -> dict[str, Any]:
    pcfg = config.pipelines[name]
    torch.manual_seed(seed_for(seed, "init"))
    model = _build(config, name, len(classes))

    def progress(event: str, info: dict) -> None:
        if event == "fit_end" and info.get("warning"):
            log(f"{tag}: WARNING: {info['warning']}", always=True)
        if event == "epoch_end":
            r = info["record"]
            extra_text = f", {r['boxes_unconverged']} boxes unconverged" if r.get("boxes_unconverged") else ""
            log(f"{tag} epoch {r['epoch']}/{info['epochs']}: loss {r['loss']:.4f}, train acc {r['train_accuracy']:.3f} ({r['seconds']:.1f} s{extra_text})")
        elif event == "fit_start" and info["start_epoch"]:
            log(f"{tag}: resuming after epoch {info['start_epoch']}")
        if callback:
            callback(event, info)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvalModeGapWarning)  # logged by progress() instead
        history = fit(
            model, source, train, epochs=pcfg.epochs, rt=rt, batch_size=config.train.batch_size, lr=config.train.lr,
            front_lr=pcfg.front_lr, seed=seed, fronted=fronted, workers=_workers(config, source),
            checkpoint=folder / "checkpoint.pt", callback=progress, recalibrate_bn=config.train.recalibrate_bn,
            eval_batch_size=config.train.eval_batch_size,
        )
    last = history[-1]
    metrics: dict[str, Any] = {"pipeline": name, **extra, "n_train": int(train.size)}
    metrics.update(
        train_accuracy=last["train_accuracy"], eval_train_accuracy=last.get("eval_train_accuracy"),
        eval_gap_warning=bool(last.get("eval_gap_warning", False)), world_size=rt.world_size, threads=torch.get_num_threads(),
    )
    if test.size:
        started = time.perf_counter()
        probs = predict(model, source, test, rt=rt, batch_size=config.train.eval_batch_size, fronted=fronted, workers=_workers(config, source))
        metrics.update(classification_metrics(labels[test], probs, len(classes)))
        metrics["eval_seconds"] = time.perf_counter() - started
    metrics.update(epochs=pcfg.epochs, train_seconds=float(sum(h["seconds"] for h in history)), history=history)
    if rt.is_main:
        if test.size:
            _write_predictions(folder / "predictions.csv", test, labels[test], probs, classes)
        write_json(folder / "metrics.json", metrics)
        if test.size:
            log(f"{tag}: test accuracy {metrics['accuracy']:.3f}, macro AUC {metrics['macro_auc']:.3f}")
    barrier(rt)
    return metrics


def _write_predictions(path: Path, index: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "label", *[f"prob_{k}" for k in range(len(classes))]])
    for i, y, p in zip(index, labels, probs):
        writer.writerow([int(i), int(y), *[f"{v:.8g}" for v in p]])
    write_text(path, buffer.getvalue())


def _prepare_out(out: Path, config: ExperimentConfig, rt: Runtime, command: str, classes: list[str], n: int, digest: str) -> None:
    """Create ``out`` with run.json and config.yaml, or check that it holds this very run on this very data."""
    fingerprint = config.fingerprint()
    run_file = out / "run.json"
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("fingerprint") != fingerprint or previous.get("command") != command:
            raise DACInputError(
                f"--out: {str(out)!r} holds results of another run (dac {previous.get('command', '?')}, config "
                f"{previous.get('fingerprint', '?')}; this is dac {command}, config {fingerprint}); choose a new folder"
            )
        if previous.get("data") != digest:
            raise DACInputError(
                f"--data: {str(out)!r} holds results on other data ({previous.get('images', '?')} images, digest "
                f"{previous.get('data', '?')}; the data now has {n} images, digest {digest}: files, labels or classes changed); "
                f"its folds would mix two datasets: choose a new folder, or restore the data it was run on"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DACInputError(f"--out: {str(out)!r} exists and is not a dac results folder; choose a new or empty folder")
    barrier(rt)
    if rt.is_main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
        import dac

        write_json(run_file, {"command": command, "fingerprint": fingerprint, "data": digest, "classes": classes, "images": n,
                              "dac_version": dac.__version__, "torch": torch.__version__, "world_size": rt.world_size,
                              "threads": torch.get_num_threads()})
    barrier(rt)


def _tagged(callback: Callback | None, info: dict[str, Any]) -> Callback | None:
    if callback is None:
        return None
    return lambda event, data: callback(event, {**info, **data})


def _logger(rt: Runtime, verbose: bool) -> Callable[..., None]:
    def log(message: str, always: bool = False) -> None:
        if (verbose or always) and rt.is_main:
            print(f"[dac] {message}", file=sys.stderr, flush=True)

    return log
