"""dac.saliency.fit: training through the box, its warm start, its options, and reproducibility by seed."""
from __future__ import annotations

import pytest
import torch

from dac import DACInputError, DACrop
from dac.saliency import (
    FIT_DEFAULTS, BoxRegressor, FitHistory, FitOptions, SaliencyNet, aspect_box, box_loss, fit_box_regressor, fit_region_masks,
    fit_saliency, init_generator, region_masks,
)

from saliency_helpers import phantom_set


def test_box_loss_charges_teeth_cut_off():
    region = torch.tensor([[100.0, 100, 200, 150]])
    target = aspect_box(region, 0.5, torch.tensor([[300, 400]]))
    wide = target + torch.tensor([[-10.0, -5, 10, 5]])
    narrow = target + torch.tensor([[10.0, 5, -10, -5]])
    w = torch.tensor([400.0])
    assert box_loss(target, region, target, w).item() == pytest.approx(0.0)
    assert box_loss(narrow, region, target, w).item() > box_loss(wide, region, target, w).item() > 0


class TestFitting:
    def test_fit_saliency_lowers_the_box_loss(self):
        features, regions, sizes, _ = phantom_set(range(40, 46))
        net = SaliencyNet(pool_size=4, width=8, dilations=(1, 2, 4))
        layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=20)
        history = fit_saliency(net, features, regions, sizes, layer, steps=20, mask_steps=0, batch_size=6, lr=1e-2, coverage_weight=1.0, margin=0.0,
                               stretch=0.0, shift=0.0, seed=0)  # the same 6 images each step: the fit alone
        assert history.steps == 20 and len(history.loss) == 20
        first, last = sum(history.loss[:4]) / 4, sum(history.loss[-4:]) / 4
        assert last < 0.8 * first, (first, last)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())

    def test_each_member_trains_on_its_own_boxes(self):
        features, regions, sizes, _ = phantom_set(range(40, 46))
        torch.manual_seed(0)
        net = SaliencyNet(pool_size=4, width=4, dilations=(1, 2), members=2)
        layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=20)
        start = net.gate.weight.detach().clone()
        history = fit_saliency(net, features, regions, sizes, layer, steps=6, mask_steps=3, batch_size=3, lr=1e-2, margin=0.0, seed=0)
        assert history.steps == 6 and history.mask_steps == 3
        assert all((net.gate.weight[m] - start[m]).abs().sum() > 0 for m in range(2))  # both members trained
        assert net.member_maps(features[0][None]).shape == (1, 2, *features[0].shape[-2:])

    def test_unset_options_are_those_of_the_command(self):
        # fit_saliency(...) and `dac fit-saliency` train alike: both take their defaults from FIT_DEFAULTS
        from dac.cli import _parser

        defaults = FitOptions()
        assert all(getattr(defaults, name) == value for name, value in FIT_DEFAULTS.items() if name not in ("count", "members"))
        args = _parser().parse_args(["fit-saliency", "--out", "x"])
        assert all(getattr(args, name) == value for name, value in FIT_DEFAULTS.items() if hasattr(args, name))

    def test_box_steps_clip_the_gradient_norm_and_count_it(self, monkeypatch):
        # One box on a flat ridge has a huge implicit gradient; the step is scaled to clip_norm.
        from dac.saliency.fit import _step

        weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        history = FitHistory()
        _step(optimizer, schedule, (torch.tensor([30.0, -40.0, 0.0, 0.0], dtype=torch.float64) * weight).sum(), history, clip_norm=1.0)
        torch.testing.assert_close(weight.detach(), torch.tensor([-0.6, 0.8, 0.0, 0.0], dtype=torch.float64))  # norm 50 -> 1
        _step(optimizer, schedule, (torch.tensor([0.3, 0.0, 0.0, 0.0], dtype=torch.float64) * weight).sum(), history, clip_norm=1.0)
        torch.testing.assert_close(weight.detach(), torch.tensor([-0.9, 0.8, 0.0, 0.0], dtype=torch.float64))  # below: untouched
        assert (history.steps, history.clipped) == (2, 1)
        features, regions, sizes, _ = phantom_set(range(40, 43))
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,))
        layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=20)
        calls = []

        def recorded(*args, **kwargs):
            calls.append(args[4] if len(args) > 4 else kwargs.get("clip_norm"))
            return _step(*args, **kwargs)

        monkeypatch.setattr("dac.saliency.fit._step", recorded)
        fitted = fit_saliency(net, features, regions, sizes, layer, steps=3, mask_steps=2, batch_size=3, clip_norm=1e-9, seed=0)
        assert (fitted.steps, fitted.clipped) == (3, 3) and calls == [None, None, 1e-9, 1e-9, 1e-9]  # the warm start is not clipped

    def test_mask_warm_start_makes_the_gate_dark_outside_the_region(self):
        features, regions, sizes, _ = phantom_set(range(40, 46))
        net = SaliencyNet(pool_size=4, width=8, dilations=(1, 2, 4))
        history = fit_region_masks(net, net.gate_logits, features, regions, sizes, 4, inside=0.5, mask_steps=60, seed=0)
        assert history.steps == 60 and sum(history.loss[-5:]) < 0.7 * sum(history.loss[:5])
        feats = torch.stack(features)
        with torch.no_grad():
            gate = net.from_features(feats) / feats[:, :1].clamp_min(1e-6)
        inside = region_masks(regions.double(), feats.shape[-2:], 4).bool()
        assert gate[inside].mean() > 0.7 and gate[~inside].mean() < 0.3, (gate[inside].mean(), gate[~inside].mean())

    def test_fit_saliency_with_a_warm_start(self):
        features, regions, sizes, _ = phantom_set(range(40, 44))
        net = SaliencyNet(pool_size=4, width=8, dilations=(1, 2, 4))
        layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=20)
        history = fit_saliency(net, features, regions, sizes, layer, steps=2, mask_steps=30, batch_size=4, seed=0)
        assert history.mask_steps == 30 and len(history.mask_loss) == 30 and history.steps == 2
        assert history.mask_loss[-1] < history.mask_loss[0]
        assert not net.training
        with pytest.raises(DACInputError, match="mask_steps"):
            fit_saliency(net, features, regions, sizes, layer, steps=1, mask_steps=-1)

    def test_no_box_steps_is_the_warm_start_alone(self):
        # steps=0 stops the fit after its warm start: the net fit_region_masks gives with the fit's own options and seed
        features, regions, sizes, _ = phantom_set(range(40, 43))
        nets = [SaliencyNet(pool_size=4, width=4, dilations=(1,), generator=init_generator(3)) for _ in range(2)]
        options = FitOptions(steps=0, mask_steps=5, batch_size=2, mask_lr=1e-2)
        history = fit_saliency(nets[0], features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4, saliency=nets[0]), options, seed=4)
        assert (history.steps, history.mask_steps, history.loss) == (0, 5, [])
        fit_region_masks(nets[1], nets[1].gate_logits, features, regions, sizes, 4, options, inside=0.5, seed=4)
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(a, b)
        assert any(p.abs().sum() > 0 for p in nets[0].gate.parameters())  # the warm start did move the gate

    def test_features_of_another_window_or_size_are_refused(self):
        features, regions, sizes, _ = phantom_set(range(40, 42))  # k = 4
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,))
        with pytest.raises(DACInputError, match="features"):  # searched as if k were 10: boxes beyond the image
            fit_saliency(SaliencyNet(pool_size=10), features, regions, sizes, DACrop(output_size=(20, 37), pool_size=10), steps=1, mask_steps=0)
        with pytest.raises(DACInputError, match="features"):
            fit_saliency(net, features, regions, [(354, 192)] * 2, DACrop(output_size=(20, 37), pool_size=4), steps=1, mask_steps=0)
        with pytest.raises(DACInputError, match="pool_size"):
            fit_saliency(SaliencyNet(pool_size=5), features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4), steps=1)
        layer = DACrop(output_size=(20, 37), pool_size=4)
        with pytest.raises(DACInputError, match="aspect"):
            fit_box_regressor(BoxRegressor(1.0, pool_size=4, width=4, dilations=(1,)), features, regions, sizes, layer, steps=1)
        with pytest.raises(DACInputError, match="pool_size"):
            fit_box_regressor(BoxRegressor(layer.aspect, pool_size=10, width=4, dilations=(1,)), features, regions, sizes, layer, steps=1)

    @pytest.mark.parametrize("option, value", [("coverage_weight", float("nan")), ("coverage_weight", -1.0), ("margin", 0.5),
                                               ("margin", float("nan")), ("time_limit", -1.0), ("time_limit", float("nan")),
                                               ("stretch", 0.5), ("stretch", -0.1), ("shift", float("nan")), ("shift", 0.6),
                                               ("clip_norm", 0.0), ("clip_norm", float("nan")), ("stretch", "0.1"), ("shift", True),
                                               ("clip_norm", "1")])
    def test_bad_fit_options(self, option, value):
        features, regions, sizes, _ = phantom_set(range(40, 41))
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,))
        with pytest.raises(DACInputError, match=option):
            fit_saliency(net, features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4), steps=1, mask_steps=1, **{option: value})

    def test_time_limit_covers_the_warm_start(self):
        features, regions, sizes, _ = phantom_set(range(40, 42))
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,))
        history = fit_saliency(net, features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4), steps=50, mask_steps=10_000,
                               batch_size=2, time_limit=0.5)
        assert history.mask_steps < 10_000 and history.steps == 0  # all 10 000 would take minutes

    def test_bad_training_input(self):
        net = SaliencyNet(pool_size=4)
        with pytest.raises(DACInputError, match="features, regions, image_sizes"):
            fit_saliency(net, [torch.rand(5, 10, 10)], torch.rand(2, 4), [(40, 40)], DACrop(pool_size=4, saliency=net))
        with pytest.raises(DACInputError, match="steps"):  # before any warm-start step
            fit_saliency(net, [torch.rand(5, 10, 10)], torch.rand(1, 4), [(40, 40)], DACrop(pool_size=4, saliency=net), steps=-1, mask_steps=5)
        for inverted in ([30.0, 5.0, 10.0, 20.0], [5.0, 20.0, 30.0, 20.0], [5.0, 5.0, float("nan"), 20.0]):  # stretched, it would leave the grid
            with pytest.raises(DACInputError, match="regions"):
                fit_saliency(net, [torch.rand(5, 10, 10)], torch.tensor([inverted]), [(40, 40)], DACrop(pool_size=4, saliency=net), steps=1, mask_steps=1)


