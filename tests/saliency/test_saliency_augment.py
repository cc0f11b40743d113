"""dac.saliency.augment: flips, stretches and shifts move features and regions alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dac import DACInputError
from dac.saliency import FIT_DEFAULTS, FitOptions, film_border, flip_left_right, region_masks, saliency_features, stretch_and_shift


class TestAugment:
    def teststretch_and_shift_move_features_and_regions_alike(self):
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
        moved, moved_regions = stretch_and_shift(features, regions, k, np.random.default_rng(1), 0.3, 0.1)
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
        same, same_regions = stretch_and_shift(features, regions, k, np.random.default_rng(1), 0.0, 0.0)
        assert torch.equal(same, features)
        torch.testing.assert_close(same_regions, regions, rtol=1e-15, atol=1e-12)

    def test_a_flip_mirrors_the_mask_of_the_region(self):
        regions = torch.tensor([[15.0, 5.0, 55.0, 25.0], [12.0, 0.0, 45.0, 30.0]], dtype=torch.float64)
        features = region_masks(regions, (4, 10), 10).expand(2, 5, 4, 10)
        flipped, moved = flip_left_right(features, regions, 10, torch.tensor([True, False]))
        torch.testing.assert_close(flipped[:, :1], region_masks(moved, (4, 10), 10))
        assert torch.equal(flipped[1], features[1]) and torch.equal(moved[1], regions[1])


class TestFilmBorder:
    def test_a_flat_border_beside_the_region_and_never_over_it(self):
        k, h, w = 10, 6, 40
        features = saliency_features(torch.randint(60, 200, (8, 1, h * k, w * k), dtype=torch.uint8), k)
        regions = torch.tensor([[120.0, 10, 300, 50]] * 8)  # pooled columns 12..30
        out = film_border(features, regions, k, np.random.default_rng(3), 1.0, (2, 5))
        changed = (out != features).any(dim=1).any(dim=1)  # [b, w] columns that changed
        for i in range(8):
            cols = changed[i].nonzero().flatten()
            assert len(cols) > 0
            left = bool(cols[0] == 0)
            assert torch.equal(cols, torch.arange(cols[0], cols[-1] + 1))  # one run of columns from an edge
            assert (cols[-1] <= 12 - 2) if left else (cols[0] >= 30 + 2 and cols[-1] == w - 1)
            border = out[i, :, :, cols]
            assert border[0].max() < 0.25 and border[4].max() < 0.05  # flat: small range and spread
            # a dark ([0, 0.06]) or bright ([0.85, 1]) level, with the phantoms' read and shot noise
            level, spread = float(border[1].mean()), float(border[4].mean())
            assert level <= 0.065 or level >= 0.845
            assert (0.003 if level > 0.01 else 0.0) < spread < 0.035
        sides = {bool(changed[i, 0]) for i in range(8)}
        assert sides == {True, False}  # both sides drawn
        # the same draws give the same border; share 0 changes nothing; no room on a side: left alone
        again = film_border(features, regions, k, np.random.default_rng(3), 1.0, (2, 5))
        assert torch.equal(again, out)
        assert film_border(features, regions, k, np.random.default_rng(3), 0.0) is features
        full = torch.tensor([[5.0, 10, 395, 50]] * 8)
        assert torch.equal(film_border(features, full, k, np.random.default_rng(3), 1.0), features)

    def test_room_for_one_pooled_column_leaves_the_image_as_it_is(self):
        # One pooled column is too narrow for the border's own features (two pooling
        # windows a side); such an image is left alone, not an error mid-fit.
        k, h, w = 4, 6, 40
        features = saliency_features(torch.randint(60, 200, (6, 1, h * k, w * k), dtype=torch.uint8), k)
        regions = torch.tensor([[8.0, 4, 152, 20]] * 6)  # pooled columns 2..38: one column's room at gap 1
        assert torch.equal(film_border(features, regions, k, np.random.default_rng(0), 1.0, (1, 1)), features)
        two = torch.tensor([[12.0, 4, 148, 20]] * 6)  # two columns' room on either side: bordered
        assert not torch.equal(film_border(features, two, k, np.random.default_rng(0), 1.0, (1, 1)), features)

    def test_the_option_is_checked(self):
        assert FitOptions(border=0.5).border == 0.5 and FitOptions().border == FIT_DEFAULTS["border"] == 0.5
        with pytest.raises(DACInputError, match="border"):
            FitOptions(border=1.5)
