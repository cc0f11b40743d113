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
``data.cache_images`` the raw images are held in memory for the run. Progress goes to
the ``dac.train`` logger (the command line shows it on stderr).

:func:`train_pipeline` trains one pipeline on all images (less a stratified
``train.holdout`` it then evaluates) into ``OUT/<pipeline>/``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import DACInputError
from .._files import write_json, write_text
from .config import GENERATED, ExperimentConfig, config_to_dict
from .distributed import barrier, init_runtime
from .engine import Engine, EvalModeGapWarning, load_checkpoint, seed_for
from .folds import build_dataset, data_digest, holdout_split, stratified_folds
from .metrics import classification_metrics
from .pipelines import Pipeline, build_pipeline
from .report import write_report

__all__ = ["load_pipeline", "run_cv", "train_pipeline"]

Callback = Callable[[str, dict], None]


_log = logging.getLogger("dac.train")


def run_cv(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    pipelines: list[str] | None = None,
    callback: Callback | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Stratified k-fold cross-validation of each pipeline; writes the results folder.

    Args:
        config: the experiment (see :mod:`dac.train.config`).
        out_dir: the results folder; an existing one from the same config is resumed.
        pipelines: names of ``config.pipelines`` to run (default: all, in order).
        callback: ``callback(event, info)`` for ``"fold_start"``, ``"fit_start"``,
            ``"epoch_end"`` and ``"fold_end"``; info holds ``pipeline`` and ``fold``.
        figures: draw figures/*.png at the end (needs matplotlib).

    Returns:
        The summary (as summary.json): pipeline -> ``accuracy_mean``, ``accuracy_std``,
        ``macro_auc_mean``, ``macro_auc_std``, ``per_class_auc_mean``, ``folds``, ...
        (on rank 0; other ranks of a torchrun get ``{}``).

    Raises:
        DACInputError: a bad pipeline name, data that cannot be split into k folds or
            holds an unreadable image, matplotlib missing when ``figures`` (checked
            before any work), or an ``out_dir`` holding a run of a different config or
            other data (one that trained something: a folder left by a run stopped
            before training starts afresh).
    """
    names = _pipeline_names(config, pipelines)
    if figures:
        from ..viz import require_matplotlib

        require_matplotlib()
    began = time.perf_counter()
    run = _Experiment(config, out_dir, names)
    k = config.train.folds
    folds = stratified_folds(run.labels, k, config.seed)
    run.prepare("cv", names)
    out = run.out
    if run.rt.is_main:
        write_json(out / "folds.json", [f.tolist() for f in folds])
    for name in names:
        todo = [f for f in range(k) if not (out / name / f"fold_{f}" / "metrics.json").is_file()]
        if not todo:
            run.log(f"{name}: all {k} folds done")
            continue
        source = run.source(name)
        for fold in todo:
            test = folds[fold]
            train = np.setdiff1d(np.arange(len(run.labels)), test)
            info = {"pipeline": name, "fold": fold}
            if callback:
                callback("fold_start", dict(info))
            run.train_and_evaluate(
                name, out / name / f"fold_{fold}", source, train, test, seed=seed_for(config.seed, "fold", fold),
                tag=f"{name} fold {fold + 1}/{k}", callback=_tagged(callback, info), extra={"fold": fold},
            )
            if callback:
                callback("fold_end", dict(info))
    barrier(run.rt)
    # every pipeline of the config with all its folds done, not only those run now
    done = [n for n in config.pipelines if all((out / n / f"fold_{f}" / "metrics.json").is_file() for f in range(k))]
    for n in config.pipelines:
        if n not in done and (out / n).is_dir():
            run.log(f"{n}: not in the report yet (some folds unfinished)")
    described = {n: {"kind": config.pipelines[n].kind, "input_size": config.pipelines[n].input_size, "epochs": config.pipelines[n].epochs} for n in done}
    summary = write_report(out, described, run.classes, k, figures=figures) if run.rt.is_main else {}
    if run.rt.is_main:
        record = json.loads((out / "run.json").read_text())
        record["last_seconds"] = time.perf_counter() - began
        write_json(out / "run.json", record)
        run.log(f"done in {time.perf_counter() - began:.0f} s -> {out}/summary.md")
    barrier(run.rt)
    return summary


def train_pipeline(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    pipeline: str | None = None,
    callback: Callback | None = None,
) -> dict[str, Any]:
    """Train one pipeline on every image but a stratified ``train.holdout``, then test it.

    Writes ``OUT/<pipeline>/checkpoint.pt`` (resumed if present), ``metrics.json``
    (test metrics on the held-out images, or only the history when ``holdout`` is 0)
    and ``predictions.csv``.

    Args:
        config: the experiment.
        out_dir: the results folder.
        pipeline: a name in ``config.pipelines`` (default: ``"dac"`` if there, else the first).
        callback: as :func:`run_cv`.

    Returns:
        The metrics dict written to metrics.json.
    """
    if pipeline is None:
        pipeline = "dac" if "dac" in config.pipelines else next(iter(config.pipelines))
    (name,) = _pipeline_names(config, [pipeline])
    run = _Experiment(config, out_dir, [name])
    train, test = holdout_split(run.labels, config.train.holdout, config.seed)
    run.prepare("train", [name])
    metrics = run.train_and_evaluate(
        name, run.out / name, run.source(name), train, test, seed=seed_for(config.seed, "train"), tag=name,
        callback=_tagged(callback, {"pipeline": name}), extra={},
    )
    barrier(run.rt)
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
    model = build_pipeline(config.pipelines[pipeline], arch=config.model.arch, width=config.model.width, num_classes=len(classes),
                           load_stage=False)  # a warm start's stage is in the checkpoint's weights
    model.load_state_dict(state["model"])
    return model.eval()


# ----------------------------------------------------------------------------- internals


class _Experiment:
    """One ``dac cv`` or ``dac train`` run: its config, results folder, runtime, engine and data.

    Built once per run; everything a fold needs is read from here, so the fold's own
    function takes only what differs between folds.
    """

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, names: list[str]) -> None:
        self.config = config
        self.rt = init_runtime(config.train.device, config.train.threads, name="train.device")
        self.out = Path(out_dir)
        # An image too small for a DAC pipeline's pooling is refused when read, by name.
        pooled = [config.pipelines[n].pool_size for n in names if config.pipelines[n].kind in ("dac", "dac_e2e")]
        self.dataset = build_dataset(config.data, config.seed, min_side=2 * max(pooled, default=0) or 1)
        if not config.data.cache_images:  # read batch by batch: every file's header first, in seconds
            self.dataset.check_headers()
        self.labels, self.classes = np.asarray(self.dataset.labels), list(self.dataset.classes)
        self.engine = Engine(self.rt, batch_size=config.train.batch_size, eval_batch_size=config.train.eval_batch_size,
                             workers=config.data.workers)
        self._images: Dataset | None = None

    def prepare(self, command: str, names: list[str]) -> None:
        """Create the results folder, or check that it holds this very run (see :func:`_prepare_out`);
        ``names``: the pipelines this call trains."""
        _prepare_out(self, command, data_digest(self.dataset), self.stages(names))

    def stages(self, names: list[str]) -> dict[str, str]:
        """The sha256 of the ``saliency_init`` stage (a warm start) of each of ``names`` that has one."""
        digests = {}
        for name in names:
            p = self.config.pipelines[name]
            if p.saliency_init is not None:
                try:
                    digests[name] = hashlib.sha256(Path(p.saliency_init).read_bytes()).hexdigest()
                except OSError as err:
                    raise DACInputError(f"pipelines.{name}.saliency_init: cannot read {p.saliency_init!r}: "
                                        f"{(err.strerror or str(err)).lower()}") from None
        return digests

    def log(self, message: str, level: int = logging.INFO) -> None:
        if self.rt.is_main:
            _log.log(level, message)

    def build(self, name: str) -> Pipeline:
        config = self.config
        try:
            return build_pipeline(config.pipelines[name], arch=config.model.arch, width=config.model.width,
                                  num_classes=len(self.classes))
        except DACInputError as err:
            if str(err).startswith("saliency_init:"):
                raise DACInputError(f"pipelines.{name}.{err}") from None
            raise

    def images(self) -> Dataset:
        """The raw images: read into memory on first use when ``data.cache_images``."""
        if not self.config.data.cache_images:
            return self.dataset
        if self._images is None:
            started = time.perf_counter()
            self._images = self.engine.load_images(self.dataset)
            what = "generated" if self.config.data.source in GENERATED else "read"
            self.log(f"{what} {len(self._images)} images into memory in {time.perf_counter() - started:.1f} s")
        return self._images

    def source(self, name: str) -> Dataset:
        """What a pipeline trains on: its front's cached crops if the front is fixed, else raw images."""
        probe = self.build(name)
        images = self.images()
        if not probe.front_is_fixed:
            return images
        started = time.perf_counter()
        cached = self.engine.front_outputs(probe, images)
        self.log(f"{name}: front output of {len(cached)} images cached ({tuple(cached.images.shape[1:])}) "
                 f"in {time.perf_counter() - started:.1f} s")
        return cached

    def _warmup(self, name: str, model: Pipeline, folder: Path, source: Dataset, train: np.ndarray, seed: int, tag: str,
                progress: Callback) -> list[dict[str, Any]]:
        """``front_warmup`` epochs of the classifier alone on the untrained front's crops (computed once),
        checkpointed in ``warmup.pt``; skipped when the joint phase has begun (its checkpoint holds the model)."""
        if (folder / "checkpoint.pt").is_file():
            return list(load_checkpoint(folder / "warmup.pt")["history"]) if (folder / "warmup.pt").is_file() else []
        pcfg = self.config.pipelines[name]
        started = time.perf_counter()
        cached = self.engine.front_outputs(model, source, train)
        self.log(f"{tag}: warm start, the untrained front's crops of {len(cached)} images in {time.perf_counter() - started:.1f} s")
        history = self.engine.fit(model, cached, np.arange(len(cached)), epochs=pcfg.front_warmup, lr=self.config.train.lr,
                                  seed=seed_for(seed, "warmup"), checkpoint=folder / "warmup.pt", callback=progress,
                                  recalibrate_bn=False)
        return [dict(h, phase="warmup") for h in history]

    def train_and_evaluate(self, name: str, folder: Path, source: Dataset, train: np.ndarray, test: np.ndarray, *,
                           seed: int, tag: str, callback: Callback | None, extra: dict[str, Any]) -> dict[str, Any]:
        """Train pipeline ``name`` on ``source[train]`` into ``folder``, then test it on ``source[test]``."""
        pcfg, rt, engine = self.config.pipelines[name], self.rt, self.engine
        torch.manual_seed(seed_for(seed, "init"))
        model = self.build(name)

        def progress(event: str, info: dict) -> None:
            if event == "fit_end" and info.get("warning"):
                self.log(f"{tag}: {info['warning']}", logging.WARNING)
            if event == "epoch_end":
                r = info["record"]
                extra_text = f", {r['boxes_unconverged']} boxes unconverged" if r.get("boxes_unconverged") else ""
                self.log(f"{tag} epoch {r['epoch']}/{info['epochs']}: loss {r['loss']:.4f}, train acc {r['train_accuracy']:.3f} ({r['seconds']:.1f} s{extra_text})")
            elif event == "fit_start" and info["start_epoch"]:
                self.log(f"{tag}: resuming after epoch {info['start_epoch']}")
            if callback:
                callback(event, info)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EvalModeGapWarning)  # logged by progress() instead
            warmup = self._warmup(name, model, folder, source, train, seed, tag, progress) if pcfg.front_warmup else []
            history = warmup + engine.fit(
                model, source, train, epochs=pcfg.epochs - pcfg.front_warmup, lr=self.config.train.lr, front_lr=pcfg.front_lr,
                front_clip_norm=pcfg.front_clip_norm,
                seed=seed, checkpoint=folder / "checkpoint.pt", callback=progress, recalibrate_bn=self.config.train.recalibrate_bn,
            )
        last = history[-1]
        metrics: dict[str, Any] = {"pipeline": name, **extra, "n_train": int(train.size)}
        metrics.update(
            train_accuracy=last["train_accuracy"], eval_train_accuracy=last.get("eval_train_accuracy"),
            eval_gap_warning=bool(last.get("eval_gap_warning", False)), world_size=rt.world_size, threads=torch.get_num_threads(),
        )
        if test.size:
            started = time.perf_counter()
            probs = engine.predict(model, source, test)
            metrics.update(classification_metrics(self.labels[test], probs, len(self.classes)))
            metrics["eval_seconds"] = time.perf_counter() - started
        metrics.update(epochs=pcfg.epochs, train_seconds=float(sum(h["seconds"] for h in history)), history=history)
        if rt.is_main:
            if test.size:
                _write_predictions(folder / "predictions.csv", test, self.labels[test], probs, self.classes)
            write_json(folder / "metrics.json", metrics)
            if test.size:
                self.log(f"{tag}: test accuracy {metrics['accuracy']:.3f}, macro AUC {metrics['macro_auc']:.3f}")
        barrier(rt)
        return metrics


def _pipeline_names(config: ExperimentConfig, names: list[str] | None) -> list[str]:
    if names is None:
        return list(config.pipelines)
    unknown = [n for n in names if n not in config.pipelines]
    if unknown or not names:
        raise DACInputError(f"pipelines: {unknown or names} not in the config's pipelines {list(config.pipelines)}")
    return list(names)


def _write_predictions(path: Path, index: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "label", *[f"prob_{k}" for k in range(len(classes))]])
    for i, y, p in zip(index, labels, probs):
        writer.writerow([int(i), int(y), *[f"{v:.8g}" for v in p]])
    write_text(path, buffer.getvalue())


#: What a results folder holds before any training: written by :func:`_prepare_out` and :func:`run_cv`.
_BEFORE_TRAINING = frozenset({"run.json", "config.yaml", "folds.json"})


def _prepare_out(run: _Experiment, command: str, digest: str, stages: dict[str, str]) -> None:
    """Create the results folder with run.json and config.yaml, or check that it holds this very run on this very
    data, from the same warm-start ``stages`` (sha256 by pipeline; those first trained now are added to run.json)."""
    out, config, rt, n = run.out, run.config, run.rt, len(run.labels)
    fingerprint = config.fingerprint()
    run_file = out / "run.json"
    # A run stopped before training anything (an unreadable image, say) left only these:
    # the mended data or config starts it afresh rather than being refused as another run.
    if run_file.is_file() and any(p.name not in _BEFORE_TRAINING for p in out.iterdir()):
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("fingerprint") != fingerprint or previous.get("command") != command:
            raise DACInputError(
                f"--out: {str(out)!r} holds results of another run (dac {previous.get('command', '?')}, config "
                f"{previous.get('fingerprint', '?')}; this is dac {command}, config {fingerprint}); choose a new folder"
            )
        recorded = previous.get("stages", {})
        changed = sorted(k for k in stages if k in recorded and stages[k] != recorded[k])
        if changed:
            raise DACInputError(
                f"pipelines.{changed[0]}.saliency_init: {str(out)!r} holds results trained from another stage (its file "
                f"changed since): choose a new folder, or restore the stage it was run with"
            )
        if previous.get("data") != digest:
            raise DACInputError(
                f"--data: {str(out)!r} holds results on other data ({previous.get('images', '?')} images, digest "
                f"{previous.get('data', '?')}; the data now has {n} images, digest {digest}: files, labels or classes changed); "
                f"its folds would mix two datasets: choose a new folder, or restore the data it was run on"
            )
        if any(k not in recorded for k in stages):  # a pipeline trained here for the first time: its stage recorded
            barrier(rt)
            if rt.is_main:
                write_json(run_file, {**previous, "stages": {**recorded, **stages}})
            barrier(rt)
        return
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not run_file.is_file())):
        raise DACInputError(f"--out: {str(out)!r} exists and is not a dac results folder; choose a new or empty folder")
    barrier(rt)
    if rt.is_main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
        import dac

        write_json(run_file, {"command": command, "fingerprint": fingerprint, "data": digest, **({"stages": stages} if stages else {}),
                              "classes": run.classes, "images": n,
                              "dac_version": dac.__version__, "torch": torch.__version__, "world_size": rt.world_size,
                              "threads": torch.get_num_threads()})
    barrier(rt)


def _tagged(callback: Callback | None, info: dict[str, Any]) -> Callback | None:
    if callback is None:
        return None
    return lambda event, data: callback(event, {**info, **data})
