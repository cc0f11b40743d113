"""DACrop: shapes, conventions, bad input, and gradients checked against finite differences."""
from __future__ import annotations

import copy
import pickle
import threading
import types
import weakref
import warnings

import pytest
import torch

from dac import BACKWARD_MODES, DACInputError, DACrop
from dac.layer import SEARCHES
from dac.functional import MaxMinPool, crop_resize, max_min_pool

from conftest import smooth_direction, textured_scene

SMALL = dict(output_size=(20, 37), pool_size=5)
EPS = 1e-7  # FD step: smooth direction, float64 (max pooling is piecewise linear)


def box_gradient_along(layer: DACrop, images: torch.Tensor, weights: torch.Tensor, direction: torch.Tensor):
    """(analytic, finite-difference) derivative of sum(weights * boxes) along ``direction``."""
    x = images.clone().requires_grad_()
    boxes, info = layer.locate(x, return_info=True)
    (boxes * weights).sum().backward()
    analytic = (x.grad * direction).sum().item()
    with torch.no_grad():
        plus = layer.locate(images + EPS * direction)
        minus = layer.locate(images - EPS * direction)
    fd = ((plus - minus) * weights).sum().item() / (2 * EPS)
    return analytic, fd, info


class TestShapesAndConventions:
    def test_forward_shapes_and_box_inside(self):
        images = textured_scene(3, 300, 555, dtype=torch.float32)
        layer = DACrop(**SMALL)
        crops = layer(images)
        boxes = layer.locate(images)
        assert crops.shape == (3, 1, 20, 37) and crops.dtype == torch.float32
        assert boxes.shape == (3, 4)
        assert torch.all(boxes[:, :2] >= 0) and torch.all(boxes[:, 2] <= 555) and torch.all(boxes[:, 3] <= 300)
        ratio = (boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0])
        torch.testing.assert_close(ratio, torch.full_like(ratio, 20 / 37))  # aspect kept
        torch.testing.assert_close(crops, crop_resize(images, boxes, (20, 37)))

    def test_finds_the_region(self):
        images = textured_scene(2, 300, 555, dtype=torch.float32)
        boxes = DACrop(**SMALL).locate(images)
        # The bright region starts at (0.12 W, 0.25 H) and spans 0.65 W x 0.6 H.
        region = torch.tensor([0.12 * 555, 0.25 * 300, 0.77 * 555, 0.85 * 300])
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert torch.all((centre - (region[:2] + region[2:]) / 2).abs() < 25)

    def test_uint8_equals_float(self):
        images = (255 * textured_scene(2, 300, 555, dtype=torch.float32)).round().to(torch.uint8)
        layer = DACrop(**SMALL)
        # Pooling uint8 then scaling rounds differently from scaling then pooling (1 ulp).
        torch.testing.assert_close(layer.locate(images), layer.locate(images.float() / 255), rtol=0, atol=1e-3)
        torch.testing.assert_close(layer(images), layer(images.float() / 255), rtol=0, atol=1e-4)

    def test_uint16_and_colour(self):
        images = (65535 * textured_scene(1, 300, 555, dtype=torch.float32)).round().to(torch.uint16)
        rgb = images.expand(1, 3, 300, 555).contiguous()
        out = DACrop(**SMALL)(rgb)
        assert out.shape == (1, 3, 20, 37) and torch.isfinite(out).all()

    def test_list_of_sizes_returns_one_batch_in_order(self):
        a = textured_scene(1, 300, 555, dtype=torch.float32)[0]
        b = textured_scene(1, 240, 500, dtype=torch.float32, seed=5)[0]
        layer = DACrop(**SMALL)
        boxes = layer.locate([a, b, a])
        crops = layer([a, b, a])
        assert crops.shape == (3, 1, 20, 37)
        # The same image elsewhere in a batch: equal to float32 rounding, not bitwise (BLAS
        # and vectorised kernels sum each image in an order set by its memory alignment:
        # 1e-4 px here); different images are pixels apart.
        torch.testing.assert_close(boxes[0], boxes[2], rtol=0, atol=1e-3)
        torch.testing.assert_close(boxes[1], layer.locate(b[None])[0], rtol=0, atol=1e-3)
        assert (boxes[0] - boxes[1]).abs().max() > 1
        same_crops, same_boxes, info = layer([a, b, a], return_boxes=True)
        torch.testing.assert_close(same_crops, crops)
        torch.testing.assert_close(same_boxes, boxes)
        # One info row per input, in input order.
        _, info_b = layer.locate(b[None], return_info=True)
        assert info.stage_thetas.shape[0] == 3 and len(info.status) == 3
        torch.testing.assert_close(info.stage_thetas[1], info_b.stage_thetas[0])
        torch.testing.assert_close(info.cost[0], info.cost[2])

    def test_float64_and_repr(self):
        layer = DACrop(**SMALL)
        assert layer(textured_scene(1, 300, 555)).dtype == torch.float64
        assert "pool_size=5" in repr(layer) and "backward_mode='implicit'" in repr(layer)

    def test_tall_image_clips_r_min(self):
        boxes = DACrop(**SMALL).locate(torch.rand(1, 1, 400, 120))
        assert torch.all(boxes[:, :2] >= 0) and boxes[0, 2] <= 120 and boxes[0, 3] <= 400


