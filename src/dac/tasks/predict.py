"""A trained pipeline applied to new images: what ``dac predict`` runs.

Load once, predict many::

    from dac.tasks.predict import Predictor
    predictor = Predictor.load("runs/quick/dac")        # a dac train / dac cv results folder
    result = predictor.predict_files(["a.png", "b.png"])
    result.probabilities, result.boxes, predictor.classes

:class:`Predictor` holds a network trained by ``dac train`` or ``dac cv``
(:func:`dac.train.load_pipeline`: weights only, refused while its training is
unfinished), reads files as its training read them (one gray channel, 8-bit where the
training data were), and returns per image the box (xyxy in input pixels), the crop the
classifier saw, the class probabilities and the predicted class.
:func:`predict_archive` runs it over files, folders or glob patterns with the archive
engine of :mod:`dac.jobs` (the same guarantees as ``dac crop``: every input one row,
bad files recorded with their reason, atomic writes, a journal per batch, resume that
redoes nothing, shards), writing ``OUT/predictions.csv``, ``OUT/crops/`` and, if asked,
``OUT/overlays/``.

The table, ``OUT/predictions.csv``
    ``path, status, error, width, height, x1, y1, x2, y2, frozen`` (1 where the DAC
    search found no region: a blank or uniform image, whose box is the start box and
    whose class comes from that box's crop; 0 otherwise; empty for fronts with no search
    and in rows predicted before the column was added), ``predicted`` (a class name),
    one ``prob_<class name>`` per class (they sum to 1), ``label`` (the name of the
    folder holding the file, where it is one of the model's class names: class
    sub-folders give labelled images, and the accuracy on them is reported), ``crop``,
    then ``intensity, settings, file_stat, sha256`` as in ``boxes.csv``. A row is done
    when the same file was predicted by the same model (a digest of its weights, its
    pipeline and classifier settings and its classes) with the same reading settings.

Which images fit a model
    The network takes one gray channel (as ``dac train`` reads images); a model whose
    classifier wants another number of channels, or whose outputs are not its classes,
    is refused. A model trained on generated phantoms knows its image sizes; an image
    more than twice as large or less than half as large as all of them, in height or
    width, fails with that reason (``any_size=True`` predicts it anyway: DAC and resize
    fronts rescale any image, but the search and the classifier were tuned at the
    training scale). Models trained on a folder of images accept any size. Images too
    small for the front (two pooling windows) fail with the front's reason.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import jobs
from .._batching import by_size
from .._checks import DACInputError, check_device
from ..data import io as dio

__all__ = ["Prediction", "PredictionSummary", "Predictor", "predict_archive"]

#: Version of how a prediction row is made from an image (with
#: :data:`dac.data.io.READ_FORMAT`, how the image is read): part of every settings key.
PREDICT_FORMAT = 2
#: An image fits a model trained on phantoms of size S when each side is within this factor of S's.
SIZE_FACTOR = 2.0


@dataclass
class Prediction:
    """What :class:`Predictor` returns for a batch of B images.

    Convention: boxes are xyxy in input pixels (torchvision's).
    """

    probabilities: Tensor  #: Tensor[B, K] float64, rows sum to 1 (softmax of the logits)
    boxes: Tensor  #: Tensor[B, 4] float32, the region the classifier saw
    crops: Tensor  #: Tensor[B, 1, h, w] float32 in [0, 1], the classifier's input
    classes: tuple[str, ...]  #: class names, index = column of ``probabilities``
    #: Tensor[B] bool: images where the DAC search found no region (a flat map: blank or
    #: uniform; the box is the start box); None for fronts with no search (resize, STN)
    frozen: Tensor | None = None

    @property
    def predicted(self) -> Tensor:
        """Tensor[B] (long): the most probable class of each image."""
        return self.probabilities.argmax(dim=1)

    @property
    def predicted_names(self) -> list[str]:
        """The most probable class of each image, by name."""
        return [self.classes[i] for i in self.predicted.tolist()]


@dataclass
class PredictionSummary(jobs.ArchiveSummary):
    """An :class:`~dac.jobs.ArchiveSummary` plus the accuracy on labelled images."""

    labelled: int = 0  #: ok rows of this run's inputs whose folder names a class
    correct: int = 0  #: of those, predicted as their folder says

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


class Predictor:
    """A trained pipeline, loaded once, applied to many images.

    Args:
        model: a :class:`dac.train.Pipeline` (front -> classifier), trained.
        classes: class names, index = output.
        training_sizes: (H, W) sizes of its training images where known (phantoms),
            for the size check of :meth:`read`; None: any size.
        gray8: read files as 8-bit gray (what its training did).
        description: JSON-ready description of the model (pipeline, classifier,
            source); part of :attr:`settings`.
        device: where it runs.

    Raises:
        DACInputError: a classifier that does not take one channel, or whose number
            of outputs is not the number of classes.

    Examples:
        >>> from dac.train import PipelineConfig, build_pipeline
        >>> net = build_pipeline(PipelineConfig(kind="dac", input_size=(20, 37), pool_size=4), width=4)
        >>> p = Predictor(net.eval(), ["0", "1-3", "4-6", "7-11", "12-32"])
        >>> out = p(torch.randint(0, 255, (2, 1, 96, 177), dtype=torch.uint8))
        >>> torch.allclose(out.probabilities.sum(1), torch.ones(2, dtype=torch.float64))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        *,
        training_sizes: Sequence[Sequence[int]] | None = None,
        gray8: bool = True,
        description: dict | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = check_device(device, "device")
        self.model = model.to(self.device).eval()
        self.classes = tuple(str(c) for c in classes)
        self.training_sizes = None if training_sizes is None else tuple(tuple(int(v) for v in s) for s in training_sizes)
        self.gray8 = bool(gray8)
        self.description = dict(description or {})
        _check_model(self.model, self.classes)

    @classmethod
    def load(
        cls, model: str | os.PathLike, *, pipeline: str | None = None, fold: int | None = None,
        device: str | torch.device = "cpu",
    ) -> "Predictor":
        """Load a trained model from a ``dac train`` / ``dac cv`` results folder.

        Args:
            model: the results folder, a pipeline's folder in it (``OUT/dac``), a fold's
                folder (``OUT/dac/fold_0``) or a ``checkpoint.pt`` in one of those.
            pipeline: the pipeline's name, where ``model`` holds several.
            fold: the fold, for a ``dac cv`` folder.
            device: where it runs.

        Raises:
            DACInputError: not a results folder, a pipeline or fold that is not there or
                not named where several are, an unfinished training, a damaged
                checkpoint (truncated, empty, edited) or one that does not fit its
                ``run.json``, or a model whose input does not fit (see the class doc);
                the message starts with ``MODEL`` and names the file.
        """
        from ..train import load_pipeline
        from ..train.config import config_to_dict, load_config

        out, name, fold = _resolve(Path(model), pipeline, fold)
        checkpoint = os.fspath(out / name / (f"fold_{fold}" if fold is not None else "") / "checkpoint.pt")
        run_json = os.fspath(out / "run.json")
        try:
            with warnings.catch_warnings():  # torch on a damaged file: the error below says it
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                net = load_pipeline(out, name, fold)
        except DACInputError as err:
            raise DACInputError(f"MODEL: {err}") from None
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise DACInputError(_damaged(checkpoint, err)) from None
            raise DACInputError(
                f"MODEL: {checkpoint!r} does not fit {run_json!r}: its weights have other shapes than the model "
                "run.json and config.yaml describe (were its classes edited?)"
            ) from None
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, pickle.UnpicklingError) as err:
            raise DACInputError(_damaged(checkpoint, err)) from None
        config = load_config(out / "config.yaml")
        try:
            classes = json.loads((out / "run.json").read_text())["classes"]
            classes = [str(c) for c in classes]
        except (OSError, ValueError, KeyError, TypeError):
            raise DACInputError(f"MODEL: {run_json!r} names no list of classes") from None
        described = config_to_dict(config)
        description = {
            "pipeline": name,
            "pipeline_config": described["pipelines"][name],
            "model_config": described["model"],
            "data": {"source": "phantom" if config.data.source == "phantom" else "files", "gray8": config.data.gray8},
        }
        phantoms = config.data.source == "phantom"
        return cls(net, classes, training_sizes=config.data.sizes if phantoms else None,
                   gray8=phantoms or config.data.gray8, description=description, device=device)

    # ------------------------------------------------------------------ public
    @property
    def settings(self) -> dict:
        """What makes this model's answers: its description, classes, front settings and weights."""
        front = getattr(self.model, "front", None)
        crop = getattr(front, "crop", None)
        return {
            "model": self.description,
            "classes": list(self.classes),
            "front": jobs.module_settings(crop) if isinstance(crop, nn.Module) else type(front).__name__,
            "weights": jobs.weights_digest(self.model),
            "training_sizes": None if self.training_sizes is None else [list(s) for s in self.training_sizes],
            "gray8": self.gray8,
        }

    @torch.no_grad()
    def __call__(self, images: Tensor | Sequence[Tensor]) -> Prediction:
        """Predict a batch: Tensor[B, 1, H, W] (integer or float in [0, 1]) or a list of
        Tensor[1, H, W] of any sizes. Returns a :class:`Prediction` (rows in order)."""
        if isinstance(images, Tensor):
            return self._batch(images)
        images = list(images)
        if not images or not all(isinstance(image, Tensor) and image.ndim == 3 for image in images):
            raise DACInputError("images: expected Tensor[B, 1, H, W] or a non-empty list of Tensor[1, H, W]")

        def part(batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
            result = self._batch(batch)
            return result.probabilities, result.boxes, result.crops, result.frozen

        probabilities, boxes, crops, frozen = by_size(images, part)
        return Prediction(probabilities, boxes, crops, self.classes, frozen)

    def read(self, path: str | os.PathLike, *, any_size: bool = False, dicom: str = "window",
             percentiles: Sequence[float] = (1.0, 99.0)) -> Tensor:
        """Read one file as this model's training read its images: Tensor[1, H, W].

        Raises:
            dac.data.io.ImageReadError: the file cannot be read, or (unless ``any_size``) its
                size does not fit the model (see the module doc).
        """
        return _read_for_model(os.fspath(path), training_sizes=self.training_sizes, any_size=any_size,
                               gray8=self.gray8, dicom=dicom, percentiles=tuple(percentiles))[0]

    def predict_files(self, paths: Sequence[str | os.PathLike], *, any_size: bool = False, **read_options: Any) -> Prediction:
        """Read and predict files (all in memory at once; for archives use :func:`predict_archive`)."""
        return self([self.read(p, any_size=any_size, **read_options) for p in paths])

    def __repr__(self) -> str:
        name = self.description.get("pipeline", type(getattr(self.model, "front", self.model)).__name__)
        return f"Predictor({name!r}, classes={list(self.classes)}, device={str(self.device)!r})"

    # --------------------------------------------------------------- internals
    def _batch(self, images: Tensor) -> Prediction:
        if images.ndim != 4 or images.shape[1] != 1:
            raise DACInputError(f"images: expected Tensor[B, 1, H, W] (one gray channel), got {tuple(images.shape)}")
        front = self.model.front(images.to(self.device))  # one search gives the box and the crop
        logits = self.model.classify(front.crops)
        probabilities = torch.softmax(logits.double(), dim=1)
        frozen = None if front.frozen is None else front.frozen.cpu()
        return Prediction(probabilities.cpu(), front.boxes.float().cpu(), front.crops.float().cpu(), self.classes, frozen)


def _damaged(checkpoint: str, err: BaseException) -> str:
    """The one line for a checkpoint that cannot be loaded (torch's own message is pages long)."""
    return (f"MODEL: {checkpoint!r} is damaged: not a whole checkpoint of dac train or dac cv (truncated, empty or "
            f"edited; {type(err).__name__}); restore it, or run its training again")


def _check_model(model: nn.Module, classes: tuple[str, ...]) -> None:
    """Refuse a network whose classifier does not take one channel or does not give one output per class."""
    classifier = getattr(model, "classifier", model)
    convs = [m for m in classifier.modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[0].in_channels != 1:
        raise DACInputError(
            f"MODEL: its classifier takes {convs[0].in_channels}-channel input; dac predict gives it one gray "
            "channel, as dac train does"
        )
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if linears and linears[-1].out_features != len(classes):
        raise DACInputError(
            f"MODEL: its classifier has {linears[-1].out_features} outputs but {len(classes)} classes ({list(classes)})"
        )


def _resolve(path: Path, pipeline: str | None, fold: int | None) -> tuple[Path, str, int | None]:
    """(results folder, pipeline, fold) named by a folder or checkpoint and the options."""
    if not path.exists():
        raise DACInputError(f"MODEL: {os.fspath(path)!r} does not exist")
    folder = path
    if path.is_file():
        if path.name != "checkpoint.pt":
            raise DACInputError(f"MODEL: {os.fspath(path)!r} is not a checkpoint.pt of dac train or dac cv")
        folder = path.parent
    named_pipeline = named_fold = None
    if (folder / "run.json").is_file():
        out = folder
    elif (folder.parent / "run.json").is_file():
        out, named_pipeline = folder.parent, folder.name
    elif folder.name.startswith("fold_") and (folder.parent.parent / "run.json").is_file():
        out, named_pipeline = folder.parent.parent, folder.parent.name
        try:
            named_fold = int(folder.name[len("fold_"):])
        except ValueError:
            raise DACInputError(f"MODEL: {os.fspath(folder)!r} is not a fold folder (fold_<k>)") from None
    else:
        raise DACInputError(f"MODEL: {os.fspath(path)!r} is not a dac train or dac cv results folder (no run.json)")
    for given, named, what in ((pipeline, named_pipeline, "--pipeline"), (fold, named_fold, "--fold")):
        if given is not None and named is not None and given != named:
            raise DACInputError(f"{what}: {given!r} differs from the one MODEL names ({named!r})")
    pipeline = pipeline if pipeline is not None else named_pipeline
    fold = fold if fold is not None else named_fold
    try:
        command = json.loads((out / "run.json").read_text()).get("command")
    except (OSError, ValueError):
        raise DACInputError(f"MODEL: {os.fspath(out / 'run.json')!r} cannot be read") from None
    if pipeline is None:
        trained = sorted(p.parent.name if command == "train" else p.parent.parent.name
                         for p in out.glob("*/checkpoint.pt" if command == "train" else "*/fold_*/checkpoint.pt"))
        trained = sorted(set(trained))
        if len(trained) != 1:
            found = ", ".join(trained) or "none"
            raise DACInputError(
                f"MODEL: {os.fspath(out)!r} holds trained pipelines: {found}; name one, e.g. "
                f"{os.fspath(out / (trained[0] if trained else 'dac'))!r} (or --pipeline NAME)"
            )
        pipeline = trained[0]
    if command == "cv" and fold is None:
        folds = sorted(p.name for p in (out / pipeline).glob("fold_*") if (p / "checkpoint.pt").is_file())
        raise DACInputError(
            f"MODEL: a dac cv folder holds one model per fold ({', '.join(folds) or 'none trained'}); name one, e.g. "
            f"{os.fspath(out / pipeline / (folds[0] if folds else 'fold_0'))!r} (or --fold K)"
        )
    if command == "train" and fold is not None:
        raise DACInputError(f"--fold: {os.fspath(out)!r} is a dac train folder; it has no folds")
    return out, pipeline, fold


def _read_for_model(path: str, data: bytes | None = None, *, training_sizes, any_size: bool, gray8: bool, dicom: str,
                    percentiles: tuple[float, float]) -> tuple[Tensor, str]:
    """Read one file as the model's training did (one gray channel, 8-bit if it was), checking its size."""
    image, intensity = dio.read_input(path, data, gray=True, gray8=gray8, dicom=dicom, percentiles=percentiles)
    if training_sizes and not any_size:
        h, w = image.shape[-2:]
        if not any(s[0] / SIZE_FACTOR <= h <= s[0] * SIZE_FACTOR and s[1] / SIZE_FACTOR <= w <= s[1] * SIZE_FACTOR
                   for s in training_sizes):
            sizes = ", ".join(f"{s[0]}x{s[1]}" for s in training_sizes)
            raise dio.ImageReadError(
                path, f"image of {h}x{w} (HxW) does not fit the model, trained on images of {sizes}: "
                f"scale it to about that size, or pass --any-size"
            )
    return image, intensity


# ------------------------------------------------------------------ archives
def predict_archive(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    predictor: Predictor,
    *,
    batch_size: int = 8,
    workers: int | str = "auto",
    overlays: bool = False,
    dicom: str = "window",
    percentiles: Sequence[float] = (1.0, 99.0),
    any_size: bool = False,
    progress: bool | None = None,
    shard: tuple[int, int] | str | None = None,
) -> PredictionSummary:
    """Predict every image of ``inputs`` into ``out_dir`` (see the module doc).

    Every argument is checked, and the inputs found, before anything is created.

    Args:
        inputs: files, folders (searched recursively) or glob patterns.
        out_dir: results folder: ``predictions.csv``, ``crops/``, ``settings.json``, and
            ``overlays/`` if asked.
        predictor: the loaded model (:meth:`Predictor.load`); it runs on its device.
        batch_size: images per batch.
        workers: processes decoding files ahead (0: a read-ahead thread of this
            process; ``"auto"``: :func:`dac.jobs.default_workers`).
        overlays: also write each image, downscaled, with its box and predicted class.
        dicom, percentiles: how DICOM values become [0, 1] (:func:`dac.data.io.read_image`).
        any_size: predict images whose size does not fit the model's training sizes.
        progress: show a progress bar (None: only on a terminal).
        shard: ``(i, n)`` or ``"i/n"``: this process's share (see :mod:`dac.jobs.engine`).

    Returns:
        :class:`PredictionSummary`, with the accuracy on the labelled inputs.

    Raises:
        DACInputError: a bad argument, an input that does not exist, an ``out_dir``
            that cannot be written, a ``predictions.csv`` that cannot be kept (or holds
            another model's classes), an ``out_dir`` holding another command's results,
            or another run writing there (of the same shard, or with other settings or
            another shard layout).
        OSError: writing the results failed (a full disk): what was done is kept;
            run again to resume.
        KeyboardInterrupt: after writing the table of what was done (run again to resume).
    """
    if not isinstance(predictor, Predictor):
        raise DACInputError(f"predictor: expected a dac.tasks.predict.Predictor, got {type(predictor).__name__}")
    classes = predictor.classes
    probability_fields = tuple(f"prob_{c}" for c in classes)
    fields = (jobs.ARCHIVE_FIELDS[0] + ("x1", "y1", "x2", "y2", "frozen", "predicted") + probability_fields
              + ("label", "crop") + jobs.ARCHIVE_FIELDS[1])
    settings = {
        "format": PREDICT_FORMAT,
        "read": dio.read_settings(gray=True, gray8=predictor.gray8, dicom=dicom, percentiles=percentiles),
        "predictor": predictor.settings,
        "overlays": bool(overlays),
        "any_size": bool(any_size),
    }
    task = jobs.ArchiveTask(
        table="predictions.csv",
        fields=fields,
        settings=settings,
        read=functools.partial(_read_for_model, training_sizes=predictor.training_sizes, any_size=bool(any_size),
                               gray8=predictor.gray8, dicom=dicom, percentiles=tuple(percentiles)),
        compute=functools.partial(_compute, predictor),
        write=functools.partial(_write, classes=classes, overlays=bool(overlays)),
        outputs=("crop",),
        folders=("crops", "overlays") if overlays else ("crops",),
        products=("crops", "overlays"),
        check_header=functools.partial(_check_header, probability_fields=probability_fields),
        name="dac predict",
    )
    base = jobs.run_archive(inputs, out_dir, task, batch_size=batch_size, workers=workers,
                               device=predictor.device, progress=progress, shard=shard)
    summary = PredictionSummary(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    _count_labelled(Path(out_dir) / "predictions.csv", summary)
    return summary


def _compute(predictor: Predictor, images: Tensor) -> list[tuple[Tensor, Tensor, Tensor, bool | None]]:
    result = predictor(images)
    frozen = [None] * len(images) if result.frozen is None else result.frozen.tolist()
    return [(result.probabilities[k], result.boxes[k], result.crops[k], frozen[k]) for k in range(len(images))]


def _write(out: Path, key: str, image: Tensor, result: tuple, found: str, *, classes: tuple[str, ...], overlays: bool) -> dict[str, str]:
    probabilities, box, crop, frozen = result
    best = int(probabilities.argmax())
    name = f"crops/{jobs.output_name(key)}"
    dio.write_png(out / name, crop, bits=8)
    if overlays:
        dio.write_overlay(out / "overlays" / jobs.output_name(key), image, box,
                              text=f"{classes[best]} ({float(probabilities[best]):.2f})")
    else:
        jobs.discard_outputs(out, key, ("overlays",))  # one from an earlier run shows another answer
    folder = os.path.basename(os.path.dirname(found))  # the class folder as the user laid it out (links not followed)
    x1, y1, x2, y2 = (jobs.number_cell(v) for v in box.tolist())
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "frozen": "" if frozen is None else str(int(frozen)),
            "predicted": classes[best], "crop": name,
            "label": folder if folder in classes else "",
            **{f"prob_{c}": f"{float(p):.6f}" for c, p in zip(classes, probabilities)}}


def _check_header(header: list[str], *, probability_fields: tuple[str, ...]) -> None:
    other = [h for h in header if h.startswith("prob_") and h not in probability_fields]
    if other:
        raise DACInputError(
            f"out_dir: its predictions.csv holds predictions of another model (columns {', '.join(other)}; this "
            f"model's are {', '.join(probability_fields)}); choose another --out"
        )


def _count_labelled(csv_path: Path, summary: PredictionSummary) -> None:
    """Accuracy over the ok rows of this run's inputs whose folder names a class."""
    keys = set(summary.keys)
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
        for row in csv.DictReader(file):
            if row.get("path") in keys and row.get("status") == "ok" and row.get("label"):
                summary.labelled += 1
                summary.correct += row["label"] == row.get("predicted")
