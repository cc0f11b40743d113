"""Crop a whole archive of images: what ``dac crop`` runs.

Streams the inputs in batches (memory stays bounded however many files there are),
records one row per input in ``OUT/boxes.csv``, writes each crop atomically under
``OUT/crops/``, and resumes: a re-run skips inputs already cropped and retries the
rest. Inputs are only ever read.

Output names cannot collide or escape ``OUT``: a crop is named after the input's
file stem (reduced to ``[A-Za-z0-9._-]``) plus a hash of its absolute path.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io as _io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ._checks import DACInputError
from .layer import DACrop

__all__ = ["CSV_FIELDS", "ArchiveSummary", "crop_archive", "find_inputs", "output_name"]

CSV_FIELDS = (
    "path", "status", "error", "width", "height", "x1", "y1", "x2", "y2", "cost", "iterations", "crop",
)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class ArchiveSummary:
    """What a :func:`crop_archive` run did."""

    total: int = 0  #: inputs found
    skipped: int = 0  #: already cropped by an earlier run
    ok: int = 0  #: cropped in this run
    failed: int = 0  #: failed in this run (reasons in boxes.csv)
    failures: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason)


def find_inputs(inputs: Sequence[str], suffixes: Iterable[str]) -> list[Path]:
    """Files named by ``inputs``: files as given, folders searched recursively for
    ``suffixes``, and glob patterns (``**`` allowed). Sorted, without duplicates.

    Raises:
        DACInputError: an input that is neither an existing path nor a pattern that
            matches anything.
    """
    suffixes = {s.lower() for s in suffixes}
    found: dict[str, Path] = {}

    def add(p: Path) -> None:
        found.setdefault(str(p.resolve()), p)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for sub in sorted(path.rglob("*")):
                if sub.is_file() and sub.suffix.lower() in suffixes:
                    add(sub)
        elif path.is_file():
            add(path)
        elif _GLOB_CHARS.search(item):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            files = [m for m in matches if m.is_file()]
            if not files:
                raise DACInputError(f"INPUT: pattern {item!r} matches no file")
            for m in files:
                add(m)
        else:
            raise DACInputError(f"INPUT: {item!r} is not a file, a folder or a glob pattern that matches")
    return sorted(found.values(), key=lambda p: str(p))


def output_name(path: Path) -> str:
    """A crop's file name: safe stem + 10 hex digits of the absolute path's SHA-1.

    Example:
        >>> output_name(Path("/data/a b/scan 01.png"))[:8]
        'scan_01-'
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "image"
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{stem[:80]}-{digest}.png"


def _load_rows(csv_path: Path) -> dict[str, dict[str, str]]:
    """Rows of an earlier run (last row per path wins; a torn last line is dropped)."""
    rows: dict[str, dict[str, str]] = {}
    if not csv_path.exists():
        return rows
    text = csv_path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a kill mid-append leaves a partial line
    for row in csv.DictReader(_io.StringIO(text)):
        if row.get("path") and len(row) == len(CSV_FIELDS) and None not in row.values():
            rows[row["path"]] = row
    return rows


