"""What an experiment trains on: the config's dataset and its stratified folds.

The datasets themselves live in :mod:`dac.data.datasets`. Real images are read as one
channel; with ``gray8`` (default) they become 8-bit gray, the paper's preprocessing.
A file that cannot be read stops training with a :class:`dac.DACInputError` naming it
(also from DataLoader worker processes), and :func:`data_digest` identifies what a
dataset holds (file list and labels), so a results folder is never resumed on other data.

Examples:
    >>> folds = stratified_folds([0, 1] * 6, k=3, seed=0)
    >>> [len(test) for test in folds], sorted(np.concatenate(folds).tolist()) == list(range(12))
    ([4, 4, 4], True)
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .._checks import DACInputError
from ..data.datasets import DistractorDataset, ImageFolderDataset, ImageLabelDataset, PhantomDataset
from ..data.phantoms import CLASS_NAMES
from .config import DataConfig

__all__ = [
    "ReadableImages",
    "build_dataset",
    "data_digest",
    "holdout_split",
    "stratified_folds",
]


def build_dataset(config: DataConfig, seed: int = 0, *, min_side: int = 1) -> ReadableImages:
    """The dataset a config names: generated phantoms, or a folder / CSV of real images.

    Args:
        config: ``source`` is ``"phantom"`` (``length`` phantoms of ``sizes``, classes
            balanced, seeded by ``seed``), ``"distractors"`` (the same, of
            :class:`~dac.data.datasets.DistractorDataset` scenes) or a path (folder of class folders, or CSV of
            ``path,label``; see :class:`dac.data.datasets.ImageFolderDataset`).
        seed: the phantom dataset's seed.
        min_side: the least height and width an image may have (what the run's pipelines
            need: two pooling windows per side for DAC); a smaller one is an item that
            cannot be read, naming the file (:class:`ReadableImages`).

    Returns:
        An :class:`ImageLabelDataset` with ``labels`` and ``classes``.

    Raises:
        DACInputError: the source does not exist, lists no images, or has one class.
    """
    if config.regions is not None and config.source in ("phantom", "distractors"):
        raise DACInputError(f"data.regions: generated data ({config.source}) carries its own regions; "
                            "data.regions is for a folder or a CSV of images")
    if config.source == "phantom":
        base: Dataset = PhantomDataset(config.length, seed=seed, sizes=config.sizes, bits=8)
        classes: Sequence[str] = CLASS_NAMES
    elif config.source == "distractors":
        base = DistractorDataset(config.length, seed=seed, sizes=config.sizes)
        classes = base.classes
    else:
        from ..data.io import read_image, to_gray8

        if not Path(config.source).exists():
            raise DACInputError(f"data.source: {config.source!r} does not exist (expected 'phantom', a folder or a CSV)")

        reader = functools.partial(read_image, gray=True)
        if config.regions is not None and not Path(config.regions).is_file():
            raise DACInputError(f"data.regions: {config.regions!r} is not a file (expected a CSV of path,x1,y1,x2,y2)")
        base = ImageFolderDataset(config.source, reader=reader, transform=to_gray8 if config.gray8 else None,
                                  regions=config.regions)
        classes = base.classes
    dataset = ReadableImages(base, classes, min_side=min_side)
    if len(set(dataset.labels)) < 2:
        raise DACInputError(f"data: {config.source!r} has fewer than two classes")
    return dataset


class ReadableImages(ImageLabelDataset):
    """:class:`~dac.data.datasets.ImageLabelDataset` whose items report a file that cannot be read.

    An item that fails to load is ``{"image": None, "label": ..., "error": "'<path>':
    <reason>"}`` instead of an exception, so the reason travels back from DataLoader
    worker processes as one line; the training loops turn it into a
    :class:`dac.DACInputError`. So is an image smaller than ``min_side`` in height or
    width (the pipelines' need: a front would refuse it without naming the file).
    """

    def __init__(self, base: Dataset, classes: Sequence[str], *, min_side: int = 1) -> None:
        super().__init__(base, classes)
        self.min_side = min_side

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            item = super().__getitem__(index)
        except (KeyboardInterrupt, IndexError, TypeError):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to decode names the file
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            return self._failed(index, reason)
        height, width = item["image"].shape[-2:]
        if min(height, width) < self.min_side:
            return self._failed(index, self._too_small(height, width))
        return item

    def check_headers(self) -> None:
        """Check every file of a folder or CSV from its header alone (:func:`dac.data.io.probe_image`):
        that it opens as an image, is at least ``min_side`` on each side and holds its true
        region (where given). A run whose images are read lazily, batch by batch, meets a
        bad file here, in seconds, rather than when its batch comes, hours into training.
        (Pixel data are not decoded: a file broken past its header still fails when read.)

        Raises:
            DACInputError: naming the first bad file and how many more there are.
        """
        base = self.base
        if not isinstance(base, ImageFolderDataset):
            return
        from ..data.io import ImageReadError, probe_image

        bad = []
        for index, (path, _) in enumerate(base.samples):
            try:
                height, width = probe_image(path)
            except ImageReadError as err:
                bad.append(f"{path!r}: {err.reason}")
                continue
            if min(height, width) < self.min_side:
                bad.append(f"{path!r}: {self._too_small(height, width)}")
            elif base.boxes is not None and (base.boxes[index][2] > width or base.boxes[index][3] > height):
                bad.append(f"{path!r}: its region {base.boxes[index]} is not inside its {width}x{height} image")
        if bad:
            more = f" (and {len(bad) - 1} more; every file's header is checked before training)" if len(bad) > 1 else ""
            raise DACInputError(f"data: cannot read {bad[0]}{more}")

    def _too_small(self, height: int, width: int) -> str:
        side = self.min_side
        return f"{height}x{width} pixels, smaller than the {side}x{side} the run's pipelines need (two pooling windows per side)"

    def _failed(self, index: int, reason: str) -> dict[str, Any]:
        samples = getattr(self.base, "samples", None)
        where = repr(samples[index][0]) if samples is not None else f"item {index}"
        return {"image": None, "label": int(self.labels[index]), "error": f"{where}: {reason}"}


def data_digest(dataset: ImageLabelDataset) -> str:
    """A short hash of what a dataset holds: its classes and every item's label, and for
    files their paths (relative to the folder or CSV), sizes and true regions (where
    given); for phantoms their recipe.

    Files edited in place without a change of size are not noticed (nothing is read).

    Examples:
        >>> from dac.data.datasets import PhantomDataset
        >>> a = ImageLabelDataset(PhantomDataset(10, sizes=((96, 177),)), ["a"] * 5)
        >>> b = ImageLabelDataset(PhantomDataset(11, sizes=((96, 177),)), ["a"] * 5)
        >>> data_digest(a) == data_digest(a) != data_digest(b)
        True
    """
    base = dataset.base
    items: list[Any]
    if isinstance(base, ImageFolderDataset):
        root = base.root if base.root.is_dir() else base.root.parent
        items = []
        for path, label in base.samples:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            rel = os.path.relpath(path, root) if Path(path).is_relative_to(root) else str(path)
            items.append([rel, int(label), size])
        if base.boxes is not None:  # the true regions, where given, are part of the data
            items.append(base.boxes)
    elif isinstance(base, (PhantomDataset, DistractorDataset)):
        items = [repr(base), list(map(int, dataset.labels))]
    else:
        items = [type(base).__name__, len(dataset), list(map(int, dataset.labels))]
    text = json.dumps({"classes": list(dataset.classes), "items": items}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_errors(items: list[dict[str, Any]]) -> list[str]:
    """The ``error`` of every item of a batch that could not be read (:class:`ReadableImages`)."""
    return [item["error"] for item in items if item.get("error")]


def cannot_read(errors: list[str]) -> DACInputError:
    """The one-line error for a batch with unreadable items."""
    more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
    return DACInputError(f"data: cannot read {errors[0]}{more}")


def stratified_folds(labels: Sequence[int], k: int, seed: int = 0) -> list[np.ndarray]:
    """The test indices of each fold of a shuffled, stratified k-fold split (scikit-learn's).

    Args:
        labels: N class labels.
        k: folds (paper: 10); every class needs at least k samples.
        seed: shuffling seed.

    Returns:
        k sorted int arrays; together they hold every index once.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if k < 2 or present.min() < k:
        raise DACInputError(f"folds: {k} folds need at least {k} images per class; the smallest class has {present.min()}")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [np.sort(test) for _, test in splitter.split(np.zeros(len(labels)), labels)]


def holdout_split(labels: Sequence[int], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with a stratified ``fraction`` held out (test empty when 0).

    Raises:
        DACInputError: a split that cannot hold every class on both sides: a class with
            one image, or fewer held-out (or training) images than classes.

    Examples:
        >>> [part.tolist() for part in holdout_split([0, 0, 1, 1], 0.5)]
        [[1, 2], [0, 3]]
    """
    labels = np.asarray(labels)
    if fraction == 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    counts = np.bincount(labels)
    present = counts[counts > 0]
    held = math.ceil(fraction * len(labels))
    if present.min() < 2 or min(held, len(labels) - held) < present.size:
        raise DACInputError(
            f"train.holdout: holding out {fraction:g} of {len(labels)} images ({held}) cannot keep each of the "
            f"{present.size} classes on both sides (the smallest class has {present.min()} image(s)); "
            "give more images, or holdout: 0 to train on all of them"
        )
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)
