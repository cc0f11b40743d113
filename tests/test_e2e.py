"""Training through the box: the oracle front, the soft-edged crop, warm starts and schedules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dac import DACInputError
from dac.data.datasets import DistractorDataset, MemoryDataset
from dac.functional import crop_resize
from dac.saliency import aspect_box
from dac.train import Engine, PipelineConfig, build_pipeline, config_from_dict, init_runtime, load_config, run_cv
from dac.train.pipelines import OracleFront

TINY = {
    "seed": 0,
    "data": {"source": "distractors", "length": 20, "sizes": [[96, 177]], "cache_images": True},
    "model": {"arch": "resnet18", "width": 4},
    "train": {"batch_size": 6, "folds": 2, "device": "cpu", "eval_batch_size": 10},
}


@pytest.fixture(scope="module")
def scenes() -> DistractorDataset:
    return DistractorDataset(10, seed=1, sizes=((96, 177),))


class TestOracleFront:
    def test_boxes_are_the_aspect_box_and_crops_the_resampled_box(self, scenes):
        images = torch.stack([scenes[i]["image"] for i in range(4)])
        regions = torch.stack([scenes[i]["roi"] for i in range(4)])
        out = OracleFront((20, 37))(images, regions=regions)
        expected = aspect_box(regions, 20 / 37, torch.tensor([[96, 177]] * 4))
        torch.testing.assert_close(out.boxes, expected)
        torch.testing.assert_close(out.crops, crop_resize(images.float() / 255, expected, (20, 37)))
        assert out.unconverged is None
        # every region lies inside its box (regions narrower than the image)
        assert bool(((out.boxes[:, :2] <= regions[:, :2] + 1e-4) & (out.boxes[:, 2:] >= regions[:, 2:] - 1e-4)).all())

    def test_list_equals_batch(self, scenes):
        images = [scenes[i]["image"] for i in range(3)]
        regions = torch.stack([scenes[i]["roi"] for i in range(3)])
        front = OracleFront((20, 37))
        torch.testing.assert_close(front(images, regions=regions).crops, front(torch.stack(images), regions=regions).crops)

    def test_without_regions_raises(self, scenes):
        with pytest.raises(DACInputError, match="regions"):
            OracleFront((20, 37))(scenes[0]["image"][None])
        with pytest.raises(DACInputError, match="regions"):
            OracleFront((20, 37))(scenes[0]["image"][None], regions=torch.zeros(2, 4))

    def test_pipeline_is_fixed_and_engine_passes_regions(self, scenes):
        net = build_pipeline(PipelineConfig(kind="oracle", input_size=(20, 37)), width=4)
        assert net.front_is_fixed
        engine = Engine(init_runtime("cpu"), batch_size=4, eval_batch_size=3)
        cached = engine.front_outputs(net, scenes, [0, 1, 2])
        images = torch.stack([scenes[i]["image"] for i in range(3)])
        regions = torch.stack([scenes[i]["roi"] for i in range(3)])
        torch.testing.assert_close(cached.images.float(), net.front(images, regions=regions).crops.half().float())
        loaded = engine.load_images(scenes, [0, 1])
        assert torch.equal(loaded[1]["roi"], scenes[1]["roi"])
        bare = MemoryDataset([scenes[0]["image"]], [0], scenes.classes)
        with pytest.raises(DACInputError, match="oracle"):
            engine.front_outputs(net, bare)


class TestDistractorRuns:
    def test_config_names_generated_sources_apart(self):
        a = config_from_dict(TINY)
        b = config_from_dict({**TINY, "data": {**TINY["data"], "source": "phantom"}})
        assert a.data.source == "distractors" and a.fingerprint() != b.fingerprint()

    def test_cv_with_oracle_row(self, tmp_path):
        config = config_from_dict({**TINY, "pipelines": {"oracle": {"epochs": 1, "input_size": [20, 37]}}})
        summary = run_cv(config, tmp_path / "cv", figures=False)
        assert set(summary) == {"oracle"} and summary["oracle"]["kind"] == "oracle"
        assert np.isfinite(summary["oracle"]["accuracy_mean"])
        assert "oracle (true region)" in (tmp_path / "cv" / "summary.md").read_text()
        again = run_cv(config, tmp_path / "again", figures=False)  # the same seed gives the same numbers
        assert again["oracle"]["accuracy_mean"] == summary["oracle"]["accuracy_mean"]


class TestOracleOnFiles:
    """A folder's true regions come from a ``path,x1,y1,x2,y2`` table (``data.regions`` / ``--regions``)."""

    @pytest.fixture
    def folder(self, tmp_path):
        """(class folders of 12 distractor scenes as PNG, the table of their regions, a config with the oracle row)."""
        from PIL import Image

        scenes = DistractorDataset(12, seed=2, sizes=((96, 177),))
        rows = ["path,x1,y1,x2,y2"]
        for i in range(len(scenes)):
            item = scenes[i]
            name = f"{scenes.classes[item['label']]}/{i}.png"
            (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(item["image"][0].numpy()).save(tmp_path / "images" / name)
            rows.append(f"{name},{','.join(str(v) for v in item['roi'].tolist())}")
        (tmp_path / "images" / "boxes.csv").write_text("\n".join(rows) + "\n")
        config = tmp_path / "oracle.yaml"
        config.write_text(json.dumps({**TINY, "data": {**TINY["data"], "source": "phantom"},
                                      "pipelines": {"oracle": {"epochs": 1, "input_size": [20, 37]}}}))
        return tmp_path / "images", tmp_path / "images" / "boxes.csv", config, scenes

    def test_cv_crops_the_regions_of_the_table(self, folder, tmp_path, capsys):
        from dac.cli import main
        from dac.train.folds import build_dataset

        images, boxes, config, scenes = folder
        cfg = load_config(config, data=str(images), regions=str(boxes))
        dataset = build_dataset(cfg.data)
        by_name = {Path(path).name: i for i, (path, _) in enumerate(dataset.base.samples)}
        for i in range(len(scenes)):  # each file's item carries its own scene's region
            assert torch.equal(dataset[by_name[f"{i}.png"]]["roi"], scenes[i]["roi"])
        out = tmp_path / "cv"
        argv = ["cv", "--config", str(config), "--data", str(images), "--out", str(out), "--quiet"]
        assert main(argv[:5] + ["--out", str(tmp_path / "bare"), "--quiet"]) == 2  # without the table: one line saying what is missing
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "regions" in err and "--regions" in err
        assert main(argv + ["--regions", str(boxes)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert np.isfinite(summary["oracle"]["accuracy_mean"])
        lines = boxes.read_text().splitlines()
        lines[1] = lines[1].rsplit(",", 4)[0] + ",0,0,30,20"  # one region changed: other data, not resumed
        boxes.write_text("\n".join(lines) + "\n")
        capsys.readouterr()
        assert main(argv + ["--regions", str(boxes)]) == 2
        assert "other data" in capsys.readouterr().err

    def test_regions_are_for_files_only(self, folder):
        from dac.train.folds import build_dataset

        _, boxes, config, _ = folder
        cfg = load_config(config, regions=str(boxes))  # the config's source is generated phantoms
        with pytest.raises(DACInputError, match="data.regions: generated data"):
            build_dataset(cfg.data)
        with pytest.raises(DACInputError, match="--regions: .*not a file"):
            load_config(config, regions=str(boxes.parent / "nowhere.csv"))


# ----------------------------------------------------------------------------- soft-edged crop

from dac.functional.soft_crop import SoftCrop, edge_weights, soft_crop  # noqa: E402
from dac.train.pipelines import DACFront  # noqa: E402


def _smooth_image(dtype=torch.float64, seed=0) -> torch.Tensor:
    """A smooth Tensor[1, 1, 40, 70] (no kinks for finite differences to trip on)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 6, 10, generator=gen, dtype=dtype)
    return torch.nn.functional.interpolate(coarse, size=(40, 70), mode="bicubic", align_corners=True)


def _reference_soft_crop(image, box, size, margin, sharpness):
    """Straight from the definition: each canvas pixel's input position, bilinear-free
    point sampling replaced by crop_resize of the grown box, weight from eqs. 1-2 in a loop."""
    out_h, out_w = size
    sx, sy = (box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h
    grown = torch.stack([box[0] - margin * sx, box[1] - margin * sy, box[2] + margin * sx, box[3] + margin * sy])
    canvas = crop_resize(image, grown[None], (out_h + 2 * margin, out_w + 2 * margin))
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    weight = torch.zeros(out_h + 2 * margin, out_w + 2 * margin, dtype=canvas.dtype)
    for i in range(out_h + 2 * margin):
        for j in range(out_w + 2 * margin):
            y, x = i + 0.5, j + 0.5
            weight[i, j] = (sig(sharpness * (x - margin)) * sig(sharpness * (margin + out_w - x))
                            * sig(sharpness * (y - margin)) * sig(sharpness * (margin + out_h - y)))
    return canvas * weight


class TestSoftCrop:
    box = torch.tensor([[12.3, 9.1, 41.7, 25.4]], dtype=torch.float64)

    def test_shapes(self):
        out = soft_crop(torch.rand(2, 3, 40, 70), self.box.float().expand(2, 4), (8, 15), margin=3, sharpness=0.5)
        assert out.shape == (2, 3, 14, 21)

    def test_matches_reference_loop(self):
        image = _smooth_image()
        got = soft_crop(image, self.box, (8, 15), margin=3, sharpness=0.7)
        torch.testing.assert_close(got, _reference_soft_crop(image, self.box[0], (8, 15), 3, 0.7))

    def test_inner_samples_are_the_hard_crop_and_infinity_is_the_padded_hard_crop(self):
        image = _smooth_image()
        hard = crop_resize(image, self.box, (8, 15))
        very_sharp = soft_crop(image, self.box, (8, 15), margin=3, sharpness=200.0)
        torch.testing.assert_close(very_sharp[..., 3:-3, 3:-3], hard)
        assert float(very_sharp[..., :3, :].abs().max()) < 1e-30
        torch.testing.assert_close(soft_crop(image, self.box, (8, 15), margin=3, sharpness=math.inf),
                                   torch.nn.functional.pad(hard, (3, 3, 3, 3)))
        torch.testing.assert_close(soft_crop(image, self.box, (8, 15), margin=0, sharpness=math.inf), hard)

    def test_gradcheck_float64(self):
        image = _smooth_image().requires_grad_(True)
        box = self.box.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, b: soft_crop(x, b, (6, 11), margin=2, sharpness=0.8), (image, box),
                                        eps=1e-6, atol=1e-6)

    def test_box_gradient_matches_central_differences(self):
        image = _smooth_image(seed=3)
        weights = torch.rand(1, 1, 12, 21, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

        def loss(box):
            return (soft_crop(image, box, (8, 17), margin=2, sharpness=0.6) * weights).sum()

        box = self.box.clone().requires_grad_(True)
        loss(box).backward()
        eps = 1e-6
        fd = torch.stack([(loss(self.box + eps * e) - loss(self.box - eps * e)) / (2 * eps) for e in torch.eye(4, dtype=torch.float64)])
        torch.testing.assert_close(box.grad[0], fd, rtol=1e-6, atol=1e-9)

    def test_a_mark_outside_the_box_pulls_its_edge(self):
        """The defect: a hard crop's box gradient is blind to a mark a few pixels outside it."""
        image = torch.zeros(1, 1, 40, 80, dtype=torch.float64)
        image[..., 15:19, 47:50] = 1.0  # a mark 5 px right of the box's right edge (x2 = 42)
        box = torch.tensor([[10.0, 8.0, 42.0, 24.0]], dtype=torch.float64, requires_grad=True)
        crop_resize(image, box, (8, 16)).sum().backward()  # "more mark is better"
        assert float(box.grad.abs().max()) == 0.0  # the hard crop cannot see it
        box.grad = None
        soft_crop(image, box, (8, 16), margin=4, sharpness=0.5).sum().backward()
        x1, y1, x2, y2 = box.grad[0].tolist()
        assert x2 > 1e-3 and abs(x2) > 10 * abs(x1)  # ascending the objective grows the right edge toward the mark

    def test_module_equals_function_and_repr(self):
        image, box = _smooth_image(torch.float32), self.box.float()
        module = SoftCrop((8, 15), margin=2, sharpness=0.5)
        torch.testing.assert_close(module(image, box), soft_crop(image, box, (8, 15), margin=2, sharpness=0.5))
        assert "margin=2" in repr(module)

    @pytest.mark.parametrize("kw, match", [({"margin": -1, "sharpness": 1.0}, "margin"), ({"margin": 1, "sharpness": 0.0}, "sharpness"),
                                           ({"margin": 1, "sharpness": "1"}, "sharpness")])
    def test_bad_input_raises(self, kw, match):
        with pytest.raises(DACInputError, match=match):
            soft_crop(torch.rand(1, 1, 20, 30), torch.tensor([[1.0, 1, 10, 6]]), (4, 8), **kw)

    def test_edge_weights_limits(self):
        hard = edge_weights((3, 4), 2, math.inf)
        assert hard.sum() == 12 and hard[2:5, 2:6].min() == 1
        soft = edge_weights((3, 4), 2, 0.3)
        assert bool((soft > 0).all() & (soft < 1).all())


class TestSoftEdgedFront:
    def test_training_soft_eval_hard_and_schedule(self, scenes):
        from dac.saliency import SaliencyNet

        front = DACFront((20, 37), 3, saliency=SaliencyNet(3, width=4), edge_margin=3, edge_sharpness=(0.5, 8.0),
                         r_min_fraction=0.1, sharpness_factor=4.0)
        images = torch.stack([scenes[i]["image"] for i in range(2)])
        assert front.sharpness == 0.5
        front.progress = 1.0
        assert front.sharpness == pytest.approx(8.0)
        front.progress = 0.0
        front.train()
        out = front(images)
        assert out.crops.shape == (2, 1, 26, 43)
        soft = soft_crop(images, out.boxes.detach(), (20, 37), margin=3, sharpness=0.5)
        torch.testing.assert_close(out.crops, soft)
        out.crops.mean().backward()  # reaches the saliency through the box
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in front.saliency.parameters())
        front.eval()
        with torch.no_grad():
            hard = front(images)
        torch.testing.assert_close(hard.crops, torch.nn.functional.pad(crop_resize(images, hard.boxes, (20, 37)), (3, 3, 3, 3)))

    def test_config_checks_and_fingerprint(self):
        from dac.train.config import load_config

        base = {"pipelines": {"dac_e2e": {"epochs": 4, "edge_margin": 2, "front_warmup": 1}}}
        assert config_from_dict(base).pipelines["dac_e2e"].edge_margin == 2
        assert config_from_dict({"pipelines": {"dac": {"edge_margin": 2}}}).pipelines["dac"].edge_margin == 2  # the control
        assert not build_pipeline(PipelineConfig(kind="dac", input_size=(20, 37), edge_margin=2), width=4).front_is_fixed
        for raw, key in (({"stn": {"edge_margin": 2}}, "edge_margin"), ({"dac": {"front_warmup": 1}}, "front_warmup"), ({"dac_e2e": {"epochs": 2, "front_warmup": 2}}, "front_warmup"),
                         ({"dac_e2e": {"edge_margin": 2, "roi_rotate_degrees": 3}}, "edge_margin"),
                         ({"dac_e2e": {"edge_sharpness": [1]}}, "edge_sharpness"), ({"dac": {"r_min_fraction": 0.6}}, "r_min_fraction")):
            with pytest.raises(DACInputError, match=key):
                config_from_dict({"pipelines": raw})
        # settings added since left at their defaults keep older results folders' fingerprints
        root = __import__("pathlib").Path(__file__).resolve().parents[1]
        assert load_config(root / "configs" / "quick.yaml").fingerprint() == "457d6b4770c010ed"
        assert config_from_dict(base).fingerprint() != config_from_dict({"pipelines": {"dac_e2e": {"epochs": 4}}}).fingerprint()


class TestWarmStart:
    def test_warmup_then_joint_and_resume(self, tmp_path):
        pipe = {"epochs": 3, "input_size": [20, 37], "pool_size": 3, "front_warmup": 1, "edge_margin": 2, "front_lr": 0.01}
        config = config_from_dict({**TINY, "data": {**TINY["data"], "length": 10}, "pipelines": {"dac_e2e": pipe}})
        first = run_cv(config, tmp_path / "cv", figures=False)
        metrics = __import__("json").loads((tmp_path / "cv" / "dac_e2e" / "fold_0" / "metrics.json").read_text())
        phases = [h.get("phase") for h in metrics["history"]]
        assert phases == ["warmup", None, None] and "front_grad_norm" in metrics["history"][-1]
        assert (tmp_path / "cv" / "dac_e2e" / "fold_0" / "warmup.pt").is_file()
        again = run_cv(config, tmp_path / "again", figures=False)  # the same seed, the same numbers
        assert again["dac_e2e"]["accuracy_mean"] == first["dac_e2e"]["accuracy_mean"]



class TestStageWarmStart:
    """``saliency_init``: the saliency net starts from a ``dac fit-saliency`` stage."""

    @pytest.fixture
    def stage(self, tmp_path):
        from dac.saliency import SaliencyNet, save_saliency

        net = SaliencyNet(3, width=4, members=2, generator=torch.Generator().manual_seed(5))
        torch.nn.init.normal_(net.gate.weight, generator=torch.Generator().manual_seed(6))  # not the paper's map
        save_saliency(net, tmp_path / "stage.pt")
        return net, tmp_path / "stage.pt"

    def test_both_dac_kinds_start_from_the_stage_and_dac_keeps_it(self, stage):
        from dac.saliency import SaliencyNet

        net, path = stage
        for kind in ("dac", "dac_e2e"):
            cfg = PipelineConfig(kind=kind, input_size=(20, 37), pool_size=3, saliency_width=4, saliency_members=2,
                                 saliency_init=str(path))
            model = build_pipeline(cfg, width=4)
            saliency = model.front.crop.saliency
            assert all(torch.equal(a, b) for a, b in zip(saliency.state_dict().values(), net.state_dict().values()))
            assert model.front_is_fixed == (kind == "dac")  # plain DAC: the stage fixed, its crops cached
            assert all(p.requires_grad == (kind == "dac_e2e") for p in saliency.parameters())
            bare = build_pipeline(cfg, width=4, load_stage=False)  # for a checkpoint's weights: the architecture only
            assert not torch.equal(bare.front.crop.saliency.gate.weight, net.gate.weight)
        images = torch.rand(2, 1, 96, 177)
        assert not torch.equal(model.front.crop.saliency(images), SaliencyNet(3, width=4, members=2)(images))

    def test_a_stage_that_does_not_fit_is_refused_naming_what_differs(self, stage, tmp_path):
        _, path = stage
        with pytest.raises(DACInputError, match=r"saliency_init: .*members 2 \(pipeline: 1\).*saliency_members"):
            build_pipeline(PipelineConfig(kind="dac_e2e", input_size=(20, 37), pool_size=3, saliency_width=4,
                                          saliency_init=str(path)), width=4)
        with pytest.raises(DACInputError, match=r"saliency_init: .*pool_size 3 \(pipeline: 4\)"):
            build_pipeline(PipelineConfig(kind="dac_e2e", input_size=(20, 37), pool_size=4, saliency_width=4,
                                          saliency_members=2, saliency_init=str(path)), width=4)
        (tmp_path / "junk.pt").write_bytes(b"not a stage")
        for bad in (tmp_path / "junk.pt", tmp_path / "nowhere.pt"):
            with pytest.raises(DACInputError, match="^saliency_init: "):
                build_pipeline(PipelineConfig(kind="dac_e2e", input_size=(20, 37), pool_size=3, saliency_init=str(bad)), width=4)
        with pytest.raises(DACInputError, match="pipelines.stn.saliency_init"):
            config_from_dict({"pipelines": {"stn": {"saliency_init": str(path)}}})

    def test_cv_records_the_stage_and_refuses_another(self, stage, tmp_path):
        from dac.saliency import SaliencyNet, save_saliency
        from dac.train import load_pipeline

        net, path = stage
        pipe = {"epochs": 1, "input_size": [20, 37], "pool_size": 3, "saliency_width": 4, "saliency_members": 2,
                "saliency_init": str(path), "front_lr": 0.01}
        raw = {**TINY, "data": {**TINY["data"], "length": 10}, "pipelines": {"dac_e2e": pipe}}
        config = config_from_dict(raw)
        moved = config_from_dict({**raw, "pipelines": {"dac_e2e": {**pipe, "saliency_init": "elsewhere/stage.pt"}}})
        assert config.fingerprint() == moved.fingerprint()  # the path is not part of it, the content is checked apart
        assert config.fingerprint() != config_from_dict({**raw, "pipelines": {"dac_e2e": {**pipe, "saliency_init": None}}}).fingerprint()
        both = config_from_dict({**raw, "pipelines": {"dac_e2e": pipe, "plain": {**pipe, "kind": "dac"}}})
        run_cv(both, tmp_path / "cv", pipelines=["plain"], figures=False)  # a stage is read and recorded when its pipeline runs
        assert list(json.loads((tmp_path / "cv" / "run.json").read_text())["stages"]) == ["plain"]
        run_cv(both, tmp_path / "cv", figures=False)
        recorded = json.loads((tmp_path / "cv" / "run.json").read_text())["stages"]
        assert sorted(recorded) == ["dac_e2e", "plain"] and len(recorded["dac_e2e"]) == 64
        config = both
        other = SaliencyNet(3, width=4, members=2, generator=torch.Generator().manual_seed(7))
        save_saliency(other, path)  # the stage changed under the same name: not resumed
        with pytest.raises(DACInputError, match="pipelines.dac_e2e.saliency_init: .*another stage"):
            run_cv(config, tmp_path / "cv", figures=False)
        path.unlink()  # a trained model no longer needs the stage's file
        model = load_pipeline(tmp_path / "cv", "dac_e2e", fold=0)
        assert model(torch.rand(2, 1, 96, 177)).shape == (2, 5)
        with pytest.raises(DACInputError, match="pipelines.dac_e2e.saliency_init: cannot read"):
            run_cv(config, tmp_path / "new", figures=False)

class _Faint(torch.nn.Module):
    """A saliency stage whose map has vanished (what a saturated gate gives)."""

    def __init__(self, scale: float = 1e-38) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, images):
        from dac.functional.pooling import max_min_pool

        return max_min_pool(images.float() / 255 if not images.dtype.is_floating_point else images, 3) * self.scale


class TestVanishingMap:
    def test_front_crops_where_a_map_vanished(self, scenes):
        # what a saturated gate gives: the search lifts the map and finds the same boxes (was: NaN boxes)
        images = torch.stack([scenes[i]["image"] for i in range(2)])
        faint, dim = DACFront((20, 37), 3, saliency=_Faint()).eval(), DACFront((20, 37), 3, saliency=_Faint(1e-9)).eval()
        assert torch.allclose(faint(images).boxes, dim(images).boxes, atol=1e-2)

    @pytest.mark.parametrize("search", ["paper", "global"])
    def test_search_on_a_vanishing_map_is_finite(self, search):
        # met in training: a saliency net at front_lr 0.1 drove its gate to ~1e-38 within an epoch, and the
        # search's Hessian underflowed to NaN boxes. Below eps the +1 of eq. 3 swamps the map: same boxes.
        from dac import DACrop
        from dac.functional.pooling import max_min_pool

        image = torch.rand(1, 1, 64, 120, generator=torch.Generator().manual_seed(0))
        layer = DACrop(output_size=(20, 37), pool_size=4, search=search)
        reference, _ = layer.search(max_min_pool(image, 4) * 1e-9)
        for scale in (1e-38, 1e-42):
            boxes, info = layer.search(max_min_pool(image, 4) * scale)
            assert bool(torch.isfinite(boxes).all()) and bool(info.converged.all())
            assert torch.allclose(boxes, reference, atol=1e-3)


class TestCandidates:
    """The global search's maxima as candidate crops, weighted by their costs, in training."""

    @staticmethod
    def _layer(**kw):
        from dac import DACrop
        from dac.saliency import SaliencyNet

        net = SaliencyNet(3, width=4, dilations=(1, 2), generator=torch.Generator().manual_seed(0)).double()
        with torch.no_grad():  # a gate that depends on the parameters (zero-initialised otherwise)
            net.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        return DACrop((20, 37), 3, saliency=net, search="global", r_min_fraction=0.1, sharpness_factor=4.0, **kw), net

    def test_the_best_candidate_is_the_box_and_costs_are_eq3(self, scenes):
        from dac.functional import dac_cost, fit_r_min

        layer, net = self._layer()
        images = torch.stack([scenes[i]["image"] for i in range(3)])
        boxes, cost, distinct = layer.candidates(images)
        assert boxes.shape == (3, 4, 4) and cost.shape == (3, 4) and distinct.dtype == torch.bool
        with torch.no_grad():
            located, info = layer.locate(images, return_info=True)
        best = cost.detach().argmax(1)
        torch.testing.assert_close(boxes[torch.arange(3), best], located)
        saliency = layer.saliency_map(images).detach() * layer.saliency_scale
        thetas = info.candidates
        r_min = fit_r_min(*saliency.shape[-2:], layer.r_min_fraction, layer.aspect, saliency)
        for k in range(4):
            expected = dac_cost(thetas[:, k], saliency, r_min=r_min, aspect=layer.aspect, sharpness=layer.final_sharpness)
            torch.testing.assert_close(cost[:, k].detach(), expected)

    def test_cost_gradient_is_the_converged_cost_s_finite_difference(self, scenes):
        """d f(theta*(p), p) / dp, with the search re-run at p +- eps: the envelope theorem (float64)."""
        layer, net = self._layer()
        images = torch.stack([scenes[i]["image"] for i in range(2)]).double() / 255
        _, cost, distinct = layer.candidates(images)
        weights = torch.tensor([[0.7, -0.3, 1.1, 0.4], [-0.8, 0.5, 0.2, 0.9]], dtype=torch.float64) * distinct
        params = list(net.parameters())
        grads = torch.autograd.grad((cost * weights).sum(), params, allow_unused=True)
        gen = torch.Generator().manual_seed(3)
        direction = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
        eps, values, base = 1e-6, [], [p.detach().clone() for p in params]
        for sign in (1, -1):
            with torch.no_grad():
                for p, b, d in zip(params, base, direction):
                    p.copy_(b + sign * eps * d)
                values.append(float((layer.candidates(images)[1] * weights).sum()))
        with torch.no_grad():
            for p, b in zip(params, base):
                p.copy_(b)
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(fd) > 1e-3
        assert abs(analytic - fd) <= 1e-5 * abs(fd), (analytic, fd)

    def test_repeats_are_not_distinct_and_paper_search_refuses(self):
        from dac import DACrop

        blob = torch.zeros(1, 1, 60, 111)
        blob[..., 20:40, 40:75] = 1.0  # one maximum: every candidate polishes to it
        _, _, distinct = DACrop((20, 37), 3, search="global", r_min_fraction=0.1).candidates(blob)
        assert distinct[0, 0] and not distinct[0, 1:].any()
        with pytest.raises(DACInputError, match="search"):
            DACrop((20, 37), 3).candidates(blob)

    def test_front_trains_on_the_mixture_and_evaluates_the_best_box(self, scenes):
        from dac.saliency import SaliencyNet
        from dac.train.pipelines import Pipeline

        net = SaliencyNet(3, width=4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            net.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        front = DACFront((20, 37), 3, saliency=net, search="global", r_min_fraction=0.1, sharpness_factor=4.0,
                         candidates=3, candidate_power=2.0)
        classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20 * 37, 5))
        pipeline = Pipeline(front, classifier, augment=None).train()
        images = torch.stack([scenes[i]["image"] for i in range(2)])
        logits, out = pipeline(images, noise=torch.zeros(2, 0), return_front=True)
        assert out.crops.shape == (2, 3, 1, 20, 37) and out.log_weights.shape == (2, 3)
        torch.testing.assert_close(out.log_weights.logsumexp(1), torch.zeros(2))
        boxes, cost, distinct = front.crop.candidates(images)
        weights = torch.where(distinct, cost.detach() ** 2, torch.zeros_like(cost))
        weights = weights / weights.sum(1, keepdim=True)
        p = torch.softmax(pipeline.classify(out.crops.detach().flatten(0, 1)), -1).reshape(2, 3, 5)
        torch.testing.assert_close(logits.exp(), (weights[:, :, None] * p).sum(1), rtol=1e-5, atol=1e-6)  # a mixture
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
        assert float(net.gate.weight.grad.abs().sum()) > 0  # the task loss reaches the map through the weights
        pipeline.eval()
        with torch.no_grad():
            out = front(images)
            located = front.crop.locate(images)
        assert out.log_weights is None and out.crops.shape == (2, 1, 20, 37)
        torch.testing.assert_close(out.boxes, located)

    @pytest.mark.parametrize("sampling", [False, True])
    def test_images_of_several_sizes_keep_their_own_candidates(self, scenes, sampling):
        from dac.saliency import SaliencyNet
        from dac.train.pipelines import Pipeline

        front = DACFront((20, 37), 3, saliency=SaliencyNet(3, width=4, generator=torch.Generator().manual_seed(0)),
                         search="global", r_min_fraction=0.1, candidates=3, candidate_sampling=sampling)
        classifier = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((4, 4)), torch.nn.Flatten(), torch.nn.Linear(16, 5))
        pipeline = Pipeline(front, classifier, augment=None).train()
        small = DistractorDataset(2, seed=2, sizes=((64, 118),))
        images = [scenes[0]["image"], small[0]["image"], scenes[1]["image"]]  # 96 x 177, 64 x 118, 96 x 177
        noise = torch.tensor([[0.9], [0.5], [0.99]]) if sampling else torch.zeros(3, 0)  # the draws: each image's own
        with torch.no_grad():
            mixed, out = pipeline(images, noise=noise, return_front=True)
            alone = [pipeline(image[None], noise=noise[i : i + 1], return_front=True) for i, image in enumerate(images)]
        torch.testing.assert_close(mixed, torch.cat([a[0] for a in alone]))
        if sampling:
            torch.testing.assert_close(out.boxes, torch.cat([a[1].boxes for a in alone]))
            torch.testing.assert_close(out.sample_log_weight, torch.cat([a[1].sample_log_weight for a in alone]))

    def test_front_clip_norm_holds_the_front_s_steps(self, scenes):
        """A clip far below the gradient's norm: Adam's steps on the front shrink to ~lr g / eps."""
        from dac.train.engine import Engine
        from dac.train import init_runtime

        config = PipelineConfig(kind="dac_e2e", input_size=(20, 37), pool_size=3, search="global", r_min_fraction=0.1,
                                candidates=3, candidate_power=8.0)
        moved = {}
        for clip in (None, 1e-12):
            torch.manual_seed(0)
            net = build_pipeline(config, width=4)
            with torch.no_grad():
                net.front.saliency.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            before = [p.detach().clone() for p in net.front.parameters()]
            history = Engine(init_runtime("cpu"), batch_size=5, eval_batch_size=10).fit(
                net, scenes, np.arange(10), epochs=1, lr=1e-3, front_clip_norm=clip, recalibrate_bn=False)
            moved[clip] = max(float((p.detach() - b).abs().max()) for p, b in zip(net.front.parameters(), before))
            assert history[0]["front_grad_norm"] > 1e-6  # recorded before the clip
        assert moved[None] > 1e-4 and moved[1e-12] < 1e-6, moved
        with pytest.raises(DACInputError, match="front_clip_norm"):
            config_from_dict({"pipelines": {"dac": {"front_clip_norm": 1.0}}})

    @staticmethod
    def _sampling_pipeline(sampling: bool):
        from dac.saliency import SaliencyNet
        from dac.train.pipelines import Pipeline

        net = SaliencyNet(3, width=4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            net.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        front = DACFront((20, 37), 3, saliency=net, search="global", r_min_fraction=0.1, sharpness_factor=4.0,
                         candidates=3, candidate_power=2.0, candidate_sampling=sampling)
        torch.manual_seed(0)
        classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20 * 37, 5))
        return Pipeline(front, classifier, augment=None).train()

    def test_sampling_draws_each_candidate_by_its_weight(self, scenes):
        pipeline = self._sampling_pipeline(True)
        images = torch.stack([scenes[i]["image"] for i in range(2)])
        boxes, cost, distinct = pipeline.front.crop.candidates(images)
        weights = torch.where(distinct, cost.detach().double() ** 2, torch.zeros((), dtype=torch.float64))
        weights = weights / weights.sum(1, keepdim=True)
        draws = 400
        u = ((torch.arange(draws, dtype=torch.float64) + 0.5) / draws).repeat_interleave(2)[:, None]
        with torch.no_grad():
            out = pipeline.front(images.repeat(draws, 1, 1, 1), noise=u)
        assert out.crops.shape == (2 * draws, 1, 20, 37) and out.log_weights is None
        picked = (out.boxes.reshape(draws, 2, 1, 4) - boxes.detach()[None]).abs().amax(-1).argmin(-1)  # [draws, 2]
        share = torch.stack([(picked == k).double().mean(0) for k in range(3)], 1)
        assert (share <= 1.01 / draws + weights).all() and (share >= weights - 1.01 / draws).all(), (share, weights)
        assert not share[~distinct].any()  # a repeated maximum is never drawn
        expected = weights.log().gather(1, picked.T).T.float()
        torch.testing.assert_close(out.sample_log_weight.reshape(draws, 2), expected, rtol=1e-5, atol=1e-5)

    def test_sampled_gradient_averages_to_the_expected_loss_s(self, scenes):
        """Batch of one (baseline 0): sum_k w_k * (the gradient when k is drawn) = d/dp sum_k w_k nll_k, exactly."""
        images = scenes[0]["image"][None]
        label = torch.tensor([2])
        mixture = self._sampling_pipeline(False)
        _, out = mixture(images, noise=torch.zeros(1, 0), return_front=True)
        nll = torch.nn.functional.cross_entropy(mixture.classify(out.crops.flatten(0, 1)), label.repeat(3), reduction="none")
        weights = out.log_weights[0].exp()
        params = [p for p in mixture.parameters() if p.requires_grad]
        exact = torch.autograd.grad((weights * nll).sum(), params, allow_unused=True)
        drawn = self._sampling_pipeline(True)
        mine = [p for p in drawn.parameters() if p.requires_grad]  # the same values, another module
        assert all(torch.equal(a, b) for a, b in zip(params, mine))
        drawn_weights = weights.detach().double()
        cumulative = drawn_weights.cumsum(0)
        estimate = [torch.zeros_like(p) for p in params]
        for k in range(3):
            if drawn_weights[k] < 1e-9:
                continue
            u = (cumulative[k] - drawn_weights[k] / 2).reshape(1, 1)  # inside k's interval
            logits, front = drawn(images, noise=u, return_front=True)
            grads = torch.autograd.grad(drawn.training_loss(logits, label, front), mine, allow_unused=True)
            for e, g in zip(estimate, grads):
                if g is not None:
                    e += float(drawn_weights[k]) * g
        assert exact[0] is not None and float(exact[0].abs()) > 1e-4  # the map's scale gets a gradient (through the weights)
        for e, g in zip(estimate, exact):
            torch.testing.assert_close(e, torch.zeros_like(e) if g is None else g, rtol=1e-4, atol=1e-6)

    def test_training_loss_value_is_the_cross_entropy_and_its_baseline_leaves_one_out(self):
        from dac.train.pipelines import FrontOutput, Pipeline

        pipeline = Pipeline(torch.nn.Identity(), torch.nn.Identity())
        logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
        labels = torch.tensor([0, 1, 2, 3])
        log_w = torch.log(torch.tensor([0.5, 0.2, 0.9, 0.3])).requires_grad_()
        front = FrontOutput(torch.zeros(4, 1, 2, 2), torch.zeros(4, 4), sample_log_weight=log_w)
        loss = pipeline.training_loss(logits, labels, front)
        nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        torch.testing.assert_close(loss, nll.sum())
        loss.backward()
        torch.testing.assert_close(log_w.grad, nll - (nll.sum() - nll) / 3)
        torch.testing.assert_close(pipeline.training_loss(logits, labels), nll.sum())

    def test_best_baseline_is_the_best_candidate_s_loss_under_the_same_augmentation(self, scenes):
        from dac.train.pipelines import FrontOutput, Pipeline
        from dac.train.augment import BatchAugment, augmentation

        pipeline = self._sampling_pipeline(True)
        pipeline.front.candidate_baseline = "best"
        pipeline.augment = BatchAugment(augmentation("paper"))
        images = torch.stack([scenes[i]["image"] for i in range(3)])
        noise = torch.rand(3, pipeline.noise_dims, generator=torch.Generator().manual_seed(5))
        logits, out = pipeline(images, noise=noise, return_front=True)
        with torch.no_grad():
            best = pipeline.front.crop.locate(images)
        expected = crop_resize(images, best, (20, 37), antialias=True).float()
        torch.testing.assert_close(out.baseline_crops, expected)
        with torch.no_grad():  # the same augmentation columns as the drawn crops
            again = pipeline.classify(expected, noise[:, pipeline._front_noise:])
        torch.testing.assert_close(out.baseline_logits, again)
        assert not out.baseline_logits.requires_grad
        labels = torch.tensor([0, 3, 4])
        log_w = out.sample_log_weight.detach().requires_grad_()
        loss = pipeline.training_loss(logits.detach(), labels, out._replace(sample_log_weight=log_w))
        loss.backward()
        nll = torch.nn.functional.cross_entropy(logits.detach(), labels, reduction="none")
        base = torch.nn.functional.cross_entropy(out.baseline_logits, labels, reduction="none")
        torch.testing.assert_close(log_w.grad, nll - base)
        with pytest.raises(DACInputError, match="candidate_baseline"):
            DACFront((20, 37), 3, search="global", candidates=2, candidate_baseline="best")
        with pytest.raises(DACInputError, match="candidate_baseline"):
            DACFront((20, 37), 3, search="global", candidates=2, candidate_sampling=True, candidate_baseline="worst")
        assert FrontOutput(torch.zeros(1), torch.zeros(1)).baseline_logits is None

    def test_sampling_trains_the_front_and_the_same_seed_gives_the_same_weights(self, scenes):
        from dac.train.engine import Engine
        from dac.train import init_runtime

        config = config_from_dict({"pipelines": {"dac_e2e": {
            "input_size": [20, 37], "pool_size": 3, "search": "global", "r_min_fraction": 0.1, "candidates": 3,
            "candidate_power": 8.0, "candidate_sampling": True}}}).pipelines["dac_e2e"]
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            net = build_pipeline(config, width=4)
            assert net.front.candidate_sampling and net.noise_dims >= 1
            with torch.no_grad():
                net.front.saliency.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            before = [p.detach().clone() for p in net.front.parameters()]
            history = Engine(init_runtime("cpu"), batch_size=5, eval_batch_size=10).fit(
                net, scenes, np.arange(10), epochs=1, lr=1e-3, seed=4, recalibrate_bn=False)
            assert history[0]["front_grad_norm"] > 1e-6
            assert max(float((p.detach() - b).abs().max()) for p, b in zip(net.front.parameters(), before)) > 1e-5
            runs.append([p.detach().clone() for p in net.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*runs))

    def test_config_checks(self):
        assert config_from_dict({"pipelines": {"dac_e2e": {"search": "global", "candidates": 4}}}).pipelines["dac_e2e"].candidates == 4
        for raw in ({"dac": {"search": "global", "candidates": 4}}, {"dac_e2e": {"candidates": 4}},
                    {"dac_e2e": {"search": "global", "candidates": 4, "edge_margin": 2}}, {"dac_e2e": {"candidates": 0}},
                    {"dac_e2e": {"candidate_power": 0}}, {"dac_e2e": {"search": "global", "candidate_sampling": True}},
                    {"dac_e2e": {"search": "global", "candidates": 4, "candidate_sampling": "yes"}},
                    {"dac_e2e": {"search": "global", "candidates": 4, "candidate_baseline": "best"}},
                    {"dac_e2e": {"search": "global", "candidates": 4, "candidate_sampling": True, "candidate_baseline": "x"}}):
            with pytest.raises(DACInputError, match="candidate"):
                config_from_dict({"pipelines": raw})
        with pytest.raises(DACInputError, match="candidates"):
            DACFront((20, 37), 3, candidates=2)
        with pytest.raises(DACInputError, match="candidate_sampling"):
            DACFront((20, 37), 3, search="global", candidate_sampling=True)


