"""``dac crop``: outputs, exit codes, bad files, resume after interruption."""
from __future__ import annotations

import ast
import csv
import json
import hashlib
import os
import re
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dac.jobs import engine
from dac.cli import main

from conftest import textured_scene, torchrun_dac

SMALL = ["--size", "20x37", "--pool-size", "5", "--no-progress"]


def write_scene(path: Path, seed: int, bits: int = 8, size=(150, 280)) -> None:
    x = textured_scene(1, *size, dtype=torch.float32, seed=seed)[0, 0].numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 8:
        Image.fromarray((255 * x).round().astype(np.uint8)).save(path)
    else:
        Image.fromarray((65535 * x).round().astype(np.uint16)).save(path)


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "boxes.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def archive_dir(tmp_path: Path) -> Path:
    """3 good images (two share a stem), 1 16-bit, and 4 bad files."""
    root = tmp_path / "in"
    write_scene(root / "a" / "scan.png", 1)
    write_scene(root / "b" / "scan.png", 2, size=(160, 300))
    write_scene(root / "c.png", 3)
    write_scene(root / "deep" / "d16.png", 4, bits=16)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    good = (root / "c.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_with_bad_files(archive_dir: Path, tmp_path: Path, capsys):
    before = digest(archive_dir)
    out = tmp_path / "out"
    assert main(["crop", str(archive_dir), "--out", str(out), "--overlays", *SMALL]) == 1
    rows = read_rows(out)
    assert len(rows) == 7  # notes.txt is not an image
    ok = [r for r in rows if r["status"] == "ok"]
    failed = {Path(r["path"]).name: r["error"] for r in rows if r["status"] == "failed"}
    assert len(ok) == 4 and set(failed) == {"empty.png", "text.png", "truncated.png"}
    assert "empty" in failed["empty.png"].lower()
    assert all(failed.values())
    for r in ok:
        crop = out / r["crop"]
        assert crop.parent == out / "crops" and crop.is_file()
        assert Image.open(crop).size == (37, 20)
        x1, y1, x2, y2 = (float(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 <= int(r["width"]) and 0 <= y1 < y2 <= int(r["height"])
        assert int(r["iterations"]) > 0 and float(r["cost"]) > 0
        assert (out / "overlays" / crop.name).is_file()
    assert len({r["crop"] for r in ok}) == 4  # same stem in two folders: no collision
    assert digest(archive_dir) == before  # inputs untouched
    assert "3 failed" in capsys.readouterr().err


def test_exit_codes(tmp_path: Path, capsys):
    write_scene(tmp_path / "one.png", 1)
    assert main(["crop", str(tmp_path / "one.png"), "--out", str(tmp_path / "o"), *SMALL]) == 0
    assert main(["crop", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o"), *SMALL]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["crop", str(tmp_path / "*.jpg"), "--out", str(tmp_path / "o"), *SMALL]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["crop", str(tmp_path / "one.png"), "--out", str(tmp_path / "o"), "--size", "big"])
    assert exc.value.code == 2


def test_one_bad_image_does_not_fail_its_batch(tmp_path: Path):
    write_scene(tmp_path / "in" / "good.png", 1)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "in" / "tiny.png")
    nan = np.full((150, 280), np.nan, dtype=np.float32)
    Image.fromarray(nan, mode="F").save(tmp_path / "in" / "nan.tif")
    out = tmp_path / "out"
    assert main(["crop", str(tmp_path / "in"), "--out", str(out), "--batch-size", "8", *SMALL]) == 1
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert rows["good.png"]["status"] == "ok"
    assert rows["tiny.png"]["status"] == "failed" and "too small" in rows["tiny.png"]["error"]
    assert rows["nan.tif"]["status"] == "failed" and "NaN" in rows["nan.tif"]["error"]


def test_glob_and_16_bit_output(tmp_path: Path):
    for i in range(3):
        write_scene(tmp_path / "in" / f"img{i}.png", i)
    out = tmp_path / "out"
    assert main(["crop", str(tmp_path / "in" / "img[01].png"), "--out", str(out), "--bits", "16", *SMALL]) == 0
    rows = read_rows(out)
    assert len(rows) == 2
    crop = np.asarray(Image.open(out / rows[0]["crop"]))
    assert crop.dtype == np.uint16 and crop.shape == (20, 37)


def test_interrupted_run_resumes_and_crops_each_file_once(archive_dir: Path, tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "out"
    written: list[str] = []
    import dac.data.io as dio

    original = dio.write_png

    def counting_write(path, *args, **kwargs):
        if Path(path).parent.name == "crops":
            written.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(dio, "write_png", counting_write)
    real_compute = engine._compute
    calls = {"n": 0}

    def interrupt_after_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the second batch
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(engine, "_compute", interrupt_after_first)
    capsys.readouterr()
    assert main(["crop", str(archive_dir), "--out", str(out), "--batch-size", "2", *SMALL]) == 1
    assert capsys.readouterr().err == "dac crop: interrupted; run the same command again to resume\n"
    first = list(written)
    assert 0 < len(first) < 4
    ok = [r for r in read_rows(out) if r["status"] == "ok"]  # the finished batch is in the table
    assert sorted(Path(r["crop"]).name for r in ok) == sorted(first)
    monkeypatch.setattr(engine, "_compute", real_compute)
    assert main(["crop", str(archive_dir), "--out", str(out), "--batch-size", "2", *SMALL]) == 1
    assert sorted(written) == sorted(set(written)) and len(written) == 4  # each good file once
    rows = read_rows(out)
    assert len(rows) == 7 and sum(r["status"] == "ok" for r in rows) == 4
    assert not list(out.rglob(".*tmp*"))  # no temporary files left behind
    # A third run has nothing left but the failed files.
    written.clear()
    assert main(["crop", str(archive_dir), "--out", str(out), *SMALL]) == 1
    assert written == []


def test_demo_writes_both_maps_side_by_side_and_reports_iou(tmp_path: Path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import dac.tasks.demo as demo
    from dac import viz

    drawn = []
    real = viz.plot_search_stages
    monkeypatch.setattr(viz, "plot_search_stages", lambda *a, **k: drawn.append(k.get("title")) or real(*a, **k))
    monkeypatch.setattr(demo, "PAPER_SIZES", ((384, 709), (384, 715)))  # a quarter of the paper's: seconds, not a minute
    result = demo.run_demo(tmp_path / "demo", count=3, seed=3)
    for key in ("boxes", "side_by_side", "search_stages", "saliency", "soft_rectangle", "crops"):
        assert result["paths"][key].is_file() and result["paths"][key].stat().st_size > 0
    assert all(0 < result[key]["mean_iou"] <= 1 for key in ("paper", "learned"))
    rows = list(csv.DictReader(open(result["paths"]["boxes"])))
    assert [(r["index"], r["map"]) for r in rows] == [(str(i), m) for i in range(3) for m in ("paper", "learned")]
    assert all(0 <= float(r["iou"]) <= 1 and (tmp_path / "demo" / r["crop"]).is_file() for r in rows)
    shown = capsys.readouterr().out
    assert "paper's max-min map" in shown and "learned saliency" in shown and shown.count("mean IoU") == 2
    assert len(drawn) == 3 and all(t.startswith(f"phantom {i},") for i, t in enumerate(drawn))  # every phantom


def test_demo_refuses_a_bad_saliency_file_before_any_work(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "bad.pt").write_bytes(b"not a stage")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--saliency", str(tmp_path / "bad.pt")]) == 2
    assert "saliency" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_int32_tiff_is_not_cropped_blank(tmp_path: Path):
    x = textured_scene(1, 150, 280, dtype=torch.float32, seed=5)[0, 0].numpy()
    Image.fromarray((4095 * x).round().astype(np.int32)).save(tmp_path / "deep.tif")  # 12 bits in 32
    out = tmp_path / "out"
    assert main(["crop", str(tmp_path / "deep.tif"), "--out", str(out), "--gray8", *SMALL]) == 0
    crop = np.asarray(Image.open(out / read_rows(out)[0]["crop"]))
    assert crop.max() > 40 and crop.std() > 1  # /(2**31 - 1) made every pixel 0


def test_settings_changed_on_the_command_line_recrop(tmp_path: Path):
    write_scene(tmp_path / "one.png", 1)
    out = tmp_path / "o"
    assert main(["crop", str(tmp_path / "one.png"), "--out", str(out), *SMALL]) == 0
    assert Image.open(out / read_rows(out)[0]["crop"]).size == (37, 20)
    size = ["--size", "24x37", "--pool-size", "4", "--no-progress"]
    assert main(["crop", str(tmp_path / "one.png"), "--out", str(out), *size]) == 0
    rows = read_rows(out)
    assert len(rows) == 1 and Image.open(out / rows[0]["crop"]).size == (37, 24)


def test_a_saliency_stage_added_on_the_command_line_recrops(tmp_path: Path, capsys):
    from dac.saliency import SaliencyNet, save_saliency

    for i in range(3):
        write_scene(tmp_path / "in" / f"scan{i}.png", i)
    net = SaliencyNet(pool_size=5)
    with torch.no_grad():
        net.gate.bias.fill_(1.0)  # gate 2 sigmoid(1) = 1.46 everywhere: not the paper's map
    stage = tmp_path / "saliency.pt"
    save_saliency(net, stage, dacrop=json.dumps({"output_size": [20, 37], "pool_size": 5}))
    args = ["crop", str(tmp_path / "in"), "--out", str(tmp_path / "o"), *SMALL]
    capsys.readouterr()
    assert main(args) == 0
    assert "3 cropped, 0 already done" in capsys.readouterr().err
    plain = {r["path"]: r for r in read_rows(tmp_path / "o")}
    assert main([*args, "--saliency", str(stage)]) == 0
    assert "3 cropped, 0 already done" in capsys.readouterr().err  # not "already done": another map
    rows = read_rows(tmp_path / "o")
    assert len(rows) == 3 and all(r["status"] == "ok" and r["settings"] != plain[r["path"]]["settings"] for r in rows)
    assert all(abs(float(r["x2"]) - float(plain[r["path"]]["x2"])) > 0.01 for r in rows)  # searched on its map (~0.2 px off)
    recorded = json.loads((tmp_path / "o" / "settings.json").read_text())[rows[0]["settings"]]
    assert recorded["layer"]["saliency"]["class"] == "dac.saliency.SaliencyNet"
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "crops").iterdir()}
    assert main([*args, "--saliency", str(stage)]) == 0  # the same stage again: nothing to do
    assert "0 cropped, 3 already done" in capsys.readouterr().err
    assert read_rows(tmp_path / "o") == rows
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "crops").iterdir()} == written


def test_two_processes_under_torchrun_crop_each_file_once(tmp_path: Path):
    for i in range(5):
        write_scene(tmp_path / "in" / f"scan{i}.png", i, size=(96, 177))
    out = tmp_path / "out"
    args = ["crop", str(tmp_path / "in"), "--out", str(out), "--workers", "0", "--size", "20x37", "--pool-size", "4", "--no-progress"]
    shares = re.findall(r"dac crop: (\d+) inputs \(shard (\d)/2 of 5\), (\d+) cropped", torchrun_dac(*args))
    assert sorted((s[1], int(s[0]), int(s[2])) for s in shares) == [("0", 3, 3), ("1", 2, 2)]  # each crop once
    rows = read_rows(out)
    assert sorted(Path(r["path"]).name for r in rows) == [f"scan{i}.png" for i in range(5)]  # one row per input
    assert all(r["status"] == "ok" and (out / r["crop"]).is_file() for r in rows)
    assert len(list((out / "crops").iterdir())) == 5 and not list(out.glob(".boxes-journal*"))
    written = {p.name: p.stat().st_mtime_ns for p in (out / "crops").iterdir()}
    assert sorted(re.findall(r"shard \d/2 of 5\), 0 cropped, (\d) already done", torchrun_dac(*args))) == ["2", "3"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "crops").iterdir()} == written
    assert read_rows(out) == rows


def test_min_width_and_schedule_from_the_command_line(tmp_path: Path, capsys):
    """A square image whose bright region is a fifth of its width: the paper's minimum
    (2/3.5 of the width) makes the box far wider; --min-width 0.15 lets it fit."""
    x = 0.05 * np.random.default_rng(0).random((300, 300))
    x[110:170, 120:180] += 0.5 + 0.4 * np.random.default_rng(1).random((60, 60))
    Image.fromarray((255 * x).round().astype(np.uint8)).save(tmp_path / "square.png")
    args = ["crop", str(tmp_path / "square.png"), "--size", "30x30", "--pool-size", "5", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "paper")]) == 0
    assert main([*args, "--out", str(tmp_path / "narrow"), "--min-width", "0.15"]) == 0
    assert main([*args, "--out", str(tmp_path / "alg1"), "--sharpness-factor", "4"]) == 0
    width = {name: float(read_rows(tmp_path / name)[0]["x2"]) - float(read_rows(tmp_path / name)[0]["x1"])
             for name in ("paper", "narrow", "alg1")}
    assert width["paper"] >= 2 / 3.5 * 300 - 1e-3 and width["narrow"] < 100
    settings = {name: read_rows(tmp_path / name)[0]["settings"] for name in width}
    assert len(set(settings.values())) == 3
    recorded = json.loads((tmp_path / "narrow" / "settings.json").read_text())[settings["narrow"]]
    assert recorded["layer"]["r_min_fraction"] == pytest.approx(0.075)
    assert json.loads((tmp_path / "alg1" / "settings.json").read_text())[settings["alg1"]]["layer"]["schedule"]["sharpness_factor"] == 4
    for bad in (["--min-width", "0"], ["--min-width", "1.5"], ["--sharpness-factor", "-2"], ["--sharpness-factor", "inf"]):
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and bad[0] in err and not (tmp_path / "bad").exists()