class TestBadInput:
    @pytest.mark.parametrize(
        "images,match",
        [
            (torch.full((1, 1, 100, 100), float("nan")), "images: contains NaN"),
            (torch.rand(1, 100, 100), r"expected shape \[B, C, H, W\].*\(1, 100, 100\)"),
            (torch.rand(1, 4, 100, 100), "1 or 3 channels"),
            (torch.rand(1, 1, 8, 100), "too small for pooling"),
            ([], "non-empty list"),
            ([torch.rand(100, 100)], r"images\[0\]: expected Tensor\[C, H, W\]"),
            (torch.rand(1, 1, 100, 100) * 255, r"images: floating images must lie in \[0, 1\]"),
            (torch.rand(1, 1, 100, 100) - 0.5, r"images: floating images must lie in \[0, 1\]"),
        ],
    )
    def test_errors_name_the_argument(self, images, match):
        with pytest.raises(DACInputError, match=match):
            DACrop(**SMALL)(images)

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            (dict(backward_mode="magic"), "backward_mode"),
            (dict(pool_size=0), "pool_size"),
            # the max-min map of one-pixel windows is zero everywhere: every box the start box
            (dict(pool_size=1), r"pool_size: 1 .*max.min map .*zero"),
            (dict(output_size=(0, 5)), "output_size"),
            (dict(sharpness=0.0), "sharpness"),
            (dict(stages=0), "stages"),
            (dict(step_size=float("nan")), "step_size"),
            (dict(output_size=(True, 37)), "output_size"),
            (dict(output_size=(20.0, 37)), "output_size"),
            (dict(stages=2.5), r"stages: expected an int >= 1"),
            (dict(saliency="maxmin"), "saliency: expected an nn.Module"),
            (dict(antialias="false"), "antialias"),  # truthy: taken as True before
            # absurd sharpness ended in a torch linear-algebra error at the first call
            (dict(sharpness=1e30), r"sharpness: .* reaches 8e\+30"),
            (dict(sharpness_factor=1e30), r"sharpness: .* sharpness_factor=1e\+30"),
            (dict(sharpness_factor=1e300), r"sharpness: .* reaches inf"),  # a float power past 1.8e308
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(DACInputError, match=match):
            DACrop(**{**SMALL, **kwargs})

    def test_one_pixel_windows_with_a_stage_of_ones_own(self):
        # A stage makes its own map: one-pixel windows are a map at full resolution.
        layer = DACrop(**{**SMALL, "pool_size": 1, "saliency": torch.nn.Identity()})
        image = torch.zeros(1, 1, 24, 40)
        image[..., 6:18, 10:30] = 1.0
        box = layer.locate(image)[0]
        assert box[0] < 12 and box[2] > 28  # around the bright block

    @pytest.mark.parametrize("search", SEARCHES)
    def test_a_map_too_large_for_float32_names_saliency_scale(self, search):
        # saliency_scale 1e20 ended in a torch linear-algebra error; 1e15 is still searched
        # (the same box as the default's: eq. 3's + 1 no longer matters there).
        images = textured_scene(1, 300, 555, dtype=torch.float32)
        with pytest.raises(DACInputError, match=r"saliency_scale: the map times saliency_scale=1e\+20 sums to"):
            DACrop(**SMALL, search=search, saliency_scale=1e20).locate(images)
        assert torch.isfinite(DACrop(**SMALL, search=search, saliency_scale=1e15).locate(images)).all()
        # a float64 map has the room
        assert torch.isfinite(DACrop(**SMALL, search=search, saliency_scale=1e20).locate(images.double())).all()

    def test_blank_image_stays_at_start_with_zero_gradient(self):
        images = torch.full((2, 1, 300, 555), 0.5, dtype=torch.float64)
        images[1] = textured_scene(1, 300, 555)[0]
        x = images.clone().requires_grad_()
        layer = DACrop(**SMALL)
        boxes, info = layer.locate(x, return_info=True)
        boxes.sum().backward()
        assert info.frozen.tolist() == [True, False]
        torch.testing.assert_close(info.stage_thetas[0, 0], info.stage_thetas[0, -1])  # never moved
        assert torch.isfinite(x.grad).all() and torch.all(x.grad[0] == 0)
        assert x.grad[1].abs().sum() > 0


