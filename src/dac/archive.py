"""Crop a whole archive of images: what ``dac crop`` runs.

Streams the inputs in batches (memory stays bounded however many files there are),
writes each crop atomically under ``OUT/crops/``, and records one row per input in
``OUT/boxes.csv``. Inputs are only ever read.

The table, ``OUT/boxes.csv``
    One row per input, keyed by the input's *resolved* path (absolute, ``..`` and
    symbolic links resolved), which is what the ``path`` column shows: the same file
    named by another spelling (relative, absolute, through a link) is the same row,
    whatever the working folder. Columns: :data:`CSV_FIELDS`. What a user or a
    spreadsheet did to the table is kept: added columns (a ``note``), the column order,
    rows of other files, a byte-order mark or CRLF line ends on reading. A table without
    a ``path`` column, or with two rows for one file that disagree in a user column, is
    refused (:class:`~dac.DACInputError`) and left as it is. The file is UTF-8; a file
    name that is not valid UTF-8 is written as its own bytes (Python's
    ``surrogateescape``), so it names exactly that file: read such a table with
    ``errors="surrogateescape"`` (pandas: ``encoding_errors="surrogateescape"``).

Resuming
    During a run each batch's rows are appended to ``OUT/.boxes-journal.csv`` and
    flushed to disk; ``boxes.csv`` is rewritten atomically from both when the run ends,
    is interrupted, or (after a kill) when the next run starts. Only one run may write
    to an ``OUT`` at a time.

Finished work
    An input is skipped only when its row is ``ok``, its crop exists, the row's
    ``settings`` equals this run's :func:`settings_key` (the archive's format, ``bits``,
    ``gray8``, ``overlays``, every public setting of the layer and of its sub-modules,
    and its weights), and the file is the one that was cropped: the same size,
    modification time and change time (``file_stat``, ``size:mtime_ns:ctime_ns``), or,
    where those differ (a ``touch``, a copy), the same SHA-256 of its bytes
    (``sha256``). Anything else is cropped again, over the same crop name. Every write
    to a file moves its change time, which no program can set back, so a changed file
    is noticed even with its size and modification time restored. The digest is taken
    while cropping (about 2 ms for a 2 MB PNG of 1536 x 2836, against 40 ms to decode it
    and seconds to search it) and is read again only for files whose stat changed, so a
    re-run over a finished archive costs one ``stat`` per file. The device, the batch
    size and the number of workers are not settings: they are not meant to change what
    is written (beyond floating-point rounding between devices).

Inputs
    Files as given, folders searched recursively for image suffixes (links to folders
    followed, each folder once), glob patterns (``**`` allowed). Every input found ends
    as a row, ok or failed with its reason: dangling links, link loops, FIFOs, unreadable
    files, folders whose name ends like an image's (also searched) and folders that cannot
    be listed. Nothing inside ``OUT`` is ever an input, so ``OUT`` may sit inside an input
    folder.

Output names cannot collide or escape ``OUT``: a crop is named after the input's file
stem (reduced to ``[A-Za-z0-9._-]``) plus a hash of its resolved path.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import io as _io
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ._checks import DACInputError, check_device, check_int
from .layer import DACrop

__all__ = [
    "CSV_FIELDS",
    "ArchiveSummary",
    "Found",
    "check_out_dir",
    "crop_archive",
    "crop_settings",
    "find_inputs",
    "output_name",
    "settings_key",
]

CSV_FIELDS = (
    "path", "status", "error", "width", "height", "x1", "y1", "x2", "y2", "cost", "iterations", "crop",
    "settings", "file_stat", "sha256",
)
#: Version of how an input becomes a crop (reading, scaling, writing): part of every
#: settings key, so a change here crops archives again.
ARCHIVE_FORMAT = 2
_JOURNAL = ".boxes-journal.csv"
_JOURNAL_FIELDS = CSV_FIELDS + ("end",)  # "end" = "1": the row was written whole
_NOT_SETTINGS = frozenset({"last_info"})  # what a layer keeps of its last call
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class ArchiveSummary:
    """What a :func:`crop_archive` run did."""

    total: int = 0  #: inputs found
    skipped: int = 0  #: already cropped with the same settings from the same file
    ok: int = 0  #: cropped in this run
    failed: int = 0  #: failed in this run (reasons in boxes.csv)
    failures: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason)


@dataclass(frozen=True)
class Found:
    """One input: its resolved path (the row's key) and a reason known from the search."""

    key: str  #: absolute path with links resolved (the link itself where it leads nowhere)
    problem: str = ""  #: why it cannot be read, where the search already knows (else "")


# ------------------------------------------------------------------------- inputs
def _resolved(path: str | os.PathLike) -> str:
    """Absolute path with ``..`` and links resolved; a dangling link or a link loop
    keeps its own name (in its resolved folder)."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError:
        head, tail = os.path.split(os.path.abspath(path))
        return os.path.join(os.path.realpath(head), tail)


def _inside(path: str, folder: str | None) -> bool:
    if folder is None:
        return False
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _reason(err: OSError) -> str:
    return (err.strerror or str(err)).lower()


def find_inputs(
    inputs: Sequence[str | os.PathLike], suffixes: Iterable[str], *, exclude: str | os.PathLike | None = None
) -> list[Found]:
    """Inputs named by ``inputs``, one per file (however it is spelled), sorted by path.

    Files as given; folders searched recursively for ``suffixes`` (any case; links to
    folders followed, each folder once); glob patterns (``**`` allowed), whose matches
    are inputs whatever their suffix and folders among them are searched. A folder whose
    name ends in one of ``suffixes``, found by a search or a pattern, is also an input
    (it fails as "is a directory"); a folder that cannot be listed is an input with that
    problem. Nothing inside ``exclude`` is an input.

    Raises:
        DACInputError: an input that does not exist and is not a pattern that matches,
            or a file or folder named inside ``exclude``.
    """
    suffixes = {s.lower() for s in suffixes}
    skip = os.path.realpath(exclude) if exclude is not None else None
    found: dict[str, Found] = {}
    searched: set[tuple[int, int]] = set()

    def add(path: str, problem: str = "") -> None:
        key = _resolved(path)
        if not _inside(key, skip):
            found.setdefault(key, Found(key, problem))

    def looks_like_image(path: str) -> bool:
        return os.path.splitext(path)[1].lower() in suffixes

    def search(folder: str) -> None:
        try:
            info = os.stat(folder)
        except OSError as err:
            add(folder, f"cannot search folder: {_reason(err)}")
            return
        if (info.st_dev, info.st_ino) in searched or _inside(_resolved(folder), skip):
            return
        searched.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            add(folder, f"cannot list folder: {_reason(err)}")
            return
        for entry in entries:
            try:
                is_folder = entry.is_dir()
            except OSError:  # a link loop: an input, whose read says what is wrong
                is_folder = False
            if is_folder:
                if looks_like_image(entry.name):
                    add(entry.path)
                search(entry.path)
            elif looks_like_image(entry.name):
                add(entry.path)

    for item in inputs:
        text = os.fspath(item)
        if os.path.lexists(text) and _inside(_resolved(text), skip):
            raise DACInputError(f"INPUT: {text!r} is inside the results folder {os.fspath(exclude)!r}")
        if os.path.isdir(text):
            search(text)
        elif os.path.lexists(text):  # a file, or a link or FIFO whose read will fail
            add(text)
        elif _GLOB_CHARS.search(text):
            matches = sorted(glob.glob(text, recursive=True))
            kept = [m for m in matches if not _inside(_resolved(m), skip)]
            if not kept:
                where = " outside the results folder" if matches else ""
                raise DACInputError(f"INPUT: pattern {text!r} matches no file{where}")
            for match in kept:
                if os.path.isdir(match):
                    if looks_like_image(match):
                        add(match)
                    search(match)
                else:
                    add(match)
        else:
            raise DACInputError(f"INPUT: {text!r} is not a file, a folder or a glob pattern that matches")
    return sorted(found.values(), key=lambda f: f.key)


def output_name(path: str | os.PathLike) -> str:
    """A crop's file name: safe stem + 10 hex digits of the SHA-1 of the resolved path.

    Example:
        >>> output_name(Path("/data/a b/scan 01.png"))[:8]
        'scan_01-'
    """
    key = _resolved(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(key))[0]).strip("._") or "image"
    digest = hashlib.sha1(os.fsencode(key)).hexdigest()[:10]
    return f"{stem[:80]}-{digest}.png"


# ----------------------------------------------------------------------- settings
def crop_settings(layer: torch.nn.Module, *, bits: int = 8, gray8: bool = False, overlays: bool = False) -> dict:
    """Every setting that changes what :func:`crop_archive` writes for an input.

    One entry per setting; a new setting is one more line here. The layer contributes
    its class, every public attribute (``output_size``, ``pool_size``, the schedule...,
    not what its last call left), the same for each sub-module, and a digest of its
    ``state_dict`` (the weights of a learned saliency, say).
    """
    return {
        "format": ARCHIVE_FORMAT,
        "bits": bits,
        "gray8": bool(gray8),
        "overlays": bool(overlays),
        "layer": _module_settings(layer),
        "weights": _weights_digest(layer),
    }


def settings_key(layer: torch.nn.Module, *, bits: int = 8, gray8: bool = False, overlays: bool = False) -> str:
    """16 hex digits of the SHA-256 of :func:`crop_settings`: the ``settings`` column.

    Example:
        >>> settings_key(DACrop(pool_size=4)) == settings_key(DACrop(pool_size=4))
        True
        >>> settings_key(DACrop(pool_size=4)) == settings_key(DACrop(pool_size=5))
        False
    """
    settings = crop_settings(layer, bits=bits, gray8=gray8, overlays=overlays)
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _module_settings(module: torch.nn.Module) -> dict:
    config: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
    for name, value in vars(module).items():
        if not name.startswith("_") and name not in _NOT_SETTINGS:
            config[name] = _plain(value)
    for name, child in module.named_children():
        config[f"module {name}"] = _module_settings(child)
    return config


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON: numbers, strings, lists, dicts (never a repr with an address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return {"tensor": _tensor_digest(value)}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"class": name} | {f.name: _plain(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if hasattr(value, "__dict__") and depth < 4:
        return {"class": name} | {k: _plain(v, depth + 1) for k, v in vars(value).items() if not k.startswith("_")}
    return name


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    head = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(head + data.tobytes()).hexdigest()[:16]


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}={_tensor_digest(tensor)};".encode())
    return digest.hexdigest()[:16]


def _stat_text(info: os.stat_result) -> str:
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


def _sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# -------------------------------------------------------------------------- table
class _Table:
    """``boxes.csv`` as read: its header (user columns kept) and rows keyed by path."""

    def __init__(self, header: list[str], rows: dict[str, list[str]]) -> None:
        self.header = header + [f for f in CSV_FIELDS if f not in header]
        self.index = {f: self.header.index(f) for f in CSV_FIELDS}
        width = len(self.header)
        self.rows = {k: cells + [""] * (width - len(cells)) for k, cells in rows.items()}

    def get(self, key: str) -> dict[str, str] | None:
        cells = self.rows.get(key)
        return None if cells is None else {f: cells[i] for f, i in self.index.items()}

    def update(self, key: str, values: dict[str, str]) -> None:
        cells = self.rows.setdefault(key, [""] * len(self.header))
        for name, value in values.items():
            cells[self.index[name]] = value
        cells[self.index["path"]] = key


def _read_table(csv_path: Path) -> _Table:
    """The table of earlier runs (an empty one if there is none); refuses what it cannot keep."""
    if not csv_path.exists():
        return _Table(list(CSV_FIELDS), {})
    try:
        with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
            lines = [cells for cells in csv.reader(file) if cells]
    except (OSError, csv.Error) as err:
        raise DACInputError(f"{csv_path}: cannot be read as a CSV table ({err}); it was left as it is") from None
    if not lines:
        return _Table(list(CSV_FIELDS), {})
    header = lines[0]
    if "path" not in header:
        other = any(";" in h or "\t" in h for h in header)
        hint = " (its columns look separated by ';' or tabs; dac writes commas)" if other else ""
        raise DACInputError(
            f"{csv_path}: has no 'path' column{hint}, so dac crop cannot add to it; it was left as it is "
            "(move it away, or choose another results folder)"
        )
    width = max(len(cells) for cells in lines)
    header = header + [""] * (width - len(header))  # rows longer than the header: unnamed columns
    table = _Table(header, {})
    path_at, settings_at = table.index["path"], table.index["settings"]
    ours = set(table.index.values())
    for number, cells in enumerate(lines[1:], start=2):
        cells = cells + [""] * (len(table.header) - len(cells))
        key = cells[path_at]
        if not key:
            key = f"\0line {number}"  # a row without a path: kept as it is
        elif not cells[settings_at] and os.path.lexists(key):
            key = cells[path_at] = _resolved(key)  # a row from before paths were resolved
        if key in table.rows:
            cells = _merge_rows(table.rows[key], cells, ours, table.header, csv_path, key)
        table.rows[key] = cells
    return table


def _merge_rows(older, newer, ours, header, csv_path, key) -> list[str]:
    """Two rows for one file: the later one's results, and every user cell of either."""
    merged = list(newer)
    for i, (a, b) in enumerate(zip(older, newer)):
        if i in ours or not a or a == b:
            continue
        if b:
            raise DACInputError(
                f"{csv_path}: two rows for {key!r} hold different values in column {header[i]!r} "
                f"({a!r} and {b!r}); keep one of them and run again"
            )
        merged[i] = a
    return merged


def _write_table(csv_path: Path, table: _Table, order: dict[str, int]) -> None:
    """Write the table atomically: inputs of this run in order, then other rows as they were."""
    position = {k: i for i, k in enumerate(table.rows)}
    keys = sorted(table.rows, key=lambda k: (0, order[k], 0) if k in order else (1, 0, position[k]))
    _write_atomic(csv_path, [table.header] + [table.rows[k] for k in keys])


def _write_atomic(path: Path, lines: Iterable[list[str]]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", newline="", encoding="utf-8", errors="surrogateescape") as file:
            csv.writer(file).writerows(lines)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _replay_journal(journal_path: Path, table: _Table) -> None:
    """Rows a run wrote before it was killed; a torn last row is left out (cropped again)."""
    if not journal_path.exists():
        return
    text = journal_path.read_bytes().decode("utf-8", "surrogateescape")
    rows = []
    try:
        for cells in csv.reader(_io.StringIO(text, newline="")):
            rows.append(cells)
    except csv.Error:
        pass  # a torn quoted field at the end
    if not rows or tuple(rows[0]) != _JOURNAL_FIELDS:
        return
    for cells in rows[1:]:
        if len(cells) == len(_JOURNAL_FIELDS) and cells[-1] == "1":
            values = dict(zip(CSV_FIELDS, cells))
            table.update(values["path"], values)


# --------------------------------------------------------------------- out folder
def check_out_dir(out_dir: str | os.PathLike, name: str = "out_dir") -> Path:
    """Check that ``out_dir`` is a writable folder or can be created; creates nothing.

    Raises:
        DACInputError: it is a file, lies inside a file, or cannot be written or
            created; the message starts with ``name``.
    """
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise DACInputError(f"{name}: {os.fspath(out)!r} exists and is not a folder")
        where = out
    else:
        where = out.absolute().parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise DACInputError(f"{name}: cannot create {os.fspath(out)!r}: {os.fspath(where)!r} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dac-probe-", dir=where))
    except OSError as err:
        raise DACInputError(f"{name}: cannot write in {os.fspath(where)!r}: {_reason(err)}") from None
    return out


def _make_folders(out: Path, name: str) -> None:
    """Create ``out`` (removing what was created if that fails half way)."""
    missing, path = [], out.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            created.append(folder)
    except OSError as err:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise DACInputError(f"{name}: cannot create {os.fspath(out)!r}: {_reason(err)}") from None


@contextlib.contextmanager
def _locked(out: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``out`` (POSIX ``flock``) while one run writes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    descriptor = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DACInputError(f"{name}: another dac crop is writing to {os.fspath(out)!r}; wait for it to end") from None
        yield
    finally:
        os.close(descriptor)


def _record_settings(out: Path, key: str, settings: dict) -> None:
    """Add ``key -> settings`` to ``OUT/settings.json``: what each ``settings`` value means."""
    path = out / "settings.json"
    known: dict = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(known, dict):
        known = {}
    if known.get(key) == settings:
        return
    known[key] = settings
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


# ---------------------------------------------------------------------- cropping
class _Reader(torch.utils.data.Dataset):
    """Reads one input per item: (index, image or None, reason, file_stat, sha256)."""

    def __init__(self, items: Sequence[Found], read: Callable[[str], torch.Tensor]) -> None:
        self.items, self.read = list(items), read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str, str]:
        item = self.items[i]
        if item.problem:
            return i, None, item.problem, "", ""
        try:
            try:
                before = os.stat(item.key)  # before reading: a later change is seen next run
            except OSError:
                before = None
            image = self.read(item.key)  # a missing file fails here, with its reason
            if before is None:
                raise OSError("the file changed while it was read")
            return i, image, "", _stat_text(before), _sha256(item.key)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, not fatal
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            return i, None, str(reason), "", ""


def crop_archive(
    inputs: Sequence[str | os.PathLike],
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
    """Crop every image of ``inputs`` into ``out_dir`` (see the module doc).

    Every argument is checked, and the inputs found, before anything is created.

    Args:
        inputs: files, folders (searched recursively) or glob patterns.
        out_dir: results folder: ``crops/``, ``boxes.csv``, ``settings.json`` (what
            each ``settings`` value means), and ``overlays/`` if asked.
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

    Raises:
        DACInputError: a bad argument, an input that does not exist, an ``out_dir``
            that cannot be written, a ``boxes.csv`` that cannot be kept, or another
            run writing to ``out_dir``.
        KeyboardInterrupt: after writing the table of what was done (run again to resume).
    """
    from . import io as dio  # the readers import Pillow / pydicom

    if isinstance(bits, bool) or bits not in (8, 16):
        raise DACInputError(f"bits: expected 8 or 16, got {bits!r}")
    batch_size = check_int(batch_size, "batch_size", 1)
    workers = check_int(workers, "workers", 0)
    dev = check_device(device, "device")
    layer = layer if layer is not None else DACrop()
    out = Path(out_dir)
    found = find_inputs(inputs, dio.IMAGE_SUFFIXES, exclude=out)
    check_out_dir(out, "out_dir")
    _make_folders(out, "out_dir")

    with _locked(out, "out_dir"):
        csv_path, journal_path = out / "boxes.csv", out / _JOURNAL
        table = _read_table(csv_path)
        for sub in ("crops", "overlays") if overlays else ("crops",):
            (out / sub).mkdir(exist_ok=True)
        _replay_journal(journal_path, table)
        order = {item.key: i for i, item in enumerate(found)}
        _write_table(csv_path, table, order)
        journal_path.unlink(missing_ok=True)

        settings = crop_settings(layer, bits=bits, gray8=gray8, overlays=overlays)
        key = settings_key(layer, bits=bits, gray8=gray8, overlays=overlays)
        _record_settings(out, key, settings)

        summary = ArchiveSummary(total=len(found))
        todo = []
        for item in found:
            if not item.problem and _is_done(table, item.key, key, out):
                summary.skipped += 1
            else:
                todo.append(item)
        return _crop_all(todo, table, summary, order, layer, dev, out, key, bits, gray8, overlays,
                         batch_size, workers, progress, dio)


def _is_done(table: _Table, path: str, key: str, out: Path) -> bool:
    """The row of ``path`` holds a crop of this very file made with settings ``key``."""
    row = table.get(path)
    if not row or row["status"] != "ok" or row["settings"] != key or not (out / row["crop"]).is_file():
        return False
    try:
        stat_text = _stat_text(os.stat(path))
        if stat_text == row["file_stat"]:
            return True
        if row["sha256"] and _sha256(path) == row["sha256"]:
            table.update(path, {"file_stat": stat_text})  # touched or copied, not changed
            return True
    except OSError:
        pass
    return False


def _crop_all(todo, table, summary, order, layer, dev, out, key, bits, gray8, overlays,
              batch_size, workers, progress, dio) -> ArchiveSummary:
    def read(path: str) -> torch.Tensor:
        image = dio.read_image(path)
        if gray8:
            return dio.to_gray8(image)
        # Integer images stay integer (a quarter of the memory); float ones are checked
        # (NaN fails the file) and clipped to [0, 1], the range DACrop expects.
        return dio.to_unit_float(image) if image.dtype.is_floating_point else image

    from tqdm import tqdm

    csv_path, journal_path = out / "boxes.csv", out / _JOURNAL
    bar = tqdm(total=len(todo), unit="img", disable=(None if progress is None else not progress))
    loader = torch.utils.data.DataLoader(
        _Reader(todo, read), batch_size=batch_size, num_workers=workers, collate_fn=list
    )
    with open(journal_path, "a", newline="", encoding="utf-8", errors="surrogateescape") as journal:
        writer = csv.writer(journal)
        writer.writerow(_JOURNAL_FIELDS)
        try:
            for items in loader:
                new_rows = _crop_batch(items, todo, layer, dev, out, bits, overlays, dio)
                for row in new_rows:
                    row["settings"] = key
                    table.update(row["path"], row)
                    if row["status"] == "ok":
                        summary.ok += 1
                    else:
                        summary.failed += 1
                        summary.failures.append((row["path"], row["error"]))
                writer.writerows([[row[f] for f in CSV_FIELDS] + ["1"] for row in new_rows])
                journal.flush()
                os.fsync(journal.fileno())
                bar.update(len(items))
        finally:
            bar.close()
            _write_table(csv_path, table, order)
    journal_path.unlink(missing_ok=True)
    return summary


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _crop_batch(items, todo, layer, device, out, bits, overlays, dio) -> list[dict[str, str]]:
    """Search, crop and write one batch; every item gets a row."""
    rows: dict[int, dict[str, str]] = {}
    good = []
    for i, image, reason, file_stat, digest in items:
        path = todo[i].key
        base = {k: "" for k in CSV_FIELDS} | {"path": path, "file_stat": file_stat, "sha256": digest}
        if image is None:
            rows[i] = base | {"status": "failed", "error": _one_line(reason)}
        else:
            rows[i] = base | {"width": str(image.shape[-1]), "height": str(image.shape[-2])}
            good.append((i, image))
    for (i, image), (crop, box, stats) in zip(good, _search(layer, good, device)):
        if box is None:
            rows[i] |= {"status": "failed", "error": _one_line(crop)}
            continue
        name = f"crops/{output_name(todo[i].key)}"
        try:
            dio.write_png(out / name, crop.cpu(), bits=bits)
            if overlays:
                _write_overlay(out / "overlays" / output_name(todo[i].key), image, box.cpu(), dio)
        except Exception as exc:  # noqa: BLE001 - recorded in boxes.csv
            rows[i] |= {"status": "failed", "error": _one_line(f"could not write output: {exc}")}
            continue
        x1, y1, x2, y2 = (f"{v:.2f}" for v in box.tolist())
        rows[i] |= {"status": "ok", "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                    "cost": f"{stats[0]:.6g}", "iterations": str(stats[1]), "crop": name}
    return [rows[item[0]] for item in items]


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
