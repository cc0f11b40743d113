"""The global search: grid scoring against the paper's equations, optimality against a
brute-force grid, near ties, flat maps, and the layer defects found with it."""
from __future__ import annotations

import math

import pytest
import torch

from dac import DACInputError, DACrop
from dac.functional import fit_r_min, initial_theta
from dac.functional.grid import grid_candidates, grid_cost
from dac.layer import SEARCHES, quiet_unconverged

SMALL = dict(output_size=(20, 37), pool_size=5)


def slow_cost(theta, saliency, r_min, aspect, gamma):
    """Eqs. 1-3 straight from the paper: the dense soft rectangle on the meshgrid, float64."""
    x_c, y_c, r = (float(v) for v in theta)
    r_total = r_min + r
    h, w = saliency.shape
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")

    def sigma(px, py):  # eq. 1
        return torch.sigmoid(gamma * px) * torch.sigmoid(gamma * py)

    a = sigma(x - (x_c - r_total), y - (y_c - aspect * r_total))  # eq. 2
    b = sigma(-x + (x_c + r_total), -y + (y_c + aspect * r_total))
    z = a * b
    f_in = (saliency * z).sum() / z.sum()  # eq. 3
    f_out = (saliency * (1 - z)).sum() / (1 - z).sum()
    return float(f_in / (f_out + 1))


def one_pixel_grid(h, w, r_min, aspect):
    """Every box of a one-pixel grid over the feasible set: r = 0, 1, .., r_hi and, per r,
    x_c from its lower bound in steps of 1 plus its upper bound (likewise y_c)."""
    r_hi = max(min(w / 2, h / (2 * aspect)) - r_min, 0.0)
    radii = list(range(int(math.floor(r_hi)) + 1)) + ([r_hi] if r_hi % 1 > 1e-9 else [])
    for r in radii:
        rt = r_min + r
        x_lo, x_hi, y_lo, y_hi = rt - 0.5, w - 0.5 - rt, aspect * rt - 0.5, h - 0.5 - aspect * rt
        xs = [x_lo + j for j in range(int(math.floor(x_hi - x_lo)) + 1)] + [x_hi]
        ys = [y_lo + i for i in range(int(math.floor(y_hi - y_lo)) + 1)] + [y_hi]
        for y_c in ys:
            for x_c in xs:
                yield (x_c, y_c, float(r))


def blocks_map(seed: int, h: int = 16, w: int = 30) -> torch.Tensor:
    """A float64 map Tensor[1, 1, h, w]: weak noise and two bright blocks of random size,
    place and strength (two competing maxima)."""
    g = torch.Generator().manual_seed(seed)
    s = 0.2 * torch.rand(1, 1, h, w, dtype=torch.float64, generator=g)
    for _ in range(2):
        bh, bw = (int(v) for v in torch.randint(3, 8, (2,), generator=g))
        y0 = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        x0 = int(torch.randint(0, w - bw + 1, (1,), generator=g))
        s[..., y0 : y0 + bh, x0 : x0 + bw] += 0.5 + torch.rand((), dtype=torch.float64, generator=g)
    return s