class TestGradients:
    """Float64 finite differences of *converged* boxes (see DESIGN notes in the README)."""

    weights = torch.tensor([[0.3, -1.2, 0.7, 0.4], [-0.5, 0.9, 1.1, -0.8]], dtype=torch.float64)

    @pytest.mark.parametrize(
        "region,offset,held",
        [
            ((0.65, 0.6), (0.12, 0.25), "interior"),
            ((0.8, 0.5), (0.12, 0.25), "x_c against the right border"),
            ((0.4, 0.4), (0.12, 0.25), "r = 0 and the left border"),
            # The paper's ascent pins this box at the whole image; the polish frees it.
            ((0.4, 0.4), (0.0, 0.25), "pinned by the ascent at the whole image"),
        ],
    )
    @pytest.mark.parametrize("search", SEARCHES)
    def test_implicit_matches_finite_differences(self, region, offset, held, search):
        images = textured_scene(2, 300, 555, region, offset)
        layer = DACrop(**SMALL, search=search)
        analytic, fd, info = box_gradient_along(layer, images, self.weights, smooth_direction(images.shape))
        assert bool(info.converged.all()) and not bool(info.frozen.any())
        if held == "interior":
            assert torch.all(info.held == 0)
        else:
            assert torch.any(info.held != 0)
        assert abs(analytic - fd) <= 2e-6 * abs(fd), (held, analytic, fd)

    def test_upstream_layer_gets_gradient_through_the_box(self):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[[[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]]]]))
        images = textured_scene(2, 300, 555)
        layer = DACrop(**SMALL)
        boxes = layer.locate(conv(images))
        loss = (boxes * self.weights).sum()
        (grad,) = torch.autograd.grad(loss, conv.weight)
        direction = torch.randn(conv.weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            base = conv.weight.clone()
            conv.weight.copy_(base + EPS * direction)
            plus = layer.locate(conv(images))
            conv.weight.copy_(base - EPS * direction)
            minus = layer.locate(conv(images))
            conv.weight.copy_(base)
        fd = ((plus - minus) * self.weights).sum().item() / (2 * EPS)
        analytic = (grad * direction).sum().item()
        assert abs(fd) > 1e-3  # the box really moves with the conv weights
        assert abs(analytic - fd) <= 2e-6 * abs(fd)

    def test_crop_gradient_reaches_image_through_pixels_and_box(self):
        images = textured_scene(1, 300, 555)
        x = images.clone().requires_grad_()
        layer = DACrop(**SMALL)
        target = torch.rand(1, 1, 20, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        ((layer(x) - target) ** 2).sum().backward()
        direction = smooth_direction(images.shape)
        with torch.no_grad():
            lp = ((layer(images + EPS * direction) - target) ** 2).sum()
            lm = ((layer(images - EPS * direction) - target) ** 2).sum()
        fd = (lp - lm).item() / (2 * EPS)
        analytic = (x.grad * direction).sum().item()
        assert abs(analytic - fd) <= 1e-5 * abs(fd)

    @pytest.mark.parametrize("search", SEARCHES)
    @pytest.mark.parametrize("mode", ["unroll", "truncated"])
    def test_unroll_through_newton_polish_equals_implicit(self, mode, search):
        images = textured_scene(2, 300, 555)
        direction = smooth_direction(images.shape)
        implicit, fd, _ = box_gradient_along(DACrop(**SMALL, search=search), images, self.weights, direction)
        layer = DACrop(**SMALL, backward_mode=mode, search=search)
        other, _, _ = box_gradient_along(layer, images, self.weights, direction)
        assert abs(other - implicit) <= 1e-9 * abs(implicit)

    def test_unrolled_ascent_approaches_implicit(self):
        """Without the polish, unrolling the paper's ascent converges to the implicit
        gradient only as slowly as the ascent converges (README: backward modes)."""
        images = textured_scene(2, 300, 555)
        x = images.clone().requires_grad_()
        boxes = DACrop(**SMALL).locate(x)
        (implicit,) = torch.autograd.grad((boxes * self.weights).sum(), x)
        gaps = []
        for steps in (10, 50, 200, 800):
            layer = DACrop(**SMALL, backward_mode="unroll", polish_steps=0, steps_per_stage=steps)
            x = images.clone().requires_grad_()
            (unrolled,) = torch.autograd.grad((layer.locate(x) * self.weights).sum(), x)
            gaps.append(((unrolled - implicit).norm() / implicit.norm()).item())
        assert gaps[0] > gaps[1] > gaps[2] > gaps[3], gaps
        assert gaps[3] < 1e-3, gaps  # measured 0.77, 0.23, 0.19, 1.8e-5

    def test_dlm_needs_small_epsilon(self):
        images = textured_scene(2, 300, 555)
        direction = smooth_direction(images.shape)
        implicit, _, _ = box_gradient_along(DACrop(**SMALL), images, self.weights, direction)
        dlm, _, _ = box_gradient_along(DACrop(**SMALL, backward_mode="dlm"), images, self.weights, direction)
        assert abs(dlm - implicit) <= 0.01 * abs(implicit)
        coarse, _, _ = box_gradient_along(
            DACrop(**SMALL, backward_mode="dlm", dlm_epsilon=1e-2), images, self.weights, direction
        )
        assert abs(coarse) < 1e-3 * abs(implicit)  # Theseus' default epsilon: ~no gradient

    def test_calls_before_one_backward_keep_their_own_gradients(self):
        # The Theseus objective is reused between calls; each call's graph must not be.
        layer = DACrop(**SMALL)
        a = textured_scene(2, 300, 555).requires_grad_()
        b = textured_scene(2, 300, 555, seed=7).requires_grad_()
        (layer.locate(a).sum() + 2 * layer.locate(b).sum()).backward()
        together = a.grad.clone(), b.grad.clone()
        a.grad = b.grad = None
        layer.locate(a).sum().backward()
        (2 * layer.locate(b).sum()).backward()
        torch.testing.assert_close(together[0], a.grad, rtol=0, atol=0)
        torch.testing.assert_close(together[1], b.grad, rtol=0, atol=0)

    def test_warns_when_implicit_gradient_is_inexact(self):
        x = textured_scene(1, 300, 555).requires_grad_()
        with pytest.warns(RuntimeWarning, match="did not reach a stationary point"):
            DACrop(**SMALL, polish_steps=0).locate(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            DACrop(**SMALL).locate(x)


class TestIndependentCalls:
    """A module holds configuration and parameters, never the last call."""

    def test_deepcopy_of_a_called_layer_follows_its_input(self):
        a = textured_scene(2, 300, 555)
        b = textured_scene(2, 300, 555, (0.4, 0.4), (0.3, 0.4), seed=3)
        layer = DACrop(**SMALL)
        layer.locate(a.clone().requires_grad_()).sum().backward()  # called once, as EMA / SWA copies are
        twin = copy.deepcopy(layer)
        x, y = b.clone().requires_grad_(), b.clone().requires_grad_()
        mine, theirs = layer.locate(x), twin.locate(y)
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)
        assert (mine - layer.locate(a)).abs().max() > 5  # the boxes really follow the input
        (mine * self.weights).sum().backward()
        (theirs * self.weights).sum().backward()
        torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=0)
        assert x.grad.abs().sum() > 0

    weights = torch.tensor([[0.3, -1.2, 0.7, 0.4], [-0.5, 0.9, 1.1, -0.8]], dtype=torch.float64)

    def test_pickle_and_state_dict_round_trip(self):
        images = textured_scene(2, 300, 555)
        gate = _Gate()
        layer = DACrop(**SMALL, saliency=gate)
        with torch.no_grad():
            gate.log_gain.fill_(0.3)
        before = layer.locate(images)
        again = pickle.loads(pickle.dumps(layer))
        torch.testing.assert_close(again.locate(images), before, rtol=0, atol=0)
        fresh = DACrop(**SMALL, saliency=_Gate())
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh.locate(images), before, rtol=0, atol=0)
        assert set(layer.state_dict()) == {"saliency.log_gain"}

    def test_threads_get_their_own_boxes(self):
        scenes = [textured_scene(2, 300, 555, (0.3 + 0.05 * i, 0.4), (0.05 * i, 0.2), seed=i) for i in range(6)]
        layer = DACrop(**SMALL, steps_per_stage=20)
        expected = [layer.locate(s) for s in scenes]
        results: dict[tuple[int, int], torch.Tensor] = {}
        start = threading.Barrier(6)

        def work(i: int) -> None:
            start.wait()
            for rep in range(3):
                results[i, rep] = layer.locate(scenes[(i + rep) % 6])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for th_ in threads:
            th_.start()
        for th_ in threads:
            th_.join()
        assert len(results) == 18  # no thread died
        for (i, rep), boxes in results.items():
            torch.testing.assert_close(boxes, expected[(i + rep) % 6], rtol=0, atol=1e-9)

    @pytest.mark.parametrize("search", SEARCHES)
    def test_without_autograd_the_results_are_ordinary_tensors(self, search):
        # The search runs in inference mode when autograd is off; what comes out must not
        # be an inference tensor (those cannot be saved for backward or changed in place).
        images = textured_scene(2, 300, 555)
        layer = DACrop(**SMALL, search=search)
        with torch.no_grad():
            crops, boxes, info = layer(images, return_boxes=True)
        tensors = {"crops": crops, "boxes": boxes} | {
            name: value for name, value in vars(info).items() if isinstance(value, torch.Tensor)
        }
        assert {"converged", "cost", "stage_thetas", "held"} <= set(tensors)
        assert [name for name, t in tensors.items() if t.is_inference()] == []
        boxes += 1.0  # in place, outside inference mode
        scale = torch.ones(4, dtype=boxes.dtype, requires_grad=True)
        (boxes * scale).sum().backward()  # saved for backward
        torch.testing.assert_close(scale.grad, boxes.sum(0))
        torch.testing.assert_close(boxes - 1.0, layer.locate(images.clone().requires_grad_()).detach(), rtol=0, atol=0)

    @pytest.mark.parametrize("search", SEARCHES)
    def test_the_search_lets_go_of_the_stage_map(self, search, monkeypatch):
        # The search works on a scaled copy of the stage's map; the map itself must be
        # freed before the search runs (peak memory at batch 24: ~3 MB more when a
        # wrapper frame kept it).
        from dac.optim import global_search, solver

        maps: list[weakref.ref] = []
        alive_during_search: list[bool] = []

        class Stage(torch.nn.Module):
            def forward(self, x):
                m = max_min_pool(x, SMALL["pool_size"])
                maps.append(weakref.ref(m))
                return m

        for cls in (solver.StagedAscent, global_search.GlobalSearch):
            original = cls._optimize_impl

            def spy(self, *args, _original=original, **kwargs):
                alive_during_search.append(maps[-1]() is not None)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, "_optimize_impl", spy)
        layer = DACrop(**SMALL, saliency=Stage(), search=search)
        with torch.no_grad():
            layer.locate(textured_scene(2, 300, 555))
        assert alive_during_search == [False]

    @pytest.mark.parametrize("search", SEARCHES)
    def test_without_autograd_the_objective_dies_with_the_call(self, search, monkeypatch):
        # Theseus' Objective refers to itself (a bound method): garbage that held the
        # searched map until the next collection, through the crop (4 MB at batch 24).
        import gc

        import dac.layer

        objectives: list[weakref.ref] = []
        build = dac.layer.build_objective

        def spy(*args, **kwargs):
            built = build(*args, **kwargs)
            objectives.append(weakref.ref(built[0]))
            return built

        monkeypatch.setattr(dac.layer, "build_objective", spy)
        layer = DACrop(**SMALL, search=search)
        gc.disable()
        try:
            with torch.no_grad():
                layer(textured_scene(2, 300, 555))
            assert len(objectives) == 1 and objectives[0]() is None
        finally:
            gc.enable()

    def test_nothing_of_a_call_outlives_it(self):
        layer = DACrop(**SMALL)
        for size in ((300, 555), (240, 500), (200, 410)):
            x = textured_scene(1, *size).requires_grad_()
            boxes = layer.locate(x)
        held = _tensors_reachable_from(layer)
        assert held == [], [tuple(t.shape) for t in held]
        assert boxes.grad_fn is not None  # the caller's graph is the caller's


