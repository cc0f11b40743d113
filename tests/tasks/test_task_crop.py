"""dac.tasks.crop: what dac crop writes, and which settings crop again."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archive_fakes import CROPPED, FastLayer, clear_cropped, read_table, run, three, write_image  # noqa: F401
from dac import DACrop
from dac.cli import main
from dac.tasks import crop


class TestSettings:
    """Every setting of dac crop that changes a crop is part of the settings key."""

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

    def test_search_on_the_command_line(self, three: Path, tmp_path: Path):
        args = ["crop", str(three), "--size", "20x37", "--pool-size", "4"]
        assert main([*args, "--out", str(tmp_path / "paper")]) == 0
        assert main([*args, "--out", str(tmp_path / "global"), "--search", "global"]) == 0
        paper, found = read_table(tmp_path / "paper")[1], read_table(tmp_path / "global")[1]
        assert len(found) == 3 and all(r["status"] == "ok" for r in found)
        assert {r["settings"] for r in found}.isdisjoint({r["settings"] for r in paper})  # another search, another key
        # the global search's box is at least as good by the cost both maximise
        assert all(float(g["cost"]) >= float(p["cost"]) * (1 - 1e-6) for p, g in zip(paper, found))

    def test_weights_are_a_setting(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        layer = FastLayer(gain=1.0)
        run([three], out, layer=layer)
        with torch.no_grad():
            layer.gain.fill_(2.0)
        assert run([three], out, layer=layer).ok == 3


    def test_rerun_without_overlays_removes_the_old_ones(self, three: Path, tmp_path: Path):
        out = tmp_path / "out"
        run([three], out, overlays=True)
        assert len(list((out / "overlays").iterdir())) == 3
        assert run([three], out, bits=16).ok == 3  # overlays showing the old boxes would stay
        assert list((out / "overlays").iterdir()) == []


    def test_settings_key_of_dacrop(self):
        one, two = DACrop(output_size=(20, 37), pool_size=4), DACrop(output_size=(20, 37), pool_size=4)
        assert crop.settings_key(one) == crop.settings_key(two)
        one(torch.rand(1, 1, 96, 177))  # a call leaves what it keeps out of the key
        assert crop.settings_key(one) == crop.settings_key(two)
        for other in (DACrop(output_size=(20, 37), pool_size=5), DACrop(output_size=(20, 36), pool_size=4),
                      DACrop(output_size=(20, 37), pool_size=4, sharpness=0.05),
                      DACrop(output_size=(20, 37), pool_size=4, steps_per_stage=10),
                      DACrop(output_size=(20, 37), pool_size=4, search="global"),
                      DACrop(output_size=(20, 37), pool_size=4, search="global", grid_step=2)):
            assert crop.settings_key(other) != crop.settings_key(two)
        assert crop.settings_key(DACrop(output_size=(20, 37), pool_size=4, search="global", grid_step=2)) != \
            crop.settings_key(DACrop(output_size=(20, 37), pool_size=4, search="global"))


class TestSettingsKeyOfDACrop:
    """The key is DACrop.config() and its weights: what changes a crop, nothing else (issue 21 item 6)."""

    @staticmethod
    def layer(**kwargs) -> DACrop:
        from dac.saliency import SaliencyNet

        torch.manual_seed(0)  # the same weights each time
        return DACrop(output_size=(8, 12), pool_size=4, saliency=SaliencyNet(pool_size=4), **kwargs)

    def test_train_and_eval_do_not_change_the_key(self):
        layer = self.layer()
        key = crop.settings_key(layer)
        assert crop.settings_key(layer.eval()) == key
        assert crop.settings_key(layer.train()) == key

    def test_config_holds_no_state_of_the_module(self):
        layer = self.layer()
        text = json.dumps(layer.config())
        assert "training" not in text and "cpu" not in text
        assert layer.config()["saliency"] == {"class": "dac.saliency.SaliencyNet"} | layer.saliency.config()
        assert layer.config()["schedule"]["sharpness_factor"] == 2.0
        # what changes gradients only is not a setting of the crops
        assert crop.settings_key(self.layer(backward_mode="unroll", dlm_epsilon=1e-6)) == crop.settings_key(layer)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_another_device_does_not_change_the_key(self):
        layer = self.layer()
        assert crop.settings_key(layer.to("cuda")) == crop.settings_key(self.layer())

    def test_pool_size_and_saliency_weights_change_the_key(self):
        layer = self.layer()
        key = crop.settings_key(layer)
        assert crop.settings_key(DACrop(output_size=(8, 12), pool_size=5)) != crop.settings_key(
            DACrop(output_size=(8, 12), pool_size=4))
        with torch.no_grad():
            layer.saliency.gate.bias.fill_(1.0)
        assert crop.settings_key(layer) != key

    def test_eval_does_not_recrop_an_archive(self, tmp_path: Path):
        for i in range(2):
            write_image(tmp_path / "in" / f"{i}.png", seed=i, size=(40, 64))
        layer = self.layer().train()
        assert run([tmp_path / "in"], tmp_path / "out", layer=layer).ok == 2
        again = run([tmp_path / "in"], tmp_path / "out", layer=layer.eval())
        assert again.skipped == 2 and again.ok == 0


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


def test_full_disk_is_one_line(three: Path, tmp_path: Path, monkeypatch, capsys):
    # a four-level chained OSError: [Errno 28] traceback (issue 26 item 9)
    import errno

    out = tmp_path / "out"
    real = os.fsync

    def full_after_the_first_crop(descriptor):
        if any((out / "crops").glob("*.png")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(descriptor)

    monkeypatch.setattr(os, "fsync", full_after_the_first_crop)
    argv = ["crop", str(three), "--out", str(out), "--size", "8x12", "--pool-size", "4", "--batch-size", "1",
            "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(os, "fsync", real)
    assert main(argv) == 0
    assert len(read_table(out)[1]) == 3


class TestRows:
    def test_frozen_is_written_and_a_blank_image_gets_the_starting_box(self, tmp_path: Path):
        # "ok" with an arbitrary box, frozen not written (issue 26, smaller)
        (tmp_path / "in").mkdir()
        Image.fromarray(np.full((40, 64), 128, dtype=np.uint8)).save(tmp_path / "in" / "blank.png")
        write_image(tmp_path / "in" / "noise.png", seed=3, size=(40, 64))
        layer = DACrop(output_size=(8, 12), pool_size=4)
        assert run([tmp_path / "in"], tmp_path / "out", layer=layer).ok == 2
        rows = {Path(r["path"]).name: r for r in read_table(tmp_path / "out")[1]}
        assert rows["blank.png"]["frozen"] == "1" and rows["noise.png"]["frozen"] == "0"
        x1, y1, x2, y2 = (float(rows["blank.png"][k]) for k in ("x1", "y1", "x2", "y2"))
        assert (x1 + x2) / 2 == pytest.approx(32, abs=0.01) and (y1 + y2) / 2 == pytest.approx(20, abs=0.01)

    def test_no_negative_zero_in_the_table(self, tmp_path: Path):
        # boxes.csv held -0.00 (issue 27)
        class AtTheEdge(FastLayer):
            def forward(self, images, return_boxes=False):
                crops, boxes, info = super().forward(images, return_boxes)
                boxes[:, :2] = -0.001
                return crops, boxes, info

        write_image(tmp_path / "x.png")
        run([tmp_path / "x.png"], tmp_path / "out", layer=AtTheEdge())
        row = read_table(tmp_path / "out")[1][0]
        assert (row["x1"], row["y1"]) == ("0.00", "0.00")

    def test_bits_16_refuses_a_colour_image_before_searching_it(self, tmp_path: Path):
        # --bits 16 failed every RGB input after searching it (issue 26, smaller)
        rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "colour.png")
        write_image(tmp_path / "gray.png")
        summary = run([tmp_path / "colour.png", tmp_path / "gray.png"], tmp_path / "out", bits=16)
        assert (summary.ok, summary.failed) == (1, 1) and CROPPED == [(30, 40)]  # the gray one alone was searched
        assert "bits 16" in summary.failures[0][1] and "gray8" in summary.failures[0][1]


def test_12_bit_data_in_16_bit_files_is_said_on_the_console(tmp_path: Path, capsys):
    # the intensity column said only "16-bit" (issue 26 item 5)
    values = np.random.default_rng(0).integers(0, 4096, (40, 64)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "twelve.png")
    write_image(tmp_path / "eight.png", size=(40, 64))
    out = tmp_path / "out"
    assert main(["crop", str(tmp_path / "twelve.png"), str(tmp_path / "eight.png"), "--out", str(out), "--size", "8x12",
                 "--pool-size", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 input read with a warning" in err and "twelve.png" in err and "1/8 of the 16-bit range" in err
    rows = {Path(r["path"]).name: r for r in read_table(out)[1]}
    assert "warning" in rows["twelve.png"]["intensity"] and rows["eight.png"]["intensity"] == "8-bit"


def test_images_with_no_region_to_find_are_said_on_the_console(tmp_path: Path, capsys):
    # a blank or uniform image got the start box and frozen=1 in the table, and the console
    # said only "2 cropped": an archive of blank scans looked fine
    Image.fromarray(np.full((40, 64), 128, dtype=np.uint8)).save(tmp_path / "blank.png")
    write_image(tmp_path / "eight.png", size=(40, 64))
    out = tmp_path / "out"
    assert main(["crop", str(tmp_path / "blank.png"), str(tmp_path / "eight.png"), "--out", str(out), "--size", "8x12",
                 "--pool-size", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 input with no region to find" in err and "blank.png" in err and "eight.png" not in err.split("region")[1]
    assert main(["crop", str(tmp_path / "eight.png"), "--out", str(tmp_path / "out2"), "--size", "8x12",
                 "--pool-size", "4", "--no-progress"]) == 0
    assert "no region" not in capsys.readouterr().err
