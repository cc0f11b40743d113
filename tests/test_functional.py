"""dac.functional: each operation against the paper's equations, autograd and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dac import DACInputError, DACrop
from dac.functional import (
    CropResize,
    MaxMinPool,
    crop_resize,
    dac_cost,
    dac_cost_derivatives,
    fit_r_min,
    initial_theta,
    max_min_pool,
    soft_rectangle,
    theta_to_boxes,
    to_unit_range,
)

torch.set_default_dtype(torch.float32)


def sig(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def slow_cost(theta, saliency, r_min, aspect, gamma):
    """Eqs. 1-3 written straight from the paper, one pixel at a time."""
    x_c, y_c, r = (float(v) for v in theta)
    r_total = r_min + r
    h, w = saliency.shape
    num_in = den_in = num_out = den_out = 0.0
    for y in range(h):
        for x in range(w):
            # eq. 1: sigma(x, y, g) = 1/(1+e^{-x g}) * 1/(1+e^{-y g}); eq. 2: R = A * B
            a = sig(gamma * (x - (x_c - r_total))) * sig(gamma * (y - (y_c - aspect * r_total)))
            b = sig(gamma * (-x + (x_c + r_total))) * sig(gamma * (-y + (y_c + aspect * r_total)))
            z = a * b
            s = float(saliency[y, x])
            num_in += s * z
            den_in += z
            num_out += s * (1 - z)
            den_out += 1 - z
    return (num_in / den_in) / (num_out / den_out + 1)


class TestMaxMinPool:
    def test_matches_loop(self):
        x = torch.rand(2, 1, 23, 31, dtype=torch.float64)
        out = max_min_pool(x, 5)
        assert out.shape == (2, 1, 4, 6)
        for b in range(2):
            for i in range(4):
                for j in range(6):
                    win = x[b, 0, 5 * i : 5 * i + 5, 5 * j : 5 * j + 5]
                    assert out[b, 0, i, j] == win.max() - win.min()

    def test_equals_max_pool_form(self):
        x = torch.rand(3, 1, 40, 60, dtype=torch.float64)
        ref = F.max_pool2d(x, 10) + F.max_pool2d(-x, 10)  # eq. 5: maxPool(x) - minPool(x)
        torch.testing.assert_close(max_min_pool(x, 10), ref)

    def test_colour_is_mean_of_channels(self):
        x = torch.rand(1, 3, 20, 20, dtype=torch.float64)
        per_channel = torch.cat([max_min_pool(x[:, c : c + 1], 10) for c in range(3)], 1)
        torch.testing.assert_close(max_min_pool(x, 10), per_channel.mean(1, keepdim=True))

    @pytest.mark.parametrize("dtype,scale", [(torch.uint8, 255), (torch.uint16, 65535), (torch.int16, 32767)])
    def test_integer_images_scaled(self, dtype, scale):
        x = torch.randint(0, min(scale, 30000), (1, 1, 30, 30)).to(dtype)
        expected = max_min_pool(x.double() / scale, 10).float()
        torch.testing.assert_close(max_min_pool(x, 10), expected)
        assert to_unit_range(torch.tensor([scale]).to(dtype)).item() == 1.0

    def test_gradcheck(self):
        x = torch.rand(1, 1, 12, 12, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: max_min_pool(t, 4), (x,))

    def test_tied_maxima_share_the_gradient_as_documented(self):
        from dac.functional.pooling import window_extremes

        x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
        x[0, 0, 0, 0] = x[0, 0, 1, 0] = x[0, 0, 0, 1] = 1.0  # two tied columns, one of two tied rows
        x.requires_grad_()
        window_extremes(x, 2)[0][0, 0, 0, 0].backward()
        assert x.grad[0, 0, :2, :2].tolist() == [[0.25, 0.5], [0.25, 0.0]]

    def test_module_equals_function(self):
        x = torch.rand(2, 1, 30, 30)
        torch.testing.assert_close(MaxMinPool(10)(x), max_min_pool(x, 10))
        assert "kernel_size=10" in repr(MaxMinPool(10))

    @pytest.mark.parametrize(
        "bad,match",
        [
            (torch.rand(1, 1, 15, 40), "too small"),
            (torch.rand(1, 30, 30), r"\[B, C, H, W\]"),
            (torch.rand(1, 2, 30, 30), "1 or 3 channels"),
            (torch.full((1, 1, 30, 30), float("nan")), "NaN"),
            (torch.full((1, 1, 30, 30), float("inf")), "NaN or Inf"),
            (torch.zeros(1, 1, 30, 30, dtype=torch.bool), "dtype"),
        ],
    )
    def test_bad_input(self, bad, match):
        with pytest.raises(DACInputError, match=match):
            max_min_pool(bad, 10)
        with pytest.raises(ValueError, match="kernel_size"):
            max_min_pool(torch.rand(1, 1, 30, 30), 0)


class TestSoftRectangleAndCost:
    kw = dict(r_min=6.0, aspect=0.55)

    def test_soft_rectangle_matches_eq2(self):
        theta = torch.tensor([[14.0, 8.0, 2.0]], dtype=torch.float64)
        z = soft_rectangle(theta, 11, 19, sharpness=0.7, **self.kw)
        r_total = 8.0
        for y in range(11):
            for x in range(19):
                a = sig(0.7 * (x - (14 - r_total))) * sig(0.7 * (y - (8 - 0.55 * r_total)))
                b = sig(0.7 * (-x + (14 + r_total))) * sig(0.7 * (-y + (8 + 0.55 * r_total)))
                assert abs(z[0, y, x].item() - a * b) < 1e-12

    def test_separable_cost_equals_slow_loop(self):
        gen = torch.Generator().manual_seed(0)
        saliency = 255 * torch.rand(3, 1, 13, 21, dtype=torch.float64, generator=gen)
        theta = torch.tensor([[10.0, 6.0, 1.5], [8.0, 5.0, 0.0], [11.5, 6.5, 3.0]], dtype=torch.float64)
        gammas = torch.tensor([0.025, 0.3, 2.0], dtype=torch.float64)
        f = dac_cost(theta, saliency, sharpness=gammas, **self.kw)
        for b in range(3):
            ref = slow_cost(theta[b], saliency[b, 0], 6.0, 0.55, float(gammas[b]))
            assert abs(f[b].item() - ref) <= 1e-12 * abs(ref)

    def test_gradient_and_hessian_match_autograd(self):
        saliency = torch.rand(2, 1, 17, 29, dtype=torch.float64)
        theta = torch.tensor([[14.0, 8.0, 2.0], [10.0, 7.0, 0.5]], dtype=torch.float64)
        kw = dict(sharpness=0.4, **self.kw)
        _, grad, hess = dac_cost_derivatives(theta, saliency, **kw)
        for b in range(2):
            def cost_b(t, b=b):
                full = theta.clone()
                full[b] = t
                return dac_cost(full, saliency, **kw)[b]

            g_ref = torch.autograd.functional.jacobian(cost_b, theta[b])
            h_ref = torch.autograd.functional.hessian(cost_b, theta[b])
            torch.testing.assert_close(grad[b], g_ref, rtol=1e-10, atol=1e-15)
            torch.testing.assert_close(hess[b], h_ref, rtol=1e-9, atol=1e-15)

    def test_gradcheck_in_theta_and_saliency(self):
        saliency = torch.rand(1, 1, 9, 14, dtype=torch.float64, requires_grad=True)
        theta = torch.tensor([[7.0, 4.0, 1.0]], dtype=torch.float64, requires_grad=True)
        fn = lambda t, s: dac_cost_derivatives(t, s, sharpness=0.5, r_min=3.0, aspect=0.5)[1]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (theta, saliency))

    def test_blank_map_is_finite(self):
        f, g, h = dac_cost_derivatives(
            torch.tensor([[10.0, 5.0, 1.0]]), torch.zeros(1, 1, 12, 20), sharpness=0.2, **self.kw
        )
        assert f.item() == 0 and torch.all(g == 0) and torch.all(h == 0)

    def test_bad_input(self):
        s = torch.rand(2, 1, 10, 10)
        with pytest.raises(DACInputError, match=r"theta: expected shape \[2, 3\]"):
            dac_cost(torch.zeros(3, 3), s, sharpness=0.1, **self.kw)
        with pytest.raises(DACInputError, match="sharpness"):
            dac_cost(torch.zeros(2, 3), s, sharpness=-1.0, **self.kw)
        with pytest.raises(DACInputError, match="saliency"):
            dac_cost(torch.zeros(2, 3), torch.rand(2, 2, 10, 10), sharpness=0.1, **self.kw)
        with pytest.raises(DACInputError, match="theta: contains NaN"):
            dac_cost(torch.full((2, 3), float("nan")), s, sharpness=0.1, **self.kw)

    @pytest.mark.parametrize("r_min", [float("nan"), float("inf"), 0.0, -2.0, None, "x", torch.tensor([3.0, float("nan")]),
                                       torch.ones(3)])
    def test_bad_r_min_names_it(self, r_min):
        # NaN and inf gave a NaN cost, None and strings a TypeError from torch, before.
        with pytest.raises(DACInputError, match="r_min"):
            dac_cost(torch.zeros(2, 3), torch.rand(2, 1, 10, 10), sharpness=0.1, r_min=r_min, aspect=0.5)

    def test_soft_rectangle_sizes_are_ints(self):
        theta = torch.tensor([[5.0, 5.0, 0.0]])
        for height, width in ((None, 20), (10, 2.5), (10, float("nan")), (0, 20)):
            with pytest.raises(DACInputError, match="height|width"):
                soft_rectangle(theta, height, width, r_min=3.0, aspect=0.5, sharpness=1.0)
        # r_min and the sharpness as dac_cost checks them (a NaN r_min gave a NaN field).
        for r_min, sharpness, name in ((float("nan"), 1.0, "r_min"), (3.0, float("inf"), "sharpness")):
            with pytest.raises(DACInputError, match=name):
                soft_rectangle(theta, 10, 20, r_min=r_min, aspect=0.5, sharpness=sharpness)


class TestCropResize:
    @pytest.mark.parametrize("size", [(40, 50), (157, 301), (300, 500), (31, 77)])
    def test_full_box_equals_antialiased_interpolate(self, size):
        x = torch.rand(2, 3, 157, 301, dtype=torch.float64)
        boxes = torch.tensor([[0.0, 0.0, 301.0, 157.0]] * 2, dtype=torch.float64)
        ref = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(crop_resize(x, boxes, size), ref)

    def test_matches_loop_for_integer_box(self):
        x = torch.rand(1, 1, 20, 30, dtype=torch.float64)
        out = crop_resize(x, torch.tensor([[4.0, 6.0, 16.0, 12.0]], dtype=torch.float64), (6, 12))
        torch.testing.assert_close(out, x[:, :, 6:12, 4:16])

    @pytest.mark.parametrize("antialias", [True, False])
    @pytest.mark.parametrize("huge", [False, True])
    def test_equals_dense_resampling_matrices_for_mixed_boxes(self, antialias, huge):
        # The bands are an implementation detail: the crop is Wy @ image @ Wx^T with the
        # triangle filter written out over every input pixel. One batch mixes a box
        # shrunk ~5x (bands of 16 output rows reading windows), one grown, one partly
        # outside the image, and three channels; the gradients in boxes and image agree too.
        x = torch.rand(3, 3, 90, 140, dtype=torch.float64)
        boxes = torch.tensor(
            [[3.2, 1.7, 137.9, 88.4], [40.3, 30.1, 47.9, 35.2], [-20.5, 60.2, 60.7, 110.3]],
            dtype=torch.float64,
        )
        if huge:  # a box in the wrong units: its footprints are wider than the image
            # (1e10 px asked for 20 GB of filter taps; now as many taps as the image has
            # pixels, for every box of the batch)
            x = x[:2]
            boxes = torch.tensor([[3.2, 1.7, 137.9, 88.4], [-1e10, -7e9, 1e10, 5e9]], dtype=torch.float64)
        size = (18, 35)

        def matrix(low, high, n_in, n_out):
            scale = (high - low) / n_out
            support = scale.clamp_min(1.0) if antialias else torch.ones_like(scale)
            centre = low + (torch.arange(n_out, dtype=x.dtype) + 0.5) * scale - 0.5
            pixels = torch.arange(n_in, dtype=x.dtype)
            w = (1 - (pixels[None, :] - centre[:, None]).abs() / support).clamp_min(0)
            total = w.sum(1, keepdim=True)
            return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), w)

        def dense(images, boxes):
            return torch.stack([
                matrix(b[1], b[3], 90, size[0]) @ images[i] @ matrix(b[0], b[2], 140, size[1]).T
                for i, b in enumerate(boxes)
            ])

        b1, b2 = boxes.clone().requires_grad_(), boxes.clone().requires_grad_()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = crop_resize(x1, b1, size, antialias=antialias), dense(x2, b2)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        weights = torch.rand_like(ref)
        (out * weights).sum().backward()
        (ref * weights).sum().backward()
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)

    def test_does_not_alias_when_shrinking(self):
        # One-pixel stripes: a 2000-px box going to 370 px must average them to ~0.5.
        x = (torch.arange(2400) % 2).double().expand(1, 1, 100, 2400).contiguous()
        box = torch.tensor([[100.0, 10.0, 2100.0, 90.0]], dtype=torch.float64)
        smooth = crop_resize(x, box, (20, 370))
        aliased = crop_resize(x, box, (20, 370), antialias=False)
        assert (smooth - 0.5).abs().max() < 0.02
        assert (aliased - 0.5).abs().max() > 0.2

    def test_gradcheck_image_and_box(self):
        x = torch.rand(1, 1, 12, 16, dtype=torch.float64, requires_grad=True)
        boxes = torch.tensor([[2.3, 1.7, 13.1, 9.4]], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda i, b: crop_resize(i, b, (4, 5)), (x, boxes))
        assert torch.autograd.gradcheck(lambda i, b: crop_resize(i, b, (15, 20)), (x, boxes))

    def test_uint8_and_module(self):
        x = torch.randint(0, 256, (2, 1, 50, 80), dtype=torch.uint8)
        boxes = torch.tensor([[5.0, 5.0, 45.0, 30.0], [0.0, 0.0, 80.0, 50.0]])
        out = CropResize((10, 16))(x, boxes)
        torch.testing.assert_close(out, crop_resize(x.float() / 255, boxes, (10, 16)))
        assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1

    @pytest.mark.parametrize("dtype,scale", [(torch.uint8, 255), (torch.uint16, 65535), (torch.int16, 32767)])
    @pytest.mark.parametrize("box_dtype", [torch.float32, torch.float64])
    def test_integer_images_crop_bitwise_as_their_unit_range(self, dtype, scale, box_dtype):
        # the gathered rows are scaled in place: bit for bit the crop of to_unit_range(x),
        # so training on integer images keeps its figures when the crop gets faster
        x = torch.randint(0, min(scale, 30000) + 1, (2, 1, 50, 80)).to(dtype)
        boxes = torch.tensor([[5.3, 5.1, 45.2, 30.7], [0.0, 0.0, 80.0, 50.0]], dtype=box_dtype)
        assert torch.equal(crop_resize(x, boxes, (10, 16)), crop_resize(x.to(box_dtype) / scale, boxes, (10, 16)))

    def test_outside_image_is_zero(self):
        x = torch.rand(1, 1, 10, 10)
        out = crop_resize(x, torch.tensor([[20.0, 20.0, 30.0, 30.0]]), (4, 4))
        assert torch.all(out == 0)

    @pytest.mark.parametrize(
        "boxes,size,match",
        [
            (torch.tensor([[5.0, 5.0, 1.0, 9.0]]), (4, 4), "x2 > x1"),
            (torch.tensor([[0.0, 0.0, 5.0]]), (4, 4), r"\[1, 4\]"),
            (torch.tensor([[0.0, 0.0, float("nan"), 5.0]]), (4, 4), "NaN"),
            (torch.tensor([[0.0, 0.0, 5.0, 5.0]]), (0, 4), "size"),
        ],
    )
    def test_bad_input(self, boxes, size, match):
        with pytest.raises(DACInputError, match=match):
            crop_resize(torch.rand(1, 1, 10, 10), boxes, size)

    @pytest.mark.parametrize("antialias", ["false", 0, None])
    def test_antialias_is_a_bool(self, antialias):
        # A truthy string from a config ("false") was taken as True: an aliased crop asked
        # for, an anti-aliased one made.
        box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        with pytest.raises(DACInputError, match="antialias"):
            crop_resize(torch.rand(1, 1, 10, 10), box, (4, 4), antialias=antialias)
        with pytest.raises(DACInputError, match="antialias"):
            CropResize((4, 4), antialias=antialias)


class TestBoxHelpers:
    """Defect: the public box helpers took NaN or None without a named error (a NaN box,
    or a TypeError from inside); the layer calls their unchecked cores."""

    @pytest.mark.parametrize(
        "call,match",
        [
            (lambda: fit_r_min(40, 71, None, 0.5, torch.zeros(2)), "r_min_fraction"),
            (lambda: fit_r_min(40, 71, float("nan"), 0.5, torch.zeros(2)), "r_min_fraction"),
            (lambda: fit_r_min(40, 71, torch.tensor(-0.1), 0.5, torch.zeros(2)), "r_min_fraction"),
            (lambda: fit_r_min(40.5, 71, 0.2, 0.5, torch.zeros(2)), "h: expected an int"),
            (lambda: fit_r_min(40, 71, 0.2, 0.5, None), "like"),
            (lambda: initial_theta(40, 71, torch.tensor([float("nan")]), 0.5, 0.4), "r_min"),
            (lambda: initial_theta(40, 71, torch.tensor([10.0]), 0.5, None), "r_init_fraction"),
            (lambda: theta_to_boxes(torch.tensor([[float("nan"), 1.0, 0.0]]), 10.0, 0.5, 10), "theta: contains NaN"),
            (lambda: theta_to_boxes(torch.tensor([[1.0, 1.0, 0.0]]), None, 0.5, 10), "r_min"),
            (lambda: theta_to_boxes(torch.tensor([[1.0, 1.0, 0.0]]), 10.0, 0.5, 0), "kernel_size"),
            (lambda: DACrop((20, 37), 5).thetas_to_boxes(torch.zeros(2, 4), (100, 200)), "thetas"),
            (lambda: DACrop((20, 37), 5).thetas_to_boxes(torch.zeros(2, 3), (3, 200)), "image_size"),
        ],
    )
    def test_bad_arguments_are_named(self, call, match):
        with pytest.raises(DACInputError, match=match):
            call()

    def test_good_arguments_as_before(self):
        torch.testing.assert_close(fit_r_min(40, 71, 0.2, 0.5, torch.zeros(2)), torch.full((2,), 14.2))
        r_min = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
        fit = fit_r_min(40, 71, torch.tensor(0.2, requires_grad=True), 0.5, torch.zeros(1))
        assert fit.requires_grad  # a learned fraction stays differentiable
        torch.testing.assert_close(initial_theta(40, 71, r_min.detach(), 0.5, 0.4), torch.tensor([[35.0, 19.5, 18.4]], dtype=torch.float64))
        boxes = theta_to_boxes(torch.tensor([[9.5, 4.5, 0.0]], dtype=torch.float64), r_min, 0.5, 10)
        torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 200.0, 100.0]], dtype=torch.float64))
        assert boxes.requires_grad
