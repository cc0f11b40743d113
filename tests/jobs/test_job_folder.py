"""dac.jobs.folder: the results folder is checked before anything is created, and locked."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archive_fakes import CROPPED, FastLayer, clear_cropped, read_table, run, three, write_image  # noqa: F401
from dac import DACInputError, DACrop
from dac.cli import main
from dac.jobs import folder


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
