"""dac.saliency and dac.localisation: features, the learned stage, training through the box."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dac import DACInputError, DACrop
from dac.functional import max_min_pool
from dac.localisation import (
    FIT_DEFAULTS,
    _stretch_and_shift,
    BoxRegressor,
    aspect_box,
    box_loss,
    fit_box_regressor,
    fit_region_masks,
    fit_saliency,
    localisation_scores,
    minimum_width,
    region_masks,
)
from dac.data.phantoms import make_phantom
from dac.saliency import FEATURES, SaliencyNet, load_saliency, save_saliency, saliency_features

from conftest import textured_scene

SMALL = dict(output_size=(20, 37), pool_size=5)


class TestFeatures:
    def test_match_a_loop_over_windows(self):
        x = torch.rand(2, 3, 23, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        f = saliency_features(x, 5)
        assert f.shape == (2, len(FEATURES), 4, 6) and f.dtype == torch.float64
        for b in range(2):
            for i in range(4):
                for j in range(6):
                    win = x[b, :, 5 * i : 5 * i + 5, 5 * j : 5 * j + 5].reshape(3, -1)
                    expected = [
                        (win.amax(1) - win.amin(1)).mean(),
                        win.mean(1).mean(),
                        win.amax(1).mean(),
                        win.amin(1).mean(),
                        win.std(1, unbiased=False).mean(),
                    ]
                    torch.testing.assert_close(f[b, :, i, j], torch.stack(expected))

    def test_std_of_flat_windows_is_not_rounding_noise(self):
        # E[x^2] - E[x]^2 in float32 gave 4e-4 for a constant 0.7 and 65x the truth for 60000/60001.
        flat = saliency_features(torch.full((1, 1, 20, 20), 0.7), 10)[0, 4]
        assert flat.abs().max() < 1e-6
        alternating = torch.full((1, 1, 20, 20), 60000, dtype=torch.uint16)
        alternating[..., ::2] = 60001
        std = saliency_features(alternating, 10)[0, 4]
        torch.testing.assert_close(std, torch.full_like(std, 0.5 / 65535), rtol=1e-2, atol=0)

    def test_uint8_equals_float_and_channel_0_is_max_min(self):
        x = torch.randint(0, 256, (1, 1, 40, 60), dtype=torch.uint8)
        torch.testing.assert_close(saliency_features(x, 10), saliency_features(x.float() / 255, 10))
        torch.testing.assert_close(saliency_features(x, 10)[:, :1], max_min_pool(x, 10))


class TestSaliencyNet:
    def test_untrained_net_is_the_paper_map(self):
        images = textured_scene(2, 300, 555, dtype=torch.float32)
        net = SaliencyNet(pool_size=5)
        torch.testing.assert_close(net(images), max_min_pool(images, 5))
        paper = DACrop(**SMALL).locate(images)
        torch.testing.assert_close(DACrop(**SMALL, saliency=net).locate(images), paper)

    def test_gate_spans_zero_to_two(self):
        net = SaliencyNet(pool_size=5)
        images = textured_scene(1, 300, 555, dtype=torch.float32)
        paper = max_min_pool(images, 5)
        for bias, gate in ((50.0, 2.0), (-50.0, 0.0)):
            with torch.no_grad():
                net.gate.bias.fill_(bias)
            torch.testing.assert_close(net(images), gate * paper)

    @pytest.mark.parametrize("members", [1, 2])
    def test_gradient_of_the_boxes_matches_finite_differences(self, members):
        """d(loss on boxes) / d(parameters), through the implicit gradient of the box (float64)."""
        torch.manual_seed(0)
        net = SaliencyNet(pool_size=5, width=4, dilations=(1, 2), members=members).double()
        with torch.no_grad():  # a gate that depends on the parameters (zero-initialised otherwise)
            net.gate.weight.normal_(0, 0.5)
            net.gate.bias.fill_(0.1)
        layer = DACrop(**SMALL, saliency=net)
        images = textured_scene(2, 300, 555)
        weights = torch.tensor([[0.3, -1.2, 0.7, 0.4], [-0.5, 0.9, 1.1, -0.8]], dtype=torch.float64)
        params = [p for p in net.parameters()]
        grads = torch.autograd.grad((layer.locate(images) * weights).sum(), params)
        gen = torch.Generator().manual_seed(3)
        direction = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
        eps = 1e-8  # the trunk's ReLUs are kinks: a small step, as for max pooling (the FD error falls with it: 3e-5 at 1e-6)
        base = [p.detach().clone() for p in params]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, b, d in zip(params, base, direction):
                    p.copy_(b + sign * eps * d)
                values.append((layer.locate(images) * weights).sum().item())
        with torch.no_grad():
            for p, b in zip(params, base):
                p.copy_(b)
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(fd) > 1e-2  # the boxes really move with the parameters
        assert abs(analytic - fd) <= 2e-6 * abs(fd), (analytic, fd)

    def test_save_and_load(self, tmp_path):
        net = SaliencyNet(pool_size=5, width=8)
        with torch.no_grad():
            net.gate.weight.normal_()
        save_saliency(net, tmp_path / "s.pt", phantoms=3)
        again = load_saliency(tmp_path / "s.pt")
        x = torch.rand(1, 1, 60, 90)
        torch.testing.assert_close(again(x), net(x))
        assert not again.training
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(DACInputError, match="saliency: .* is not a saliency stage"):
            load_saliency(tmp_path / "bad.pt")
        with pytest.raises(DACInputError, match="no such file"):
            load_saliency(tmp_path / "missing.pt")

    def test_members_are_independent_gates_averaged(self):
        torch.manual_seed(0)
        pair = SaliencyNet(pool_size=5, width=4, dilations=(1, 2), members=2)
        images = textured_scene(2, 300, 555, dtype=torch.float32)
        torch.testing.assert_close(pair(images), max_min_pool(images, 5))  # untrained: the paper's map
        singles = [SaliencyNet(pool_size=5, width=4, dilations=(1, 2)) for _ in range(2)]
        with torch.no_grad():
            pair.gate.weight.normal_(0, 0.5)
            pair.gate.bias.copy_(torch.tensor([0.3, -0.2]))
            pair.log_scale.fill_(0.1)
            for m, single in enumerate(singles):  # member m's slices of the grouped weights
                for grouped, alone in zip(list(pair.trunk) + [pair.gate], list(single.trunk) + [single.gate]):
                    if isinstance(grouped, torch.nn.Conv2d):
                        n = alone.out_channels
                        alone.weight.copy_(grouped.weight[m * n : (m + 1) * n])
                        alone.bias.copy_(grouped.bias[m * n : (m + 1) * n])
                single.log_scale.copy_(pair.log_scale)
        features = saliency_features(images, 5)
        own = torch.cat([single.gate_logits(features) for single in singles], dim=1)
        torch.testing.assert_close(pair.member_logits(features), own)
        torch.testing.assert_close(pair.gate_logits(features), own.mean(dim=1, keepdim=True))
        torch.testing.assert_close(pair.member_maps(features)[:, 1:], singles[1].from_features(features))
        pair.member_maps(features)[:, 0].sum().backward()  # member 0's map leaves member 1's weights alone
        assert pair.gate.weight.grad[1].abs().sum() == 0 and pair.gate.weight.grad[0].abs().sum() > 0
        assert pair.trunk[0].weight.grad[4:].abs().sum() == 0 and pair.trunk[0].weight.grad[:4].abs().sum() > 0

    def test_members_are_saved(self, tmp_path):
        net = SaliencyNet(pool_size=5, width=4, members=3)
        with torch.no_grad():
            net.gate.weight.normal_()
        save_saliency(net, tmp_path / "s.pt")
        again = load_saliency(tmp_path / "s.pt")
        assert again.members == 3
        x = torch.rand(1, 1, 60, 90)
        torch.testing.assert_close(again(x), net(x))

    def test_bad_arguments(self):
        with pytest.raises(DACInputError, match="pool_size"):
            SaliencyNet(pool_size=0)
        with pytest.raises(DACInputError, match="members"):
            SaliencyNet(members=0)
        with pytest.raises(DACInputError, match="features"):
            SaliencyNet().from_features(torch.rand(1, 3, 10, 10))
        with pytest.raises(DACInputError, match="features"):  # the box regressor's heat map draws the same map
            BoxRegressor(0.5).heat_logits(torch.rand(1, 3, 10, 10))
        with pytest.raises(DACInputError, match="features"):
            BoxRegressor(0.5)(torch.rand(3, 10, 10), (100, 100))


class TestScores:
    def test_aspect_box_is_the_smallest_box_of_the_aspect_around_the_region(self):
        regions = torch.tensor([[100.0, 50.0, 300.0, 90.0], [0.0, 0.0, 50.0, 200.0]])
        sizes = torch.tensor([[400, 800], [300, 800]])
        boxes = aspect_box(regions, 0.5, sizes, min_width=torch.tensor([0.0, 100.0]))
        torch.testing.assert_close(boxes[0], torch.tensor([100.0, 20.0, 300.0, 120.0]))  # width-bound, centred
        torch.testing.assert_close(boxes[1], torch.tensor([0.0, 0.0, 400.0, 200.0]))  # height-bound, shifted in
        with_floor = aspect_box(regions[:1], 0.5, sizes[:1], min_width=500.0)
        assert (with_floor[0, 2] - with_floor[0, 0]).item() == pytest.approx(500.0)

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

    def test_box_loss_charges_teeth_cut_off(self):
        region = torch.tensor([[100.0, 100, 200, 150]])
        target = aspect_box(region, 0.5, torch.tensor([[300, 400]]))
        wide = target + torch.tensor([[-10.0, -5, 10, 5]])
        narrow = target + torch.tensor([[10.0, 5, -10, -5]])
        w = torch.tensor([400.0])
        assert box_loss(target, region, target, w).item() == pytest.approx(0.0)
        assert box_loss(narrow, region, target, w).item() > box_loss(wide, region, target, w).item() > 0


def _phantom_set(seeds, size=(192, 354), k=4):
    features, regions, sizes, teeth = [], [], [], []
    for s in seeds:
        p = make_phantom(s, *size)
        features.append(saliency_features(p.image[None], k)[0])
        regions.append(p.roi)
        sizes.append(size)
        teeth.append(p.teeth)
    return features, torch.stack(regions), sizes, teeth


class TestFitting:
    def test_fit_saliency_lowers_the_box_loss(self):
        features, regions, sizes, _ = _phantom_set(range(40, 46))
        net = SaliencyNet(pool_size=4, width=8, dilations=(1, 2, 4))
        layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=20)
        history = fit_saliency(net, features, regions, sizes, layer, steps=20, mask_steps=0, batch_size=6, lr=1e-2, coverage_weight=1.0, margin=0.0,
                               stretch=0.0, shift=0.0, seed=0)  # the same 6 images each step: the fit alone
        assert history.steps == 20 and len(history.loss) == 20
        first, last = sum(history.loss[:4]) / 4, sum(history.loss[-4:]) / 4
        assert last < 0.8 * first, (first, last)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())

    def test_each_member_trains_on_its_own_boxes(self):
        features, regions, sizes, _ = _phantom_set(range(40, 46))
        torch.manual_seed(0)
        net = SaliencyNet(pool_size=4, width=4, dilations=(1, 2), members=2)
        layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=20)
        start = net.gate.weight.detach().clone()
        history = fit_saliency(net, features, regions, sizes, layer, steps=6, mask_steps=3, batch_size=3, lr=1e-2, margin=0.0, seed=0)
        assert history.steps == 6 and history.mask_steps == 3
        assert all((net.gate.weight[m] - start[m]).abs().sum() > 0 for m in range(2))  # both members trained
        assert net.member_maps(features[0][None]).shape == (1, 2, *features[0].shape[-2:])

    def test_box_regressor_starts_centred_and_trains(self):
        features, regions, sizes, _ = _phantom_set(range(40, 46))
        layer = DACrop(output_size=(20, 37), pool_size=4)
        model = BoxRegressor(layer.aspect, pool_size=4, width=8, dilations=(1, 2), min_width_fraction=2 * layer.r_min_fraction)
        start = model(torch.stack(features[:1]), (192, 352))
        torch.testing.assert_close((start[0, 0] + start[0, 2]) / 2, torch.tensor(176.0))
        assert (start[0, 2] - start[0, 0]).item() >= minimum_width(layer, (192, 354)) - 1e-3
        history = fit_box_regressor(model, features, regions, sizes, layer, steps=30, mask_steps=0, batch_size=6, lr=1e-2, coverage_weight=1.0, margin=0.0, seed=0)
        assert sum(history.loss[-5:]) < sum(history.loss[:5])

    def test_coverage_weight_charges_teeth_cut_off_in_training(self):
        features, regions, sizes, _ = _phantom_set(range(40, 43))
        layer = DACrop(output_size=(20, 37), pool_size=4)
        first = []
        for weight in (0.0, 50.0):
            model = BoxRegressor(layer.aspect, pool_size=4, width=4, dilations=(1,), min_width_fraction=0.1, init_width_fraction=0.3)
            first.append(fit_box_regressor(model, features, regions, sizes, layer, steps=1, mask_steps=0, batch_size=3, coverage_weight=weight).loss[0])
        assert first[1] > first[0] + 1.0  # a narrow start box cuts teeth off: the weight counts

    def test_unset_options_are_those_of_the_command(self, monkeypatch):
        # fit_saliency(...) and `dac fit-saliency` train alike: options left out come from FIT_DEFAULTS
        features, regions, sizes, _ = _phantom_set(range(40, 43))
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,))
        monkeypatch.setitem(FIT_DEFAULTS, "mask_steps", 3)
        monkeypatch.setitem(FIT_DEFAULTS, "steps", 2)
        history = fit_saliency(net, features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4, saliency=net))
        assert (history.mask_steps, history.steps) == (3, 2)

    def test_margin_grows_the_target(self):
        features, regions, sizes, _ = _phantom_set(range(40, 43))
        layer = DACrop(output_size=(20, 37), pool_size=4)
        first = []
        for margin in (0.0, 0.2):
            model = BoxRegressor(layer.aspect, pool_size=4, width=4, dilations=(1,), min_width_fraction=0.1, init_width_fraction=0.9)
            first.append(fit_box_regressor(model, features, regions, sizes, layer, steps=1, mask_steps=0, batch_size=3, margin=margin).loss[0])
        assert first[1] < first[0]  # a wide start box is nearer a target grown by the margin

    def test_region_masks_mark_the_pooled_pixels_whose_centre_is_inside(self):
        gen = torch.Generator().manual_seed(0)
        corners = torch.rand(5, 2, 2, generator=gen, dtype=torch.float64) * torch.tensor([60.0, 40.0], dtype=torch.float64)
        regions = torch.cat((corners.amin(1), corners.amax(1)), -1)
        masks = region_masks(regions, (8, 12), 5)
        for b, (x1, y1, x2, y2) in enumerate(regions.tolist()):
            for i in range(8):
                for j in range(12):
                    cx, cy = 5 * j + 2.5, 5 * i + 2.5
                    assert masks[b, 0, i, j].item() == float(x1 <= cx < x2 and y1 <= cy < y2)

    def test_region_masks_of_a_mirrored_region_are_the_mirrored_masks(self):
        # A region edge on a pooled pixel's centre (integer boxes, even k) counts half,
        # so the mask of a mirrored image's region is the mirror of the mask.
        regions = torch.tensor([[15.0, 5.0, 55.0, 25.0], [12.0, 0.0, 45.0, 30.0]], dtype=torch.float64)
        masks = region_masks(regions, (4, 10), 10)
        mirrored = torch.stack((100 - regions[:, 2], regions[:, 1], 100 - regions[:, 0], regions[:, 3]), -1)
        torch.testing.assert_close(region_masks(mirrored, (4, 10), 10), masks.flip(-1))
        assert masks[0, 0, 1].tolist() == [0, 0.5, 1, 1, 1, 0.5, 0, 0, 0, 0]
        assert masks[0, 0, :, 3].tolist() == [0.5, 1, 0.5, 0]

    def test_stretch_and_shift_move_features_and_regions_alike(self):
        # Features that are the region's own mask: after the augmentation the mask must lie on the
        # moved region: rows exactly (whole-pixel moves), columns but for the column at each edge
        # (each new column takes the old column under its centre).
        gen = torch.Generator().manual_seed(0)
        k, h, w, b = 10, 30, 60, 64
        x1 = 10 + torch.rand(b, generator=gen, dtype=torch.float64) * 280
        y1 = 10 + torch.rand(b, generator=gen, dtype=torch.float64) * 130
        regions = torch.stack((x1, y1, x1 + 150 + torch.rand(b, generator=gen, dtype=torch.float64) * 150,
                               y1 + 50 + torch.rand(b, generator=gen, dtype=torch.float64) * 100), -1)  # on the grid
        regions[0] = torch.tensor([0.0, 0.0, 600.0, 300.0])  # the whole grid: nowhere to go
        regions[1] = torch.tensor([5.0, 100.0, 300.0, 200.0])  # in the first column: moves in y only
        regions[2] = torch.tensor([40.0, 20.0, 590.0, 295.0])  # would leave the grid if stretched much
        features = region_masks(regions, (h, w), k).expand(b, 5, h, w).clone()
        moved, moved_regions = _stretch_and_shift(features, regions, k, np.random.default_rng(1), 0.3, 0.1)
        assert moved.shape == features.shape and moved_regions.dtype == torch.float64
        expected = region_masks(moved_regions, (h, w), k)
        assert torch.equal(moved[:, 1:], moved[:, :1].expand(b, 4, h, w))  # every channel moved alike
        wrong = (moved[:, :1] != expected)[:, 0]
        # a column's centre and the old column it takes differ by at most half an old column: s / 2 new ones
        ratio = (moved_regions[:, 2] - moved_regions[:, 0]) / (regions[:, 2] - regions[:, 0])
        centres = torch.arange(w, dtype=torch.float64) + 0.5
        to_an_edge = torch.minimum((centres - moved_regions[:, :1] / k).abs(), (centres - moved_regions[:, 2:3] / k).abs())
        assert not (wrong & ~(to_an_edge <= 0.5 * ratio[:, None] + 1e-9)[:, None, :]).any()
        # on the grid; heights kept, widths stretched by [0.7, 1.3] (less where cut at the grid); moves up to 0.1 w = 6 pooled px
        assert (moved_regions[:, :2] >= 0).all() and (moved_regions[:, 2] <= k * w).all() and (moved_regions[:, 3] <= k * h).all()
        torch.testing.assert_close(moved_regions[:, 3] - moved_regions[:, 1], regions[:, 3] - regions[:, 1])
        assert (ratio <= 1.3 + 1e-9).all() and (ratio >= 0.7 - 1e-9).all() and ratio.max() > 1.2 and ratio.min() < 0.8
        dy = (moved_regions[:, 1] - regions[:, 1]) / k
        torch.testing.assert_close(dy, dy.round())
        assert dy.abs().max().round() == 6 and (dy > 0).any() and (dy < 0).any()
        torch.testing.assert_close(moved_regions[0], regions[0])
        torch.testing.assert_close(moved_regions[1, 0::2], regions[1, 0::2])
        assert moved_regions[1, 1] != regions[1, 1] and ratio[2] <= 28.5 / 27.5 + 1e-9  # room to the right edge: 28.5 of 27.5 pooled px
        # nothing asked, nothing moved
        same, same_regions = _stretch_and_shift(features, regions, k, np.random.default_rng(1), 0.0, 0.0)
        assert torch.equal(same, features)
        torch.testing.assert_close(same_regions, regions, rtol=1e-15, atol=1e-12)

    def test_box_steps_clip_the_gradient_norm_and_count_it(self, monkeypatch):
        # One box on a flat ridge has a huge implicit gradient; the step is scaled to clip_norm.
        from dac.localisation import FitHistory, _step

        weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        history = FitHistory()
        _step(optimizer, schedule, (torch.tensor([30.0, -40.0, 0.0, 0.0], dtype=torch.float64) * weight).sum(), history, clip_norm=1.0)
        torch.testing.assert_close(weight.detach(), torch.tensor([-0.6, 0.8, 0.0, 0.0], dtype=torch.float64))  # norm 50 -> 1
        _step(optimizer, schedule, (torch.tensor([0.3, 0.0, 0.0, 0.0], dtype=torch.float64) * weight).sum(), history, clip_norm=1.0)
        torch.testing.assert_close(weight.detach(), torch.tensor([-0.9, 0.8, 0.0, 0.0], dtype=torch.float64))  # below: untouched
        assert (history.steps, history.clipped) == (2, 1)
        features, regions, sizes, _ = _phantom_set(range(40, 43))
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,))
        layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=20)
        calls = []

        def recorded(*args, **kwargs):
            calls.append(args[4] if len(args) > 4 else kwargs.get("clip_norm"))
            return _step(*args, **kwargs)

        monkeypatch.setattr("dac.localisation._step", recorded)
        fitted = fit_saliency(net, features, regions, sizes, layer, steps=3, mask_steps=2, batch_size=3, clip_norm=1e-9, seed=0)
        assert (fitted.steps, fitted.clipped) == (3, 3) and calls == [None, None, 1e-9, 1e-9, 1e-9]  # the warm start is not clipped

    def test_mask_warm_start_makes_the_gate_dark_outside_the_region(self):
        features, regions, sizes, _ = _phantom_set(range(40, 46))
        net = SaliencyNet(pool_size=4, width=8, dilations=(1, 2, 4))
        history = fit_region_masks(net, net.gate_logits, features, regions, sizes, 4, inside=0.5, steps=60, seed=0)
        assert history.steps == 60 and sum(history.loss[-5:]) < 0.7 * sum(history.loss[:5])
        feats = torch.stack(features)
        with torch.no_grad():
            gate = net.from_features(feats) / feats[:, :1].clamp_min(1e-6)
        inside = region_masks(regions.double(), feats.shape[-2:], 4).bool()
        assert gate[inside].mean() > 0.7 and gate[~inside].mean() < 0.3, (gate[inside].mean(), gate[~inside].mean())

    def test_fit_saliency_with_a_warm_start(self):
        features, regions, sizes, _ = _phantom_set(range(40, 44))
        net = SaliencyNet(pool_size=4, width=8, dilations=(1, 2, 4))
        layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net, steps_per_stage=20)
        history = fit_saliency(net, features, regions, sizes, layer, steps=2, mask_steps=30, batch_size=4, seed=0)
        assert history.mask_steps == 30 and len(history.mask_loss) == 30 and history.steps == 2
        assert history.mask_loss[-1] < history.mask_loss[0]
        assert not net.training
        with pytest.raises(DACInputError, match="mask_steps"):
            fit_saliency(net, features, regions, sizes, layer, steps=1, mask_steps=-1)

    def test_no_box_steps_is_the_warm_start_alone(self):
        # steps=0 stops the fit after its warm start: the net fit_region_masks gives with the fit's own settings
        features, regions, sizes, _ = _phantom_set(range(40, 43))
        nets = []
        for _ in range(2):
            torch.manual_seed(3)
            nets.append(SaliencyNet(pool_size=4, width=4, dilations=(1,)))
        history = fit_saliency(nets[0], features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4, saliency=nets[0]),
                               steps=0, mask_steps=5, batch_size=2, mask_lr=1e-2, seed=4)
        assert (history.steps, history.mask_steps, history.loss) == (0, 5, [])
        fit_region_masks(nets[1], nets[1].gate_logits, features, regions, sizes, 4, inside=0.5, steps=5, batch_size=2, lr=1e-2, seed=5)
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(a, b)
        assert any(p.abs().sum() > 0 for p in nets[0].gate.parameters())  # the warm start did move the gate

    def test_features_of_another_window_or_size_are_refused(self):
        features, regions, sizes, _ = _phantom_set(range(40, 42))  # k = 4
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
        features, regions, sizes, _ = _phantom_set(range(40, 41))
        net = SaliencyNet(pool_size=4, width=4, dilations=(1,))
        with pytest.raises(DACInputError, match=option):
            fit_saliency(net, features, regions, sizes, DACrop(output_size=(20, 37), pool_size=4), steps=1, mask_steps=1, **{option: value})

    def test_time_limit_covers_the_warm_start(self):
        features, regions, sizes, _ = _phantom_set(range(40, 42))
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


class TestCommandLine:
    def test_fit_saliency_then_crop_with_it(self, tmp_path, capsys):
        import csv
        import json

        from dac.data import io as dio
        from dac.cli import main
        from dac.localisation import load_dacrop

        small = ["--image-size", "192x354", "--pool-size", "4", "--size", "20x37"]
        assert main(["fit-saliency", "--out", str(tmp_path / "fit"), "--count", "3", "--steps", "2", "--mask-steps", "3", "--quiet", *small]) == 0
        summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
        assert summary["steps"] == 2 and summary["mask_steps"] == 3
        assert summary["dacrop"]["r_min_fraction"] == 0.2 and summary["dacrop"]["sharpness_factor"] == 4.0
        layer = load_dacrop(tmp_path / "fit" / "saliency.pt")
        assert isinstance(layer.saliency, SaliencyNet) and layer.pool_size == 4 and layer.output_size == (20, 37)
        # The summary says how the saved stage's boxes fit its own labelled phantoms.
        from dac.localisation import localisation_scores

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
        from dac.localisation import _labelled_images

        colour = torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(0))
        colour[0] *= 0.3  # channels that differ: the luma and the channels' mean differ
        Image.fromarray((colour * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "c.png")
        (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2\nc.png,5,5,30,20\n")
        features, regions, sizes = _labelled_images(tmp_path / "boxes.csv", 5)
        in_use = saliency_features(dio.read_image(tmp_path / "c.png")[None], 5)[0]  # what dac crop --saliency computes
        assert dio.read_image(tmp_path / "c.png").shape[0] == 3
        torch.testing.assert_close(features[0], in_use)
        assert sizes == [(40, 60)] and regions[0].tolist() == [5, 5, 30, 20]

    def test_labelled_float_image_of_0_to_255_is_refused_as_dac_crop_refuses_it(self, tmp_path):
        import numpy as np
        from PIL import Image

        from dac.localisation import _labelled_images

        pixels = np.random.default_rng(0).random((40, 60)).astype(np.float32)
        Image.fromarray(pixels * 255).save(tmp_path / "raw.tif")  # a forgotten / 255: clipped, it trains on white
        (tmp_path / "boxes.csv").write_text("raw.tif,5,5,30,20\n")
        with pytest.raises(DACInputError, match=r"line 1: .*\[0, 1\]"):
            _labelled_images(tmp_path / "boxes.csv", 5)

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

    @pytest.mark.parametrize("header", ["path,x,y,w,h", "image,y1,x1,y2,x2", "path,x1,y1,x2"])
    def test_data_csv_with_other_columns_is_refused(self, tmp_path, capsys, header):
        from dac.data import io as dio
        from dac.cli import main

        dio.write_png(tmp_path / "a.png", make_phantom(1, 96, 177).image)
        (tmp_path / "boxes.csv").write_text(f"{header}\na.png,19,29,100,40\n")  # xywh read as xyxy would fit
        code = main(["fit-saliency", "--out", str(tmp_path / "fit"), "--data", str(tmp_path / "boxes.csv"), "--quiet",
                     "--pool-size", "4", "--size", "20x37", "--steps", "1", "--mask-steps", "1"])
        assert code == 2 and "x1,y1,x2,y2" in capsys.readouterr().err and not (tmp_path / "fit").exists()

    def test_load_dacrop_of_a_stage_saved_without_settings(self, tmp_path):
        from dac.localisation import LEARNED_DEFAULTS, load_dacrop

        save_saliency(SaliencyNet(4, width=4), tmp_path / "plain.pt")
        with pytest.warns(UserWarning, match="no DACrop settings"):
            layer = load_dacrop(tmp_path / "plain.pt")
        assert layer.r_min_fraction == LEARNED_DEFAULTS["r_min_fraction"] and layer.pool_size == 4
        assert layer.schedule.sharpness_factor == LEARNED_DEFAULTS["sharpness_factor"]

    @pytest.mark.parametrize("stored", ["not json", "[1, 2]", '{"saliency": 1}', '{"pool_size": 4, "bogus": 1}'])
    def test_load_dacrop_with_bad_settings_is_one_clear_error(self, tmp_path, stored):
        from dac.localisation import load_dacrop

        save_saliency(SaliencyNet(4, width=4), tmp_path / "bad.pt", dacrop=stored)
        with pytest.raises(DACInputError, match="saliency"):
            load_dacrop(tmp_path / "bad.pt")

    def test_interrupted_fit_says_nothing_was_saved(self, tmp_path, capsys, monkeypatch):
        import dac.localisation
        from dac.cli import main

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(dac.localisation, "train_saliency", interrupted)
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
                                               ("--time-limit", "nan"), ("--stretch", "0.5"), ("--shift", "-0.01"), ("--clip-norm", "0")])
    def test_bad_fit_option_is_a_usage_error(self, tmp_path, capsys, option, value):
        from dac.cli import main

        code = main(["fit-saliency", "--out", str(tmp_path / "fit"), option, value, "--quiet"])
        assert code == 2 and option in capsys.readouterr().err
        assert not (tmp_path / "fit").exists()


def test_labelled_fit_searches_each_size_and_names_bad_regions():
    from dac.localisation import labelled_fit, localisation_scores

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
