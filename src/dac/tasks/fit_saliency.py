"""The ``dac fit-saliency`` task: train a saliency stage from labelled boxes and save it.

* :func:`train_saliency` — phantoms (or a CSV of labelled images) -> features -> the fit
  through the box -> ``OUT/saliency.pt`` and ``OUT/fit.json``.
* :func:`read_labelled_images` — the ``path,x1,y1,x2,y2`` CSV, read as ``dac crop`` reads
  its inputs.
* :func:`check_fit_out` — a trained stage is never replaced without asking.

Progress goes to the ``logging`` logger ``dac.saliency`` (INFO): the features of each
image, then every :data:`~dac.saliency.fit.LOG_EVERY` steps of the warm start and of the
box steps; ``dac fit-saliency`` prints it unless ``--quiet``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .._checks import DACInputError, check_int
from ..layer import DACrop
from ..saliency import (
    FIT_DEFAULTS, LEARNED_DEFAULTS, FitHistory, FitOptions, SaliencyNet, fit_saliency, init_generator, labelled_fit,
    saliency_features, save_saliency,
)

__all__ = ["BOXES_NOTE_SHARE", "check_fit_out", "read_labelled_images", "train_saliency"]

_log = logging.getLogger("dac.saliency")

#: ``fit.json``'s ``boxes_note`` calls frozen or unconverged boxes many above this share
#: of the boxes searched in training (phantoms at the defaults: ~2 % frozen, ~1 % unconverged).
BOXES_NOTE_SHARE = 0.1


def train_saliency(
    out_dir: str | Path,
    options: FitOptions | None = None,
    *,
    count: int = FIT_DEFAULTS["count"],
    data: str | Path | None = None,
    seed: int = 0,
    image_size: Sequence[int] = (1536, 2836),
    output_size: Sequence[int] = (200, 370),
    pool_size: int = 10,
    r_min_fraction: float = LEARNED_DEFAULTS["r_min_fraction"],
    sharpness_factor: float = LEARNED_DEFAULTS["sharpness_factor"],
    search: str = LEARNED_DEFAULTS["search"],
    width: int = 16,
    members: int = FIT_DEFAULTS["members"],
    overwrite: bool = False,
    flags: bool = False,
    **changes: Any,
) -> dict[str, Any]:
    """Train a :class:`~dac.saliency.SaliencyNet` from labelled boxes and save it:
    what ``dac fit-saliency`` runs.

    Every argument is checked here, before any work. One ``seed`` fixes the phantoms,
    the stage's initial weights (:func:`~dac.saliency.init_generator`) and every batch,
    flip, stretch and shift (:func:`~dac.saliency.random_stream`): the same arguments on
    the same machine and thread count give bitwise the same ``saliency.pt`` (unless a
    ``time_limit`` cuts the fit at a machine-dependent step).

    Args:
        out_dir: writes ``saliency.pt`` (atomically; read with :func:`~dac.saliency.load_dacrop`
            or :func:`~dac.saliency.load_saliency`) and ``fit.json``.
        options: how it trains (:class:`~dac.saliency.FitOptions`; default its defaults,
            :data:`~dac.saliency.FIT_DEFAULTS`); ``**changes`` replace some (``steps=30``).
        count: generated phantoms to train on (used when ``data`` is None).
        data: a CSV of ``path,x1,y1,x2,y2`` of real images (:func:`read_labelled_images`).
        seed: phantoms, initial weights, batches and augmentation (an int >= 0).
        image_size: (H, W) of the phantoms.
        output_size, pool_size, r_min_fraction, sharpness_factor, search: the ``DACrop``
            the stage is trained with, stored with it and used again by ``load_dacrop``.
        width: the net's hidden channels (per member).
        members: gates trained side by side and averaged (:class:`~dac.saliency.SaliencyNet`).
        overwrite: replace a ``saliency.pt`` already in ``out_dir`` (else DACInputError).
        flags: name the arguments as ``dac fit-saliency``'s options in errors.

    Returns:
        The summary written to ``fit.json``: what was trained on, the steps, losses,
        seconds, the boxes searched in training and how many were frozen or unconverged
        (``boxes_note`` says whether that is many), and how the trained stage's boxes fit
        its own labelled regions (:func:`~dac.saliency.labelled_fit`).

    Raises:
        DACInputError: a bad argument, naming it, before anything is computed or written.
    """
    from ..jobs import check_out_dir

    def name(argument: str) -> str:
        return "--" + argument.replace("_", "-") if flags else argument

    out = check_out_dir(out_dir, "--out" if flags else "out_dir")
    check_fit_out(out, overwrite, flags=flags)
    options = FitOptions.of(options, **changes)
    seed = check_int(seed, name("seed"), 0)
    members = check_int(members, name("members"), 1)
    if data is None:
        count = check_int(count, name("count"), 1)
        height, width_px = (check_int(v, name("image_size"), 64) for v in image_size)
    net = SaliencyNet(pool_size=pool_size, width=width, members=members, generator=init_generator(seed))
    layer = DACrop(output_size, pool_size, saliency=net, r_min_fraction=r_min_fraction, sharpness_factor=sharpness_factor,
                   search=search)
    if data is None:
        features, regions, sizes = _phantoms(count, seed, height, width_px, pool_size)
        source = f"{count} phantoms of {height}x{width_px}, seed {seed}"
    else:
        features, regions, sizes = read_labelled_images(data, pool_size)
        source = f"{len(features)} images from {data}"
    _log.info("training on %s: %s", source,
              (f"{options.mask_steps} warm-start steps, then " if options.mask_steps else "") + f"{options.steps} steps through the box")
    history = fit_saliency(net, features, regions, sizes, layer, options, seed=seed)
    settings = {"output_size": list(layer.output_size), "pool_size": pool_size, "r_min_fraction": r_min_fraction,
                "sharpness_factor": sharpness_factor, "search": layer.search_method}
    summary = {
        "source": source, "images": len(features), "seed": seed, "members": net.members,
        "mask_steps": history.mask_steps, "steps": history.steps, "seconds": round(history.seconds, 1),
        "first_loss": history.loss[0] if history.loss else None,
        "last_loss": float(np.mean(history.loss[-10:])) if history.loss else None,
        **_box_counts(history), "clipped_steps": history.clipped,
        **labelled_fit(net, layer, features, regions), "dacrop": settings,
        # how it trained (non-finite numbers as text: JSON has none)
        "options": {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in dataclasses.asdict(options).items()},
    }
    save_saliency(net, out / "saliency.pt", dacrop=json.dumps(settings), source=source)
    from .._files import write_json

    write_json(out / "fit.json", summary)
    return summary


def _phantoms(count: int, seed: int, height: int, width: int, pool_size: int) -> tuple[list[Tensor], Tensor, list[tuple[int, int]]]:
    """Features, regions and sizes of ``count`` phantoms of ``seed`` (phantom ``seed * 1000003 + i``)."""
    from ..data.phantoms import make_phantom

    features, regions = [], []
    for i in range(count):
        p = make_phantom(seed * 1_000_003 + i, height, width)
        features.append(saliency_features(p.image[None], pool_size)[0])
        regions.append(p.roi)
        _log.info("features of phantom %d/%d", i + 1, count)
    return features, torch.stack(regions), [(height, width)] * count


def _box_counts(history: FitHistory) -> dict[str, Any]:
    """``fit.json``'s counts of the boxes searched in training, with a note on whether they are many."""
    searched = max(history.boxes, 1)
    frozen, unconverged = history.frozen / searched, history.unconverged / searched
    many = max(frozen, unconverged) > BOXES_NOTE_SHARE
    note = (
        f"{'many' if many else 'fine'}: of the {history.boxes} boxes searched in training, {100 * frozen:.1f} % were frozen "
        f"(a map with no strict maximum: no gradient) and {100 * unconverged:.1f} % unconverged (an approximate gradient); "
        f"phantoms at the defaults give ~2 % and ~1 %; above {100 * BOXES_NOTE_SHARE:.0f} % "
        + ("the fit learned from fewer boxes than it searched: check the labels (xyxy, input pixels), --pool-size and "
           "--min-width" if many else "the fit would learn from fewer boxes than it searches")
    )
    return {"boxes_searched": history.boxes, "frozen_boxes": history.frozen, "unconverged_boxes": history.unconverged,
            "boxes_note": note}