class TestTorchCompile:
    """A compiled model runs the search eagerly and compiles what surrounds it."""

    class _Net(torch.nn.Module):
        def __init__(self, search: str) -> None:
            super().__init__()
            self.crop = DACrop(**SMALL, search=search)
            self.head = torch.nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.crop(x * 1.0)).tanh()

    @pytest.mark.parametrize("search", SEARCHES)
    def test_the_search_is_not_traced_and_the_rest_compiles(self, search):
        # Traced, the search gave dynamo ~50 graphs of ~1500 operations (50 s for this model).
        from torch._dynamo.testing import CompileCounter

        torch._dynamo.reset()
        counter = CompileCounter()
        net = self._Net(search)
        x = textured_scene(2, 100, 185).float().requires_grad_()
        out = torch.compile(net, backend=counter)(x)
        assert counter.op_count <= 4, counter.op_count  # x * 1.0 before; conv and tanh after
        assert counter.frame_count == 2
        torch.testing.assert_close(out, net(x), rtol=0, atol=0)
        out.sum().backward()  # gradients still reach the input through the box and the pixels
        assert x.grad.abs().sum() > 0

    @pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # deprecated in torch; still used to deploy
    @pytest.mark.parametrize("capture", ["trace", "export"])
    def test_trace_and_export_are_refused_with_the_reason(self, capture):
        # Before: a ValueError from inside Theseus ("Provided tensors must be broadcastable")
        # or dynamo's GuardOnDataDependentSymNode, neither saying why.
        net = torch.nn.Sequential(DACrop(**SMALL), torch.nn.Conv2d(1, 2, 3))
        x = textured_scene(1, 100, 185).float()
        with pytest.raises(RuntimeError, match="cannot capture the DAC search"):
            torch.jit.trace(net, x) if capture == "trace" else torch.export.export(net, (x,))

    def test_a_compiled_saliency_stage_compiles_inside(self):
        from torch._dynamo.testing import CompileCounter

        torch._dynamo.reset()
        counter = CompileCounter()
        gate = _Gate()
        layer = DACrop(**SMALL, saliency=torch.compile(gate, backend=counter))
        layer(textured_scene(1, 100, 185).float()).sum().backward()
        assert counter.frame_count >= 1
        assert gate.log_gain.grad is not None and gate.log_gain.grad != 0


