"""dac.tasks.predict and ``dac predict``: a trained pipeline on new images, with the archive's guarantees.

One tiny model is trained once for the module (phantoms of 96 x 177, one epoch, a
ResNet-18 of width 4: seconds), then predicted with; what is tested is the bookkeeping
and the agreement with the trained network, not its accuracy.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from dac import DACInputError
from dac.data import io as dio
from dac.cli import main
from dac.data.phantoms import CLASS_NAMES, make_phantom
from dac.tasks.predict import Predictor, predict_archive
from dac.train import PipelineConfig, build_pipeline, config_from_dict, load_checkpoint, save_checkpoint, train_pipeline

from conftest import torchrun_dac

TINY = {
    "seed": 0,
    "data": {"source": "phantom", "length": 10, "sizes": [[96, 177]]},
    "model": {"arch": "resnet18", "width": 4},
    "train": {"batch_size": 10, "folds": 2, "device": "cpu", "eval_batch_size": 10, "holdout": 0.0},
    "pipelines": {
        "dac": {"epochs": 1, "input_size": [20, 37], "pool_size": 4, "augment": "none"},
        "resize": {"epochs": 1, "input_size": [24, 24], "augment": "none"},
    },
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A dac train results folder holding a finished 'dac' pipeline."""
    out = tmp_path_factory.mktemp("model") / "run"
    train_pipeline(config_from_dict(TINY), out, pipeline="dac")
    return out


