"""dac.jobs.table: the results table keeps what a user did to it; its journal resumes a killed run."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from archive_fakes import CROPPED, clear_cropped, read_table, run, three, write_image  # noqa: F401
from dac import DACInputError
from dac.jobs import engine


class TestUserTable:
    """What a user (or a spreadsheet) did to boxes.csv is kept."""

    def resave(self, out: Path, how: str) -> None:
        header, rows = read_table(out)
        if how == "note column":
            header = header[:2] + ["note"] + header[2:]
        elif how == "reordered":
            header = ["note"] + header[::-1]
        for k, row in enumerate(rows):
            row["note"] = f"checked by hand {k}, ok"
        newline = "\r\n" if how == "bom + crlf" else "\n"
        if how == "bom + crlf":
            header = header + ["note"]
        with open(out / "boxes.csv", "w", newline="", encoding="utf-8-sig" if how == "bom + crlf" else "utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, lineterminator=newline)
            writer.writeheader()
            writer.writerows(rows)

    @pytest.mark.parametrize("how", ["note column", "reordered", "bom + crlf"])
    def test_extra_column_kept_and_nothing_recropped(self, three: Path, tmp_path: Path, how: str):
        out = tmp_path / "out"
        assert run([three], out).ok == 3
        self.resave(out, how)
        CROPPED.clear()
        summary = run([three], out)
        assert summary.skipped == 3 and summary.ok == 0 and CROPPED == []
        header, rows = read_table(out)
        assert "note" in header and len(rows) == 3
        assert sorted(r["note"] for r in rows) == [f"checked by hand {k}, ok" for k in range(3)]
        # A file cropped again keeps its note too.
        write_image(three / "a.png", seed=9)
        run([three], out)
        notes = {Path(r["path"]).name: r["note"] for r in read_table(out)[1]}
        assert notes["a.png"].startswith("checked by hand")

    def test_table_without_path_column_is_refused_untouched(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        out.mkdir()
        text = "file;status\r\nx.png;ok\r\n"
        (out / "boxes.csv").write_bytes(text.encode())
        with pytest.raises(DACInputError, match="boxes.csv.*'path' column"):
            run([three], out)
        assert (out / "boxes.csv").read_bytes() == text.encode()

    def test_rows_of_other_files_and_odd_rows_are_kept(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        run([three / "a.png"], out)
        with open(out / "boxes.csv", "a", newline="") as fh:
            fh.write("/elsewhere/old.png,ok\r\n")  # a short row, as a hand edit leaves it
        run([three / "b.png"], out)
        paths = [Path(r["path"]).name for r in read_table(out)[1]]
        assert sorted(paths) == ["a.png", "b.png", "old.png"]


def test_killed_run_resumes_from_its_journal(three: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    real_write = engine.write_table
    calls = {"n": 0}

    def killed_before_the_last_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first write compacts, the last one merges the journal
            raise SystemExit("killed")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(engine, "write_table", killed_before_the_last_write)
    with pytest.raises(SystemExit):
        run([three], out, batch_size=1)
    monkeypatch.setattr(engine, "write_table", real_write)
    journal = out / ".boxes-journal.csv"
    assert len(journal.read_text().splitlines()) == 4  # header + 3 rows
    with open(journal, "a") as fh:
        fh.write(str(three / "a.png") + ",ok,,28")  # a torn last line
    CROPPED.clear()
    assert run([three], out).skipped == 3 and CROPPED == []
    assert len(read_table(out)[1]) == 3 and not journal.exists()
