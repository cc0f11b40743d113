"""dac.saliency.targets: the best box of the aspect, and region masks on the pooled grid."""
from __future__ import annotations

import pytest
import torch

from dac.saliency import aspect_box, region_masks


class TestTargets:
    def test_aspect_box_is_the_smallest_box_of_the_aspect_around_the_region(self):
        regions = torch.tensor([[100.0, 50.0, 300.0, 90.0], [0.0, 0.0, 50.0, 200.0]])
        sizes = torch.tensor([[400, 800], [300, 800]])
        boxes = aspect_box(regions, 0.5, sizes, min_width=torch.tensor([0.0, 100.0]))
        torch.testing.assert_close(boxes[0], torch.tensor([100.0, 20.0, 300.0, 120.0]))  # width-bound, centred
        torch.testing.assert_close(boxes[1], torch.tensor([0.0, 0.0, 400.0, 200.0]))  # height-bound, shifted in
        with_floor = aspect_box(regions[:1], 0.5, sizes[:1], min_width=500.0)
        assert (with_floor[0, 2] - with_floor[0, 0]).item() == pytest.approx(500.0)

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