class TestLearnedConstants:
    """``learn_constants``: DACrop's r_min and sharpness trained with the front."""

    @pytest.mark.parametrize("extra", [{}, {"search": "global", "candidates": 3, "candidate_power": 8.0, "candidate_sampling": True}])
    def test_a_fit_moves_the_constants_and_a_checkpoint_keeps_them(self, scenes, extra):
        config = config_from_dict({"pipelines": {"dac_e2e": {
            "input_size": [20, 37], "pool_size": 3, "r_min_fraction": 0.1, "learn_constants": ["sharpness", "r_min"],
            **extra}}}).pipelines["dac_e2e"]
        assert config.learn_constants == ("r_min", "sharpness")
        torch.manual_seed(0)
        net = build_pipeline(config, width=4)
        crop = net.front.crop
        assert crop.learn == ("r_min", "sharpness")
        start = (float(crop.r_min_value.detach()), float(crop.sharpness_gain.detach()))
        assert start[0] == pytest.approx(0.1) and start[1] == pytest.approx(1.0)
        Engine(init_runtime("cpu"), batch_size=5, eval_batch_size=10).fit(
            net, scenes, np.arange(10), epochs=1, lr=1e-3, front_lr=1e-2, seed=4, recalibrate_bn=False)
        # The sharpness reaches every candidate's cost and every box: it moves.
        assert float(crop.sharpness_gain.detach()) != pytest.approx(start[1], abs=1e-4)
        assert 0 < float(crop.r_min_value.detach()) < 0.5
        torch.manual_seed(1)
        again = build_pipeline(config, width=4)
        again.load_state_dict(net.state_dict())
        assert torch.equal(again.front.crop.sharpness_logit, crop.sharpness_logit)

    def test_config_checks_and_fingerprint(self):
        base = config_from_dict({"pipelines": {"dac_e2e": {}}})
        same = config_from_dict({"pipelines": {"dac_e2e": {"learn_constants": []}}})
        assert base.fingerprint() == same.fingerprint()  # the default leaves old results valid
        learned = config_from_dict({"pipelines": {"dac_e2e": {"learn_constants": ["r_min"]}}})
        assert learned.fingerprint() != base.fingerprint()
        for raw, match in (({"dac": {"learn_constants": ["r_min"]}}, "only dac_e2e"),
                           ({"dac_e2e": {"learn_constants": "r_min"}}, "learn_constants"),
                           ({"dac_e2e": {"learn_constants": ["width"]}}, "learn_constants"),
                           ({"dac_e2e": {"learn_constants": ["r_min", "r_min"]}}, "repeated"),
                           ({"dac_e2e": {"learn_constants": ["r_min"], "r_min_fraction": 0.5}}, "below 0.5")):
            with pytest.raises(DACInputError, match=match):
                config_from_dict({"pipelines": raw})
