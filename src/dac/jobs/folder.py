"""The results folder of a job: checked before anything is created, created, locked.

A job writes into one folder ``OUT``. :func:`check_out_dir` checks it can (creating
nothing); :func:`make_folders` creates it; :func:`locked` holds an exclusive lock on it
(POSIX ``flock``) while its table is rewritten; :func:`try_lock` takes a journal's lock
without waiting (a lock dies with its process, so a journal nobody holds belongs to a
run that is over); :func:`discard_outputs` removes an input's outputs.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from .._checks import DACInputError
from .inputs import output_name, reason

__all__ = ["check_out_dir", "discard_outputs", "locked", "make_folders", "try_lock"]

_LOCK_WAIT_S = 120.0  # longest wait for another process's merge into the table


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
        raise DACInputError(f"{name}: cannot write in {os.fspath(where)!r}: {reason(err)}") from None
    return out


def make_folders(out: Path, name: str) -> None:
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
