"""dac.saliency.regressor: the box-regression baseline, trained as the saliency stage is."""
from __future__ import annotations

import torch

from dac import DACrop
from dac.saliency import BoxRegressor, fit_box_regressor, minimum_width

from saliency_helpers import phantom_set


class TestBoxRegressor:
    def test_box_regressor_starts_centred_and_trains(self):
        features, regions, sizes, _ = phantom_set(range(40, 46))
        layer = DACrop(output_size=(20, 37), pool_size=4)
        model = BoxRegressor(layer.aspect, pool_size=4, width=8, dilations=(1, 2), min_width_fraction=2 * layer.r_min_fraction)
        start = model(torch.stack(features[:1]), (192, 352))
        torch.testing.assert_close((start[0, 0] + start[0, 2]) / 2, torch.tensor(176.0))
        assert (start[0, 2] - start[0, 0]).item() >= minimum_width(layer, (192, 354)) - 1e-3
        history = fit_box_regressor(model, features, regions, sizes, layer, steps=30, mask_steps=0, batch_size=6, lr=1e-2, coverage_weight=1.0, margin=0.0, seed=0)
        assert sum(history.loss[-5:]) < sum(history.loss[:5])

    def test_coverage_weight_charges_teeth_cut_off_in_training(self):
        features, regions, sizes, _ = phantom_set(range(40, 43))
        layer = DACrop(output_size=(20, 37), pool_size=4)
        first = []
        for weight in (0.0, 50.0):
            model = BoxRegressor(layer.aspect, pool_size=4, width=4, dilations=(1,), min_width_fraction=0.1, init_width_fraction=0.3)
            first.append(fit_box_regressor(model, features, regions, sizes, layer, steps=1, mask_steps=0, batch_size=3, coverage_weight=weight).loss[0])
        assert first[1] > first[0] + 1.0  # a narrow start box cuts teeth off: the weight counts

    def test_margin_grows_the_target(self):
        features, regions, sizes, _ = phantom_set(range(40, 43))
        layer = DACrop(output_size=(20, 37), pool_size=4)
        first = []
        for margin in (0.0, 0.2):
            model = BoxRegressor(layer.aspect, pool_size=4, width=4, dilations=(1,), min_width_fraction=0.1, init_width_fraction=0.9)
            first.append(fit_box_regressor(model, features, regions, sizes, layer, steps=1, mask_steps=0, batch_size=3, margin=margin).loss[0])
        assert first[1] < first[0]  # a wide start box is nearer a target grown by the margin