class TestGridCost:
    @pytest.mark.parametrize("step", [1.0, 2.5])
    def test_matches_slow_loop_at_every_box(self, step):
        s = blocks_map(3, 12, 21)
        aspect, gamma, r_min = 0.55, 0.7, 5.3
        cost, grid = grid_cost(s, r_min=r_min, aspect=aspect, sharpness=gamma, step=step)
        assert cost.shape == (1, grid.n_r, grid.n_y, grid.n_x) and cost.dtype == torch.float64
        index = torch.arange(cost[0].numel())
        thetas = grid.thetas(index, torch.float64)
        feasible = cost[0].flatten() > float("-inf")
        assert int(feasible.sum()) > 20
        for theta, f in zip(thetas[feasible], cost[0].flatten()[feasible]):
            assert abs(float(f) - slow_cost(theta, s[0, 0], r_min, aspect, gamma)) <= 1e-12 * abs(float(f))

    def test_lattice_spans_the_feasible_set(self):
        h, w, aspect, r_min = 40, 73, 20 / 37, 73 / 3.5
        cost, grid = grid_cost(torch.rand(2, 1, h, w), r_min=r_min, aspect=aspect, sharpness=0.2, step=4.0)
        t = grid.thetas(torch.arange(cost[0].numel()), torch.float64)[cost[0].flatten() > float("-inf")]
        rt = r_min + t[:, 2]
        tol = 1e-9
        assert torch.all(t[:, 2] >= 0) and torch.all(t[:, 2] <= min(w / 2, h / (2 * aspect)) - r_min + tol)
        assert torch.all(t[:, 0] >= rt - 0.5 - tol) and torch.all(t[:, 0] <= w - 0.5 - rt + tol)
        assert torch.all(t[:, 1] >= aspect * rt - 0.5 - tol) and torch.all(t[:, 1] <= h - 0.5 - aspect * rt + tol)
        at_zero = t[t[:, 2] == 0]
        # r = 0 is on the grid, and x_c reaches both of its bounds; y_c its upper bound.
        assert torch.isclose(at_zero[:, 0].min(), torch.tensor(r_min - 0.5, dtype=torch.float64))
        assert torch.isclose(at_zero[:, 0].max(), torch.tensor(w - 0.5 - r_min, dtype=torch.float64))
        assert float(at_zero[:, 1].min()) == pytest.approx(aspect * r_min - 0.5)
        assert float(h - 0.5 - aspect * r_min - at_zero[:, 1].max()) < grid.step_y

    def test_chunks_float32_and_batch_agree(self):
        s = torch.cat([blocks_map(i, 20, 37) for i in range(3)])
        kw = dict(r_min=9.0, aspect=0.5, sharpness=0.3, step=1.5)
        whole, _ = grid_cost(s, **kw)
        chunked, _ = grid_cost(s, chunk_elements=50, **kw)
        single, _ = grid_cost(s[1:2], **kw)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
        torch.testing.assert_close(single[0], whole[1], rtol=1e-13, atol=0)
        low, _ = grid_cost(s.float(), **kw)
        finite = whole > float("-inf")
        torch.testing.assert_close(low[finite].double(), whole[finite], rtol=1e-5, atol=0)

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            (dict(r_min=30.0), "r_min: 30.0 does not fit"),
            (dict(step=0.0), "step: expected a finite number > 0"),
            (dict(sharpness=-1.0), "sharpness"),
            (dict(saliency=-torch.ones(1, 1, 10, 20)), "saliency: expected values >= 0"),
            (dict(saliency=torch.ones(1, 1, 1, 20)), "saliency: needs at least 2x2"),
            # a step of 1e-4 asked torch for 55 PB (a tinier one raised ZeroDivisionError)
            (dict(step=1e-4), r"step: a step of 0.0001 .* use a step of at least 0.0\d+"),
            (dict(step=5e-324), "step: a step of 4.94066e-324"),
        ],
    )
    def test_bad_input_names_the_argument(self, kwargs, match):
        args = dict(saliency=torch.rand(1, 1, 10, 20), r_min=4.0, aspect=0.5, sharpness=0.5, step=2.0) | kwargs
        with pytest.raises(DACInputError, match=match):
            grid_cost(args.pop("saliency"), **args)


