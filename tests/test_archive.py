"""dac.archive: the boxes table, what counts as finished work, which files are inputs.

Most tests drive :func:`crop_archive` with :class:`FastLayer`, a stand-in for ``DACrop``
that crops a fixed box, so that they test the archive's bookkeeping in milliseconds;
the CLI tests in ``test_cli.py`` run the real search.
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dac.archive as archive
from dac import DACInputError, DACrop
from dac.archive import crop_archive
from dac.cli import main
from dac.functional import to_unit_range

CROPPED: list[tuple[int, int]] = []  # (height, width) of every image FastLayer cropped


class FastLayer(torch.nn.Module):
    """Crops the middle 80 % of each image; optional learnable ``gain`` (a weight)."""

    def __init__(self, output_size=(8, 12), pool_size=4, gain: float | None = None):
        super().__init__()
        self.output_size, self.pool_size = tuple(output_size), pool_size
        if gain is not None:
            self.gain = torch.nn.Parameter(torch.tensor([gain]))

    def forward(self, images, return_boxes=False):
        crops, boxes = [], []
        for image in images:
            CROPPED.append(tuple(image.shape[-2:]))
            h, w = image.shape[-2:]
            box = torch.tensor([0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])
            unit = to_unit_range(image, torch.float32)[None]
            crops.append(torch.nn.functional.interpolate(unit, size=self.output_size)[0])
            boxes.append(box)
        n = len(crops)
        info = SimpleNamespace(cost=torch.ones(n), iterations=torch.ones(n, dtype=torch.long))
        return torch.stack(crops), torch.stack(boxes), info


@pytest.fixture(autouse=True)
def _clear_cropped():
    CROPPED.clear()


def write_image(path: Path, seed: int = 0, size=(30, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run(inputs, out, **kwargs):
    kwargs.setdefault("layer", FastLayer())
    return crop_archive([str(i) for i in inputs], out, progress=False, **kwargs)


def read_table(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "boxes.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


@pytest.fixture
def three(tmp_path: Path) -> Path:
    for i, name in enumerate(("a.png", "b.png", "sub/c.png")):
        write_image(tmp_path / "in" / name, seed=i)
    return tmp_path / "in"


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


class TestFinishedWork:
    """A row counts as done only for the same file content and the same settings."""

    @pytest.mark.parametrize(
        "change",
        [
            {"layer": FastLayer(pool_size=5)},
            {"layer": FastLayer(output_size=(9, 12))},
            {"bits": 16},
            {"overlays": True},
            {"gray8": True},
        ],
        ids=["pool_size", "output_size", "bits", "overlays", "gray8"],
    )
    def test_other_settings_recrop(self, three: Path, tmp_path: Path, change):
        out = tmp_path / "out"
        run([three], out)
        first = read_table(out)[1]
        CROPPED.clear()
        assert run([three], out, **change).ok == 3 and len(CROPPED) == 3
        first = {r["path"]: r["settings"] for r in first}
        rows = read_table(out)[1]
        assert len(rows) == 3 and all(r["settings"] != first[r["path"]] for r in rows)
        CROPPED.clear()
        assert run([three], out, **change).skipped == 3 and CROPPED == []

    def test_weights_are_a_setting(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        layer = FastLayer(gain=1.0)
        run([three], out, layer=layer)
        with torch.no_grad():
            layer.gain.fill_(2.0)
        assert run([three], out, layer=layer).ok == 3

    def test_changed_content_same_size_and_mtime_is_recropped(self, tmp_path: Path):
        path = tmp_path / "in" / "x.bmp"  # BMP: the byte size depends on the pixel size only
        write_image(path, seed=1)
        out = tmp_path / "out"
        run([path], out)
        before = os.stat(path)
        write_image(path, seed=2)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(path).st_size == before.st_size
        CROPPED.clear()
        assert run([path], out).ok == 1 and len(CROPPED) == 1

    def test_file_that_now_fails_leaves_no_old_outputs(self, three: Path, tmp_path: Path):
        # Its old crop and overlay would stay, unreferenced, looking current.
        out = tmp_path / "out"
        run([three], out, overlays=True)
        row = next(r for r in read_table(out)[1] if r["path"].endswith("a.png"))
        crop, overlay = out / row["crop"], out / "overlays" / Path(row["crop"]).name
        assert crop.is_file() and overlay.is_file()
        (three / "a.png").write_bytes(b"not an image any more")
        assert run([three], out, overlays=True).failed == 1
        assert not crop.exists() and not overlay.exists()
        assert len(list((out / "crops").iterdir())) == len(list((out / "overlays").iterdir())) == 2

    def test_rerun_without_overlays_removes_the_old_ones(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        run([three], out, overlays=True)
        assert len(list((out / "overlays").iterdir())) == 3
        assert run([three], out, bits=16).ok == 3  # overlays showing the old boxes would stay
        assert list((out / "overlays").iterdir()) == []

    def test_touched_file_is_not_recropped(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        run([three], out)
        os.utime(three / "a.png", ns=(1, 10**18))
        CROPPED.clear()
        assert run([three], out).skipped == 3 and CROPPED == []
        row = next(r for r in read_table(out)[1] if r["path"].endswith("a.png"))
        assert row["file_stat"].split(":")[1] == str(10**18)  # the new stat is recorded

    def test_settings_key_of_dacrop(self):
        one, two = DACrop(output_size=(20, 37), pool_size=4), DACrop(output_size=(20, 37), pool_size=4)
        assert archive.settings_key(one) == archive.settings_key(two)
        one(torch.rand(1, 1, 96, 177))  # a call leaves what it keeps out of the key
        assert archive.settings_key(one) == archive.settings_key(two)
        for other in (DACrop(output_size=(20, 37), pool_size=5), DACrop(output_size=(20, 36), pool_size=4),
                      DACrop(output_size=(20, 37), pool_size=4, sharpness=0.05),
                      DACrop(output_size=(20, 37), pool_size=4, steps_per_stage=10)):
            assert archive.settings_key(other) != archive.settings_key(two)


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

        monkeypatch.setattr(archive.os, "scandir", scandir)
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


class TestUsageErrors:
    @pytest.mark.parametrize(
        "args, match",
        [
            (["--workers", "-1"], "--workers"),
            (["--batch-size", "0"], "--batch-size"),
            (["--pool-size", "0"], "--pool-size"),
            (["--device", "gpu7"], "--device"),
            pytest.param(["--device", "cuda"], "--device", marks=pytest.mark.skipif(
                torch.cuda.is_available(), reason="this machine has a GPU")),
        ],
    )
    def test_bad_option_is_one_line_and_creates_nothing(self, three: Path, tmp_path: Path, capsys, args, match):
        out = tmp_path / "out"
        assert main(["crop", str(three), "--out", str(out), "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err and "Traceback" not in err
        assert not out.exists()

    @pytest.mark.parametrize("args", [["--bits", "7"], ["--size", "big"], ["--workers", "two"]])
    def test_argument_errors_are_one_line(self, three: Path, tmp_path: Path, capsys, args):
        with pytest.raises(SystemExit) as exit_:
            main(["crop", str(three), "--out", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and args[0] in err
        assert not (tmp_path / "out").exists()

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

        monkeypatch.setattr(archive.os, "mkdir", refuse)
        with pytest.raises(DACInputError, match="out_dir"):
            run([three], tmp_path / "new" / "out")
        assert not (tmp_path / "new").exists()

    def test_second_run_on_the_same_out_is_refused(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        run([three], out)
        with open(out / ".boxes-journal.csv", "a") as held:  # as a running dac crop holds it
            assert archive._try_lock(held.fileno())
            with pytest.raises(DACInputError, match="another dac crop is writing"):
                run([three], out)
            with pytest.raises(DACInputError, match=r"another dac crop \(shard 1/2\) is writing"):
                with open(out / ".boxes-journal-1-of-2.csv", "a") as other:
                    assert archive._try_lock(other.fileno())
                    run([three], out, shard="1/2")
        assert run([three], out).skipped == 3


def test_killed_run_resumes_from_its_journal(three: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    real_write = archive._write_table
    calls = {"n": 0}

    def killed_before_the_last_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first write compacts, the last one merges the journal
            raise SystemExit("killed")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(archive, "_write_table", killed_before_the_last_write)
    with pytest.raises(SystemExit):
        run([three], out, batch_size=1)
    monkeypatch.setattr(archive, "_write_table", real_write)
    journal = out / ".boxes-journal.csv"
    assert len(journal.read_text().splitlines()) == 4  # header + 3 rows
    with open(journal, "a") as fh:
        fh.write(str(three / "a.png") + ",ok,,28")  # a torn last line
    CROPPED.clear()
    assert run([three], out).skipped == 3 and CROPPED == []
    assert len(read_table(out)[1]) == 3 and not journal.exists()


class TestShards:
    """Several processes: each takes a share, journals its own part, merges into one table."""

    def test_shares_are_disjoint_and_merge(self, three: Path, tmp_path: Path):
        for i in range(3, 7):
            write_image(three / f"more{i}.png", seed=i)
        out = tmp_path / "out"
        summaries = [run([three], out, shard=(i, 3)) for i in range(3)]
        assert [s.total for s in summaries] == [3, 2, 2] and sum(s.ok for s in summaries) == 7
        assert len(CROPPED) == 7
        assert all(s.found == 7 for s in summaries)
        header, rows = read_table(out)
        assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
        assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # the inputs' order
        assert not list(out.glob(".boxes-journal*"))
        CROPPED.clear()
        assert run([three], out).skipped == 7 and CROPPED == []  # any number of processes resumes
        assert sum(run([three], out, shard=f"{i}/2").skipped for i in range(2)) == 7 and CROPPED == []

    def test_part_of_a_killed_shard_is_merged_by_the_next_run(self, three: Path, tmp_path: Path, monkeypatch):
        out = tmp_path / "out"
        real_write = archive._write_table
        calls = {"n": 0}

        def killed_before_merging(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise SystemExit("killed")
            return real_write(*args, **kwargs)

        monkeypatch.setattr(archive, "_write_table", killed_before_merging)
        with pytest.raises(SystemExit):
            run([three], out, shard="1/2")
        monkeypatch.setattr(archive, "_write_table", real_write)
        assert (out / ".boxes-journal-1-of-2.csv").exists()
        CROPPED.clear()
        summary = run([three], out, shard="0/2")  # another shard's run merges the dead part
        assert summary.ok == 2 and len(CROPPED) == 2
        assert not (out / ".boxes-journal-1-of-2.csv").exists()
        assert len(read_table(out)[1]) == 3 and run([three], out).skipped == 3

    @pytest.mark.parametrize("shard", ["2/2", "1", "a/b", (0, 0), "-1/2"])
    def test_bad_shard(self, three: Path, tmp_path: Path, shard):
        with pytest.raises(DACInputError, match="shard"):
            run([three], tmp_path / "out", shard=shard)
        assert not (tmp_path / "out").exists()

    def test_shard_from_torchrun_environment(self, monkeypatch):
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert archive.shard_from_environment() == (1, 2)
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert archive.shard_from_environment() is None


class TestBatches:
    def test_batches_hold_one_size_and_at_most_batch_size(self, tmp_path: Path):
        sizes = [(30, 40), (32, 44), (30, 40), (36, 40), (30, 40), (32, 44), (30, 40), (30, 40)]
        for i, size in enumerate(sizes):
            write_image(tmp_path / "in" / f"{i}.png", seed=i, size=size)
        batches: list[list[tuple[int, int]]] = []

        class Recording(FastLayer):
            def forward(self, images, return_boxes=False):
                batches.append([tuple(image.shape[-2:]) for image in images])
                return super().forward(images, return_boxes)

        assert run([tmp_path / "in"], tmp_path / "out", layer=Recording(), batch_size=3).ok == 8
        assert all(len(set(b)) == 1 and len(b) <= 3 for b in batches)
        assert sorted(s for b in batches for s in b) == sorted(sizes)
        assert [len(b) for b in batches if b[0] == (30, 40)] == [3, 2]

    def test_waiting_images_are_bounded(self):
        groups = archive._Groups(batch_size=4)
        ready = []
        for i in range(20):  # every image of its own size: nothing fills a group
            ready += groups.add({"path": str(i)}, torch.zeros(1, 10 + i, 10))
            assert groups.count <= 8
        ready += groups.flush()
        assert sum(len(b) for b in ready) == 20 and groups.count == 0

    def test_workers_decode_and_threads_are_restored(self, three: Path, tmp_path: Path):
        before = torch.get_num_threads()
        summary = run([three], tmp_path / "out", workers=2, batch_size=1)
        assert summary.ok == 3 and torch.get_num_threads() == before

    def test_a_failed_write_is_a_failed_row(self, three: Path, tmp_path: Path, monkeypatch):
        import dac.data.io as dio

        real = dio.write_png

        def full_disk(path, *args, **kwargs):
            if Path(path).name.startswith("b-"):
                raise OSError(28, "No space left on device")
            return real(path, *args, **kwargs)

        monkeypatch.setattr(dio, "write_png", full_disk)
        summary = run([three], tmp_path / "out")
        assert summary.ok == 2 and summary.failed == 1
        assert "could not write output" in summary.failures[0][1] and "No space" in summary.failures[0][1]

    def test_read_ahead_thread_is_bounded(self):
        read: list[int] = []

        class Reader:
            def __getitem__(self, i):
                read.append(i)
                return i

        batches = [[i] for i in range(10)]
        ahead = archive._read_ahead(Reader(), batches, depth=2)
        assert next(ahead) == [0]
        import time

        time.sleep(0.2)
        assert len(read) <= 4  # the batch handed out, 2 ahead, one being read
        assert [b for b in ahead] == [[i] for i in range(1, 10)] and sorted(read) == list(range(10))


def test_float_tiff_outside_the_unit_range_fails_with_its_reason(tmp_path: Path):
    # A float TIFF of 0..255 (a missing / 255) clipped to [0, 1] would crop a white image without a word.
    pixels = np.random.default_rng(0).random((40, 60)).astype(np.float32)
    Image.fromarray(pixels * 255).save(tmp_path / "raw.tif")
    Image.fromarray(pixels).save(tmp_path / "unit.tif")
    summary = run([tmp_path / "raw.tif", tmp_path / "unit.tif"], tmp_path / "out")
    assert (summary.ok, summary.failed) == (1, 1)
    rows = {Path(r["path"]).name: r for r in read_table(tmp_path / "out")[1]}
    assert rows["unit.tif"]["status"] == "ok" and rows["raw.tif"]["status"] == "failed"
    assert "[0, 1]" in rows["raw.tif"]["error"] and "255" in rows["raw.tif"]["error"]