def check_fit_out(out_dir: str | Path, overwrite: bool, *, flags: bool = False) -> None:
    """Raise :class:`DACInputError` if ``out_dir`` already holds a ``saliency.pt`` and
    ``overwrite`` is False: a trained stage (minutes of training) is never replaced
    without asking. ``flags`` names ``dac fit-saliency``'s options.

    Examples:
        >>> import tempfile
        >>> check_fit_out(tempfile.mkdtemp(), overwrite=False)  # an empty folder: fine
    """
    stage = Path(out_dir) / "saliency.pt"
    if not overwrite and (stage.exists() or stage.is_symlink()):
        out, again = ("--out", "--overwrite") if flags else ("out_dir", "overwrite=True")
        raise DACInputError(f"{out}: {str(out_dir)!r} already holds saliency.pt (a trained stage); "
                            f"choose another folder, or {again} to replace it")


def read_labelled_images(csv_path: str | Path, pool_size: int) -> tuple[list[Tensor], Tensor, list[tuple[int, int]]]:
    """Features, regions and sizes of the images a ``path,x1,y1,x2,y2`` CSV lists.

    The CSV: one image per row, its labelled region xyxy in input pixels; an optional
    header row ``path,x1,y1,x2,y2``; relative paths from the CSV's folder; read by
    :func:`dac.data.tables.read_box_rows` (UTF-8 with or without a BOM, bytes that are
    not UTF-8, such as a Latin-1 file name, kept as the file system's bytes). Each image is read as ``dac crop`` reads
    it (:func:`dac.data.io.read_input`: 8- and 16-bit PNG, TIFF, JPEG, DICOM, ...), so the
    features are those the stage will search.

    Args:
        csv_path: the CSV.
        pool_size: k of the features.

    Returns:
        (features: per image Tensor[5, H // k, W // k], regions: Tensor[N, 4] float32,
        sizes: per image (H, W)).

    Raises:
        DACInputError: naming ``data``, the CSV and the line: a missing file, a row that is
            not a path and four numbers, a header naming other columns, a box outside its
            image, an image that cannot be read; or a CSV with no images.
    """
    from ..data.io import ImageReadError, read_input
    from ..data.tables import read_box_rows

    csv_path = Path(csv_path)
    shown = repr(str(csv_path))
    features, regions, sizes = [], [], []
    for line, file, box in read_box_rows(csv_path, "data"):
        try:
            image, _ = read_input(str(file))
        except ImageReadError as err:
            raise DACInputError(f"data: {shown} line {line}: {err}") from None
        height, width = image.shape[-2:]
        if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            raise DACInputError(f"data: {shown} line {line}: box {box} is not xyxy inside the {width}x{height} image")
        try:
            features.append(saliency_features(image[None], pool_size)[0])
        except DACInputError as err:  # too small for the pooling window
            raise DACInputError(f"data: {shown} line {line}: {err}") from None
        regions.append(torch.tensor(box, dtype=torch.float32))
        sizes.append((height, width))
        _log.info("features of image %d (%s)", len(features), file.name)
    if not features:
        raise DACInputError(f"data: {shown} lists no images")
    return features, torch.stack(regions), sizes
