"""Datasets: generated phantoms and real images with labels, in-memory caches, collation.

Every dataset yields dicts with at least ``{"image": Tensor[C, H, W], "label": int}``;
images of different sizes are batched as lists (:func:`collate_images`), which
``DACrop`` accepts.

Convention: boxes (``roi``) are xyxy in input pixel coordinates (torchvision's).
"""
from __future__ import annotations

import os
import operator
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._checks import DACInputError, check_int
from .._files import first_copy, shown_path
from .distractors import DISTRACTOR_CLASSES, distractor_class, make_distractor_scene
from .io import IMAGE_SUFFIXES, looks_like_dicom, read_image
from .phantoms import CLASS_NAMES, MIN_SIZE, make_phantom, phantom_class
from .tables import read_box_rows, read_csv_rows

__all__ = [
    "DistractorDataset",
    "ImageFolderDataset",
    "ImageLabelDataset",
    "MemoryDataset",
    "PhantomDataset",
    "collate_images",
]


class PhantomDataset(Dataset):
    """A seeded, indexable set of :func:`make_phantom` phantoms (generated on access).

    Item ``i`` is ``make_phantom(seed * 1_000_003 + i, *sizes[i % len(sizes)],
    label=i % 5 if balanced else None, bits=bits)``.

    Convention: ``roi`` is xyxy in input pixel coordinates (torchvision's).

    Args:
        length: number of items, >= 0.
        seed: dataset seed, >= 0.
        sizes: (H, W) pairs cycled over the items (default: the paper's two sizes).
        bits: 8 (uint8 images) or 16 (uint16).
        transform: applied to each image Tensor[1, H, W] (raw dtype), or None.
        balanced: classes cycle 0..4 (exactly balanced); else each is drawn uniformly.

    Examples:
        >>> ds = PhantomDataset(5, sizes=((96, 177),))
        >>> item = ds[3]
        >>> item["image"].shape, item["label"], ds.labels
        (torch.Size([1, 96, 177]), 3, [0, 1, 2, 3, 4])
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int = 0,
        sizes: Sequence[Sequence[int]] = ((1536, 2836), (1536, 2860)),
        bits: int = 8,
        transform: Callable[[Tensor], Any] | None = None,
        balanced: bool = True,
    ) -> None:
        self.length = check_int(length, "length", 0)
        self.seed = check_int(seed, "seed", 0)
        self.sizes = _check_sizes(sizes)
        if isinstance(bits, bool) or bits not in (8, 16):
            raise DACInputError(f"bits: expected 8 or 16, got {bits!r}")
        self.bits = bits
        if transform is not None and not callable(transform):
            raise DACInputError(f"transform: expected a callable or None, got {type(transform).__name__}")
        self.transform = transform
        self.balanced = bool(balanced)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = _item_index(index, self.length)
        height, width = self.sizes[i % len(self.sizes)]
        label = i % len(CLASS_NAMES) if self.balanced else None
        p = make_phantom(self.item_seed(i), height, width, label=label, bits=self.bits)
        image = p.image if self.transform is None else self.transform(p.image)
        return {"image": image, "label": p.label, "roi": p.roi, "restorations": p.restorations, "index": i}

    def item_seed(self, index: int) -> int:
        """The :func:`make_phantom` seed of item ``index``."""
        return self.seed * 1_000_003 + _item_index(index, self.length)

    @property
    def labels(self) -> list[int]:
        """Every item's class, computed without drawing any image."""
        if self.balanced:
            return [i % len(CLASS_NAMES) for i in range(self.length)]
        return [phantom_class(self.item_seed(i))[0] for i in range(self.length)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(length={self.length}, seed={self.seed}, sizes={self.sizes}, "
            f"bits={self.bits}, transform={self.transform!r}, balanced={self.balanced})"
        )


class DistractorDataset(Dataset):
    """A seeded, indexable set of :func:`~dac.data.distractors.make_distractor_scene` scenes.

    Item ``i`` is ``make_distractor_scene(seed * 1_000_003 + i, *sizes[i % len(sizes)],
    label=i % 5)`` (classes exactly balanced): ``{"image", "label", "roi", "count", "index"}``.

    Convention: ``roi`` is xyxy in input pixel coordinates (torchvision's).

    Args:
        length: number of items, >= 0.
        seed: dataset seed, >= 0.
        sizes: (H, W) pairs cycled over the items.

    Examples:
        >>> ds = DistractorDataset(5, sizes=((96, 177),))
        >>> item = ds[3]
        >>> item["image"].shape, item["label"], item["count"] in (6, 7), ds.labels
        (torch.Size([1, 96, 177]), 3, True, [0, 1, 2, 3, 4])
    """

    classes = DISTRACTOR_CLASSES

    def __init__(self, length: int, *, seed: int = 0, sizes: Sequence[Sequence[int]] = ((192, 354),)) -> None:
        self.length = check_int(length, "length", 0)
        self.seed = check_int(seed, "seed", 0)
        self.sizes = _check_sizes(sizes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = _item_index(index, self.length)
        height, width = self.sizes[i % len(self.sizes)]
        s = make_distractor_scene(self.seed * 1_000_003 + i, height, width, label=i % len(DISTRACTOR_CLASSES))
        return {"image": s.image, "label": s.label, "roi": s.roi, "count": s.count, "index": i}

    @property
    def labels(self) -> list[int]:
        """Every item's class."""
        return [i % len(DISTRACTOR_CLASSES) for i in range(self.length)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length}, seed={self.seed}, sizes={self.sizes})"


class ImageFolderDataset(Dataset):
    """Real images with class labels, from class sub-folders or from a CSV of ``path,label``.

    * A directory: one sub-folder per class; classes are the sorted folder names
      (torchvision's ``ImageFolder`` rule), and each folder's images (suffixes in
      :data:`dac.data.io.IMAGE_SUFFIXES`, any case, searched recursively, and DICOM files
      named without one: :func:`dac.data.io.looks_like_dicom`) are taken in sorted order;
      one file reached twice (a link) is an error.
    * From either: two files with the same bytes (one image saved twice, under two names)
      are an error too — a fold would train and test on it. Only files of equal size
      are read to compare them.
    * A ``.csv`` file: rows ``path,label``; an optional first row ``path,label`` is a
      header. Relative paths are resolved against the CSV's folder; each image once (a
      second row for the same file is an error: folds would share it). Labels are either
      all ints (class indices; ``classes`` is ``"0".."max"``) or class names (sorted
      names give the indices).

    Names that are all among the paper's :data:`CLASS_NAMES` map to their paper index
    (``"12-32"`` is class 4, not the 3rd name in string order), so ``classes`` is then
    :data:`CLASS_NAMES`.

    With ``regions`` (a ``path,x1,y1,x2,y2`` table, :func:`dac.data.tables.read_box_rows`:
    the one ``dac fit-saliency --data`` reads) every item also carries its true region
    ``roi`` (Tensor[4] float32, xyxy in input pixels), as generated data does: what the
    ``oracle`` pipeline crops and what box benchmarks compare with. Every image needs a
    row; rows for other files are ignored. The box is checked against the image when the
    item is read (``transform`` must keep the image's geometry).

    Args:
        root_or_csv: a directory of class folders, or a ``.csv`` file.
        transform: applied to each image Tensor[C, H, W] from ``reader``, or None.
        reader: ``path -> Tensor[C, H, W]``; default :func:`dac.data.io.read_image`
            (imported on first use).
        regions: a table of every image's true region, or None.

    Attributes:
        classes: class names, index = label.
        samples: list of (path, label), path a str.
        labels: list of every sample's label.
        boxes: every sample's region ``[x1, y1, x2, y2]`` (with ``regions``), else None.

    Examples:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory(); root = pathlib.Path(tmp.name)
        >>> for name in ("b/x.png", "a/y.png", "a/z.PNG"):
        ...     (root / name).parent.mkdir(exist_ok=True); (root / name).touch()
        >>> ds = ImageFolderDataset(root, reader=lambda path: torch.zeros(1, 2, 2))
        >>> ds.classes, ds.labels, ds[2]["label"]
        (['a', 'b'], [0, 0, 1], 1)
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        root_or_csv: str | Path,
        *,
        transform: Callable[[Tensor], Any] | None = None,
        reader: Callable[[str], Tensor] | None = None,
        regions: str | Path | None = None,
    ) -> None:
        if not isinstance(root_or_csv, (str, Path)):
            raise DACInputError(f"root_or_csv: expected a path, got {type(root_or_csv).__name__}")
        source = Path(root_or_csv)
        if source.is_dir():
            self.classes, self.samples = _scan_folders(source)
        elif source.is_file() and source.suffix.lower() == ".csv":
            self.classes, self.samples = _read_csv(source)
        elif source.exists():
            raise DACInputError(f"root_or_csv: expected a directory or a .csv file, got {str(source)!r}")
        else:
            raise DACInputError(f"root_or_csv: {str(source)!r} does not exist")
        copy = first_copy(sorted(path for path, _ in self.samples))
        if copy is not None:  # one image exported twice: in two folds (or two classes)
            raise DACInputError(f"root_or_csv: '{shown_path(copy[0])}' and '{shown_path(copy[1])}' hold the same bytes "
                                "(one image saved twice); keep one (a cross-validation fold would train and test on it)")
        for name, fn in (("transform", transform), ("reader", reader)):
            if fn is not None and not callable(fn):
                raise DACInputError(f"{name}: expected a callable or None, got {type(fn).__name__}")
        self.root = source
        self.transform = transform
        self.reader = reader
        self.boxes = None if regions is None else _boxes_of(self.samples, regions)

    @property
    def labels(self) -> list[int]:
        """Every sample's label, in order."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _item_index(index, len(self.samples))
        path, label = self.samples[index]
        image = (self.reader or read_image)(path)
        if self.transform is not None:
            image = self.transform(image)
        item = {"image": image, "label": label, "path": path}
        if self.boxes is not None:
            box = self.boxes[index]
            height, width = image.shape[-2:]
            if box[2] > width or box[3] > height:
                raise DACInputError(f"regions: the box {box} of {shown_path(path)!r} is not inside its {width}x{height} image")
            item["roi"] = torch.tensor(box, dtype=torch.float32)
        return item

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} images, classes={self.classes})"