def _fit_small(seed: int, members: int = 2) -> dict[str, torch.Tensor]:
    """A small fit with augmentation, warm start and two members; its weights."""
    features, regions, sizes, _ = phantom_set(range(40, 44))
    net = SaliencyNet(pool_size=4, width=4, dilations=(1, 2), members=members, generator=init_generator(seed))
    layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=10)
    fit_saliency(net, features, regions, sizes, layer, steps=3, mask_steps=3, batch_size=2, seed=seed)
    return {name: value.detach().clone() for name, value in net.state_dict().items()}


class TestReproducibleBySeed:
    def test_the_same_seed_gives_bitwise_the_same_weights(self):
        torch.manual_seed(0)  # the global state differs between the two runs: it must not matter
        first = _fit_small(seed=3)
        torch.rand(100)
        second = _fit_small(seed=3)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first), [n for n in first if not torch.equal(first[n], second[n])]

    def test_another_seed_gives_other_weights(self):
        first, other = _fit_small(seed=3), _fit_small(seed=4)
        assert not torch.equal(first["trunk.0.weight"], other["trunk.0.weight"])
        assert not torch.equal(first["gate.weight"], other["gate.weight"])

    def test_the_seeds_streams_are_independent(self):
        from dac.saliency import random_stream

        draws = {purpose: random_stream(3, purpose).random(4).tolist() for purpose in ("init", "mask", "box")}
        assert len({tuple(v) for v in draws.values()}) == 3
        assert random_stream(3, "box").random(4).tolist() != random_stream(4, "box").random(4).tolist()
        with pytest.raises(DACInputError, match="seed"):
            random_stream(-1, "box")