def test_dicom_intensity_is_in_boxes_csv(tmp_path: Path):
    pydicom = pytest.importorskip("pydicom")
    source = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "CT_small.dcm")
    if not os.path.exists(source):
        pytest.skip("CT_small.dcm is not bundled with this pydicom")
    ds = pydicom.dcmread(source)
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "plain.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.save_as(tmp_path / "in" / "window.dcm")
    ds.WindowCenter = 50
    ds.save_as(tmp_path / "in" / "IM0001")  # as PACS exports name them: found by its DICM marker
    args = ["--size", "20x37", "--pool-size", "4", "--no-progress"]
    out = tmp_path / "out"
    assert main(["crop", str(tmp_path / "in"), "--out", str(out), *args]) == 0
    how = {Path(r["path"]).name: r["intensity"] for r in read_rows(out)}
    assert how == {"plain.dcm": "DICOM stored range -33792..31743 (no window in file)",
                   "window.dcm": "DICOM window 40/400 (center/width, LINEAR)",
                   "IM0001": "DICOM window 50/400 (center/width, LINEAR)"}
    assert main(["crop", str(tmp_path / "in"), "--out", str(out), "--dicom", "percentiles", "--percentiles", "5,95",
                 *args]) == 0  # another setting: both cropped again
    rows = read_rows(out)
    assert all(r["intensity"].startswith("DICOM percentiles 5-95: ") for r in rows)
    assert main(["crop", str(tmp_path / "in"), "--out", str(out), "--percentiles", "9,2", *args]) == 2


