"""Archives of images, processed file by file: what ``dac crop`` (and ``dac predict``) run.

One engine, :func:`run_archive`, serves every command that turns a folder of images into
one table row per file: it finds the inputs, reads them in worker processes, hands
batches of same-size images to the command's computation, writes the command's files in
a background thread, journals each batch's rows and keeps the table. A command says
what it computes with an :class:`ArchiveTask`; :func:`crop_archive` is the one for
``dac crop`` (``dac.predict`` holds the one for ``dac predict``). Inputs are only ever
read.

The table (``OUT/boxes.csv`` for ``dac crop``)
    One row per input, keyed by the input's *resolved* path (absolute, ``..`` and
    symbolic links resolved), which is what the ``path`` column shows: the same file
    named by another spelling (relative, absolute, through a link) is the same row,
    whatever the working folder. Columns: :data:`CSV_FIELDS` for ``dac crop``. What a
    user or a spreadsheet did to the table is kept: added columns (a ``note``), the
    column order, rows of other files, a byte-order mark or CRLF line ends on reading.
    A table without a ``path`` column, or with two rows for one file that disagree in a
    user column, is refused (:class:`~dac.DACInputError`) and left as it is. The file is
    UTF-8; a file name that is not valid UTF-8 is written as its own bytes (Python's
    ``surrogateescape``), so it names exactly that file: read such a table with
    ``errors="surrogateescape"`` (pandas: ``encoding_errors="surrogateescape"``). The
    ``intensity`` column says how each file's values became [0, 1] (for DICOM: the
    window, the stored range or the percentiles used; see :func:`dac.data.io.read_image`).

Resuming
    During a run each batch's rows are appended to a journal (``OUT/.boxes-journal.csv``,
    one per process) and flushed to disk; the table is rewritten atomically from it when
    the run ends, is interrupted, or (after a kill) when the next run starts. An
    interrupted or killed run loses at most the batches in flight.

Finished work
    An input is skipped only when its row is ``ok``, its output files exist, the row's
    ``settings`` equals this run's settings key (for ``dac crop``: :func:`settings_key`,
    the archive's format, ``bits``, ``gray8``, ``overlays``, the DICOM intensity mode,
    every public setting of the layer and of its sub-modules, and its weights), and the
    file is the one that was processed: the same size, modification time and change
    time (``file_stat``, ``size:mtime_ns:ctime_ns``), or, where those differ (a
    ``touch``, a copy), the same SHA-256 of its bytes (``sha256``). Anything else is
    done again, over the same output name. Every write to a file moves its change time,
    which no program can set back, so a changed file is noticed even with its size and
    modification time restored. The digest is taken while reading (about 2 ms for a 2 MB
    PNG of 1536 x 2836) and is read again only for files whose stat changed, so a re-run
    over a finished archive costs one ``stat`` per file. The device, the batch size, the
    number of workers and the shard are not settings: they are not meant to change what
    is written (beyond floating-point rounding between devices).

Inputs
    Files as given, folders searched recursively for image suffixes (links to folders
    followed, each folder once), glob patterns (``**`` allowed). Every input found ends
    as a row, ok or failed with its reason: dangling links, link loops, FIFOs, unreadable
    files, folders whose name ends like an image's (also searched) and folders that cannot
    be listed. Nothing inside ``OUT`` is ever an input, so ``OUT`` may sit inside an input
    folder.

Speed: the parts overlap
    ``workers`` processes (or, with ``workers=0``, one read-ahead thread of this
    process) decode files and take their SHA-256 ahead of the computation, through a
    bounded queue (``prefetch`` batches per reader); decoded
    images wait in groups of one size and type until a group holds ``batch_size``
    images (or too many wait: then the largest group goes), so each batch is one
    tensor; the main process computes (the search) with ``torch`` threads set to the
    cores the readers leave free; one writer thread encodes and writes the outputs while
    the next batch is computed. Images held at once: at most ``(max(workers, 1) *
    prefetch + 5) * batch_size`` (queue, waiting groups, the batch being computed, two
    batches being written). The read-ahead thread costs no copy between processes and
    suits Pillow's formats (their decoders release the GIL); DICOM, decoded in Python
    by pydicom, goes faster with worker processes.

Several processes or machines
    With ``shard=(i, n)`` (``dac crop --shard i/n``, or the ``RANK`` and ``WORLD_SIZE``
    that ``torchrun`` sets) a process takes every n-th input of the sorted list from the
    i-th on, journals its rows in its own part (``OUT/.boxes-journal-<i>-of-<n>.csv``)
    and, when it ends, merges its part into the one table under a lock on ``OUT`` (POSIX
    ``flock``; on several machines ``OUT`` must be on a file system whose locks work
    across them, such as NFSv4). Parts left by killed processes are merged by the next
    run. A resumed run, with any number of processes, skips what any of them finished.
    Two runs of the same shard on one ``OUT`` at once are refused.

Output names cannot collide or escape ``OUT``: an output is named after the input's
file stem (reduced to ``[A-Za-z0-9._-]``) plus a hash of its resolved path.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import csv
import dataclasses
import functools
import glob
import hashlib
import io as _io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ._checks import DACInputError, check_device, check_int, check_unit_range
from ._files import atomic_write, write_json
from .layer import DACrop

__all__ = [
    "ARCHIVE_FIELDS",
    "CSV_FIELDS",
    "ArchiveSummary",
    "ArchiveTask",
    "Found",
    "check_out_dir",
    "check_shard",
    "crop_archive",
    "crop_settings",
    "default_workers",
    "discard_outputs",
    "find_inputs",
    "module_settings",
    "output_name",
    "run_archive",
    "search_threads",
    "settings_digest",
    "settings_key",
    "shard_from_environment",
    "weights_digest",
    "write_overlay",
]

#: Columns every archive table has, first (``path, status, error, width, height``) and
#: last (``intensity, settings, file_stat, sha256``); :func:`run_archive` fills them.
ARCHIVE_FIELDS = (("path", "status", "error", "width", "height"), ("intensity", "settings", "file_stat", "sha256"))
#: Columns of ``boxes.csv``.
CSV_FIELDS = ARCHIVE_FIELDS[0] + ("x1", "y1", "x2", "y2", "cost", "iterations", "crop") + ARCHIVE_FIELDS[1]
#: Version of how an input becomes a crop (reading, scaling, writing): part of every
#: settings key, so a change here crops archives again.
ARCHIVE_FORMAT = 4
_NOT_SETTINGS = frozenset({"last_info"})  # what a layer keeps of its last call
_GLOB_CHARS = re.compile(r"[*?\[]")
_LOCK_WAIT_S = 120.0  # longest wait for another process's merge into the table


@dataclass
class ArchiveSummary:
    """What a :func:`run_archive` run did (its shard only, when sharded)."""

    total: int = 0  #: inputs of this run (its share, when sharded)
    skipped: int = 0  #: already done with the same settings from the same file
    ok: int = 0  #: done in this run
    failed: int = 0  #: failed in this run (reasons in the table)
    failures: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason)
    found: int = 0  #: inputs found (all shards)
    shard: tuple[int, int] = (0, 1)  #: (index, count) of this process's share
    seconds: float = 0.0  #: wall time of the run
    keys: list[str] = field(default_factory=list, repr=False)  #: rows of this process's inputs (resolved paths)


@dataclass(frozen=True)
class Found:
    """One input: its resolved path (the row's key) and a reason known from the search."""

    key: str  #: absolute path with links resolved (the link itself where it leads nowhere)
    problem: str = ""  #: why it cannot be read, where the search already knows (else "")
    found: str = ""  #: the path where the search met it, links not resolved (its folder may be a class name)


@dataclass
class ArchiveTask:
    """What one kind of archive run computes; :func:`run_archive` does the rest.

    Attributes:
        table: the table's file name in ``OUT`` (``"boxes.csv"``).
        fields: every column, in order: ``ARCHIVE_FIELDS[0]``, the task's own, then
            ``ARCHIVE_FIELDS[1]``.
        settings: every setting that changes a row or an output (JSON-ready); its
            digest is the ``settings`` column, and ``OUT/settings.json`` says what
            each digest means.
        read: ``path -> (image Tensor[C, H, W], intensity text)``. Runs in worker
            processes, so it must pickle (a module-level function or a
            ``functools.partial`` of one); raising fails that file with the reason.
        compute: a list of same-size images (one Tensor[b, C, H, W]) -> one result per
            image. Runs in the main process under ``torch.no_grad()``; when it raises,
            each image is computed alone so that only the bad ones fail.
        write: ``(out, key, image, result, found) -> cells``: writes the input's output
            files (``found``: :attr:`Found.found`, the path as the search met it)
            under ``out`` (atomically) and returns its columns. Runs in the writer
            thread; raising fails that file.
        outputs: columns naming files (relative to ``out``) a finished row needs.
        folders: sub-folders of ``out`` to create.
        products: sub-folders of ``out`` where this kind of task, with any settings,
            writes a file named :func:`output_name` of an input. When an input fails,
            its files there are removed: what an earlier run made of it would
            otherwise stay, unreferenced, looking current.
        check_header: optional ``header -> None`` that raises :class:`DACInputError`
            for a table this task cannot add to (e.g. columns of another model).
        name: the command, for messages (``"dac crop"``).
    """

    table: str
    fields: tuple[str, ...]
    settings: dict
    read: Callable[[str], tuple[torch.Tensor, str]]
    compute: Callable[[torch.Tensor], list[Any]]
    write: Callable[[Path, str, torch.Tensor, Any, str], dict[str, str]]
    outputs: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    products: tuple[str, ...] = ()
    check_header: Callable[[list[str]], None] | None = None
    name: str = "dac"


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
            found.setdefault(key, Found(key, problem, os.path.abspath(path)))

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
    its class, every public attribute (``output_size``, ``pool_size``, the schedule,
    ``r_min_fraction``..., not what its last call left), the same for each sub-module,
    and a digest of its ``state_dict`` (the weights of a learned saliency, say).
    """
    return {
        "format": ARCHIVE_FORMAT,
        "bits": bits,
        "gray8": bool(gray8),
        "overlays": bool(overlays),
        "dicom": _dicom_settings(dicom, percentiles),
        "layer": module_settings(layer),
        "weights": weights_digest(layer),
    }


def _dicom_settings(dicom: str, percentiles: Sequence[float]) -> dict:
    return {"intensity": dicom} | ({"percentiles": [float(v) for v in percentiles]} if dicom == "percentiles" else {})


def settings_digest(settings: dict) -> str:
    """16 hex digits of the SHA-256 of ``settings`` as canonical JSON: a ``settings`` cell.

    Example:
        >>> settings_digest({"a": 1, "b": [2]}) == settings_digest({"b": [2], "a": 1})
        True
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_key(layer: torch.nn.Module, **options: Any) -> str:
    """The ``settings`` column of :func:`crop_archive`: :func:`settings_digest` of
    :func:`crop_settings` (same keyword options).

    Example:
        >>> settings_key(DACrop(pool_size=4)) == settings_key(DACrop(pool_size=4))
        True
        >>> settings_key(DACrop(pool_size=4)) == settings_key(DACrop(pool_size=5))
        False
    """
    return settings_digest(crop_settings(layer, **options))


def module_settings(module: torch.nn.Module) -> dict:
    """A module's class and public attributes, and those of its sub-modules, as JSON."""
    config: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
    for name, value in vars(module).items():
        if not name.startswith("_") and name not in _NOT_SETTINGS:
            config[name] = _plain(value)
    for name, child in module.named_children():
        config[f"module {name}"] = module_settings(child)
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


def weights_digest(module: torch.nn.Module) -> str:
    """16 hex digits naming a module's ``state_dict`` (every parameter and buffer)."""
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
    """A table as read: its header (user columns kept) and rows keyed by path."""

    def __init__(self, header: list[str], rows: dict[str, list[str]], fields: Sequence[str] = CSV_FIELDS) -> None:
        self.fields = tuple(fields)
        self.header = header + [f for f in self.fields if f not in header]
        self.index = {f: self.header.index(f) for f in self.fields}
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


def _read_table(csv_path: Path, fields: Sequence[str] = CSV_FIELDS, command: str = "dac crop",
                check_header: Callable[[list[str]], None] | None = None) -> _Table:
    """The table of earlier runs (an empty one if there is none); refuses what it cannot keep."""
    if not csv_path.exists():
        return _Table(list(fields), {}, fields)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
            lines = [cells for cells in csv.reader(file) if cells]
    except (OSError, csv.Error) as err:
        raise DACInputError(f"{csv_path}: cannot be read as a CSV table ({err}); it was left as it is") from None
    if not lines:
        return _Table(list(fields), {}, fields)
    header = lines[0]
    if "path" not in header:
        other = any(";" in h or "\t" in h for h in header)
        hint = " (its columns look separated by ';' or tabs; dac writes commas)" if other else ""
        raise DACInputError(
            f"{csv_path}: has no 'path' column{hint}, so {command} cannot add to it; it was left as it is "
            "(move it away, or choose another results folder)"
        )
    if check_header is not None:
        check_header(header)
    width = max(len(cells) for cells in lines)
    header = header + [""] * (width - len(header))  # rows longer than the header: unnamed columns
    table = _Table(header, {}, fields)
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
    text = _io.StringIO(newline="")
    csv.writer(text).writerows([table.header] + [table.rows[k] for k in keys])
    atomic_write(csv_path, lambda file: file.write(text.getvalue().encode("utf-8", "surrogateescape")))


def _replay_journal(journal_path: Path, table: _Table) -> int:
    """Add the rows of a journal to ``table``; a torn last row is left out (done again).

    Returns the number of rows replayed."""
    try:
        text = journal_path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return 0
    rows = []
    try:
        for cells in csv.reader(_io.StringIO(text, newline="")):
            rows.append(cells)
    except csv.Error:
        pass  # a torn quoted field at the end
    if not rows or rows[0][-1:] != ["end"] or "path" not in rows[0]:
        return 0
    header = rows[0]
    count = 0
    for cells in rows[1:]:
        if len(cells) == len(header) and cells[-1] == "1":
            values = {k: v for k, v in zip(header, cells) if k in table.index}
            table.update(values["path"], values)
            count += 1
    return count
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
def _locked(out: Path, name: str, wait: float = _LOCK_WAIT_S) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``out`` (POSIX ``flock``) while the table is rewritten.

    Other processes of a sharded run hold it only to merge their rows, so this waits
    for it (at most ``wait`` seconds, then refuses)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    descriptor = os.open(out, os.O_RDONLY)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DACInputError(
                        f"{name}: another process has held the lock on {os.fspath(out)!r} for {wait:.0f} s; "
                        "is a dac run hanging there?"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(descriptor)


def _try_lock(descriptor: int) -> bool:
    """Take an exclusive ``flock`` on an open file without waiting; False if another holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


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
    write_json(path, known)


# ------------------------------------------------------------------ the engine
def default_workers(device: str | torch.device = "cpu") -> int:
    """Decoding processes ``workers="auto"`` starts: none on a CPU of up to 4 cores (one
    read-ahead thread decodes: no copy of each image between processes), a quarter of
    the cores beyond that (the search keeps the rest), and all but one (at most 8) when
    the computation runs on a GPU.

    Example:
        >>> default_workers("cpu") >= 0
        True
    """
    cpus = _cpus()
    if torch.device(device).type != "cpu":
        return max(0, min(8, cpus - 1))
    return 0 if cpus <= 4 else cpus // 4


def _cpus() -> int:
    """Cores this process may use; under ``torchrun``, its share of this machine's."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, count // int(local)) if local.isdigit() and int(local) > 0 else max(1, count)


def search_threads(workers: int, device: str | torch.device = "cpu") -> int | None:
    """torch threads of the computation in :func:`run_archive`: on a CPU, the cores the
    readers (``workers`` processes, or the read-ahead thread when 0) leave, at most
    torch's current number; None (unchanged) on other devices."""
    if torch.device(device).type != "cpu":
        return None
    return min(torch.get_num_threads(), max(1, _cpus() - max(workers, 1)))


def check_shard(shard: Any, name: str = "shard") -> tuple[int, int]:
    """``(index, count)`` from a pair or a text ``"i/n"``, with 0 <= index < count.

    Example:
        >>> check_shard("1/4"), check_shard((0, 1))
        ((1, 4), (0, 1))
    """
    if isinstance(shard, str):
        parts = shard.split("/")
        try:
            shard = tuple(int(p) for p in parts) if len(parts) == 2 else None
        except ValueError:
            shard = None
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)):
        raise DACInputError(f"{name}: expected i/n (this process's share i of n, 0 <= i < n), got {shard!r}")
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise DACInputError(f"{name}: expected i/n with 0 <= i < n, got {index}/{count}")
    return index, count


