"""dac.jobs.folder: the results folder is checked before anything is created, and locked."""
from __future__ import annotations

from pathlib import Path

import pytest

from archive_fakes import CROPPED, clear_cropped, listing, other_task, run, three  # noqa: F401
from dac import DACInputError
from dac.cli import main
from dac.jobs import folder, run_archive


class TestResultsFolder:
    @pytest.mark.parametrize("where", ["a file", "inside a file", "/proc"])
    def test_out_that_cannot_be_written(self, three: Path, tmp_path: Path, capsys, where):
        (tmp_path / "file").write_text("x")
        out = {"a file": tmp_path / "file", "inside a file": tmp_path / "file" / "out",
               "/proc": Path("/proc/dac-test/out")}[where]
        assert main(["crop", str(three), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out" in err
        assert (tmp_path / "file").read_text() == "x" and not Path("/proc/dac-test").exists()

    def test_read_only_out_creates_nothing(self, three: Path, tmp_path: Path, monkeypatch):
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(folder.os, "mkdir", refuse)
        with pytest.raises(DACInputError, match="out_dir"):
            run([three], tmp_path / "new" / "out")
        assert not (tmp_path / "new").exists()

    def test_second_run_on_the_same_out_is_refused(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        run([three], out)
        with open(out / ".boxes-journal.csv", "a") as held:  # as a running dac crop holds it
            assert folder.try_lock(held.fileno())
            with pytest.raises(DACInputError, match="another dac crop is writing"):
                run([three], out)
            with pytest.raises(DACInputError, match=r"another dac crop \(shard 1/2\) is writing"):
                with open(out / ".boxes-journal-1-of-2.csv", "a") as other:
                    assert folder.try_lock(other.fileno())
                    run([three], out, shard="1/2")
        assert run([three], out).skipped == 3


class TestOneCommandPerFolder:
    """Two commands writing crops/ into one OUT overwrote each other's crops, and each then
    skipped the other's as done (issue 26 item 1): OUT belongs to the command that made it."""

    def test_another_command_is_refused_and_changes_nothing(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        assert run([three], out).ok == 3
        before = listing(out)
        with pytest.raises(DACInputError, match="out_dir: .* holds the results of dac crop"):
            run_archive([three], out, other_task(), workers=0, progress=False)
        assert listing(out) == before

    def test_and_the_other_way_round(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        assert run_archive([three], out, other_task(), workers=0, progress=False).ok == 3
        before = listing(out)
        with pytest.raises(DACInputError, match="holds the results of dac other"):
            run([three], out)
        assert listing(out) == before and CROPPED == []

    def test_a_folder_made_before_the_mark_is_known_by_its_outputs(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        run([three], out)
        for mark in out.glob(".dac-*"):
            mark.unlink()  # as dac crop left its folders before it marked them
        with pytest.raises(DACInputError, match="crops"):
            run_archive([three], out, other_task(), workers=0, progress=False)
        assert run([three], out).skipped == 3  # its own command goes on


class TestConcurrentRuns:
    """Runs with other settings or another shard layout beside a running one wrote crops of
    another size under rows that a re-run then kept (issue 26 item 3)."""

    def test_other_settings_or_shard_layout_beside_a_running_shard_are_refused(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        assert run([three], out, shard="0/2").ok == 2
        with open(out / ".boxes-journal-0-of-2.csv", "a") as held:  # shard 0/2 is still running
            assert folder.try_lock(held.fileno())
            before = listing(out)
            CROPPED.clear()
            with pytest.raises(DACInputError, match="other settings"):
                run([three], out, shard="1/2", bits=16)
            with pytest.raises(DACInputError, match="shard layout"):
                run([three], out)  # every input, beside a run that takes half of them
            with pytest.raises(DACInputError, match="shard layout"):
                run([three], out, shard="1/3")
            assert listing(out) == before and CROPPED == []
            assert run([three], out, shard="1/2").ok == 1  # the same settings, the other share: welcome
        assert run([three], out, bits=16).ok == 3  # once it ended, other settings crop again

    def test_shards_creating_the_folder_at_once_both_go_on(self, tmp_path: Path, monkeypatch):
        # Defect: two shards saw the folder missing and both made it; the one that came
        # second got FileExistsError as "out_dir: cannot create ..." (exit 2 under torchrun).
        out = tmp_path / "a" / "out"
        real_mkdir = folder.os.mkdir

        def other_shard_first(path, *args, **kwargs):
            real_mkdir(path, *args, **kwargs)  # the other process wins the race
            real_mkdir(path, *args, **kwargs)  # then this one: FileExistsError

        monkeypatch.setattr(folder.os, "mkdir", other_shard_first)
        folder.make_folders(out, "out_dir")
        assert out.is_dir()
        monkeypatch.undo()
        (tmp_path / "file").write_text("x")
        with pytest.raises(DACInputError, match="cannot create"):  # a file in the way is still refused
            folder.make_folders(tmp_path / "file" / "out", "out_dir")

    def test_out_holding_a_file_named_like_an_output_folder(self, three: Path, tmp_path: Path, capsys):
        # FileExistsError after boxes.csv was created (issue 26 item 11)
        out = tmp_path / "out"
        out.mkdir()
        (out / "crops").write_text("mine")
        argv = ["crop", str(three), "--out", str(out), "--size", "8x12", "--pool-size", "4", "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "crops" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == ["crops"] and (out / "crops").read_text() == "mine"
