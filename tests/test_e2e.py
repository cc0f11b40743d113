"""Training through the box: the oracle front, the soft-edged crop, warm starts and schedules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dac import DACInputError
from dac.data.datasets import DistractorDataset, MemoryDataset
from dac.functional import crop_resize
from dac.localisation import aspect_box
from dac.train import Engine, PipelineConfig, build_pipeline, config_from_dict, init_runtime, run_cv
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
