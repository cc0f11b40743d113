"""dac.saliency.scores: IoU, teeth kept, and a stage's fit of its own labels."""
from __future__ import annotations

import pytest
import torch

from dac import DACInputError, DACrop
from dac.data.phantoms import make_phantom
from dac.saliency import SaliencyNet, labelled_fit, localisation_scores, saliency_features


class TestScores:
    def test_scores(self):
        teeth = [torch.tensor([[10.0, 10, 20, 20], [90, 10, 110, 20]])]
        s = localisation_scores(torch.tensor([[0.0, 0, 100, 50]]), torch.tensor([[10.0, 10, 110, 20]]), teeth)
        assert s["iou"].item() == pytest.approx(900 / 5100)
        assert s["tooth_coverage"].item() == pytest.approx(0.75)
        assert s["worst_tooth"].item() == pytest.approx(0.5) and not s["all_teeth_inside"].item()

    def test_scores_of_mismatched_batches_are_refused(self):
        boxes, regions = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 9, 9]]), torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20]])
        with pytest.raises(DACInputError, match="regions"):
            localisation_scores(boxes, regions)
        with pytest.raises(DACInputError, match="teeth"):
            localisation_scores(boxes[:2], regions, [torch.tensor([[1.0, 1, 2, 2]])])

    def test_an_image_without_teeth_keeps_them_all(self):
        s = localisation_scores(torch.tensor([[0.0, 0, 10, 10]] * 2), torch.tensor([[0.0, 0, 10, 10]] * 2),
                                [torch.zeros(0, 4), torch.tensor([[20.0, 20, 30, 30]])])
        assert s["tooth_coverage"].tolist() == [1.0, 0.0] and s["worst_tooth"].tolist() == [1.0, 0.0]
        assert s["all_teeth_inside"].tolist() == [True, False]


def test_labelled_fit_searches_each_size_and_names_bad_regions():
    net = SaliencyNet(pool_size=4)  # untrained: the paper's map
    layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net)
    phantoms = [make_phantom(10, 192, 354), make_phantom(11, 160, 300), make_phantom(12, 192, 354)]
    features = [saliency_features(p.image[None], 4)[0] for p in phantoms]
    rois = torch.stack([p.roi for p in phantoms])
    fit = labelled_fit(net, layer, features, rois)
    alone = torch.cat([layer.locate(p.image[None]) for p in phantoms])
    scores = localisation_scores(alone, rois, [r[None] for r in rois])
    assert fit["labelled_iou"] == pytest.approx(float(scores["iou"].mean()), abs=1e-5)
    assert fit["labelled_region_kept"] == pytest.approx(float(scores["tooth_coverage"].mean()), abs=1e-5)
    far = rois.clone()
    far[:, [0, 2]] = torch.tensor([0.0, 1.0])  # a 1-pixel sliver: its IoU with any box this wide is near 0
    assert labelled_fit(net, layer, features, far)["labelled_iou"] < 0.01
    with pytest.raises(DACInputError, match="regions"):
        labelled_fit(net, layer, features, rois[:2])