def phantoms(root: Path, count: int, start: int = 1000, size=(96, 177)) -> list[Path]:
    """``count`` new phantoms in class sub-folders (labelled), as 8-bit PNGs."""
    paths = []
    for i in range(count):
        p = make_phantom(start + i, *size, label=i % 5)
        path = root / CLASS_NAMES[p.label] / f"p{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        dio.write_png(path, p.image)
        paths.append(path)
    return paths


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_archive_end_to_end(trained: Path, tmp_path: Path, capsys, monkeypatch):
    inputs = tmp_path / "new"
    phantoms(inputs, 6)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "preds"
    assert main(["predict", str(trained / "dac"), str(inputs), "--out", str(out), "--no-progress", "--overlays"]) == 1
    err = capsys.readouterr().err
    table = {Path(r["path"]).name: r for r in rows(out)}
    assert len(table) == 7 and table["broken.png"]["status"] == "failed" and table["broken.png"]["error"]
    good = [r for r in table.values() if r["status"] == "ok"]
    assert len(good) == 6
    for r in good:
        probs = [float(r[f"prob_{c}"]) for c in CLASS_NAMES]
        assert abs(sum(probs) - 1) < 1e-5 and all(0 <= p <= 1 for p in probs)
        assert r["predicted"] == CLASS_NAMES[max(range(5), key=probs.__getitem__)]
        assert r["label"] == Path(r["path"]).parent.name
        assert (out / r["crop"]).is_file() and (out / "overlays" / Path(r["crop"]).name).is_file()
        x1, y1, x2, y2 = (float(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 <= 177 and 0 <= y1 < y2 <= 96
    correct = sum(r["label"] == r["predicted"] for r in good)
    assert f"accuracy {correct / 6:.3f} ({correct}/6 images" in err
    assert "1 failed" in err and "ms per image" in err

    # resume: nothing predicted again (only the failed file is tried again)
    calls = []
    real = Predictor._batch
    monkeypatch.setattr(Predictor, "_batch", lambda self, images: calls.append(len(images)) or real(self, images))
    assert main(["predict", str(trained / "dac"), str(inputs), "--out", str(out), "--no-progress", "--overlays"]) == 1
    assert calls == [] and "6 already done" in capsys.readouterr().err
    assert rows(out) == list(table.values())


def test_file_that_now_fails_leaves_no_old_outputs(trained: Path, tmp_path: Path):
    first, _ = phantoms(tmp_path / "new", 2)
    out, predictor = tmp_path / "preds", Predictor.load(trained)
    assert predict_archive([tmp_path / "new"], out, predictor, overlays=True, progress=False).ok == 2
    crop = out / next(r["crop"] for r in rows(out) if r["path"] == str(first.resolve()))
    overlay = out / "overlays" / crop.name
    assert crop.is_file() and overlay.is_file()
    first.write_bytes(b"no longer an image")
    assert predict_archive([tmp_path / "new"], out, predictor, overlays=True, progress=False).failed == 1
    assert not crop.exists() and not overlay.exists()  # old answers, for a file that has none now
    assert predict_archive([tmp_path / "new"], out, predictor, progress=False).ok == 1
    assert list((out / "overlays").iterdir()) == []  # without --overlays: no old overlay left


def test_labels_of_class_folders_made_of_links(trained: Path, tmp_path: Path):
    # A test split as links into one store (a common way to make folds): the label is the
    # folder the link sits in, as training's ImageFolderDataset reads it, not the store's.
    (tmp_path / "store").mkdir()
    for i in range(3):
        path = tmp_path / "store" / f"s{i}.png"
        dio.write_png(path, make_phantom(1000 + i, 96, 177).image)
        link = tmp_path / "split" / CLASS_NAMES[i % 5] / f"x{i}.png"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    summary = predict_archive([tmp_path / "split"], tmp_path / "preds", Predictor.load(trained), progress=False)
    assert summary.ok == 3
    labels = sorted(r["label"] for r in rows(tmp_path / "preds"))
    assert labels == sorted(CLASS_NAMES[i % 5] for i in range(3))


def test_float_tiff_of_0_to_255_fails_with_its_reason(trained: Path, tmp_path: Path):
    from PIL import Image

    image = make_phantom(7, 96, 177).image[0].float().numpy()
    Image.fromarray(image).save(tmp_path / "raw.tif")  # a forgotten / 255: clipped, it predicted on a white image
    summary = predict_archive([tmp_path / "raw.tif"], tmp_path / "preds", Predictor.load(trained), progress=False)
    assert summary.failed == 1 and "[0, 1]" in rows(tmp_path / "preds")[0]["error"]


def test_predictor_matches_the_trained_network(trained: Path):
    """The box search, crop and classifier give the probabilities of the network itself."""
    predictor = Predictor.load(trained)
    images = torch.stack([make_phantom(50 + i, 96, 177).image for i in range(3)])
    result = predictor(images)
    with torch.no_grad():
        expected = torch.softmax(predictor.model(images).double(), dim=1)
        boxes = predictor.model.front.locate(images)
    assert torch.allclose(result.probabilities, expected, atol=1e-6)
    assert torch.allclose(result.boxes, boxes)
    assert result.crops.shape == (3, 1, 20, 37) and result.predicted_names == [CLASS_NAMES[i] for i in result.predicted]
    # a list of differently sized images: rows in order
    mixed = [images[0], make_phantom(9, 100, 180).image, images[1]]
    listed = predictor(mixed)
    assert torch.allclose(listed.probabilities[[0, 2]], expected[:2], atol=1e-6)


@pytest.mark.parametrize("kind, extra", [("resize", {"input_size": (24, 24)}),
                                         ("stn", {"input_size": (20, 37), "localization_size": (32, 59)}),
                                         ("dac_e2e", {"input_size": (20, 37), "pool_size": 4})])
def test_other_fronts_match_their_network(kind, extra):
    torch.manual_seed(0)
    net = build_pipeline(PipelineConfig(kind=kind, **extra), width=4).eval()
    predictor = Predictor(net, CLASS_NAMES)
    images = torch.randint(0, 255, (2, 1, 96, 177), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.softmax(net(images).double(), dim=1)
    result = predictor(images)
    assert torch.allclose(result.probabilities, expected, atol=1e-6)
    assert result.boxes.shape == (2, 4) and (result.boxes[:, 2:] > result.boxes[:, :2]).all()


def test_python_entry_point_loads_once(trained: Path, tmp_path: Path):
    paths = phantoms(tmp_path / "new", 3)
    predictor = Predictor.load(trained, pipeline="dac")
    first = predictor.predict_files(paths)
    again = predictor.predict_files(paths[:1])
    assert torch.allclose(first.probabilities[:1], again.probabilities)
    assert predictor.classes == tuple(CLASS_NAMES) and "dac" in repr(predictor)
    summary = predict_archive([tmp_path / "new"], tmp_path / "out", predictor, workers=0, progress=False)
    assert summary.ok == 3 and summary.labelled == 3 and summary.accuracy is not None


def test_unfinished_training_is_refused(trained: Path, tmp_path: Path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    state = load_checkpoint(copy / "dac" / "checkpoint.pt")
    save_checkpoint(copy / "dac" / "checkpoint.pt", state | {"finished": False})
    phantoms(tmp_path / "new", 1)
    out = tmp_path / "preds"
    assert main(["predict", str(copy), str(tmp_path / "new"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MODEL" in err and "unfinished" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "model, args, match",
    [
        ("nowhere", [], "MODEL: .* does not exist"),
        (".", [], "not a dac train or dac cv results folder"),
        ("run/dac/metrics.json", [], "not a checkpoint.pt"),
        ("run", ["--pipeline", "stn"], "pipeline"),
        ("run", ["--fold", "1"], "--fold: .* has no folds"),
        ("run/dac", ["--pipeline", "resize"], "--pipeline: 'resize' differs"),
    ],
)
def test_model_that_cannot_be_used_is_one_line(trained: Path, tmp_path: Path, capsys, monkeypatch, model, args, match):
    monkeypatch.chdir(trained.parent)
    phantoms(tmp_path / "new", 1)
    out = tmp_path / "preds"
    assert main(["predict", model, str(tmp_path / "new"), "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    import re

    assert re.search(match, err), err
    assert not out.exists()


def test_cv_folder_needs_a_fold(trained: Path, tmp_path: Path, capsys):
    cv = tmp_path / "cv"
    (cv / "dac" / "fold_0").mkdir(parents=True)
    shutil.copy(trained / "config.yaml", cv)
    run = json.loads((trained / "run.json").read_text()) | {"command": "cv"}
    (cv / "run.json").write_text(json.dumps(run))
    shutil.copy(trained / "dac" / "checkpoint.pt", cv / "dac" / "fold_0")
    phantoms(tmp_path / "new", 1)
    assert main(["predict", str(cv), str(tmp_path / "new"), "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "fold_0" in capsys.readouterr().err
    assert main(["predict", str(cv / "dac" / "fold_0"), str(tmp_path / "new"), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    assert main(["predict", str(cv), str(tmp_path / "new"), "--out", str(tmp_path / "p"), "--fold", "0",
                 "--no-progress"]) == 0


def test_input_that_does_not_fit(trained: Path, tmp_path: Path):
    net = build_pipeline(PipelineConfig(kind="resize", input_size=(24, 24)), width=4, channels=3)
    with pytest.raises(DACInputError, match="MODEL: its classifier takes 3-channel input"):
        Predictor(net, CLASS_NAMES)
    with pytest.raises(DACInputError, match="MODEL: its classifier has 5 outputs but 2 classes"):
        Predictor(build_pipeline(PipelineConfig(kind="resize", input_size=(24, 24)), width=4), ["a", "b"])
    # an image far from the training size (96 x 177) fails with the reason, unless any_size
    predictor = Predictor.load(trained)
    phantoms(tmp_path / "new", 1, size=(384, 708))
    tiny = tmp_path / "new" / "tiny.png"
    dio.write_png(tiny, torch.zeros(1, 6, 6, dtype=torch.uint8))
    summary = predict_archive([tmp_path / "new"], tmp_path / "out", predictor, workers=0, progress=False)
    reasons = dict(summary.failures)
    assert summary.failed == 2 and summary.ok == 0
    assert "384x708 (HxW) does not fit the model, trained on images of 96x177" in reasons[str(tmp_path / "new" / "0" / "p0.png")]
    summary = predict_archive([tmp_path / "new"], tmp_path / "out", predictor, workers=0, progress=False, any_size=True)
    assert summary.ok == 1 and summary.failed == 1  # too small for the front, whatever the option
    assert "tiny.png" in summary.failures[0][0]


def test_another_model_predicts_again_and_other_classes_are_refused(trained: Path, tmp_path: Path):
    phantoms(tmp_path / "new", 2)
    out = tmp_path / "out"
    predictor = Predictor.load(trained)
    assert predict_archive([tmp_path / "new"], out, predictor, workers=0, progress=False).ok == 2
    with torch.no_grad():
        next(predictor.model.classifier.parameters()).mul_(1.5)  # other weights: another model
    assert predict_archive([tmp_path / "new"], out, predictor, workers=0, progress=False).ok == 2
    other = Predictor(predictor.model, ["a", "b", "c", "d", "e"])
    before = (out / "predictions.csv").read_bytes()
    with pytest.raises(DACInputError, match="another model"):
        predict_archive([tmp_path / "new"], out, other, workers=0, progress=False)
    assert (out / "predictions.csv").read_bytes() == before


def test_shards_merge_into_one_table(trained: Path, tmp_path: Path):
    paths = phantoms(tmp_path / "new", 5)
    out = tmp_path / "out"
    predictor = Predictor.load(trained)
    first = predict_archive([tmp_path / "new"], out, predictor, workers=0, progress=False, shard="0/2")
    second = predict_archive([tmp_path / "new"], out, predictor, workers=0, progress=False, shard=(1, 2))
    assert (first.total, second.total) == (3, 2) and first.ok + second.ok == 5
    assert sorted(Path(r["path"]).name for r in rows(out)) == sorted(p.name for p in paths)
    assert predict_archive([tmp_path / "new"], out, predictor, workers=0, progress=False).skipped == 5


def test_two_processes_under_torchrun_predict_each_file_once(trained: Path, tmp_path: Path):
    paths = phantoms(tmp_path / "new", 5)
    out = tmp_path / "out"
    args = ["predict", str(trained / "dac"), str(tmp_path / "new"), "--out", str(out), "--workers", "0", "--no-progress"]
    shares = re.findall(r"dac predict: (\d+) inputs \(shard (\d)/2 of 5\), (\d+) predicted", torchrun_dac(*args))
    assert sorted((s[1], int(s[0]), int(s[2])) for s in shares) == [("0", 3, 3), ("1", 2, 2)]  # each file once
    table = rows(out)
    assert sorted(Path(r["path"]).name for r in table) == sorted(p.name for p in paths)  # one row per input
    assert len({r["path"] for r in table}) == 5 and all(r["status"] == "ok" for r in table)
    assert len(list((out / "crops").iterdir())) == 5 and not list(out.glob(".*journal*"))
    # The same answers as one process gives.
    alone = predict_archive([tmp_path / "new"], tmp_path / "alone", Predictor.load(trained / "dac"), workers=0, progress=False)
    assert alone.ok == 5
    expected = {r["path"]: r for r in rows(tmp_path / "alone")}
    for r in table:
        assert r["predicted"] == expected[r["path"]]["predicted"]
        for c in CLASS_NAMES:
            assert float(r[f"prob_{c}"]) == pytest.approx(float(expected[r["path"]][f"prob_{c}"]), abs=1e-5)
    written = {p.name: p.stat().st_mtime_ns for p in (out / "crops").iterdir()}
    assert sorted(re.findall(r"shard \d/2 of 5\), 0 predicted, (\d) already done", torchrun_dac(*args))) == ["2", "3"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "crops").iterdir()} == written
    assert rows(out) == table


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "classes in run.json"])
def test_damaged_model_is_one_line_naming_the_file(trained: Path, tmp_path: Path, capsys, damage):
    # OSError, EOFError, UnpicklingError, RuntimeError: size mismatch (issue 26 item 8)
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    checkpoint = copy / "dac" / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif damage == "empty":
        checkpoint.write_bytes(b"")
    elif damage == "garbage":
        checkpoint.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    else:
        run = json.loads((copy / "run.json").read_text())
        (copy / "run.json").write_text(json.dumps(run | {"classes": run["classes"][:3]}))
    phantoms(tmp_path / "new", 1)
    out = tmp_path / "preds"
    assert main(["predict", str(copy / "dac"), str(tmp_path / "new"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("dac predict: error: MODEL: ")
    named = "run.json" if damage.startswith("classes") else "checkpoint.pt"
    assert named in err, err
    assert not out.exists()


def test_crop_and_predict_never_share_a_results_folder(trained: Path, tmp_path: Path, capsys):
    # each overwrote the other's crops, and dac crop then skipped them as done (issue 26 item 1)
    phantoms(tmp_path / "new", 2)
    shared = tmp_path / "shared"
    assert main(["crop", str(tmp_path / "new"), "--out", str(shared), "--size", "24x44", "--pool-size", "4",
                 "--no-progress"]) == 0
    crops = {p.name: p.read_bytes() for p in (shared / "crops").iterdir()}
    capsys.readouterr()
    assert main(["predict", str(trained / "dac"), str(tmp_path / "new"), "--out", str(shared), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds the results of dac crop" in err
    assert {p.name: p.read_bytes() for p in (shared / "crops").iterdir()} == crops
    assert not (shared / "predictions.csv").exists()


def test_a_run_with_nothing_to_do_rewrites_nothing(trained: Path, tmp_path: Path):
    # predictions.csv was rewritten (same content) where dac crop left its table (issue 26)
    phantoms(tmp_path / "new", 2)
    out, predictor = tmp_path / "preds", Predictor.load(trained)
    assert predict_archive([tmp_path / "new"], out, predictor, workers=0, progress=False).ok == 2
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    assert predict_archive([tmp_path / "new"], out, predictor, workers=0, progress=False).skipped == 2
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == before


def test_images_with_no_region_to_find_are_marked_frozen(trained: Path, tmp_path: Path, capsys):
    # a blank scan got a class from the start box's crop, and neither the table nor the
    # console said that the search found nothing there (dac crop's table says frozen=1)
    from PIL import Image
    import numpy as np

    inputs = tmp_path / "new"
    phantoms(inputs, 1)
    Image.fromarray(np.full((96, 177), 128, dtype=np.uint8)).save(inputs / "blank.png")
    out = tmp_path / "preds"
    assert main(["predict", str(trained / "dac"), str(inputs), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    table = {Path(r["path"]).name: r for r in rows(out)}
    assert table["blank.png"]["frozen"] == "1" and table["p0.png"]["frozen"] == "0"
    said = err.split("1 input with no region to find")[1]
    assert "blank.png" in said and "p0.png" not in said
    predictor = Predictor.load(trained)
    result = predictor.predict_files([inputs / "blank.png", next(inputs.rglob("p0.png"))])
    assert result.frozen.tolist() == [True, False]

    # a front with no search has nothing to mark: the cell is empty, the field None
    torch.manual_seed(0)
    resize = Predictor(build_pipeline(PipelineConfig(kind="resize", input_size=(24, 24)), width=4).eval(), CLASS_NAMES)
    assert resize(torch.zeros(1, 1, 96, 177, dtype=torch.uint8)).frozen is None
    predict_archive([inputs], tmp_path / "resized", resize, progress=False)
    assert {r["frozen"] for r in rows(tmp_path / "resized")} == {""}


def test_a_table_written_before_the_frozen_column_is_resumed_as_it_is(trained: Path, tmp_path: Path, capsys):
    phantoms(tmp_path / "new", 2)
    out = tmp_path / "preds"
    assert main(["predict", str(trained / "dac"), str(tmp_path / "new"), "--out", str(out), "--no-progress"]) == 0
    before = rows(out)
    with open(out / "predictions.csv", newline="") as fh:
        cells = list(csv.reader(fh))
    drop = cells[0].index("frozen")
    with open(out / "predictions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([c[:drop] + c[drop + 1:] for c in cells])
    capsys.readouterr()
    assert main(["predict", str(trained / "dac"), str(tmp_path / "new"), "--out", str(out), "--no-progress"]) == 0
    assert "2 already done" in capsys.readouterr().err
    after = rows(out)
    assert [r["frozen"] for r in after] == ["", ""]  # not known for rows predicted before it
    assert [{k: v for k, v in r.items() if k != "frozen"} for r in after] == [
        {k: v for k, v in r.items() if k != "frozen"} for r in before]
