"""``dac crop``: every image of an archive cropped to its region of interest by :class:`~dac.DACrop`.

:func:`crop_archive` is the :class:`~dac.jobs.ArchiveTask` of ``dac crop`` run by
:func:`dac.jobs.run_archive` (resume, journal, shards, bad files as rows: see
:mod:`dac.jobs.engine`). It writes ``OUT/crops/<stem>-<hash>.png``, ``OUT/boxes.csv``,
``OUT/settings.json`` and, if asked, ``OUT/overlays/``.

The table, ``OUT/boxes.csv``
    One row per input, keyed by the input's *resolved* path (absolute, ``..`` and
    symbolic links resolved), which is what the ``path`` column shows. Columns:
    :data:`CSV_FIELDS`; box columns are xyxy in input pixels. Columns a user adds are
    kept (:mod:`dac.jobs.table`). The file is UTF-8; a file name that is not valid
    UTF-8 is written as its own bytes (Python's ``surrogateescape``): read such a table
    with ``errors="surrogateescape"`` (pandas: ``encoding_errors="surrogateescape"``).
    The ``intensity`` column says how each file's values became [0, 1] (for DICOM: the
    window, the stored range or the percentiles used; see :func:`dac.data.io.read_image`).

    ``frozen`` is 1 where the search found no strict maximum of the cost (a blank or
    uniform image, a flat map: :attr:`dac.DACSolverInfo.frozen`); its box is then where
    the search starts, centred in the image with a half-width of ``r_init_fraction``
    of the image width (clipped to fit the image and the crop's aspect), not a region
    found in it. Otherwise 0.

Finished work
    A row is done for the same file with the same settings key (:func:`settings_key`:
    the formats, ``bits``, ``gray8``, ``overlays``, the DICOM intensity mode, the
    layer's ``config()`` and its weights).
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .._checks import DACInputError, check_bits, check_device
from ..data import io as dio
from ..jobs import ARCHIVE_FIELDS, ArchiveSummary, ArchiveTask, discard_outputs, number_cell, output_name, run_archive
from ..jobs.settings import module_settings, settings_digest, weights_digest
from ..layer import DACrop

__all__ = ["CROP_FORMAT", "CSV_FIELDS", "crop_archive", "crop_settings", "settings_key"]

#: Columns of ``boxes.csv``.
CSV_FIELDS = ARCHIVE_FIELDS[0] + ("x1", "y1", "x2", "y2", "cost", "iterations", "frozen", "crop") + ARCHIVE_FIELDS[1]
#: Version of how a crop and its row are made from an image (with
#: :data:`dac.data.io.READ_FORMAT`, how the image is read): part of every settings key,
#: so a change here crops archives again.
CROP_FORMAT = 5


def crop_archive(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    layer: DACrop | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    workers: int | str = "auto",
    bits: int = 8,
    gray8: bool = False,
    overlays: bool = False,
    dicom: str = "window",
    percentiles: Sequence[float] = (1.0, 99.0),
    progress: bool | None = None,
    shard: tuple[int, int] | str | None = None,
) -> ArchiveSummary:
    """Crop every image of ``inputs`` into ``out_dir`` (see the module doc).

    Every argument is checked, and the inputs found, before anything is created.

    Args:
        inputs: files, folders (searched recursively) or glob patterns.
        out_dir: results folder: ``crops/``, ``boxes.csv``, ``settings.json`` (what
            each ``settings`` value means), and ``overlays/`` if asked.
        layer: the :class:`~dac.DACrop` to use (default: the paper's, 200 x 370).
        batch_size: images per search batch (memory grows with it).
        device: where the search runs (``"cpu"``, ``"cuda"``, ...).
        workers: processes that decode files ahead of the search (0: a read-ahead
            thread of this process; ``"auto"``: :func:`default_workers`).
        bits: 8 or 16-bit PNG crops.
        gray8: convert every image to 8-bit gray first (the paper's preprocessing).
        overlays: also write each image, downscaled, with its box drawn.
        dicom, percentiles: how DICOM values become [0, 1] (:func:`dac.data.io.read_image`).
        progress: show a progress bar (None: only on a terminal).
        shard: ``(i, n)`` or ``"i/n"``: this process's share (see the module doc).

    Returns:
        :class:`ArchiveSummary`. Box columns of ``boxes.csv`` are xyxy in input pixels.

    Raises:
        DACInputError: a bad argument, an input that does not exist, an ``out_dir``
            that cannot be written, a ``boxes.csv`` that cannot be kept, an ``out_dir``
            holding another command's results, or another run writing there (of the
            same shard, or with other settings or another shard layout).
        OSError: writing the results failed (a full disk): what was done is kept;
            run again to resume.
        KeyboardInterrupt: after writing the table of what was done (run again to resume).
    """
    layer = layer if layer is not None else DACrop()
    settings = crop_settings(layer, bits=bits, gray8=gray8, overlays=overlays, dicom=dicom, percentiles=percentiles)
    dev = check_device(device, "device")
    if any(t.device != dev for t in [*layer.parameters(), *layer.buffers()]):
        layer = copy.deepcopy(layer).to(dev)  # the search's device; the caller's layer stays where it is
    task = ArchiveTask(
        table="boxes.csv",
        fields=CSV_FIELDS,
        settings=settings,
        read=functools.partial(_crop_read, bits=bits, gray8=bool(gray8), dicom=dicom, percentiles=tuple(percentiles)),
        compute=functools.partial(_crop_compute, layer),
        write=functools.partial(_crop_write, bits=bits, overlays=bool(overlays)),
        outputs=("crop",),
        folders=("crops", "overlays") if overlays else ("crops",),
        products=("crops", "overlays"),
        name="dac crop",
    )
    return run_archive(inputs, out_dir, task, batch_size=batch_size, workers=workers, device=device,
                       progress=progress, shard=shard)


def _crop_read(path: str, data: bytes, *, bits: int, **options: Any) -> tuple[torch.Tensor, str]:
    """Read one input (:func:`dac.data.io.read_input`); a colour image with ``bits=16``
    fails here, before it is searched (its crop could not be written)."""
    image, intensity = dio.read_input(path, data, **options)
    if bits == 16 and image.shape[0] == 3:
        raise dio.ImageReadError(
            path, "colour image: 16-bit crops (--bits 16) are one-channel PNGs (Pillow cannot write 16-bit colour); "
            "crop it with --bits 8, or make it gray with --gray8"
        )
    return image, intensity


def _crop_compute(layer: torch.nn.Module, images: torch.Tensor) -> list[tuple]:
    crops, boxes, info = layer(images, return_boxes=True)
    return [(crops[k].cpu(), boxes[k].cpu(), float(info.cost[k]), int(info.iterations[k]), bool(info.frozen[k]))
            for k in range(len(crops))]


def _crop_write(out: Path, key: str, image: torch.Tensor, result: tuple, found: str, *, bits: int, overlays: bool) -> dict[str, str]:
    crop, box, cost, iterations, frozen = result
    name = f"crops/{output_name(key)}"
    dio.write_png(out / name, crop, bits=bits)
    if overlays:
        dio.write_overlay(out / "overlays" / output_name(key), image, box)
    else:
        discard_outputs(out, key, ("overlays",))  # one from an earlier run shows another box
    x1, y1, x2, y2 = (number_cell(v) for v in box.tolist())
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "cost": number_cell(cost, ".6g"), "iterations": str(iterations),
            "frozen": str(int(frozen)), "crop": name}


# ----------------------------------------------------------------------- settings
def crop_settings(
    layer: torch.nn.Module,
    *,
    bits: int = 8,
    gray8: bool = False,
    overlays: bool = False,
    dicom: str = "window",
    percentiles: Sequence[float] = (1.0, 99.0),
) -> dict:
    """Every setting that changes what :func:`crop_archive` writes for an input.

    One entry per setting; a new setting is one more line here. The layer contributes
    its class and its ``config()`` (:meth:`dac.DACrop.config`: the crop size, pooling
    window, schedule, minimum width..., not its mode, device or what its last call
    left) and a digest of its ``state_dict`` (the weights of a learned saliency, say).

    Raises:
        DACInputError: ``layer`` has no ``config()`` saying what changes its crops, or
            a bad ``bits``, ``dicom`` or ``percentiles``.
    """
    if not callable(getattr(layer, "config", None)):
        raise DACInputError(
            f"layer: {type(layer).__name__} has no config() saying which of its settings change its crops "
            "(dac.DACrop has one); the archive cannot tell finished work from work to redo without it"
        )
    return {
        "format": CROP_FORMAT,
        "read": dio.read_settings(gray8=gray8, dicom=dicom, percentiles=percentiles),
        "bits": check_bits(bits),
        "overlays": bool(overlays),
        "layer": module_settings(layer),
        "weights": weights_digest(layer),
    }


def settings_key(layer: torch.nn.Module, **options: Any) -> str:
    """The ``settings`` column of :func:`crop_archive`: :func:`settings_digest` of
    :func:`crop_settings` (same keyword options).

    Examples:
        >>> settings_key(DACrop(pool_size=4)) == settings_key(DACrop(pool_size=4))
        True
        >>> settings_key(DACrop(pool_size=4)) == settings_key(DACrop(pool_size=5))
        False
    """
    return settings_digest(crop_settings(layer, **options))
