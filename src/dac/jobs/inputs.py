"""Finding the inputs of a job: files, folders searched recursively, glob patterns; what names a file.

Every input is keyed by its *resolved* path (absolute, ``..`` and symbolic links
resolved), so the same file named by another spelling is one input. A file is
identified by its stat (:func:`stat_text`) and the SHA-256 of its bytes
(:func:`sha256_bytes`); its outputs are named by :func:`output_name`.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .._checks import DACInputError

__all__ = ["Found", "find_inputs", "output_name", "resolved", "sha256_bytes", "sha256_file", "stat_text"]

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Found:
    """One input: its resolved path (the row's key) and a reason known from the search."""

    key: str  #: absolute path with links resolved (the link itself where it leads nowhere)
    problem: str = ""  #: why it cannot be read, where the search already knows (else "")
    found: str = ""  #: the path where the search met it, links not resolved (its folder may be a class name)


def resolved(path: str | os.PathLike) -> str:
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


def reason(err: OSError) -> str:
    """An OS error's reason in lower case, for a row or a message."""
    return (err.strerror or str(err)).lower()


def find_inputs(
    inputs: Sequence[str | os.PathLike],
    suffixes: Iterable[str],
    *,
    exclude: str | os.PathLike | None = None,
    also: Callable[[str], bool] | None = None,
) -> list[Found]:
    """Inputs named by ``inputs``, one per file (however it is spelled), sorted by path.

    Files as given; folders searched recursively for ``suffixes`` (any case; links to
    folders followed, each folder once); glob patterns (``**`` allowed), whose matches
    are inputs whatever their suffix and folders among them are searched. A folder whose
    name ends in one of ``suffixes``, found by a search or a pattern, is also an input
    (it fails as "is a directory"); a folder that cannot be listed is an input with that
    problem. Nothing inside ``exclude`` is an input. ``also``: ``path -> bool`` for the
    files of a folder search whose suffix is not among ``suffixes`` (e.g.
    :func:`dac.data.io.looks_like_dicom`: DICOM files named without one).

    Raises:
        DACInputError: an input that does not exist and is not a pattern that matches,
            or a file or folder named inside ``exclude``.
    """
    suffixes = {s.lower() for s in suffixes}
    skip = os.path.realpath(exclude) if exclude is not None else None
    found: dict[str, Found] = {}
    searched: set[tuple[int, int]] = set()

    def add(path: str, problem: str = "") -> None:
        key = resolved(path)
        if not _inside(key, skip):
            found.setdefault(key, Found(key, problem, os.path.abspath(path)))

    def looks_like_image(path: str) -> bool:
        return os.path.splitext(path)[1].lower() in suffixes

    def search(folder: str) -> None:
        try:
            info = os.stat(folder)
        except OSError as err:
            add(folder, f"cannot search folder: {reason(err)}")
            return
        if (info.st_dev, info.st_ino) in searched or _inside(resolved(folder), skip):
            return
        searched.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            add(folder, f"cannot list folder: {reason(err)}")
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
            elif looks_like_image(entry.name) or (also is not None and also(entry.path)):
                add(entry.path)

    for item in inputs:
        text = os.fspath(item)
        if os.path.lexists(text) and _inside(resolved(text), skip):
            raise DACInputError(f"INPUT: {text!r} is inside the results folder {os.fspath(exclude)!r}")
        if os.path.isdir(text):
            search(text)
        elif os.path.lexists(text):  # a file, or a link or FIFO whose read will fail
            add(text)
        elif _GLOB_CHARS.search(text):
            matches = sorted(glob.glob(text, recursive=True))
            kept = [m for m in matches if not _inside(resolved(m), skip)]
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

    Examples:
        >>> output_name(Path("/data/a b/scan 01.png"))[:8]
        'scan_01-'
    """
    key = resolved(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(key))[0]).strip("._") or "image"
    digest = hashlib.sha1(os.fsencode(key)).hexdigest()[:10]
    return f"{stem[:80]}-{digest}.png"


def stat_text(info: os.stat_result) -> str:
    """A file's ``file_stat`` cell: ``size:mtime_ns:ctime_ns``."""
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


def sha256_bytes(data: bytes) -> str:
    """The SHA-256 of ``data``, as hex (a ``sha256`` cell of bytes that were read and decoded).

    Examples:
        >>> sha256_bytes(b"")[:12]
        'e3b0c44298fc'
    """
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, as hex (a ``sha256`` cell)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
