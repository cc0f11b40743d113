"""The batch engine: a folder of images in, one table row per file out.

One engine, :func:`run_archive`, serves every command that turns a folder of images into
one table row per file: it finds the inputs (:mod:`dac.jobs.inputs`), reads them in
worker processes, hands batches of same-size images to the task's computation, writes
the task's files in a background thread, journals each batch's rows and keeps the table
(:mod:`dac.jobs.table`). A task says what it computes with an :class:`ArchiveTask`
(``dac crop``: :mod:`dac.tasks.crop`; ``dac predict``: :mod:`dac.tasks.predict`).
Inputs are only ever read.

Resuming
    During a run each batch's rows are appended to a journal (one per process) and
    flushed to disk; the table is rewritten atomically from it when the run ends, is
    interrupted, or (after a kill) when the next run starts. An interrupted or killed
    run loses at most the batches in flight.

Finished work
    An input is skipped only when its row is ``ok``, its output files exist, the row's
    ``settings`` equals the digest of this run's :attr:`ArchiveTask.settings`, and the
    file is the one that was processed: the same size, modification time and change
    time (``file_stat``, ``size:mtime_ns:ctime_ns``), or, where those differ (a
    ``touch``, a copy), the same SHA-256 of its bytes (``sha256``). Anything else is
    done again, over the same output name. Every write to a file moves its change time,
    which no program can set back, so a changed file is noticed even with its size and
    modification time restored. The digest is taken while reading and is read again
    only for files whose stat changed, so a re-run over a finished archive costs one
    ``stat`` per file. The device, the batch size, the number of workers and the shard
    are not settings: they are not meant to change what is written (beyond
    floating-point rounding between devices).

Inputs
    Files as given, folders searched recursively for image suffixes (links to folders
    followed, each folder once), glob patterns (``**`` allowed). Every input found ends
    as a row, ok or failed with its reason: dangling links, link loops, FIFOs, unreadable
    files, folders whose name ends like an image's (also searched) and folders that cannot
    be listed. Nothing inside ``OUT`` is ever an input, so ``OUT`` may sit inside an input
    folder. Output names cannot collide or escape ``OUT``: an output is named after the
    input's file stem (reduced to ``[A-Za-z0-9._-]``) plus a hash of its resolved path.

Speed: the parts overlap
    ``workers`` processes (or, with ``workers=0``, one read-ahead thread of this
    process) decode files and take their SHA-256 ahead of the computation, through a
    bounded queue (``prefetch`` batches per reader); decoded
    images wait in groups of one size and type until a group holds ``batch_size``
    images (or too many wait: then the largest group goes), so each batch is one
    tensor; the main process computes with ``torch`` threads set to the
    cores the readers leave free; one writer thread encodes and writes the outputs while
    the next batch is computed. Images held at once: at most ``(max(workers, 1) *
    prefetch + 5) * batch_size`` (queue, waiting groups, the batch being computed, two
    batches being written). The read-ahead thread costs no copy between processes and
    suits Pillow's formats (their decoders release the GIL); DICOM, decoded in Python
    by pydicom, goes faster with worker processes.

Several processes or machines
    With ``shard=(i, n)`` (``--shard i/n``, or the ``RANK`` and ``WORLD_SIZE``
    that ``torchrun`` sets) a process takes every n-th input of the sorted list from the
    i-th on, journals its rows in its own part and, when it ends, merges its part into
    the one table under a lock on ``OUT`` (POSIX ``flock``; on several machines ``OUT``
    must be on a file system whose locks work across them, such as NFSv4). Parts left by
    killed processes are merged by the next run. A resumed run, with any number of
    processes, skips what any of them finished. Two runs of the same shard on one
    ``OUT`` at once are refused, and so is a run beside a running one with other
    settings or another shard layout (:func:`dac.jobs.folder.claim`).

One folder, one command
    ``OUT/.dac-job.json`` names the command whose results ``OUT`` holds; another
    command there is refused (``dac crop`` and ``dac predict`` both write
    ``crops/<name>`` and each would take the other's crops for its own).

Messages
    Progress is a tqdm bar; events worth a line in a log (journals of ended runs
    merged at INFO, a merge that failed after the run stopped at DEBUG: the run's own
    error is the one line a user sees) go to the ``dac.jobs`` logger.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .._checks import DACInputError, check_device, check_int, check_shard
from ..data import io as dio
from .folder import check_out_dir, claim, discard_outputs, locked, make_folders, try_lock
from .inputs import Found, find_inputs, sha256_bytes, sha256_file, stat_text
from .settings import record_settings, settings_digest
from .table import Table, journal_name, read_table, replay_journal, write_table

_log = logging.getLogger("dac.jobs")

__all__ = [
    "ArchiveSummary",
    "ArchiveTask",
    "default_workers",
    "run_archive",
    "search_threads",
    "shard_from_environment",
]


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
    warnings: list[tuple[str, str]] = field(default_factory=list)  #: (path, intensity) of ok rows read with a warning
    frozen: list[str] = field(default_factory=list)  #: paths of ok rows whose table says frozen=1 (a flat map)




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
        read: ``(path, data) -> (image Tensor[C, H, W], intensity text)``: decode
            ``data``, the bytes of the file at ``path`` (read once by the engine, which
            hashes the same bytes). Runs in worker processes, so it must pickle (a
            module-level function or a ``functools.partial`` of one); raising fails that
            file with the reason. An intensity text holding ``"warning:"`` (a faint
            16-bit image, say) is listed in :attr:`ArchiveSummary.warnings`.
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
    read: Callable[[str, bytes], tuple[torch.Tensor, str]]
    compute: Callable[[torch.Tensor], list[Any]]
    write: Callable[[Path, str, torch.Tensor, Any, str], dict[str, str]]
    outputs: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    products: tuple[str, ...] = ()
    check_header: Callable[[list[str]], None] | None = None
    name: str = "dac"



# ------------------------------------------------------------------ the engine
def default_workers(device: str | torch.device = "cpu") -> int:
    """Decoding processes ``workers="auto"`` starts: none on a CPU of up to 4 cores (one
    read-ahead thread decodes: no copy of each image between processes), a quarter of
    the cores beyond that (the search keeps the rest), and all but one (at most 8) when
    the computation runs on a GPU.

    Examples:
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