@pytest.mark.parametrize("command", ["cv", "demo"])
def test_missing_matplotlib_is_said_before_any_work(tmp_path: Path, monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "out"
    config = str(Path(__file__).parents[1] / "configs" / "quick.yaml")
    argv = {"cv": ["cv", "--config", config, "--data", str(tmp_path), "--out", str(out)],
            "demo": ["demo", "--out", str(out)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs matplotlib" in err and not out.exists()


def _third_party_imports() -> set[str]:
    names = set()
    for path in (Path(__file__).parents[1] / "src" / "dac").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "dac"}


def test_pyproject_declares_what_the_code_imports():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    required = names(project["dependencies"])
    optional = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    distribution = {"PIL": "pillow", "theseus": "theseus-ai", "yaml": "pyyaml", "sklearn": "scikit-learn"}
    imported = {distribution.get(n, n).lower() for n in _third_party_imports()}
    assert {"scikit-learn", "pyyaml", "torch", "numpy", "pillow"} <= imported
    missing = imported - required - set().union(*optional.values())
    # theseus-ai is imported but deliberately not declared (its metadata breaks `pip install .`): test_install.py
    assert missing == {"theseus-ai"}, f"imported but not declared in pyproject.toml: {missing}"
    assert {"scikit-learn", "pyyaml"} <= required  # dac train / dac cv, core commands
    assert "matplotlib" in optional["viz"] and "pydicom" in optional["dicom"]


def test_pyproject_metadata_has_no_deprecation_warning():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), Path(__file__).parents[1] / "pyproject.toml")
    assert dist.metadata.name == "dac"
