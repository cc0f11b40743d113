"""dac fit-saliency (dac.tasks.fit_saliency): phantoms or labelled images -> saliency.pt -> dac crop --saliency."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from dac import DACInputError
from dac.cli import main
from dac.data import io as dio
from dac.data.phantoms import make_phantom
from dac.saliency import FIT_DEFAULTS, SaliencyNet, saliency_features

SMALL = ["--image-size", "192x354", "--pool-size", "4", "--size", "20x37"]
TINY = [*SMALL, "--count", "2", "--steps", "2", "--mask-steps", "2", "--quiet"]


class TestCommandLine:
    def test_fit_saliency_then_crop_with_it(self, tmp_path, capsys):
        import csv
        import json

        from dac.data import io as dio
        from dac.cli import main
        from dac.saliency import load_dacrop

        small = ["--image-size", "192x354", "--pool-size", "4", "--size", "20x37"]
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), "--count", "3", "--steps", "2", "--mask-steps", "3", "--quiet", "--border", "0.25",
                     *small]) == 0
        summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
        assert summary["steps"] == 2 and summary["mask_steps"] == 3
        # fit.json records how the stage was trained: every option, the ones given and the defaults
        assert summary["options"]["border"] == 0.25 and summary["options"]["margin"] == FIT_DEFAULTS["margin"]
        assert summary["options"]["clip_norm"] == FIT_DEFAULTS["clip_norm"] and summary["options"]["steps"] == 2
        assert summary["dacrop"]["r_min_fraction"] == 0.2 and summary["dacrop"]["sharpness_factor"] == 4.0
        layer = load_dacrop(tmp_path / "fit" / "saliency.pt")
        assert isinstance(layer.saliency, SaliencyNet) and layer.pool_size == 4 and layer.output_size == (20, 37)
        # The summary says how the saved stage's boxes fit its own labelled phantoms.
        from dac.saliency import localisation_scores

        trained_on = [make_phantom(i, 192, 354) for i in range(3)]  # --seed 0: phantoms 0, 1, 2
        rois = torch.stack([p.roi for p in trained_on])
        scores = localisation_scores(layer.locate([p.image for p in trained_on]), rois, [r[None] for r in rois])
        assert summary["labelled_iou"] == pytest.approx(float(scores["iou"].mean()), abs=1e-4)
        assert summary["labelled_region_kept"] == pytest.approx(float(scores["tooth_coverage"].mean()), abs=1e-4)
        assert summary["labelled_region_inside"] == float(scores["all_teeth_inside"].float().mean())
        assert "on its 3 labelled images: mean IoU" in capsys.readouterr().err

        images = tmp_path / "in"
        images.mkdir()
        for seed in range(2):
            dio.write_png(images / f"p{seed}.png", make_phantom(100 + seed, 192, 354).image)
        assert main(["crop", str(images), "--out", str(tmp_path / "out"), "--saliency", str(tmp_path / "fit" / "saliency.pt"),
                     "--workers", "0", "--no-progress"]) == 0
        rows = list(csv.DictReader(open(tmp_path / "out" / "boxes.csv")))
        assert [r["status"] for r in rows] == ["ok", "ok"]
        settings = json.loads((tmp_path / "out" / "settings.json").read_text())[rows[0]["settings"]]
        assert "SaliencyNet" in json.dumps(settings)  # the learned stage made these crops
        boxes = torch.tensor([[float(r[c]) for c in ("x1", "y1", "x2", "y2")] for r in rows])
        reference = layer.locate([dio.read_image(images / f"p{s}.png") for s in range(2)])
        torch.testing.assert_close(boxes, reference.float(), atol=0.01, rtol=0)

    def test_labelled_images_give_the_features_a_crop_searches(self, tmp_path):
        from PIL import Image

        from dac.data import io as dio
        from dac.tasks.fit_saliency import read_labelled_images

        colour = torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(0))
        colour[0] *= 0.3  # channels that differ: the luma and the channels' mean differ
        Image.fromarray((colour * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "c.png")
        (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2\nc.png,5,5,30,20\n")
        features, regions, sizes = read_labelled_images(tmp_path / "boxes.csv", 5)
        in_use = saliency_features(dio.read_image(tmp_path / "c.png")[None], 5)[0]  # what dac crop --saliency computes
        assert dio.read_image(tmp_path / "c.png").shape[0] == 3
        torch.testing.assert_close(features[0], in_use)
        assert sizes == [(40, 60)] and regions[0].tolist() == [5, 5, 30, 20]

    def test_labelled_float_image_of_0_to_255_is_refused_as_dac_crop_refuses_it(self, tmp_path):
        import numpy as np
        from PIL import Image

        from dac.tasks.fit_saliency import read_labelled_images

        pixels = np.random.default_rng(0).random((40, 60)).astype(np.float32)
        Image.fromarray(pixels * 255).save(tmp_path / "raw.tif")  # a forgotten / 255: clipped, it trains on white
        (tmp_path / "boxes.csv").write_text("raw.tif,5,5,30,20\n")
        with pytest.raises(DACInputError, match=r"line 1: .*\[0, 1\]"):
            read_labelled_images(tmp_path / "boxes.csv", 5)

    def test_fit_saliency_with_no_box_steps(self, tmp_path, capsys):
        import json

        from dac.cli import main

        small = ["--image-size", "192x354", "--pool-size", "4", "--size", "20x37", "--count", "2"]
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), "--steps", "0", "--mask-steps", "3", "--quiet", *small]) == 0
        summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
        assert (summary["steps"], summary["mask_steps"], summary["first_loss"], summary["last_loss"]) == (0, 3, None, None)
        assert "3 warm-start steps only" in capsys.readouterr().err and (tmp_path / "fit" / "saliency.pt").is_file()

    def test_a_trained_stage_is_not_overwritten_without_asking(self, tmp_path, capsys):
        from dac.cli import main

        small = ["--image-size", "192x354", "--pool-size", "4", "--size", "20x37", "--count", "2", "--steps", "0", "--mask-steps", "2", "--quiet"]
        out = tmp_path / "fit"
        assert main(["fit-saliency", "--out", str(out), *small]) == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        capsys.readouterr()
        assert main(["fit-saliency", "--out", str(out), *small, "--seed", "1"]) == 2  # minutes of training kept
        err = capsys.readouterr().err
        assert "--out" in err and "saliency.pt" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert main(["fit-saliency", "--out", str(out), *small, "--seed", "1", "--overwrite"]) == 0
        assert (out / "saliency.pt").read_bytes() != before["saliency.pt"]

    @pytest.mark.parametrize("header", ["path,x,y,w,h", "image,y1,x1,y2,x2", "path,x1,y1,x2", "x1,y1,x2,y2,path"])
    def test_data_csv_with_other_columns_is_refused(self, tmp_path, capsys, header):
        from dac.data import io as dio
        from dac.cli import main

        dio.write_png(tmp_path / "a.png", make_phantom(1, 96, 177).image)
        (tmp_path / "boxes.csv").write_text(f"{header}\na.png,19,29,100,40\n")  # xywh read as xyxy would fit
        code = main(["fit-saliency", "--out", str(tmp_path / "fit"), "--data", str(tmp_path / "boxes.csv"), "--quiet",
                     "--pool-size", "4", "--size", "20x37", "--steps", "1", "--mask-steps", "1"])
        err = capsys.readouterr().err
        assert code == 2 and "header" in err and "x1,y1,x2,y2" in err and not (tmp_path / "fit").exists()

    def test_interrupted_fit_says_nothing_was_saved(self, tmp_path, capsys, monkeypatch):
        import dac.tasks.fit_saliency
        from dac.cli import main

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(dac.tasks.fit_saliency, "train_saliency", interrupted)
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert "resume" not in err and "nothing saved" in err

    def test_bad_saliency_file_is_a_usage_error(self, tmp_path, capsys):
        from dac.cli import main

        (tmp_path / "in").mkdir()
        (tmp_path / "bad.pt").write_bytes(b"nope")
        code = main(["crop", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--saliency", str(tmp_path / "bad.pt")])
        assert code == 2 and "saliency" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize("option, value", [("--margin", "0.7"), ("--margin", "-0.1"), ("--margin", "nan"), ("--mask-steps", "-1"),
                                               ("--coverage-weight", "nan"), ("--coverage-weight", "-1"), ("--time-limit", "0"),
                                               ("--time-limit", "nan"), ("--stretch", "0.5"), ("--shift", "-0.01"), ("--clip-norm", "0"),
                                               ("--border", "1.5"), ("--border", "nan")])
    def test_bad_fit_option_is_a_usage_error(self, tmp_path, capsys, option, value):
        from dac.cli import main

        code = main(["fit-saliency", "--out", str(tmp_path / "fit"), option, value, "--quiet"])
        assert code == 2 and option in capsys.readouterr().err
        assert not (tmp_path / "fit").exists()


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


class TestReproducibleBySeed:
    def test_the_same_seed_gives_the_same_saliency_pt(self, tmp_path):
        # Before the fix the stage was built from the global random state: up to 0.34 apart in a weight.
        for run in ("r1", "r2", "other"):
            seed = "4" if run == "other" else "3"
            torch.manual_seed(len(run) + 100 * (run == "r2"))  # a different global state each run: it must not matter
            assert main(["fit-saliency", "--out", str(tmp_path / run), *TINY, "--seed", seed]) == 0
        first, second, other = (_weights(tmp_path / run / "saliency.pt") for run in ("r1", "r2", "other"))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first)  # bitwise
        summaries = [json.loads((tmp_path / run / "fit.json").read_text()) for run in ("r1", "r2")]
        assert summaries[0]["first_loss"] == summaries[1]["first_loss"] and summaries[0]["last_loss"] == summaries[1]["last_loss"]
        assert not torch.equal(first["trunk.0.weight"], other["trunk.0.weight"])

    def test_a_negative_seed_is_a_usage_error(self, tmp_path, capsys):
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), *TINY, "--seed", "-1"]) == 2
        assert "--seed" in capsys.readouterr().err and not (tmp_path / "fit").exists()


def _dicom(path, pixels: np.ndarray) -> None:
    """A minimal 16-bit MONOCHROME2 DICOM of ``pixels`` (uint16, 12 bits stored)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.3", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


