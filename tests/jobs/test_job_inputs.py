"""dac.jobs.inputs: which files are inputs, each one row however it is spelled."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from archive_fakes import CROPPED, clear_cropped, read_table, run, three, write_image  # noqa: F401
from dac import DACInputError
from dac.jobs import inputs


class TestInputs:
    def test_out_inside_an_input_folder_is_never_an_input(self, three: Path):
        out = three / "results"
        for _ in range(3):
            summary = run([three], out, overlays=True)
            assert summary.total == 3
        rows = read_table(out)[1]
        assert len(rows) == 3 and not any("results" in r["path"] for r in rows)
        with pytest.raises(DACInputError, match="inside"):
            run([out / "crops"], out)

    def test_same_file_by_other_spellings_is_one_row(self, three: Path, tmp_path: Path, monkeypatch):
        out = tmp_path / "out"
        run([three / "a.png"], out)
        (tmp_path / "link.png").symlink_to(three / "a.png")
        monkeypatch.chdir(tmp_path)
        for spelling in ("in/a.png", "./in/sub/../a.png", str(three / "a.png"), "link.png"):
            CROPPED.clear()
            assert run([spelling], out).skipped == 1 and CROPPED == []
        rows = read_table(out)[1]
        assert [r["path"] for r in rows] == [os.path.realpath(three / "a.png")]
        assert run([three / "a.png", "in/a.png", "link.png"], out).total == 1

    def test_every_input_found_ends_as_a_row(self, three: Path, tmp_path: Path, monkeypatch):
        (three / "gone.png").symlink_to(three / "nowhere.png")
        (three / "loop.png").symlink_to(three / "loop.png")
        (three / "folder.png").mkdir()
        write_image(three / "folder.png" / "inner.png", seed=5)
        os.mkfifo(three / "pipe.png")
        locked = three / "locked"
        write_image(locked / "hidden.png")
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fspath(path) == os.fspath(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(inputs.os, "scandir", scandir)
        out = tmp_path / "out"
        summary = run([three], out)
        rows = {Path(r["path"]).name: r for r in read_table(out)[1]}
        assert summary.total == len(rows) == 9
        assert {n for n, r in rows.items() if r["status"] == "ok"} == {"a.png", "b.png", "c.png", "inner.png"}
        errors = {n: r["error"] for n, r in rows.items() if r["status"] == "failed"}
        assert "dangling" in errors["gone.png"]
        assert "loop" in errors["loop.png"]
        assert "directory" in errors["folder.png"]
        assert "not a regular file" in errors["pipe.png"]
        assert "permission denied" in errors["locked"].lower()
        assert summary.failed == 5
        assert run([three / "pipe.png"], tmp_path / "out2").failed == 1  # named on its own

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
    def test_unreadable_file_is_a_failed_row(self, three: Path, tmp_path: Path):
        (three / "a.png").chmod(0)
        try:
            summary = run([three], tmp_path / "out")
        finally:
            (three / "a.png").chmod(0o644)
        assert summary.failed == 1 and "permission denied" in summary.failures[0][1]

    @pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
    def test_name_that_is_not_utf8(self, three: Path, tmp_path: Path):
        name = os.fsencode(three) + b"/scan\xff\xfe.png"
        write_image(Path(os.fsdecode(name)), seed=7)
        out = tmp_path / "out"
        summary = run([three], out)
        assert summary.ok == 4 and summary.failed == 0
        rows = read_table(out)[1]
        assert os.fsencode(os.path.realpath(os.fsdecode(name))) in [os.fsencode(r["path"]) for r in rows]
        CROPPED.clear()
        assert run([three], out).skipped == 4 and CROPPED == []
        assert len(read_table(out)[1]) == 4


def test_dicom_files_without_an_image_suffix_are_found_in_folders(tmp_path: Path):
    # PACS exports name files IM0001 or by their UID (1.2.840....): a folder of them gave
    # "0 inputs", and dac cv --data "holds no images"
    from dac.data.datasets import ImageFolderDataset

    def dicom(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 128 + b"DICM" + path.name.encode())

    dicom(tmp_path / "a" / "IM0001")
    dicom(tmp_path / "a" / "1.2.840.10008.5")
    dicom(tmp_path / "b" / "I0000007")
    (tmp_path / "a" / "README").write_text("x" * 200)  # no marker: not an input
    (tmp_path / "a" / "notes.txt").write_bytes(b"\0" * 128 + b"DICM")  # a named other type: not sniffed
    (tmp_path / "b" / "short").write_bytes(b"DICM")
    os.mkfifo(tmp_path / "b" / "pipe")  # opened to look for the marker, it would block
    assert inputs.find_inputs([tmp_path], {".png"}) == []
    found = inputs.find_inputs([tmp_path], {".png"}, also=lambda path: path.endswith("7"))
    assert [os.path.basename(f.key) for f in found] == ["I0000007"]
    from dac.data.io import looks_like_dicom

    done: list = []
    search = threading.Thread(target=lambda: done.append(inputs.find_inputs([tmp_path], {".png"}, also=looks_like_dicom)),
                              daemon=True)
    search.start()
    search.join(timeout=20)
    assert done, "the search blocked"
    assert sorted(os.path.basename(f.key) for f in done[0]) == ["1.2.840.10008.5", "I0000007", "IM0001"]
    dataset = ImageFolderDataset(tmp_path, reader=lambda path: None)
    assert sorted(os.path.basename(p) for p, _ in dataset.samples) == ["1.2.840.10008.5", "I0000007", "IM0001"]
