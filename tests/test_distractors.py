"""dac.data.distractors and DistractorDataset: the generated task whose true region is known."""
from __future__ import annotations

import pytest
import torch

from dac import DACInputError
from dac.data.datasets import DistractorDataset, ImageLabelDataset, MemoryDataset
from dac.data.distractors import DISTRACTOR_CLASSES, distractor_class, make_distractor_scene


def _inside(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 0] >= box[0]) & (boxes[:, 1] >= box[1]) & (boxes[:, 2] <= box[2]) & (boxes[:, 3] <= box[3])


class TestMakeDistractorScene:
    def test_smoke_shapes(self):
        s = make_distractor_scene(0, 96, 177)
        assert s.image.shape == (1, 96, 177) and s.image.dtype == torch.uint8
        assert s.roi.shape == (4,) and s.decoy.shape == (4,) and s.marks.shape == (s.count, 4)

    def test_same_seed_same_scene(self):
        a, b = make_distractor_scene(5, 96, 177), make_distractor_scene(5, 96, 177)
        assert torch.equal(a.image, b.image) and torch.equal(a.roi, b.roi) and a.count == b.count
        assert not torch.equal(a.image, make_distractor_scene(6, 96, 177).image)

    def test_does_not_touch_global_rng(self):
        torch.manual_seed(0)
        before = torch.rand(1)
        torch.manual_seed(0)
        make_distractor_scene(1, 96, 177)
        assert torch.equal(torch.rand(1), before)

    @pytest.mark.parametrize("seed", range(20))
    def test_ground_truth_is_consistent(self, seed):
        s = make_distractor_scene(seed, 64, 118)
        assert s.count // 2 == s.label and (s.label, s.count) == distractor_class(seed)
        h, w = s.image.shape[-2:]
        for box in (s.roi, s.decoy):
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
        assert s.roi[2] <= s.decoy[0] or s.decoy[2] <= s.roi[0]  # side by side, apart
        assert bool(_inside(s.marks, s.roi).all())
        # a mark is the brightest thing: its centre pixel is near the mark level
        for x1, y1, x2, y2 in s.marks.tolist():
            assert int(s.image[0, int((y1 + y2) / 2), int((x1 + x2) / 2)]) > 200

    def test_regions_differ_in_mean_only(self):
        s = make_distractor_scene(3, 192, 354)
        img = s.image[0].float() / 255

        def patch(box):
            x1, y1, x2, y2 = (int(v) for v in box)
            return img[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]

        true, decoy = patch(s.roi), patch(s.decoy)
        assert float(true.median()) + 0.2 < float(decoy.median())
        spread = lambda p: float(p.quantile(0.9) - p.quantile(0.1))  # noqa: E731 - the texture's range, marks aside
        assert spread(true) == pytest.approx(spread(decoy), rel=0.1)

    def test_label_override(self):
        for label in range(5):
            s = make_distractor_scene(11, 96, 177, label=label)
            assert s.label == label and s.count in (2 * label, 2 * label + 1)

    @pytest.mark.parametrize("size", [(63, 200), (100, 117)])
    def test_too_small_raises(self, size):
        with pytest.raises(DACInputError, match="height|width"):
            make_distractor_scene(0, *size)

    def test_bad_label_raises(self):
        with pytest.raises(DACInputError, match="label"):
            make_distractor_scene(0, 96, 177, label=5)

    def test_paper_size(self):
        s = make_distractor_scene(2, 1536, 2836)
        assert s.image.shape == (1, 1536, 2836) and s.marks.shape[0] == s.count


class TestDistractorDataset:
    def test_items_and_labels(self):
        ds = DistractorDataset(7, seed=3, sizes=((96, 177), (64, 118)))
        assert ds.labels == [0, 1, 2, 3, 4, 0, 1] and list(ds.classes) == list(DISTRACTOR_CLASSES)
        item = ds[5]
        assert item["label"] == 0 and item["image"].shape == (1, 64, 118) and item["index"] == 5
        assert torch.equal(item["image"], make_distractor_scene(3 * 1_000_003 + 5, 64, 118, label=0).image)

    def test_bad_index_and_sizes(self):
        with pytest.raises(IndexError):
            DistractorDataset(2, sizes=((96, 177),))[2]
        with pytest.raises(DACInputError, match="sizes"):
            DistractorDataset(2, sizes=((96,),))

    def test_roi_travels_through_views(self):
        ds = DistractorDataset(3, sizes=((96, 177),))
        view = ImageLabelDataset(ds, ds.classes)
        assert torch.equal(view[1]["roi"], ds[1]["roi"])
        memory = MemoryDataset([view[i]["image"] for i in range(3)], view.labels, ds.classes, regions=[view[i]["roi"] for i in range(3)])
        assert torch.equal(memory[2]["roi"], ds[2]["roi"])
        with pytest.raises(DACInputError, match="regions"):
            MemoryDataset([view[0]["image"]], [0], ds.classes, regions=[])