class TestLabelledRealImages:
    def test_train_on_png_8_and_16_bit_and_dicom_of_other_sizes_then_crop(self, tmp_path, capsys):
        pytest.importorskip("pydicom")
        images = tmp_path / "images"
        images.mkdir()
        rows = []
        for seed, (h, w), kind in ((11, (192, 354), "png8"), (12, (176, 320), "png16"), (13, (200, 372), "dcm")):
            p = make_phantom(seed, h, w)
            name = f"{kind}.{'dcm' if kind == 'dcm' else 'png'}"
            if kind == "png8":
                dio.write_png(images / name, p.image)
            elif kind == "png16":
                dio.write_png(images / name, p.image, bits=16)
            else:
                _dicom(images / name, (p.image[0] * 4095).round().numpy())
            rows.append(f"images/{name}," + ",".join(f"{v:.1f}" for v in p.roi.tolist()))
        (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2\n" + "\n".join(rows) + "\n")
        fit = tmp_path / "fit"
        assert main(["fit-saliency", "--out", str(fit), "--data", str(tmp_path / "boxes.csv"), "--pool-size", "4", "--size", "20x37",
                     "--steps", "2", "--mask-steps", "2", "--quiet"]) == 0
        summary = json.loads((fit / "fit.json").read_text())
        assert summary["images"] == 3 and summary["steps"] == 2 and "boxes.csv" in summary["source"]
        assert main(["crop", str(images), "--out", str(tmp_path / "out"), "--saliency", str(fit / "saliency.pt"),
                     "--workers", "0", "--no-progress"]) == 0
        table = list(csv.DictReader(open(tmp_path / "out" / "boxes.csv")))
        assert sorted(r["status"] for r in table) == ["ok"] * 3
        settings = json.loads((tmp_path / "out" / "settings.json").read_text())[table[0]["settings"]]
        assert "SaliencyNet" in json.dumps(settings)
        intensities = {r["intensity"] for r in table}
        assert any("16-bit" in i for i in intensities) and any("DICOM" in i for i in intensities)

    def test_a_latin1_csv_is_read_as_dac_crop_reads_names(self, tmp_path):
        # printf 'caf\xe9.png,50,40,300,150\n': a UnicodeDecodeError traceback before the fix
        import os

        name = os.fsdecode(b"caf\xe9.png")  # the file system's own bytes, not UTF-8
        dio.write_png(tmp_path / name, make_phantom(1, 192, 354).image)
        (tmp_path / "boxes.csv").write_bytes(b"caf\xe9.png,50,40,300,150\n")
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), "--data", str(tmp_path / "boxes.csv"), "--pool-size", "4",
                     "--size", "20x37", "--steps", "1", "--mask-steps", "1", "--quiet"]) == 0
        assert json.loads((tmp_path / "fit" / "fit.json").read_text())["images"] == 1

    def test_a_csv_with_a_bom_is_read(self, tmp_path):
        from dac.tasks.fit_saliency import read_labelled_images

        dio.write_png(tmp_path / "a.png", make_phantom(1, 96, 177).image)
        (tmp_path / "boxes.csv").write_bytes("\ufeffpath,x1,y1,x2,y2\na.png,10,10,100,60\n".encode("utf-8"))
        features, regions, sizes = read_labelled_images(tmp_path / "boxes.csv", 4)
        assert regions.tolist() == [[10.0, 10.0, 100.0, 60.0]] and sizes == [(96, 177)]

    @pytest.mark.parametrize("content", [
        "path,x1,y1,x2,y2\na.png,10,10,100,60\n".encode("utf-16"),  # not UTF-8: garbage cells, one line
        b'"a.png,10,10,100,60\n',  # an unclosed quote
        b"a.png,10,10,100\n",
        b"b.png,10,10,100,60\n",  # no such image
        b"a.png,10,10,1000,60\n",  # outside the image
        b"a.png,10,10,100,60\n./a.png,10,10,100,61\n",  # one image, two different boxes
    ])
    def test_a_bad_csv_is_one_clear_line(self, tmp_path, capsys, content):
        dio.write_png(tmp_path / "a.png", make_phantom(1, 96, 177).image)
        (tmp_path / "boxes.csv").write_bytes(content)
        code = main(["fit-saliency", "--out", str(tmp_path / "fit"), "--data", str(tmp_path / "boxes.csv"), "--pool-size", "4",
                     "--size", "20x37", "--steps", "1", "--mask-steps", "1", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("dac fit-saliency: error: data:") and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "fit").exists()


    def test_a_repeated_row_is_trained_on_as_often_as_it_appears(self, tmp_path):
        from dac.tasks.fit_saliency import read_labelled_images

        dio.write_png(tmp_path / "a.png", make_phantom(1, 96, 177).image)
        (tmp_path / "boxes.csv").write_bytes(b"a.png,10,10,100,60\na.png,10,10,100,60\n")
        _, regions, sizes = read_labelled_images(tmp_path / "boxes.csv", 4)
        assert regions.tolist() == [[10.0, 10.0, 100.0, 60.0]] * 2 and sizes == [(96, 177)] * 2


class TestWhatTheUserSees:
    def test_progress_during_the_warm_start_and_a_word_on_the_box_counts(self, tmp_path, capsys):
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), *SMALL, "--count", "2", "--steps", "1", "--mask-steps", "20"]) == 0
        err = capsys.readouterr().err
        assert "[dac] features of phantom 2/2" in err  # the dac.saliency logger, which the CLI shows
        assert "[dac] warm-start step 20/20: loss" in err and "[dac] step 1/1: loss" in err
        summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
        assert summary["boxes_searched"] == 2 * 2  # 1 step x 2 images x 2 members
        assert summary["boxes_note"].split(":")[0] in ("fine", "many") and "%" in summary["boxes_note"]
        assert "boxes in training: " in err

    def test_quiet_prints_only_the_summary(self, tmp_path, capsys):
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), *TINY]) == 0
        err = capsys.readouterr().err
        assert "warm-start step" not in err and "features of phantom" not in err and "mean IoU" in err