class TestGridCandidates:
    def test_separate_maxima_in_lattice_order(self):
        s = torch.zeros(2, 1, 20, 60)
        s[..., 4:16, 38:58] = 1.0
        s[0, :, 4:16, 2:22] = 1.0  # map 0: two equal blocks; map 1: the right one only
        thetas, cost = grid_candidates(s, r_min=10.0, aspect=0.5, sharpness=2.0, step=2.0, count=3)
        assert thetas.shape == (2, 3, 3) and cost.shape == (2, 3)
        assert thetas[0, 0, 0] < 30 < thetas[0, 1, 0]  # left block, then right block
        # Map 1: its best is the right block (its other maxima are f = 0 plateaus).
        assert thetas[1, cost[1].argmax(), 0] > 30 and float(cost[1].max()) > 0.5

    def test_streamed_chunks_equal_the_whole_grid(self):
        s = torch.cat([blocks_map(i, 20, 37) for i in range(3)])
        kw = dict(r_min=9.0, aspect=0.5, sharpness=0.6, step=1.0, count=5)
        whole_cost, grid = grid_cost(s, **{k: v for k, v in kw.items() if k != "count"})
        thetas, cost = grid_candidates(s, **kw)
        for chunk in (1, 500):  # one r level at a time; a few
            t, c = grid_candidates(s, chunk_elements=chunk, **kw)
            torch.testing.assert_close(t, thetas, rtol=0, atol=0)
            torch.testing.assert_close(c, cost, rtol=1e-12, atol=0)
        # The best candidate is the grid's best box, and each is a local maximum of it.
        torch.testing.assert_close(cost.amax(1), whole_cost.flatten(1).amax(1), rtol=1e-12, atol=0)


def test_tied_maxima_do_not_depend_on_the_chunks():
    """Defect: ``topk`` chose among equal grid maxima (plateaus of a map of equal blocks)
    in an order of its own, which depended on how the grid was cut into chunks, that is
    on the batch size: the same map gave other candidates in another batch."""
    g = torch.Generator().manual_seed(0)
    kw = dict(r_min=6.0, aspect=0.5, sharpness=0.8, step=1.0, count=4)
    differ = 0
    for _ in range(60):
        s = torch.zeros(1, 1, 24, 44)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            x, y = int(torch.randint(0, 36, (1,), generator=g)), int(torch.randint(0, 16, (1,), generator=g))
            s[..., y : y + 6, x : x + 8] = 1.0
        whole, cost = grid_candidates(s, **kw)
        for chunk in (200, 1000, 5000):
            t, c = grid_candidates(s, chunk_elements=chunk, **kw)
            differ += not torch.equal(t, whole)
    assert differ == 0


def test_a_grid_step_too_fine_for_the_map_names_grid_step():
    # The layer's grid over a 60 x 111 map at a step of 0.01 would hold ~1e10 boxes.
    images = torch.rand(1, 1, 300, 555)
    with pytest.raises(DACInputError, match="grid_step: a step of 0.01 saliency pixels"):
        DACrop(output_size=(20, 37), pool_size=5, search="global", grid_step=0.01).locate(images)


def _layer(search, **kw):
    # Small maps: r_min 1/3.5 of the width and the final sharpness 0.8 per pixel.
    return DACrop(**SMALL, search=search, sharpness=0.1, sharpness_factor=2.0, stages=4, **kw)


class TestGlobalOptimality:
    @pytest.mark.parametrize("seed", range(6))
    def test_reaches_the_best_box_of_a_brute_force_grid(self, seed):
        """found f >= (1 - 1e-6) max over every box of the one-pixel grid, and >= the
        staged ascent's f (float64, the paper's eqs. written out per box)."""
        s = blocks_map(seed)
        layer = _layer("global")
        _, info = layer.search(s)
        _, paper = _layer("paper").search(s)
        h, w = s.shape[-2:]
        r_min = float(fit_r_min(h, w, layer.r_min_fraction, layer.aspect, s)[0])
        scaled = s[0, 0] * layer.saliency_scale
        best = max(slow_cost(t, scaled, r_min, layer.aspect, layer.final_sharpness) for t in one_pixel_grid(h, w, r_min, layer.aspect))
        found = slow_cost(info.stage_thetas[0, -1], scaled, r_min, layer.aspect, layer.final_sharpness)
        assert found >= best * (1 - 1e-6), (found, best)
        assert float(info.cost[0]) >= float(paper.cost[0]) * (1 - 1e-12)
        assert bool(info.converged.all())

    def test_beats_the_staged_ascent_where_it_stops_at_a_local_maximum(self):
        # Among these maps the ascent stops at a lower maximum at least once (measured: 2 of 6).
        gaps = []
        for seed in range(6):
            s = blocks_map(seed)
            gaps.append(float(_layer("global").search(s)[1].cost[0] - _layer("paper").search(s)[1].cost[0]))
        assert min(gaps) >= -1e-12 and max(gaps) > 1e-3, gaps


