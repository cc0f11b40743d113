"""CSV files users hand to dac (``path,label`` lists, labelled boxes): one reader for all.

* :func:`read_csv_rows` — the rows of any of them.
* :func:`read_box_rows` — a ``path,x1,y1,x2,y2`` table of labelled regions (``dac
  fit-saliency --data``, a folder's ``data.regions``).

Read as ``dac crop`` reads its own table: UTF-8, with or without a byte-order mark;
bytes that are not UTF-8 (a file name written by a Latin-1 tool, say) are kept as
Python's ``surrogateescape`` characters, so that a path names exactly the file whose
name holds those bytes. Blank lines are skipped; cells are stripped of surrounding
spaces.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .._checks import DACInputError
from .._files import shown_path

__all__ = ["BOX_HEADER", "read_box_rows", "read_csv_rows"]

#: The header of a table of labelled regions: xyxy in input pixels (torchvision's boxes).
BOX_HEADER = ("path", "x1", "y1", "x2", "y2")


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


def read_box_rows(path: str | os.PathLike, name: str) -> list[tuple[int, Path, list[float]]]:
    """The rows of a ``path,x1,y1,x2,y2`` table: one image per row, its labelled region
    xyxy in input pixels; an optional header row :data:`BOX_HEADER`; relative paths from
    the table's folder. Read by :func:`read_csv_rows`.

    Whether a file exists and whether its box lies inside its image are the caller's
    to check (they need the image).

    Args:
        path: the table.
        name: how the caller names the argument, for error messages (``data``, ``data.regions``).

    Returns:
        ``[(line, file, [x1, y1, x2, y2]), ...]`` in the table's order.

    Raises:
        DACInputError: naming ``name``, the table and the line: a row that is not a path and
            four finite numbers with ``0 <= x1 < x2`` and ``0 <= y1 < y2``, a header naming
            other columns (an xywh or y-first table is not read as xyxy), a second,
            different box for a file (matched by resolved path; a repeated row is kept,
            as often as it appears); or no rows.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     p = Path(folder, "boxes.csv")
        ...     _ = p.write_text("path,x1,y1,x2,y2\\na.png, 10, 5, 50, 40\\n")
        ...     [(line, file.name, box) for line, file, box in read_box_rows(p, "regions")]
        [(2, 'a.png', [10.0, 5.0, 50.0, 40.0])]
    """
    shown = repr(os.fspath(path))
    rows = []
    seen: dict[str, tuple[int, list[float]]] = {}  # resolved file -> (first line, box)
    for line, cells in read_csv_rows(path, name):
        # A first row whose box cells hold no number is a header, whatever its first cell.
        if line == 1 and (cells[0].lower() in ("path", "file", "image") or not any(map(_number, cells[1:]))):
            if tuple(c.lower() for c in cells[1:]) != BOX_HEADER[1:]:
                raise DACInputError(f"{name}: {shown}: the header {cells!r} names other columns; expected "
                                    f"{','.join(BOX_HEADER)} (xyxy, input pixels)")
            continue
        if len(cells) != 5 or not cells[0]:
            raise DACInputError(f"{name}: {shown} line {line}: expected {','.join(BOX_HEADER)} (UTF-8), got {cells!r}")
        try:
            box = [float(v) for v in cells[1:]]
        except ValueError:
            raise DACInputError(f"{name}: {shown} line {line}: the box {cells[1:]} is not four numbers") from None
        if not all(map(math.isfinite, box)) or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
            raise DACInputError(f"{name}: {shown} line {line}: the box {box} is not xyxy with 0 <= x1 < x2 and 0 <= y1 < y2")
        file = Path(cells[0]) if Path(cells[0]).is_absolute() else Path(path).parent / cells[0]
        first = seen.setdefault(os.path.realpath(file), (line, box))
        if first[1] != box:
            raise DACInputError(f"{name}: {shown} line {line}: a second, different box for "
                                f"'{shown_path(str(file))}' (line {first[0]}: {first[1]})")
        rows.append((line, file, box))
    if not rows:
        raise DACInputError(f"{name}: {shown} lists no images")
    return rows


def _number(cell: str) -> bool:
    """Whether a cell reads as a number (float's rules: '1e3', ' 7 ', 'nan' do)."""
    try:
        float(cell)
    except ValueError:
        return False
    return True