def collate_images(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate dataset items; images of different sizes stay a list.

    Tensors (``image``, ``roi``) are stacked when all have one shape, else kept as a
    list (``DACrop`` takes a list of differently sized Tensor[C, H, W]); ints
    (``label``, ``restorations``, ``index``) become an int64 Tensor[B]; anything else
    (``path``) a list.

    Args:
        batch: list of B item dicts with the same keys.

    Returns:
        dict with the same keys: e.g. ``image`` Tensor[B, C, H, W] or list of
        Tensor[C, H, W], ``label`` Tensor[B], ``roi`` Tensor[B, 4].

    Examples:
        >>> items = [{"image": torch.zeros(1, 4, 6), "label": 2}, {"image": torch.zeros(1, 5, 6), "label": 0}]
        >>> out = collate_images(items)
        >>> type(out["image"]).__name__, out["label"]
        ('list', tensor([2, 0]))
    """
    if not isinstance(batch, Sequence) or len(batch) == 0:
        raise DACInputError("batch: expected a non-empty list of item dicts")
    if not all(isinstance(item, dict) for item in batch):
        raise DACInputError("batch: every item must be a dict")
    keys = list(batch[0])
    for n, item in enumerate(batch):
        if list(item) != keys:
            raise DACInputError(f"batch: item {n} has keys {sorted(item)}, item 0 has {sorted(keys)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch]
        if all(isinstance(v, Tensor) for v in values):
            same = all(v.shape == values[0].shape and v.dtype == values[0].dtype for v in values)
            out[key] = torch.stack(values) if same else values
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor([int(v) for v in values], dtype=torch.int64)
        else:
            out[key] = values
    return out


class ImageLabelDataset(Dataset):
    """A view of a dataset whose items are dicts with ``image`` and ``label``: just those
    two, and the true region ``roi`` (Tensor[4], xyxy) where the base knows it.

    Args:
        base: a dataset with ``.labels`` (:class:`PhantomDataset`,
            :class:`ImageFolderDataset`).
        classes: class names, index = label.
    """

    def __init__(self, base: Dataset, classes: Sequence[str]) -> None:
        self.base = base
        self.classes = list(classes)
        self.labels = list(base.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        out = {"image": item["image"], "label": int(item["label"])}
        if "roi" in item:
            out["roi"] = item["roi"]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"


class MemoryDataset(Dataset):
    """Images (or a front's cached outputs) held in memory, with their labels.

    Args:
        images: a list of Tensor[C, H, W] (any sizes) or one Tensor[N, C, h, w].
        labels: N ints.
        classes: class names.
        dtype: if given, items are converted to it (e.g. float16 caches -> float32).
        key: the item key of the tensors: ``"image"`` for raw images, ``"crop"`` for a
            front's outputs (what the training engine passes on to the classifier).
        regions: N true regions Tensor[4] (xyxy, input pixels) given to items as ``roi``,
            or None.

    Examples:
        >>> MemoryDataset(torch.zeros(2, 1, 4, 6), [0, 1], ["a", "b"], key="crop")[1]["label"]
        1
    """

    def __init__(self, images: Sequence[Tensor] | Tensor, labels: Sequence[int], classes: Sequence[str],
                 dtype: torch.dtype | None = None, key: str = "image", regions: Sequence[Tensor] | None = None) -> None:
        if len(images) != len(labels):
            raise DACInputError(f"images, labels: expected one label per image, got {len(images)} images and {len(labels)} labels")
        if key not in ("image", "crop"):
            raise DACInputError(f"key: expected 'image' or 'crop', got {key!r}")
        self.images = images
        self.labels = list(labels)
        self.classes = list(classes)
        self.dtype = dtype
        self.key = key
        if regions is not None and len(regions) != len(labels):
            raise DACInputError(f"regions: expected one region per image, got {len(regions)} for {len(labels)} images")
        self.regions = regions

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        if self.dtype is not None:
            image = image.to(self.dtype)
        item = {self.key: image, "label": self.labels[index]}
        if self.regions is not None:
            item["roi"] = self.regions[index]
        return item


def _check_sizes(sizes: Any) -> tuple[tuple[int, int], ...]:
    try:
        pairs = [tuple(s) for s in sizes]
    except TypeError:
        raise DACInputError(f"sizes: expected a list of (height, width) pairs, got {sizes!r}") from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise DACInputError(f"sizes: expected a non-empty list of (height, width) pairs, got {sizes!r}")
    return tuple((check_int(h, "sizes (height)", MIN_SIZE), check_int(w, "sizes (width)", MIN_SIZE)) for h, w in pairs)


def _item_index(index: Any, length: int) -> int:
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"index: expected an int, got {type(index).__name__}") from None
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index: {index} out of range for {length} items")
    return i


def _class_order(names: list[str]) -> list[str]:
    """Sorted class names; the paper's names (a subset of CLASS_NAMES) keep the paper's order."""
    if set(names) <= set(CLASS_NAMES):
        return list(CLASS_NAMES)
    return sorted(set(names))


def _is_image(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or looks_like_dicom(path))


def _scan_folders(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DACInputError(f"root_or_csv: no class sub-folders in {str(root)!r}")
    classes = _class_order(folders)
    samples = []
    for name in folders:
        files = sorted(p for p in (root / name).rglob("*") if _is_image(p))
        if not files:
            raise DACInputError(
                f"root_or_csv: class folder {str(root / name)!r} holds no images "
                f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        samples += [(str(p), classes.index(name)) for p in files]
    seen: dict[str, str] = {}  # resolved file -> the path it was found by
    for path, _ in samples:  # a link to one file from two folders: two classes, two folds
        first = seen.setdefault(os.path.realpath(path), path)
        if first != path:
            raise DACInputError(f"root_or_csv: '{shown_path(first)}' and '{shown_path(path)}' are the same file "
                                "(a link); keep one (a cross-validation fold would train and test on it)")
    samples.sort(key=lambda s: (s[1], s[0]))
    return classes, samples


_HEADER = {"path", "file", "filename", "image", "image_path", "filepath"}


def _read_csv(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    rows = []
    seen: dict[str, int] = {}  # resolved file -> its line
    for line, fields in read_csv_rows(path, "root_or_csv"):
        if line == 1 and fields[0].lower() in _HEADER:
            continue
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise DACInputError(f"root_or_csv: {str(path)!r} line {line}: expected 'path,label', got {fields!r}")
        file = Path(fields[0]) if Path(fields[0]).is_absolute() else path.parent / fields[0]
        if not file.is_file():
            raise DACInputError(f"root_or_csv: {str(path)!r} line {line}: no such file '{shown_path(str(file))}'")
        first = seen.setdefault(os.path.realpath(file), line)
        if first != line:  # in two folds it would be trained and tested on (or hold two labels)
            raise DACInputError(f"root_or_csv: {str(path)!r} lines {first} and {line}: '{shown_path(str(file))}' "
                                "listed twice (a cross-validation fold would train and test on it); list each image once")
        rows.append((line, str(file), fields[1]))
    if not rows:
        raise DACInputError(f"root_or_csv: {str(path)!r} lists no images")
    if all(re.fullmatch(r"\d+", label) for _, _, label in rows):
        labels = [int(label) for _, _, label in rows]
        classes = [str(c) for c in range(max(labels) + 1)]
    else:
        for line, _, label in rows:
            if re.fullmatch(r"[+-]?\d+", label) and label.startswith("-"):
                raise DACInputError(f"root_or_csv: {str(path)!r} line {line}: negative label {label!r}")
        classes = _class_order([label for _, _, label in rows])
        labels = [classes.index(label) for _, _, label in rows]
    return classes, [(file, label) for (_, file, _), label in zip(rows, labels)]


def _boxes_of(samples: list[tuple[str, int]], regions: str | Path) -> list[list[float]]:
    """Each sample's box from a ``path,x1,y1,x2,y2`` table, matched by the file's resolved path."""
    if not isinstance(regions, (str, Path)):
        raise DACInputError(f"regions: expected a path to a .csv file or None, got {type(regions).__name__}")
    if not Path(regions).is_file():
        raise DACInputError(f"regions: {str(regions)!r} is not a file (expected a CSV of path,x1,y1,x2,y2)")
    # (read_box_rows refuses a second, different box for a file.)
    table = {os.path.realpath(file): box for _, file, box in read_box_rows(regions, "regions")}
    missing = [path for path, _ in samples if os.path.realpath(path) not in table]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DACInputError(f"regions: {str(regions)!r} has no box for '{shown_path(missing[0])}'{more}")
    return [table[os.path.realpath(path)] for path, _ in samples]