class TestSearchOfTheStage:
    def test_fit_with_the_global_search_stores_it_for_crop(self, tmp_path):
        from dac.saliency import load_dacrop

        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), *TINY, "--search", "global"]) == 0
        assert json.loads((tmp_path / "fit" / "fit.json").read_text())["dacrop"]["search"] == "global"
        assert load_dacrop(tmp_path / "fit" / "saliency.pt").search_method == "global"
        assert load_dacrop(tmp_path / "fit" / "saliency.pt", search="paper").search_method == "paper"  # dac crop --search

    def test_the_default_is_the_global_search_and_paper_is_stored_when_asked(self, tmp_path):
        from dac.saliency import LEARNED_DEFAULTS, load_dacrop

        assert LEARNED_DEFAULTS["search"] == "global"  # chosen on the tuning phantoms
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), *TINY]) == 0
        assert load_dacrop(tmp_path / "fit" / "saliency.pt").search_method == "global"
        assert main(["fit-saliency", "--out", str(tmp_path / "paper"), *TINY, "--search", "paper"]) == 0
        assert load_dacrop(tmp_path / "paper" / "saliency.pt").search_method == "paper"

    def test_an_unknown_search_is_a_usage_error(self, tmp_path, capsys):
        with pytest.raises(SystemExit) as exit_:
            main(["fit-saliency", "--out", str(tmp_path / "fit"), *TINY, "--search", "dense"])
        assert exit_.value.code == 2 and "--search" in capsys.readouterr().err and not (tmp_path / "fit").exists()
