"""Atomic file writes (a temporary file in the same folder, then ``os.replace``), and
paths as messages show them.

A reader (or a resumed run) sees either the old file or the new one, never half of one.
The temporary file is created exclusively with mode 0666, so the process umask applies
as for a plain ``open()`` (no umask juggling, which would race with other threads).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "first_copy", "shown_path", "write_json", "write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary binary file next to ``path``, sync it, and rename it to ``path``.

    The folder is created if missing; on any error (or interrupt) the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def shown_path(path: str) -> str:
    """A path for a message: bytes that are not UTF-8 (a Latin-1 file name) as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def first_copy(paths: list[str], chunk: int = 1 << 12) -> tuple[str, str] | None:
    """The first two of ``paths`` (distinct files) whose bytes are the same, or None.

    Only files of equal size are compared: first a hash of three ``chunk``-byte samples
    (start, middle, end: uncompressed scans of one size share their headers and often
    their dark first rows), then of the whole file, so a folder of compressed images,
    whose sizes rarely agree, costs one ``stat`` per file, and one of same-size scans
    three small reads per file. Empty files and files that cannot be read are skipped
    (they are no image; reading them fails with its own reason).
    """
    by_size: dict[int, list[str]] = {}
    for path in paths:
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if size:
            by_size.setdefault(size, []).append(path)
    for size, group in by_size.items():
        if len(group) < 2:
            continue
        by_sample: dict[bytes, list[str]] = {}
        for path in group:
            digest = _digest(path, chunk, size)
            if digest is not None:
                by_sample.setdefault(digest, []).append(path)
        for alike in by_sample.values():
            if len(alike) < 2:
                continue
            whole: dict[bytes, str] = {}
            for path in alike:
                digest = _digest(path)
                if digest is not None and whole.setdefault(digest, path) != path:
                    return whole[digest], path
    return None


def _digest(path: str, chunk: int | None = None, size: int = 0) -> bytes | None:
    """sha256 of the file (of ``chunk`` bytes at its start, middle and end, when given, of a
    file of ``size`` bytes); None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            if chunk is not None:
                for start in (0, max(size // 2 - chunk // 2, 0), max(size - chunk, 0)):
                    fh.seek(start)
                    digest.update(fh.read(chunk))
            else:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return None
    return digest.digest()