class TestFitOptions:
    def test_checked_once_when_made(self):
        options = FitOptions(steps=2, mask_steps=0)
        assert FitOptions.of(options) is options  # taken as made: not checked again
        assert FitOptions.of(options, steps=3).steps == 3
        with pytest.raises(DACInputError, match="options"):
            FitOptions.of({"steps": 2})

    @pytest.mark.parametrize("option, value", [("lr", 0.0), ("mask_lr", "1e-2"), ("batch_size", 0), ("flip", 1), ("time_limit", float("inf"))])
    def test_other_bad_options(self, option, value):
        with pytest.raises(DACInputError, match=option):
            FitOptions(**{option: value})
        with pytest.raises(DACInputError, match="--" + option.replace("_", "-")):
            FitOptions(**{option: value}, flags=True)

    def test_fit_history_counts_the_boxes_searched(self):
        features, regions, sizes, _ = phantom_set(range(40, 43))
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,), members=2, generator=init_generator(0))
        history = fit_saliency(net, features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4, saliency=net),
                               steps=2, mask_steps=0, batch_size=3)
        assert history.boxes == 2 * 3 * 2 and 0 <= history.frozen + history.unconverged <= history.boxes
        assert isinstance(history, FitHistory)

    def test_progress_is_logged_in_both_phases(self, caplog):
        import logging

        features, regions, sizes, _ = phantom_set(range(40, 42))
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,), generator=init_generator(0))
        with caplog.at_level(logging.INFO, logger="dac.saliency"):
            fit_saliency(net, features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4, saliency=net),
                         steps=1, mask_steps=20, batch_size=2)
        messages = [r.getMessage() for r in caplog.records if r.name.startswith("dac.saliency")]
        assert "warm-start step 20/20: loss" in messages[0] and messages[-1].startswith("step 1/1: loss")