class TestNearTies:
    def test_two_equal_maxima_are_marked_and_the_first_in_lattice_order_wins(self):
        s = torch.full((1, 1, 16, 80), 0.05, dtype=torch.float64)
        s[..., 4:12, 1:13] = 1.0
        s[..., 4:12, 67:79] = 1.0  # the mirror image of the first block
        layer = _layer("global")
        boxes, info = layer.search(s)
        assert bool(info.near_tie[0]) and bool(info.converged[0])
        assert boxes[0, 2] < 5 * 40  # the left box (lower x_c: first in lattice order)
        again, _ = layer.search(s.clone())
        torch.testing.assert_close(again, boxes, rtol=0, atol=0)

    def test_one_clear_maximum_is_not_a_tie(self):
        s = torch.full((1, 1, 16, 80), 0.05, dtype=torch.float64)
        s[..., 4:12, 1:13] = 1.0
        s[..., 4:12, 67:79] = 0.5
        _, info = _layer("global").search(s)
        assert not bool(info.near_tie[0])
        _, paper = _layer("paper").search(s)
        assert not bool(paper.near_tie.any())  # the staged ascent never reports one


class TestFlatMaps:
    """Defect: a constant map's box wandered with rounding noise and was not always frozen."""

    @pytest.mark.parametrize("search", SEARCHES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("value", [0.0, 1.0, 0.37])
    def test_flat_map_gets_the_start_box_frozen(self, search, dtype, value):
        s = torch.full((2, 1, 40, 71), value, dtype=dtype)
        layer = DACrop(**SMALL, search=search)
        boxes, info = layer.search(s)
        r_min = fit_r_min(40, 71, layer.r_min_fraction, layer.aspect, s)
        start = initial_theta(40, 71, r_min, layer.aspect, layer.r_init_fraction)
        assert info.frozen.tolist() == [True, True] and not bool(info.converged.any())
        assert torch.isfinite(boxes).all() and torch.isfinite(info.cost).all()
        torch.testing.assert_close(info.stage_thetas[:, -1], start, rtol=0, atol=0)

    @pytest.mark.parametrize("search", SEARCHES)
    @pytest.mark.parametrize("mode", ["implicit", "unroll", "truncated", "dlm"])
    def test_frozen_box_has_zero_gradient_in_every_mode(self, search, mode):
        """Defect: ``unroll`` differentiated the ascent on a blank map (d grad f / dS is
        not zero there) and returned large gradients where ``info.frozen`` says zero."""
        s = torch.zeros(2, 1, 40, 71, dtype=torch.float64)
        s[1, :, 10:30, 10:60] = torch.rand(1, 20, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        s.requires_grad_()
        layer = DACrop(**SMALL, search=search, backward_mode=mode)
        boxes, info = layer.search(s)
        assert info.frozen.tolist() == [True, False]
        boxes.sum().backward()
        assert torch.isfinite(s.grad).all()
        assert torch.all(s.grad[0] == 0) and s.grad[1].abs().sum() > 0


class TestNearlyFlatMaps:
    """Defect: on a nearly flat map (the max-min pooling of uniform noise: every window
    0.88-1.0) float32 Newton steps of ~0.01 px wandered in f's rounding for all 50 polish
    steps (~10x a converging search's time): such a box now stops after STALL_STEPS."""

    def test_the_polish_stops_when_its_steps_only_wander(self):
        from dac.optim.solver import STALL_STEPS

        images = (torch.rand(3, 1, 400, 740, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
        layer = DACrop(pool_size=10, search="global")
        with torch.no_grad(), quiet_unconverged():
            boxes, info = layer.locate(images, return_info=True)
            # The same maps searched in float64, where the polish converges.
            exact, exact_info = layer.search(layer.saliency_map(images).double())
        assert int(info.iterations.max()) <= 2 * STALL_STEPS  # was 50 on the third image
        assert torch.isfinite(boxes).all() and not bool(info.frozen.any())
        assert bool(exact_info.converged.all())
        # Where it stopped, within a twentieth of a saliency pixel of the float64 maximum.
        torch.testing.assert_close(boxes.double(), exact, rtol=0, atol=0.05 * layer.pool_size)


class TestLayerArguments:
    @pytest.mark.parametrize(
        "kwargs,match",
        [
            (dict(search="magic"), "search: expected one of"),
            (dict(search=None), "search: expected one of"),
            (dict(grid_step=0.0), "grid_step"),
            (dict(grid_candidates=0), "grid_candidates"),
            (dict(tie_tolerance=-1.0), "tie_tolerance"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(DACInputError, match=match):
            DACrop(**SMALL, **kwargs)

    def test_repr_and_float32(self):
        layer = DACrop(**SMALL, search="GLOBAL")
        assert "search='global'" in repr(layer) and "grid_step=4.0" in repr(layer)
        assert "grid_step" not in repr(DACrop(**SMALL))
        s = torch.cat([blocks_map(i, 40, 71) for i in range(2)])
        b64, info64 = layer.search(s)
        b32, info32 = layer.search(s.float())
        assert b32.dtype == torch.float32 and bool(info32.converged.all())
        torch.testing.assert_close(b32.double(), b64, rtol=0, atol=0.05)


class TestMetaDevice:
    """Defect: a meta tensor raised ``Tensor.item() cannot be called on meta tensors``."""

    @pytest.mark.parametrize("call", ["forward", "locate", "saliency_map"])
    def test_meta_images_name_the_argument(self, call):
        images = torch.zeros(1, 1, 300, 555, device="meta")
        with pytest.raises(DACInputError, match="images: .*meta device"):
            getattr(DACrop(**SMALL), call)(images)
        with pytest.raises(DACInputError, match=r"images\[0\]: .*meta device"):
            getattr(DACrop(**SMALL), call)([images[0]])

    def test_meta_saliency_names_the_argument(self):
        with pytest.raises(DACInputError, match="saliency: .*meta device"):
            DACrop(**SMALL).search(torch.zeros(1, 1, 60, 111, device="meta"))


class TestSparseImages:
    """Defect: a sparse image raised torch's NotImplementedError (``aten::ne.Scalar`` on SparseCPU)."""

    @pytest.mark.parametrize("call", ["forward", "locate", "saliency_map"])
    def test_sparse_images_name_the_argument(self, call):
        images = torch.zeros(1, 1, 60, 111).to_sparse()
        with pytest.raises(DACInputError, match=r"images: .*sparse.*to_dense"):
            getattr(DACrop(**SMALL), call)(images)
        with pytest.raises(DACInputError, match=r"images\[0\]: .*sparse.*to_dense"):
            getattr(DACrop(**SMALL), call)([images[0]])

    def test_sparse_saliency_names_the_argument(self):
        with pytest.raises(DACInputError, match=r"saliency: .*sparse"):
            DACrop(**SMALL).search(torch.zeros(1, 1, 60, 111).to_sparse())

    def test_the_functions_refuse_them_too(self):
        from dac.functional import crop_resize, dac_cost, max_min_pool

        images = torch.zeros(1, 1, 60, 111).to_sparse()
        with pytest.raises(DACInputError, match=r"images: .*sparse"):
            max_min_pool(images, 4)
        with pytest.raises(DACInputError, match=r"images: .*sparse"):
            crop_resize(images, torch.tensor([[0.0, 0.0, 50.0, 30.0]]), (10, 18))
        with pytest.raises(DACInputError, match=r"saliency: .*sparse"):
            dac_cost(torch.tensor([[20.0, 10.0, 0.0]]), images, r_min=5.0, aspect=0.5, sharpness=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_global_search_on_cuda_matches_cpu():
    s = torch.cat([blocks_map(i, 60, 111) for i in range(3)]).float()
    layer = DACrop(**SMALL, search="global")
    cpu, _ = layer.search(s)
    x = s.cuda().requires_grad_()
    boxes, info = layer.search(x)
    boxes.sum().backward()
    assert boxes.device.type == "cuda" and torch.isfinite(x.grad).all()
    torch.testing.assert_close(boxes.cpu(), cpu, rtol=0, atol=1e-2)