def shard_from_environment() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` where ``torchrun`` (or another launcher) set them, else None."""
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    if rank.isdigit() and world.isdigit() and int(world) > 1:
        return check_shard((int(rank), int(world)), "RANK/WORLD_SIZE")
    return None


def _journal_name(table: str, shard: tuple[int, int]) -> str:
    stem = Path(table).stem
    return f".{stem}-journal.csv" if shard == (0, 1) else f".{stem}-journal-{shard[0]}-of-{shard[1]}.csv"


class _Reader(torch.utils.data.Dataset):
    """Reads one input per item: (index, image or None, reason, file_stat, sha256, intensity)."""

    def __init__(self, items: Sequence[Found], read: Callable[[str], tuple[torch.Tensor, str]]) -> None:
        self.items, self.read = list(items), read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str, str, str]:
        item = self.items[i]
        if item.problem:
            return i, None, item.problem, "", "", ""
        try:
            try:
                before = os.stat(item.key)  # before reading: a later change is seen next run
            except OSError:
                before = None
            image, intensity = self.read(item.key)  # a missing file fails here, with its reason
            if before is None:
                raise OSError("the file changed while it was read")
            return i, image, "", _stat_text(before), _sha256(item.key), intensity
        except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, not fatal
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            return i, None, str(reason), "", "", ""


class _Groups:
    """Decoded images waiting, in groups of one size and dtype, until a group makes a batch.

    A group goes when it holds ``batch_size`` images; when more than ``2 * batch_size``
    images wait in all (an archive of many sizes), the largest group goes as it is.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.limit = batch_size, 2 * batch_size
        self.groups: dict[tuple, list] = {}
        self.count = 0

    def add(self, row: dict[str, str], image: torch.Tensor) -> list[list]:
        key = (tuple(image.shape), image.dtype)
        group = self.groups.setdefault(key, [])
        group.append((row, image))
        self.count += 1
        ready = [self._pop(key)] if len(group) >= self.batch_size else []
        while self.count > self.limit:
            ready.append(self._pop(max(self.groups, key=lambda k: len(self.groups[k]))))
        return ready

    def flush(self) -> list[list]:
        return [self._pop(key) for key in list(self.groups)]

    def _pop(self, key: tuple) -> list:
        group = self.groups.pop(key)
        self.count -= len(group)
        return group


@dataclass(frozen=True)
class _Failure:
    reason: str


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_archive(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    task: ArchiveTask,
    *,
    batch_size: int = 8,
    workers: int | str = "auto",
    device: str | torch.device = "cpu",
    prefetch: int = 2,
    progress: bool | None = None,
    shard: tuple[int, int] | str | None = None,
) -> ArchiveSummary:
    """Run ``task`` over every image of ``inputs`` into ``out_dir`` (see the module doc).

    Every argument is checked, and the inputs found, before anything is created.

    Args:
        inputs: files, folders (searched recursively) or glob patterns.
        out_dir: results folder: ``task.table``, ``settings.json`` (what each
            ``settings`` value means) and the task's outputs.
        task: what to compute and write per image (:class:`ArchiveTask`).
        batch_size: images per computed batch (memory grows with it).
        workers: processes decoding files ahead of the computation (0: a read-ahead
            thread of this process), or ``"auto"`` (:func:`default_workers`).
        device: where the computation runs; on a CPU, torch's threads are set to the
            cores the workers leave free for the run.
        prefetch: batches each worker decodes ahead (the queue's depth).
        progress: show a progress bar (None: only on a terminal).
        shard: ``(i, n)`` or ``"i/n"``: take every n-th input from the i-th on (see
            the module doc); None: all of them.

    Returns:
        :class:`ArchiveSummary` of this process's share.

    Raises:
        DACInputError: a bad argument, an input that does not exist, an ``out_dir``
            that cannot be written, a table that cannot be kept, or another run of
            the same shard writing to ``out_dir``.
        KeyboardInterrupt: after writing the table of what was done (run again to resume).
    """
    from .data import io as dio

    began = time.perf_counter()
    batch_size = check_int(batch_size, "batch_size", 1)
    prefetch = check_int(prefetch, "prefetch", 1)
    dev = check_device(device, "device")
    workers = default_workers(dev) if workers == "auto" else check_int(workers, "workers", 0)
    index, count = check_shard(shard if shard is not None else (0, 1))
    out = Path(out_dir)
    found = find_inputs(inputs, dio.IMAGE_SUFFIXES, exclude=out)
    check_out_dir(out, "out_dir")
    _make_folders(out, "out_dir")

    mine = found[index::count]
    order = {item.key: i for i, item in enumerate(found)}
    key = settings_digest(task.settings)
    csv_path = out / task.table
    journal_path = out / _journal_name(task.table, (index, count))
    summary = ArchiveSummary(total=len(mine), found=len(found), shard=(index, count), keys=[f.key for f in mine])
    journal, table = _start(out, csv_path, journal_path, task, order, (index, count), key)
    try:
        writer = csv.writer(journal)
        todo = []
        for item in mine:
            done, update = _is_done(table, item.key, key, out, task.outputs)
            if done:
                summary.skipped += 1
                if update:  # touched or copied, not changed: the new stat, through the journal
                    writer.writerow([update.get(f, "") for f in task.fields] + ["1"])
            else:
                todo.append(item)
        journal.flush()
        with _torch_threads(search_threads(workers, dev)):
            _process(todo, task, out, key, dev, journal, summary, batch_size, workers, prefetch, progress)
    finally:
        try:
            journal.flush()
            with _locked(out, "out_dir"):  # this run's part into the one table
                table = _read_table(csv_path, task.fields, task.name, task.check_header)
                _replay_journal(journal_path, table)
                _write_table(csv_path, table, order)
                journal_path.unlink(missing_ok=True)
        finally:
            journal.close()  # a part that could not be merged stays; the next run merges it
    summary.seconds = time.perf_counter() - began
    return summary


def _start(out: Path, csv_path: Path, journal_path: Path, task: ArchiveTask, order: dict[str, int],
           shard: tuple[int, int], key: str):
    """Under the lock on ``out``: open and lock this run's journal, merge the parts that
    finished or dead runs left into the table, write it, record the settings ``key``
    means; returns (journal, table)."""
    stem = Path(task.table).stem
    with _locked(out, "out_dir"):
        journal = open(journal_path, "a", newline="", encoding="utf-8", errors="surrogateescape")
        if not _try_lock(journal.fileno()):
            journal.close()
            share = "" if shard == (0, 1) else f" (shard {shard[0]}/{shard[1]})"
            raise DACInputError(f"out_dir: another {task.name}{share} is writing to {os.fspath(out)!r}; wait for it to end")
        try:
            table = _read_table(csv_path, task.fields, task.name, task.check_header)
            merged = []
            for part in sorted(out.glob(f".{stem}-journal*.csv")):
                if part == journal_path:
                    _replay_journal(part, table)
                    continue
                with open(part, "rb") as other:
                    if _try_lock(other.fileno()):  # its run is over (a lock dies with its process)
                        _replay_journal(part, table)
                        merged.append(part)
            _write_table(csv_path, table, order)
            for part in merged:
                part.unlink(missing_ok=True)
            for sub in task.folders:
                (out / sub).mkdir(exist_ok=True)
            _record_settings(out, key, task.settings)
            journal.truncate(0)
            csv.writer(journal).writerow(tuple(task.fields) + ("end",))
            journal.flush()
            os.fsync(journal.fileno())
        except BaseException:
            journal.close()
            if journal_path.exists() and journal_path.stat().st_size == 0:
                journal_path.unlink()
            raise
    return journal, table


def _is_done(table: _Table, path: str, key: str, out: Path, outputs: Sequence[str]) -> tuple[bool, dict | None]:
    """Whether the row of ``path`` holds this very file done with settings ``key``, and
    the row with its new stat where the file was touched or copied without a change."""
    row = table.get(path)
    if not row or row["status"] != "ok" or row["settings"] != key:
        return False, None
    if not all(row.get(name) and (out / row[name]).is_file() for name in outputs):
        return False, None
    try:
        stat_text = _stat_text(os.stat(path))
        if stat_text == row["file_stat"]:
            return True, None
        if row["sha256"] and _sha256(path) == row["sha256"]:
            return True, row | {"file_stat": stat_text}
    except OSError:
        pass
    return False, None


def _process(todo, task, out, key, dev, journal, summary, batch_size, workers, prefetch, progress) -> None:
    """Read, compute, write and journal every input of ``todo`` (see "Speed" in the module doc)."""
    from tqdm import tqdm

    if not todo:
        return
    writer = csv.writer(journal)
    bar = tqdm(total=len(todo), unit="img", disable=(None if progress is None else not progress))

    def journal_rows(rows: list[dict[str, str]]) -> None:
        writer.writerows([[row.get(f, "") for f in task.fields] + ["1"] for row in rows])
        journal.flush()
        os.fsync(journal.fileno())
        for row in rows:
            if row["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append((row["path"], row["error"]))
                discard_outputs(out, row["path"], task.products)
        bar.update(len(rows))

    batches = [list(range(i, min(i + batch_size, len(todo)))) for i in range(0, len(todo), batch_size)]
    reader = _Reader(todo, task.read)
    if workers:
        loader: Iterable = torch.utils.data.DataLoader(
            reader, batch_sampler=batches, num_workers=workers, collate_fn=list, prefetch_factor=prefetch)
    else:
        loader = _read_ahead(reader, batches, prefetch)
    groups = _Groups(batch_size)
    pending: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dac-writer")

    def submit(batch: list) -> None:
        rows = [row for row, _ in batch]
        images = [image for _, image in batch]
        results = _compute(task, images, dev)
        pending.append(pool.submit(_write_rows, task, out, rows, images, results))
        while len(pending) > 1:  # one batch written while the next is computed
            journal_rows(pending.popleft().result())

    try:
        for items in loader:
            failed = []
            for i, image, reason, file_stat, digest, intensity in items:
                row = {"path": todo[i].key, "found": todo[i].found or todo[i].key, "file_stat": file_stat, "sha256": digest, "intensity": intensity,
                       "settings": key}
                if image is None:
                    failed.append(row | {"status": "failed", "error": _one_line(reason)})
                    continue
                row |= {"width": str(image.shape[-1]), "height": str(image.shape[-2])}
                for batch in groups.add(row, image):
                    submit(batch)
            if failed:
                journal_rows(failed)
        for batch in groups.flush():
            submit(batch)
    finally:
        # what was computed is written and journalled; the rest is done again next run
        while pending:
            try:
                journal_rows(pending.popleft().result())
            except Exception:  # noqa: BLE001 - a write that broke is done again next run
                pass
        pool.shutdown(wait=True)
        if hasattr(loader, "close"):  # the read-ahead thread: stop reading now
            loader.close()
        bar.close()


def _read_ahead(reader: _Reader, batches: list[list[int]], depth: int) -> Iterator[list]:
    """Batches read by one thread of this process, ``depth`` batches ahead of the caller.

    Decoders release the GIL (Pillow, zlib, hashlib), so reading overlaps the search
    without a second process: no copy of each image between processes, no fork.
    """
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dac-reader")
    pending: collections.deque = collections.deque()
    ahead = iter(batches)
    try:
        for batch in ahead:
            pending.append(pool.submit(lambda b=batch: [reader[i] for i in b]))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _compute(task: ArchiveTask, images: list[torch.Tensor], device: torch.device) -> list[Any]:
    """``task.compute`` on one batch; if that raises, on each image alone, so that only the
    bad ones fail (a :class:`_Failure` with the reason)."""
    def run(batch: list[torch.Tensor]) -> list[Any]:
        with torch.no_grad():
            results = list(task.compute(torch.stack(batch).to(device)))
        if len(results) != len(batch):
            raise RuntimeError(f"compute returned {len(results)} results for {len(batch)} images")
        return results

    try:
        return run(images)
    except Exception as exc:  # noqa: BLE001 - isolate the image that broke the batch
        if len(images) == 1:
            return [_Failure(_reason_of(exc))]
        results = []
        for image in images:
            try:
                results.extend(run([image]))
            except Exception as exc:  # noqa: BLE001 - recorded in the table
                results.append(_Failure(_reason_of(exc)))
        return results


def _reason_of(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"


def _write_rows(task: ArchiveTask, out: Path, rows: list[dict], images: list, results: list) -> list[dict[str, str]]:
    """The writer thread: each input's outputs and its row (ok, or failed with the reason)."""
    done = []
    for row, image, result in zip(rows, images, results):
        if isinstance(result, _Failure):
            done.append(row | {"status": "failed", "error": _one_line(result.reason)})
            continue
        try:
            cells = task.write(out, row["path"], image, result, row["found"])
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            done.append(row | {"status": "failed", "error": _one_line(f"could not write output: {exc}")})
            continue
        done.append(row | cells | {"status": "ok", "error": ""})
    return done


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------- cropping
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
            that cannot be written, a ``boxes.csv`` that cannot be kept, or another
            run (of the same shard) writing to ``out_dir``.
        KeyboardInterrupt: after writing the table of what was done (run again to resume).
    """
    from .data import io as dio

    if isinstance(bits, bool) or bits not in (8, 16):
        raise DACInputError(f"bits: expected 8 or 16, got {bits!r}")
    if dicom not in dio.DICOM_INTENSITY:
        raise DACInputError(f"dicom: expected one of {dio.DICOM_INTENSITY}, got {dicom!r}")
    percentiles = dio.check_percentiles(percentiles)
    layer = layer if layer is not None else DACrop()
    settings = crop_settings(layer, bits=bits, gray8=gray8, overlays=overlays, dicom=dicom, percentiles=percentiles)
    dev = check_device(device, "device")
    if any(t.device != dev for t in [*layer.parameters(), *layer.buffers()]):
        layer = copy.deepcopy(layer).to(dev)  # the search's device; the caller's layer stays where it is
    task = ArchiveTask(
        table="boxes.csv",
        fields=CSV_FIELDS,
        settings=settings,
        read=functools.partial(dio.read_input, gray8=bool(gray8), dicom=dicom, percentiles=percentiles),
        compute=functools.partial(_crop_compute, layer),
        write=functools.partial(_crop_write, bits=bits, overlays=bool(overlays)),
        outputs=("crop",),
        folders=("crops", "overlays") if overlays else ("crops",),
        products=("crops", "overlays"),
        name="dac crop",
    )
    return run_archive(inputs, out_dir, task, batch_size=batch_size, workers=workers, device=device,
                       progress=progress, shard=shard)


def _crop_compute(layer: torch.nn.Module, images: torch.Tensor) -> list[tuple]:
    crops, boxes, info = layer(images, return_boxes=True)
    return [(crops[k].cpu(), boxes[k].cpu(), float(info.cost[k]), int(info.iterations[k])) for k in range(len(crops))]


def discard_outputs(out: Path, key: str, folders: Sequence[str]) -> None:
    """Remove the files named :func:`output_name` of input ``key`` from ``out``'s
    ``folders`` (those that exist; one that cannot be removed is left)."""
    for folder in folders:
        try:
            (out / folder / output_name(key)).unlink(missing_ok=True)
        except OSError:
            pass


def _crop_write(out: Path, key: str, image: torch.Tensor, result: tuple, found: str, *, bits: int, overlays: bool) -> dict[str, str]:
    from .data import io as dio

    crop, box, cost, iterations = result
    name = f"crops/{output_name(key)}"
    dio.write_png(out / name, crop, bits=bits)
    if overlays:
        write_overlay(out / "overlays" / output_name(key), image, box)
    else:
        discard_outputs(out, key, ("overlays",))  # one from an earlier run shows another box
    x1, y1, x2, y2 = (f"{v:.2f}" for v in box.tolist())
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "cost": f"{cost:.6g}", "iterations": str(iterations), "crop": name}


def write_overlay(path: Path, image: torch.Tensor, box: torch.Tensor, text: str = "") -> None:
    """The image (downscaled to <= 1024 px wide) with its box drawn in red and ``text``
    written above it; an 8-bit PNG written atomically."""
    from PIL import Image, ImageDraw

    from .data import io as dio

    gray = dio.to_gray8(image)[0].numpy()
    pil = Image.fromarray(gray).convert("RGB")
    scale = min(1.0, 1024 / pil.width)
    if scale < 1:
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(pil)
    x1, y1, x2, y2 = (v * scale for v in box.tolist())
    draw.rectangle([x1, y1, x2, y2], outline=(255, 0, 0), width=3)
    if text:
        left, top, right, bottom = draw.textbbox((0, 0), text)
        y = y1 - (bottom - top) - 6 if y1 >= (bottom - top) + 6 else y2 + 2
        draw.rectangle([x1, y, x1 + right - left + 6, y + bottom - top + 4], fill=(255, 0, 0))
        draw.text((x1 + 3 - left, y + 2 - top), text, fill=(255, 255, 255))
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    dio.write_png(path, tensor, bits=8)
