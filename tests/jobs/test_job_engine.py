"""dac.jobs.engine: what counts as finished work, shards, batches, readers."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from archive_fakes import CROPPED, FastLayer, clear_cropped, read_table, run, three, write_image  # noqa: F401
from dac import DACInputError
from dac.jobs import engine
from dac.jobs import shard_from_environment


class TestFinishedWork:
    """A row counts as done only for the same file content and the same settings."""

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

    def test_touched_file_is_not_recropped(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        run([three], out)
        os.utime(three / "a.png", ns=(1, 10**18))
        CROPPED.clear()
        assert run([three], out).skipped == 3 and CROPPED == []
        row = next(r for r in read_table(out)[1] if r["path"].endswith("a.png"))
        assert row["file_stat"].split(":")[1] == str(10**18)  # the new stat is recorded


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

    def test_part_of_a_killed_shard_is_merged_by_the_next_run(self, three: Path, tmp_path: Path, monkeypatch, caplog):
        out = tmp_path / "out"
        real_write = engine.write_table
        calls = {"n": 0}

        def killed_before_merging(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise SystemExit("killed")
            return real_write(*args, **kwargs)

        monkeypatch.setattr(engine, "write_table", killed_before_merging)
        with pytest.raises(SystemExit):
            run([three], out, shard="1/2")
        monkeypatch.setattr(engine, "write_table", real_write)
        assert (out / ".boxes-journal-1-of-2.csv").exists()
        CROPPED.clear()
        with caplog.at_level("INFO", logger="dac.jobs"):
            summary = run([three], out, shard="0/2")  # another shard's run merges the dead part
        assert "merged 1 rows of an ended run's journal" in caplog.text
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
        assert shard_from_environment() == (1, 2)
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert shard_from_environment() is None


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
        groups = engine._Groups(batch_size=4)
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
        ahead = engine._read_ahead(Reader(), batches, depth=2)
        assert next(ahead) == [0]
        import time

        time.sleep(0.2)
        assert len(read) <= 4  # the batch handed out, 2 ahead, one being read
        assert [b for b in ahead] == [[i] for i in range(1, 10)] and sorted(read) == list(range(10))


class TestFileIdentity:
    def test_file_rewritten_while_it_is_read_is_cropped_again(self, tmp_path: Path, monkeypatch):
        # The reader hashed the file by reading it a second time: the row held the old
        # image's crop with the new file's SHA-256, skipped by every later run (issue 26 item 2).
        import dac.data.io as dio

        path = write_image(tmp_path / "in" / "x.png", seed=1)
        real = dio.read_input

        def read_then_rewritten(*args, **kwargs):
            result = real(*args, **kwargs)
            write_image(path, seed=2)  # a scanner export lands while the first one is being read
            return result

        monkeypatch.setattr(dio, "read_input", read_then_rewritten)
        out = tmp_path / "out"
        assert run([path], out, workers=0).ok == 1
        monkeypatch.setattr(dio, "read_input", real)
        CROPPED.clear()
        assert run([path], out).ok == 1 and len(CROPPED) == 1  # the new content, not a stale crop


class TestTableWrites:
    def test_a_run_with_nothing_to_do_leaves_the_table_as_it_was(self, three: Path, tmp_path: Path):
        # dac predict rewrote predictions.csv (same content) on every such run (issue 26)
        out = tmp_path / "out"
        run([three], out)
        before = os.stat(out / "boxes.csv")
        assert run([three], out).skipped == 3
        after = os.stat(out / "boxes.csv")
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    def test_full_disk_stops_with_one_error_and_resumes(self, three: Path, tmp_path: Path, monkeypatch):
        # a four-level chained OSError: [Errno 28] (issue 26 item 9)
        out = tmp_path / "out"
        real = os.fsync

        def full_after_a_while(descriptor):
            if any((out / "crops").glob("*.png")):  # the disk fills up after the first crop
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(descriptor)

        monkeypatch.setattr(os, "fsync", full_after_a_while)
        with pytest.raises(OSError) as raised:
            run([three], out, batch_size=1)
        assert raised.value.errno == errno.ENOSPC
        assert raised.value.__context__ is None and raised.value.__cause__ is None
        monkeypatch.setattr(os, "fsync", real)
        run([three], out)
        rows = read_table(out)[1]
        assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
