"""CSV files users hand to dac (``path,label`` lists, labelled boxes): one reader for all.

Read as ``dac crop`` reads its own table: UTF-8, with or without a byte-order mark;
bytes that are not UTF-8 (a file name written by a Latin-1 tool, say) are kept as
Python's ``surrogateescape`` characters, so that a path names exactly the file whose
name holds those bytes. Blank lines are skipped; cells are stripped of surrounding
spaces.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .._checks import DACInputError

__all__ = ["read_csv_rows"]


def read_csv_rows(path: str | os.PathLike, name: str = "csv") -> list[tuple[int, list[str]]]:
    """The rows of a CSV file that hold something, with their line numbers (1-based).

    Args:
        path: the file.
        name: how the caller names the argument, for error messages (``--data``).

    Returns:
        ``[(line, cells), ...]``, cells stripped; blank rows left out.

    Raises:
        DACInputError: the file cannot be read, or is not CSV (a NUL byte, an
            unterminated quoted cell); the message names ``name`` and the file.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     p = Path(folder, "list.csv")
        ...     _ = p.write_bytes(b"\\xef\\xbb\\xbfpath,label\\n\\ncaf\\xe9.png, 2\\n")
        ...     rows = read_csv_rows(p)
        >>> rows[0], rows[1][0], os.fsencode(rows[1][1][0]), rows[1][1][1]
        ((1, ['path', 'label']), 3, b'caf\\xe9.png', '2')
    """
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            rows = [(line, [cell.strip() for cell in cells]) for line, cells in enumerate(csv.reader(handle, strict=True), start=1)]
    except OSError as err:
        raise DACInputError(f"{name}: cannot read {os.fspath(path)!r}: {(err.strerror or str(err)).lower()}") from None
    except csv.Error as err:
        raise DACInputError(f"{name}: {os.fspath(path)!r} is not a CSV file ({err})") from None
    return [(line, cells) for line, cells in rows if any(cells)]
