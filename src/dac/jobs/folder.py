"""The results folder of a job: checked before anything is created, created, locked.

A job writes into one folder ``OUT``. :func:`check_out_dir` checks it can (creating
nothing); :func:`make_folders` creates it; :func:`locked` holds an exclusive lock on it
(POSIX ``flock``) while its table is rewritten; :func:`try_lock` takes a journal's lock
without waiting (a lock dies with its process, so a journal nobody holds belongs to a
run that is over); :func:`discard_outputs` removes an input's outputs.

One folder, one command: :func:`claim` marks ``OUT`` (:data:`MARK`) with the command
whose results it holds, and refuses another command there (two commands write
``crops/<name>`` under the same names and each would take the other's crops for its
own), and refuses a run beside a running one of other settings or another shard
layout (their crops would land under each other's rows).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from .._checks import DACInputError
from .._files import write_json
from .inputs import output_name, reason

__all__ = ["MARK", "check_out_dir", "claim", "discard_outputs", "locked", "make_folders", "try_lock"]

#: The mark of a results folder: which command's results it holds, and the settings
#: and shard count of its latest run (``{"command", "table", "settings", "shards"}``).
MARK = ".dac-job.json"

_LOCK_WAIT_S = 120.0  # longest wait for another process's merge into the table


def check_out_dir(out_dir: str | os.PathLike, name: str = "out_dir", folders: Sequence[str] = ()) -> Path:
    """Check that ``out_dir`` is a writable folder or can be created; creates nothing.

    Args:
        out_dir: the results folder.
        name: the argument's name, for messages.
        folders: sub-folders a job will create in it: each must be a folder or absent.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DACInputError: it is a file, lies inside a file, cannot be written or created,
            or holds something other than a folder under one of ``folders``; the
            message starts with ``name``.
    """
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise DACInputError(f"{name}: {os.fspath(out)!r} exists and is not a folder")
        for sub in folders:
            inner = out / sub
            if (inner.exists() or inner.is_symlink()) and not inner.is_dir():
                raise DACInputError(
                    f"{name}: {os.fspath(inner)!r} exists and is not a folder; the outputs go there: "
                    "move it away, or choose another folder"
                )
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
        raise DACInputError(f"{name}: cannot write in {os.fspath(where)!r}: {reason(err)}") from None
    return out


def make_folders(out: Path, name: str) -> None:
    """Create ``out`` (removing what was created if that fails half way); a folder that
    another process (a shard of the same run) creates meanwhile is taken as made."""
    missing, path = [], out.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
                created.append(folder)
            except FileExistsError:
                # Another shard of the same run made it between the look and the mkdir.
                if not folder.is_dir():
                    raise
    except OSError as err:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise DACInputError(f"{name}: cannot create {os.fspath(out)!r}: {reason(err)}") from None


@contextlib.contextmanager
def locked(out: Path, name: str, wait: float = _LOCK_WAIT_S) -> Iterator[None]:
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


def try_lock(descriptor: int) -> bool:
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


def discard_outputs(out: Path, key: str, folders: Sequence[str]) -> None:
    """Remove the files named :func:`output_name` of input ``key`` from ``out``'s
    ``folders`` (those that exist; one that cannot be removed is left)."""
    for folder in folders:
        try:
            (out / folder / output_name(key)).unlink(missing_ok=True)
        except OSError:
            pass


def claim(out: Path, *, command: str, table: str, products: Sequence[str], settings: str, shards: int,
          running: bool, name: str = "out_dir") -> None:
    """Mark ``out`` as holding the results of ``command``, or refuse it (call under :func:`locked`).

    Args:
        out: the results folder (it exists).
        command: the command, e.g. ``"dac crop"``.
        table: its table's file name (``"boxes.csv"``).
        products: its output folders; in a folder without a mark (made before marks
            existed), outputs there without ``table`` belong to another command.
        settings: the digest of this run's settings.
        shards: the number of shards of this run's layout.
        running: whether another run of ``command`` is writing to ``out`` now.
        name: the argument's name, for messages.

    Raises:
        DACInputError: ``out`` holds another command's results, or another run of
            ``command`` is writing there with other settings or another shard layout.
    """
    shown = os.fspath(out)
    try:
        mark = json.loads((out / MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        mark = None
    if not isinstance(mark, dict):
        mark = None
        if not (out / table).exists():
            for sub in products:
                with contextlib.suppress(OSError):
                    if any((out / sub).iterdir()):
                        raise DACInputError(
                            f"{name}: {shown!r} holds {sub}/ that no {table} names: results of another command; "
                            f"{command} would write over them: choose another folder"
                        )
    elif mark.get("command") != command:
        raise DACInputError(
            f"{name}: {shown!r} holds the results of {mark.get('command')} ({mark.get('table')}); {command} writes "
            "outputs under the same names: choose another folder"
        )
    elif running and mark.get("settings") != settings:
        raise DACInputError(
            f"{name}: another {command} with other settings is writing to {shown!r}; wait for it to end, "
            "or choose another folder"
        )
    elif running and mark.get("shards") != shards:
        raise DACInputError(
            f"{name}: another {command} with a shard layout of {mark.get('shards')} is writing to {shown!r} "
            f"(this one: {shards}); give every process the same --shard i/{mark.get('shards')}, or wait for it to end"
        )
    ours = {"command": command, "table": table, "settings": settings, "shards": shards}
    if mark != ours:
        write_json(out / MARK, ours)
