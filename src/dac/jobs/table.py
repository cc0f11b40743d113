"""The results table of a job (``OUT/boxes.csv``, ``OUT/predictions.csv``) and its journals.

One row per input, keyed by the input's resolved path (the ``path`` column). What a
user or a spreadsheet did to the table is kept: added columns, the column order, rows
of other files, a byte-order mark or CRLF line ends on reading. A table without a
``path`` column, or with two rows for one file that disagree in a user column, is
refused (:class:`~dac.DACInputError`) and left as it is. The file is UTF-8; a file name
that is not valid UTF-8 is written as its own bytes (Python's ``surrogateescape``).

During a run each batch's rows are appended to a journal (``OUT/.<table>-journal.csv``,
or ``.<table>-journal-<i>-of-<n>.csv`` for shard i of n) whose header ends in ``end``
and whose rows end in ``1``, so that a torn last row is recognised and left out; the
table is rewritten atomically from the journals (:func:`replay_journal`,
:func:`write_table`).
"""
from __future__ import annotations

import csv
import io as _io
import os
from pathlib import Path
from typing import Callable, Sequence

from .._checks import DACInputError
from .._files import atomic_write
from .inputs import resolved

__all__ = ["ARCHIVE_FIELDS", "Table", "journal_name", "number_cell", "read_table", "replay_journal", "write_table"]

#: Columns every archive table has, first (``path, status, error, width, height``) and
#: last (``intensity, settings, file_stat, sha256``); :func:`~dac.jobs.run_archive` fills them.
ARCHIVE_FIELDS = (("path", "status", "error", "width", "height"), ("intensity", "settings", "file_stat", "sha256"))


class Table:
    """A table as read: its header (user columns kept) and rows keyed by path."""

    def __init__(self, header: list[str], rows: dict[str, list[str]], fields: Sequence[str]) -> None:
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


def read_table(csv_path: Path, fields: Sequence[str], command: str,
                check_header: Callable[[list[str]], None] | None = None) -> Table:
    """The table of earlier runs (an empty one if there is none); refuses what it cannot keep."""
    if not csv_path.exists():
        return Table(list(fields), {}, fields)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
            lines = [cells for cells in csv.reader(file) if cells]
    except (OSError, csv.Error) as err:
        raise DACInputError(f"{csv_path}: cannot be read as a CSV table ({err}); it was left as it is") from None
    if not lines:
        return Table(list(fields), {}, fields)
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
    table = Table(header, {}, fields)
    path_at, settings_at = table.index["path"], table.index["settings"]
    ours = set(table.index.values())
    for number, cells in enumerate(lines[1:], start=2):
        cells = cells + [""] * (len(table.header) - len(cells))
        key = cells[path_at]
        if not key:
            key = f"\0line {number}"  # a row without a path: kept as it is
        elif not cells[settings_at] and os.path.lexists(key):
            key = cells[path_at] = resolved(key)  # a row from before paths were resolved
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


def write_table(csv_path: Path, table: Table, order: dict[str, int]) -> None:
    """Write the table atomically: inputs of this run in order, then other rows as they
    were. A table that would come out as it is on disk is left untouched (a run with
    nothing to do changes no file)."""
    position = {k: i for i, k in enumerate(table.rows)}
    keys = sorted(table.rows, key=lambda k: (0, order[k], 0) if k in order else (1, 0, position[k]))
    text = _io.StringIO(newline="")
    csv.writer(text).writerows([table.header] + [table.rows[k] for k in keys])
    data = text.getvalue().encode("utf-8", "surrogateescape")
    try:
        if csv_path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write(csv_path, lambda file: file.write(data))


def replay_journal(journal_path: Path, table: Table) -> int:
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


def number_cell(value: float, spec: str = ".2f") -> str:
    """``value`` as a table cell in format ``spec``, never a negative zero.

    Examples:
        >>> number_cell(-0.001), number_cell(-1.5)
        ('0.00', '-1.50')
    """
    text = format(value, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def journal_name(table: str, shard: tuple[int, int]) -> str:
    """The journal's file name of ``table`` for shard ``(i, n)``."""
    stem = Path(table).stem
    return f".{stem}-journal.csv" if shard == (0, 1) else f".{stem}-journal-{shard[0]}-of-{shard[1]}.csv"