def _write_rows_atomic(csv_path: Path, rows: Iterable[dict[str, str]]) -> None:
    tmp = csv_path.with_name(f".{csv_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, csv_path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _batches(items: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class _Reader(torch.utils.data.Dataset):
    """Reads one file per item; a failure becomes an item carrying its reason."""

    def __init__(self, paths: Sequence[Path], read: Callable[[Path], torch.Tensor]) -> None:
        self.paths, self.read = list(paths), read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.read(self.paths[i]), ""
        except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, not fatal
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            return i, None, str(reason)


def crop_archive(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    layer: DACrop | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    workers: int = 0,
    bits: int = 8,
    gray8: bool = False,
    overlays: bool = False,
    progress: bool | None = None,
) -> ArchiveSummary:
    """Crop every image of ``inputs`` into ``out_dir`` (see module doc).

    Args:
        inputs: files, folders (searched recursively) or glob patterns.
        out_dir: results folder: ``crops/``, ``boxes.csv``, and ``overlays/`` if asked.
        layer: the :class:`~dac.DACrop` to use (default: the paper's, 200 x 370).
        batch_size: images per search batch (memory grows with it).
        device: where the search runs (``"cpu"``, ``"cuda"``, ...).
        workers: processes that decode files ahead of the search (0: in this process).
        bits: 8 or 16-bit PNG crops.
        gray8: convert every image to 8-bit gray first (the paper's preprocessing).
        overlays: also write each image, downscaled, with its box drawn.
        progress: show a progress bar (None: only on a terminal).

    Returns:
        :class:`ArchiveSummary`. Box columns of ``boxes.csv`` are xyxy in input pixels.
    """
    from . import io as dio  # the readers import Pillow / pydicom

    if bits not in (8, 16):
        raise DACInputError(f"bits: expected 8 or 16, got {bits!r}")
    if batch_size < 1:
        raise DACInputError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    paths = find_inputs(inputs, dio.IMAGE_SUFFIXES)
    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
    csv_path = out / "boxes.csv"
    rows = _load_rows(csv_path)
    _write_rows_atomic(csv_path, rows.values())  # compact what an earlier run left

    summary = ArchiveSummary(total=len(paths))
    todo = []
    for p in paths:
        row = rows.get(str(p))
        if row and row["status"] == "ok" and (out / row["crop"]).is_file():
            summary.skipped += 1
        else:
            todo.append(p)

    layer = layer or DACrop()
    dev = torch.device(device)

    def read(p: Path) -> torch.Tensor:
        image = dio.read_image(p)
        if gray8:
            return dio.to_gray8(image)
        # Integer images stay integer (a quarter of the memory); float ones are checked
        # (NaN fails the file) and clipped to [0, 1], the range DACrop expects.
        return dio.to_unit_float(image) if image.dtype.is_floating_point else image

    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", disable=(None if progress is None else not progress))
    loader = torch.utils.data.DataLoader(
        _Reader(todo, read), batch_size=batch_size, num_workers=workers, collate_fn=list
    )
    with open(csv_path, "a", newline="", encoding="utf-8") as journal:
        writer = csv.DictWriter(journal, fieldnames=CSV_FIELDS)
        for items in loader:
            new_rows = _crop_batch(items, todo, layer, dev, out, bits, overlays, dio)
            for row in new_rows:
                rows[row["path"]] = row
                if row["status"] == "ok":
                    summary.ok += 1
                else:
                    summary.failed += 1
                    summary.failures.append((row["path"], row["error"]))
            writer.writerows(new_rows)
            journal.flush()
            os.fsync(journal.fileno())
            bar.update(len(items))
    bar.close()
    order = {str(p): i for i, p in enumerate(paths)}
    _write_rows_atomic(csv_path, sorted(rows.values(), key=lambda r: (order.get(r["path"], len(order)), r["path"])))
    return summary


def _crop_batch(items, todo, layer, device, out, bits, overlays, dio) -> list[dict[str, str]]:
    """Search, crop and write one batch; every item gets a row."""
    rows: dict[int, dict[str, str]] = {}
    good = []
    for i, image, reason in items:
        path = todo[i]
        base = {k: "" for k in CSV_FIELDS} | {"path": str(path)}
        if image is None:
            rows[i] = base | {"status": "failed", "error": reason}
        else:
            rows[i] = base | {"width": str(image.shape[-1]), "height": str(image.shape[-2])}
            good.append((i, image))
    for (i, image), (crop, box, stats) in zip(good, _search(layer, good, device)):
        if box is None:
            rows[i] |= {"status": "failed", "error": crop}
            continue
        name = f"crops/{output_name(todo[i])}"
        try:
            dio.write_png(out / name, crop.cpu(), bits=bits)
            if overlays:
                _write_overlay(out / "overlays" / output_name(todo[i]), image, box.cpu(), dio)
        except Exception as exc:  # noqa: BLE001 - recorded in boxes.csv
            rows[i] |= {"status": "failed", "error": f"could not write output: {exc}"}
            continue
        x1, y1, x2, y2 = (f"{v:.2f}" for v in box.tolist())
        rows[i] |= {"status": "ok", "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                    "cost": f"{stats[0]:.6g}", "iterations": str(stats[1]), "crop": name}
    return [rows[i] for i, _, _ in items]


def _search(layer: DACrop, good: list, device: torch.device) -> list[tuple]:
    """(crop, box, (cost, iterations)) per image, or (reason, None, None) where it failed.

    The batch is searched at once; if that raises (one image too small, say), each
    image is searched alone so that only the bad ones fail.
    """
    def run(images):
        with torch.no_grad():
            crops, boxes, info = layer([img.to(device) for img in images], return_boxes=True)
        return [(crops[k], boxes[k], (info.cost[k].item(), int(info.iterations[k]))) for k in range(len(images))]

    if not good:
        return []
    try:
        return run([img for _, img in good])
    except Exception:  # noqa: BLE001 - isolate the image that broke the batch
        results = []
        for _, img in good:
            try:
                results.extend(run([img]))
            except Exception as exc:  # noqa: BLE001 - recorded in boxes.csv
                results.append((f"{type(exc).__name__}: {exc}", None, None))
        return results


def _write_overlay(path: Path, image: torch.Tensor, box: torch.Tensor, dio) -> None:
    """The image (downscaled to <= 1024 px wide) with its box drawn in red."""
    from PIL import Image, ImageDraw

    gray = dio.to_gray8(image)[0].numpy()
    pil = Image.fromarray(gray).convert("RGB")
    scale = min(1.0, 1024 / pil.width)
    if scale < 1:
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(pil)
    draw.rectangle([v * scale for v in box.tolist()], outline=(255, 0, 0), width=3)
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    dio.write_png(path, tensor, bits=8)