class _Gate(torch.nn.Module):
    """A tiny learned saliency: the max-min map, times a learned gain on its right half."""

    def __init__(self, pool_size: int = 5) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.log_gain = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = max_min_pool(images, self.pool_size)
        w = s.shape[-1]
        ramp = torch.linspace(0, 1, w, dtype=s.dtype) > 0.5
        return s * torch.where(ramp, self.log_gain.exp(), torch.ones((), dtype=s.dtype))


def _tensors_reachable_from(obj, limit: int = 100000) -> list[torch.Tensor]:
    """Tensors reachable from ``obj`` through instance dicts and containers (not classes or modules)."""
    seen, found, stack = set(), [], [obj]
    while stack and len(seen) < limit:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (type, types.ModuleType, types.FunctionType, str, bytes)):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return found


class TestSaliencyStage:
    def test_default_is_the_paper_max_min_map(self):
        images = textured_scene(2, 300, 555)
        layer = DACrop(**SMALL)
        assert isinstance(layer.saliency, MaxMinPool) and layer.saliency.kernel_size == 5
        torch.testing.assert_close(layer.saliency_map(images), max_min_pool(images, 5))
        explicit = DACrop(**SMALL, saliency=MaxMinPool(5))
        torch.testing.assert_close(explicit.locate(images), layer.locate(images), rtol=0, atol=0)

    def test_search_runs_on_the_map_and_crops_the_original(self):
        images = textured_scene(2, 300, 555)
        gate = _Gate()
        with torch.no_grad():
            gate.log_gain.fill_(3.0)  # the right half dominates
        layer = DACrop(**SMALL, saliency=gate)
        crops, boxes, _ = layer(images, return_boxes=True)
        plain = DACrop(**SMALL).locate(images)
        assert torch.all((boxes[:, 0] + boxes[:, 2]) / 2 > (plain[:, 0] + plain[:, 2]) / 2 + 20)
        torch.testing.assert_close(crops, crop_resize(images, boxes, (20, 37)))

    @pytest.mark.parametrize(
        "module,match",
        [
            (torch.nn.Identity(), r"saliency: the module must map images .* to a map of shape"),
            (MaxMinPool(4), r"saliency: the module must map images"),
            (torch.nn.Sequential(MaxMinPool(5), torch.nn.Hardtanh(-1.0, -0.5)), "saliency: the map must be finite and >= 0"),
        ],
    )
    def test_bad_maps_name_the_saliency(self, module, match):
        with pytest.raises(DACInputError, match=match):
            DACrop(**SMALL, saliency=module).locate(textured_scene(1, 300, 555))

    @pytest.mark.parametrize("search", SEARCHES)
    @pytest.mark.parametrize("mode", BACKWARD_MODES)
    def test_parameters_get_the_gradient_of_the_box(self, mode, search):
        images = textured_scene(2, 300, 555)
        gate = _Gate()
        with torch.no_grad():
            gate.log_gain.fill_(0.2)
        layer = DACrop(**SMALL, saliency=gate, backward_mode=mode, search=search)
        weights = TestGradients.weights
        (grad,) = torch.autograd.grad((layer.locate(images) * weights).sum(), gate.log_gain)
        with torch.no_grad():
            gate.log_gain.fill_(0.2 + EPS)
            plus = layer.locate(images)
            gate.log_gain.fill_(0.2 - EPS)
            minus = layer.locate(images)
        fd = ((plus - minus) * weights).sum().item() / (2 * EPS)
        assert abs(fd) > 1e-2  # the box really moves with the parameter
        tolerance = 0.01 if mode == "dlm" else 2e-6
        assert abs(grad.item() - fd) <= tolerance * abs(fd), (mode, grad.item(), fd)