def shard_from_environment() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` where ``torchrun`` (or another launcher) set them, else None."""
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    if rank.isdigit() and world.isdigit() and int(world) > 1:
        return check_shard((int(rank), int(world)), "RANK/WORLD_SIZE")
    return None



class _Reader(torch.utils.data.Dataset):
    """Reads one input per item: (index, image or None, reason, file_stat, sha256, intensity).

    The file is read once (:func:`dac.data.io.read_file`); its bytes are hashed and
    decoded, so the ``sha256`` cell names what was decoded even if the file is
    rewritten meanwhile. The stat is taken before reading: a later change is seen by
    the next run.
    """

    def __init__(self, items: Sequence[Found], read: Callable[[str, bytes], tuple[torch.Tensor, str]]) -> None:
        self.items, self.read = list(items), read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str, str, str]:
        item = self.items[i]
        if item.problem:
            return i, None, item.problem, "", "", ""
        try:
            try:
                before = os.stat(item.key)
            except OSError:
                before = None
            data = dio.read_file(item.key)  # a missing file fails here, with its reason
            if before is None:
                raise OSError("the file changed while it was read")
            image, intensity = self.read(item.key, data)
            return i, image, "", stat_text(before), sha256_bytes(data), intensity
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
            that cannot be written, a table that cannot be kept, an ``out_dir``
            holding another command's results, or another run writing there (of the
            same shard, or with other settings or another shard layout).
        OSError: writing the results failed (a full disk): what was done is kept;
            run again to resume.
        KeyboardInterrupt: after writing the table of what was done (run again to resume).
    """
    began = time.perf_counter()
    batch_size = check_int(batch_size, "batch_size", 1)
    prefetch = check_int(prefetch, "prefetch", 1)
    dev = check_device(device, "device")
    workers = default_workers(dev) if workers == "auto" else check_int(workers, "workers", 0)
    index, count = check_shard(shard if shard is not None else (0, 1))
    out = Path(out_dir)
    found = find_inputs(inputs, dio.IMAGE_SUFFIXES, exclude=out, also=dio.looks_like_dicom)
    check_out_dir(out, "out_dir", task.folders)
    make_folders(out, "out_dir")

    mine = found[index::count]
    order = {item.key: i for i, item in enumerate(found)}
    key = settings_digest(task.settings)
    csv_path = out / task.table
    journal_path = out / journal_name(task.table, (index, count))
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
    except BaseException:
        # what stopped the run (Ctrl-C, a full disk) is the one error raised; the merge
        # is tried, and if it fails too its part stays for the next run to merge
        try:
            _finish(out, csv_path, journal_path, journal, task, order)
        except Exception as exc:  # noqa: BLE001 - logged; the error that stopped the run goes on
            _log.debug("%s: could not merge %s into %s after the run stopped (%s); the next run merges it",
                      task.name, journal_path, csv_path, exc)
        raise
    _finish(out, csv_path, journal_path, journal, task, order)
    summary.seconds = time.perf_counter() - began
    return summary


def _finish(out: Path, csv_path: Path, journal_path: Path, journal, task: ArchiveTask, order: dict[str, int]) -> None:
    """Merge this run's journal into the table under the lock on ``out``, then close it
    (a part that could not be merged stays; the next run merges it)."""
    try:
        journal.flush()
        with locked(out, "out_dir"):
            table = read_table(csv_path, task.fields, task.name, task.check_header)
            replay_journal(journal_path, table)
            write_table(csv_path, table, order)
            journal_path.unlink(missing_ok=True)
    finally:
        with contextlib.suppress(OSError):  # a full disk fails the close's flush too
            journal.close()


def _start(out: Path, csv_path: Path, journal_path: Path, task: ArchiveTask, order: dict[str, int],
           shard: tuple[int, int], key: str):
    """Under the lock on ``out``: open and lock this run's journal, merge the parts that
    finished or dead runs left into the table, write it, record the settings ``key``
    means; returns (journal, table)."""
    stem = Path(task.table).stem
    with locked(out, "out_dir"):
        journal = open(journal_path, "a", newline="", encoding="utf-8", errors="surrogateescape")
        if not try_lock(journal.fileno()):
            journal.close()
            share = "" if shard == (0, 1) else f" (shard {shard[0]}/{shard[1]})"
            raise DACInputError(f"out_dir: another {task.name}{share} is writing to {os.fspath(out)!r}; wait for it to end")
        try:
            others = [part for part in sorted(out.glob(f".{stem}-journal*.csv")) if part != journal_path]
            merged = [part for part in others if _is_over(part)]
            claim(out, command=task.name, table=task.table, products=task.products, settings=key, shards=shard[1],
                  running=len(merged) < len(others))
            table = read_table(csv_path, task.fields, task.name, task.check_header)
            for part in [*merged, journal_path]:
                replayed = replay_journal(part, table)
                if part in merged:
                    _log.info("%s: merged %d rows of an ended run's journal %s", task.name, replayed, part)
            write_table(csv_path, table, order)
            for part in merged:
                part.unlink(missing_ok=True)
            for sub in task.folders:
                (out / sub).mkdir(exist_ok=True)
            record_settings(out, key, task.settings)
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


def _is_over(part: Path) -> bool:
    """Whether the run that wrote journal ``part`` is over: nobody holds its lock (a lock dies with its process)."""
    try:
        with open(part, "rb") as other:
            return try_lock(other.fileno())
    except FileNotFoundError:  # merged meanwhile by the run that ended
        return True


def _is_done(table: Table, path: str, key: str, out: Path, outputs: Sequence[str]) -> tuple[bool, dict | None]:
    """Whether the row of ``path`` holds this very file done with settings ``key``, and
    the row with its new stat where the file was touched or copied without a change."""
    row = table.get(path)
    if not row or row["status"] != "ok" or row["settings"] != key:
        return False, None
    if not all(row.get(name) and (out / row[name]).is_file() for name in outputs):
        return False, None
    try:
        now = stat_text(os.stat(path))
        if now == row["file_stat"]:
            return True, None
        if row["sha256"] and sha256_file(path) == row["sha256"]:
            return True, row | {"file_stat": now}
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
                if "warning:" in row["intensity"]:
                    summary.warnings.append((row["path"], row["intensity"]))
                if row.get("frozen") == "1":
                    summary.frozen.append(row["path"])
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