class TestPrecision:
    def test_autocast_does_not_change_the_search(self):
        images = textured_scene(2, 300, 555, dtype=torch.float32)
        layer = DACrop(**SMALL)
        boxes, info = layer.locate(images, return_info=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            crops, cast_boxes, cast_info = layer(images, return_boxes=True)
        assert bool(cast_info.converged.all())
        assert crops.dtype == torch.float32
        torch.testing.assert_close(cast_boxes, boxes, rtol=0, atol=1e-3)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_images_are_searched_in_float32(self, dtype):
        images = textured_scene(2, 300, 555, dtype=torch.float32)
        low = images.to(dtype)
        crops, boxes, info = DACrop(**SMALL)(low, return_boxes=True)
        assert crops.dtype == dtype and boxes.dtype == torch.float32 and bool(info.converged.all())
        reference = DACrop(**SMALL).locate(low.float())  # the same pixels, widened by the caller
        torch.testing.assert_close(boxes, reference, rtol=0, atol=1e-3)

    def test_float32_polish_converges_where_its_cost_cannot_tell_the_steps_apart(self):
        # A 153 x 283 map (a phantom's max-min map, gated by smooth noise, as a learned
        # stage does) whose float32 cost carries rounding noise (~2e-5 of f, sums over
        # 43k pixels) larger than the last Newton steps' gain: the polish's f test used to
        # reject them, fall back to 0.5 px ascent steps and cycle for all its 50 steps.
        from dac.data.phantoms import make_phantom
        from dac.saliency import saliency_features

        image = make_phantom(5021, 768, 1418).image[None]
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(40, 1, 153, 283, generator=g)[21:22]
        gate = 2 * torch.sigmoid(torch.nn.functional.avg_pool2d(noise, 9, 1, 4) * 20)
        saliency = saliency_features(image, 5)[:, :1] * gate
        layer = DACrop((200, 370), 5, r_min_fraction=0.2, sharpness_factor=4.0)
        with torch.no_grad():
            theta32, info = layer.search(saliency)
            theta64, info64 = layer.search(saliency.double())
        assert bool(info64.converged.all())
        assert bool(info.converged.all()) and int(info.iterations.max()) < layer.schedule.total_steps
        torch.testing.assert_close(theta32.double(), theta64, rtol=0, atol=0.05)


class TestSecondDerivatives:
    @pytest.mark.parametrize("mode,extra", [("implicit", {}), ("dlm", {}), ("truncated", {"backward_num_iterations": 1})],
                             ids=["implicit", "dlm", "truncated one step"])
    def test_first_order_modes_refuse_create_graph(self, mode, extra):
        # One differentiated Newton step at the converged box gives the exact first derivative
        # but a second derivative 46 % off (-0.275 vs -0.506 by finite differences): refused.
        x = textured_scene(1, 300, 555).requires_grad_()
        boxes = DACrop(**SMALL, backward_mode=mode, **extra).locate(x)
        with pytest.raises(RuntimeError, match="exact first derivatives only"):
            torch.autograd.grad(boxes.sum(), x, create_graph=True)
        (grad,) = torch.autograd.grad(DACrop(**SMALL, backward_mode=mode, **extra).locate(x).sum(), x)
        assert torch.isfinite(grad).all()

    @pytest.mark.parametrize(
        "mode,schedule",
        [
            # A short ascent keeps the graph (and the test) small; the polish still
            # converges, in ~5 Newton steps. Unroll differentiates every step.
            ("unroll", dict(steps_per_stage=10, polish_steps=10)),
            # Truncated differentiates the last 10 of the 50 polish steps, all at the converged box.
            ("truncated", dict(steps_per_stage=10)),
        ],
        ids=["unroll", "truncated"],
    )
    def test_second_derivative_matches_finite_differences_of_the_first(self, scene, mode, schedule):
        """d/dt of (d loss / d image . v) at image + t u, by create_graph=True, against
        central differences of that mode's own first derivative. A Newton step has a
        zero Jacobian in theta at its fixed point, so two or more differentiated polish
        steps at the converged box give the implicit function's second derivative."""
        layer = DACrop(**SMALL, backward_mode=mode, **schedule)
        weights = TestGradients.weights
        u, v = smooth_direction(scene.shape), smooth_direction(scene.shape, seed=5)

        def slope(images: torch.Tensor, create_graph: bool):
            x = images.clone().requires_grad_()
            boxes, info = layer.locate(x, return_info=True)
            (grad,) = torch.autograd.grad((boxes * weights).sum(), x, create_graph=create_graph)
            return (grad * v).sum(), x, info

        first, x, info = slope(scene, create_graph=True)
        assert bool(info.converged.all()) and torch.all(info.held == 0)  # interior: no bound held
        (second,) = torch.autograd.grad(first, x)
        analytic = (second * u).sum().item()
        # A step above EPS: the first derivative's rounding dominates its differences at
        # 1e-7; from ~1e-5 max pooling's argmax flips and the first derivative jumps.
        step = 1e-6
        plus = slope(scene + step * u, create_graph=False)[0].item()
        minus = slope(scene - step * u, create_graph=False)[0].item()
        fd = (plus - minus) / (2 * step)
        assert abs(fd) > 0.1  # the box's gradient really changes along u (measured -0.506)
        assert abs(analytic - fd) <= 1e-5 * abs(fd), (mode, analytic, fd)  # measured 3e-8 (unroll), 5e-8 (truncated)


class TestDLM:
    @pytest.mark.parametrize(
        "region,offset",
        [((0.65, 0.6), (0.12, 0.25)), ((0.8, 0.5), (0.12, 0.25)), ((0.4, 0.4), (0.12, 0.25))],
        ids=["interior", "right border", "r = 0 and the left border"],
    )
    def test_dlm_matches_implicit_wherever_the_box_is(self, region, offset):
        images = textured_scene(2, 300, 555, region, offset)
        direction = smooth_direction(images.shape)
        weights = TestGradients.weights
        implicit, fd, info = box_gradient_along(DACrop(**SMALL), images, weights, direction)
        dlm, _, _ = box_gradient_along(DACrop(**SMALL, backward_mode="dlm"), images, weights, direction)
        assert abs(implicit - fd) <= 2e-6 * abs(fd)
        assert abs(dlm - implicit) <= 0.01 * abs(implicit), (dlm, implicit, info.held.tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    images = textured_scene(2, 300, 555, dtype=torch.float32)
    layer = DACrop(**SMALL)
    cpu_boxes = layer.locate(images)
    x = images.cuda().requires_grad_()
    crops, boxes, info = layer(x, return_boxes=True)
    crops.sum().backward()
    assert crops.device.type == "cuda" and torch.isfinite(x.grad).all()
    torch.testing.assert_close(boxes.cpu(), cpu_boxes, rtol=0, atol=1e-2)


def _held_and_free_scene() -> torch.Tensor:
    """Two float64 images: a small edge-rich patch (its box held at the minimum width)
    and a wide textured region (its box free)."""
    g = torch.Generator().manual_seed(0)
    images = 0.02 * torch.rand(2, 1, 96, 160, dtype=torch.float64, generator=g)
    images[0, :, 40:56, 60:80] += 0.8
    images[1, :, 10:80, 20:150] += 0.3 + 0.5 * torch.rand(70, 130, dtype=torch.float64, generator=g)
    return images


class TestLearnedConstants:
    """``DACrop(learn=...)``: r_min and the sharpness as bounded parameters trained by the
    box's gradient (issue: the paper's constants, learned)."""

    @pytest.mark.parametrize("search", SEARCHES)
    def test_gradient_matches_finite_differences_of_converged_boxes(self, search):
        images = _held_and_free_scene()
        layer = DACrop(output_size=(20, 37), pool_size=4, search=search, sharpness=0.1, r_min_fraction=0.15,
                       learn=("r_min", "sharpness")).double()
        weights = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        boxes, info = layer.locate(images, return_info=True)
        assert bool(info.converged.all())
        (boxes * weights).sum().backward()
        for param in (layer.r_min_logit, layer.sharpness_logit):
            step = 1e-5
            with torch.no_grad():
                param += step
                up = layer.locate(images)
                param -= 2 * step
                down = layer.locate(images)
                param += step
            fd = float(((up - down) * weights).sum()) / (2 * step)
            assert float(param.grad) == pytest.approx(fd, rel=1e-5, abs=1e-7)
        assert float(layer.sharpness_logit.grad) != 0.0

    def test_r_min_moves_a_box_held_at_the_minimum_width_only(self):
        images = _held_and_free_scene()
        layer = DACrop(output_size=(20, 37), pool_size=4, search="global", sharpness=0.1, r_min_fraction=0.15,
                       learn=("r_min",)).double()
        boxes, info = layer.locate(images, return_info=True)
        assert info.held[:, 2].tolist() == [-1, 0]  # r held at 0 on the patch, free on the region
        width = boxes[:, 2] - boxes[:, 0]
        (grad_held,) = torch.autograd.grad(width[0], layer.r_min_logit, retain_graph=True)
        (grad_free,) = torch.autograd.grad(width[1], layer.r_min_logit)
        assert float(grad_held) > 0 and abs(float(grad_free)) < 1e-6 * abs(float(grad_held))

    def test_starts_at_the_set_constants_and_stays_in_bounds(self):
        images = torch.rand(2, 1, 60, 100, generator=torch.Generator().manual_seed(2))
        plain = DACrop(**SMALL, search="global", r_min_fraction=0.2)
        learned = DACrop(**SMALL, search="global", r_min_fraction=0.2, learn=["sharpness", "r_min"])
        assert learned.learn == ("r_min", "sharpness") and plain.learn == ()
        assert [n for n, _ in plain.named_parameters()] == []
        torch.testing.assert_close(learned.locate(images), plain.locate(images), rtol=0, atol=1e-3)
        with torch.no_grad():
            learned.r_min_logit.fill_(1e4)
            learned.sharpness_logit.fill_(-1e4)
        assert float(learned.r_min_value.detach()) <= 0.5 and float(learned.sharpness_gain.detach()) == pytest.approx(0.25)
        assert torch.isfinite(learned.locate(images)).all()
        assert learned.config()["learn"] == ["r_min", "sharpness"] and "learn" not in plain.config()

    def test_candidates_costs_learn_the_sharpness(self):
        layer = DACrop(**SMALL, search="global", learn=("sharpness",))
        _, cost, _ = layer.candidates(torch.rand(2, 1, 60, 100, generator=torch.Generator().manual_seed(3)))
        (grad,) = torch.autograd.grad(cost.sum(), layer.sharpness_logit)
        assert torch.isfinite(grad) and float(grad) != 0.0

    @pytest.mark.parametrize("learn, r_min_fraction, match", [
        ("r_min", 0.2, "learn"), (("width",), 0.2, "learn"), (("r_min",), 0.5, "r_min_fraction"),
        (3, 0.2, "learn"), (None, 0.2, "learn"),  # not a sequence: TypeError from a loop before
    ])
    def test_bad_learn_names_the_argument(self, learn, r_min_fraction, match):
        with pytest.raises(DACInputError, match=match):
            DACrop(**SMALL, learn=learn, r_min_fraction=r_min_fraction)
