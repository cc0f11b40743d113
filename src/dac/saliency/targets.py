"""What a labelled region asks of the box: the best box of the crop's aspect, and masks.

* :func:`aspect_box` — the smallest box of a fixed aspect (and at least the minimum
  width) around the region, kept in the image. Its IoU with the region is the
  *ceiling* a DAC box can reach.
* :func:`minimum_width` — the narrowest box a ``DACrop`` returns on an image.
* :func:`margin_target` — the box the fit's loss pulls towards: the aspect box around
  the region grown by a margin.
* :func:`region_masks` — the region as a mask on the pooled grid (the warm start's target).

Convention: boxes are xyxy in input pixel coordinates (torchvision's): pixel ``i``
covers ``[i, i + 1)``, the whole image is ``(0, 0, W, H)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..functional.boxes import box_inside, fit_r_min
from ..layer import DACrop

__all__ = ["aspect_box", "margin_target", "minimum_width", "region_masks"]


def aspect_box(regions: Tensor, aspect: float, image_sizes: Tensor, min_width: Tensor | float = 0.0) -> Tensor:
    """The smallest box of ``aspect`` (height / width), at least ``min_width`` wide,
    centred on each region and shifted to lie inside its image.

    Convention: xyxy in input pixels.

    Args:
        regions: Tensor[B, 4] xyxy.
        aspect: box height / width.
        image_sizes: Tensor[B, 2] = (H, W) of each image.
        min_width: smallest width, pixels (float or Tensor[B]).

    Returns:
        Tensor[B, 4] xyxy (as wide as the image allows, if the region needs more).

    Examples:
        >>> aspect_box(torch.tensor([[10.0, 10.0, 30.0, 20.0]]), 0.5, torch.tensor([[100, 200]]))
        tensor([[10., 10., 30., 20.]])
    """
    regions = regions.to(torch.promote_types(regions.dtype, torch.float32))
    w = torch.maximum(regions[:, 2] - regions[:, 0], (regions[:, 3] - regions[:, 1]) / aspect)
    w = torch.maximum(w, torch.as_tensor(min_width, dtype=w.dtype).expand_as(w))
    centres = torch.stack(((regions[:, 0] + regions[:, 2]) / 2, (regions[:, 1] + regions[:, 3]) / 2), dim=-1)
    return box_inside(centres, w, aspect, image_sizes)


def minimum_width(layer: DACrop, image_size: Sequence[int]) -> float:
    """The narrowest box ``layer`` can return on an image of ``image_size`` = (H, W), pixels.

    Examples:
        >>> minimum_width(DACrop(output_size=(20, 37), pool_size=4, r_min_fraction=0.2), (192, 354))
        140.8
    """
    k = layer.pool_size
    h, w = int(image_size[0]) // k, int(image_size[1]) // k
    return 2 * k * float(fit_r_min(h, w, layer.r_min_fraction, layer.aspect, torch.zeros(1, dtype=torch.float64)))


def margin_target(regions: Tensor, margin: float, layer: DACrop, image_size: Sequence[int]) -> Tensor:
    """The boxes the fit's loss pulls towards: the best box of ``layer``'s aspect and
    minimum width (:func:`aspect_box`) around each region grown by ``margin`` image widths
    per side, inside the part of the image the search covers (whole pooling windows).

    Convention: xyxy in input pixels.

    Args:
        regions: Tensor[B, 4] xyxy of images of ``image_size`` = (H, W).
        margin: image widths added on every side.
        layer: the ``DACrop`` whose aspect, minimum width and pooling window count.
        image_size: (H, W).

    Returns:
        Tensor[B, 4] xyxy.

    Examples:
        >>> layer = DACrop(output_size=(20, 40), pool_size=4, r_min_fraction=0.05)
        >>> margin_target(torch.tensor([[40.0, 40, 80, 60]], dtype=torch.float64), 0.0, layer, (100, 200))
        tensor([[40., 40., 80., 60.]], dtype=torch.float64)
    """
    height, width, k = int(image_size[0]), int(image_size[1]), layer.pool_size
    grid = torch.tensor([[height // k * k, width // k * k]], dtype=torch.float64, device=regions.device).expand(len(regions), 2)
    pad = margin * float(width) * torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=regions.dtype, device=regions.device)
    return aspect_box(regions + pad, layer.aspect, grid, minimum_width(layer, (height, width)))


def region_masks(regions: Tensor, pooled_size: Sequence[int], pool_size: int) -> Tensor:
    """1 where a pooled pixel's centre lies inside the region, else 0; a centre on the
    region's edge counts half per axis (so the mask of a mirrored region is the
    mirrored mask, whatever the ties).

    Pooled pixel ``(i, j)`` covers input pixels ``[i k, (i + 1) k) x [j k, (j + 1) k)``;
    its centre is ``((j + 1/2) k, (i + 1/2) k)``.

    Args:
        regions: Tensor[B, 4] xyxy, input pixels.
        pooled_size: (h, w) of the grid.
        pool_size: k.

    Returns:
        Tensor[B, 1, h, w] in ``regions``' dtype.

    Examples:
        >>> region_masks(torch.tensor([[10.0, 0.0, 30.0, 10.0]]), (2, 4), 10)[0, 0]
        tensor([[0., 1., 1., 0.],
                [0., 0., 0., 0.]])
    """
    h, w = int(pooled_size[0]), int(pooled_size[1])
    k = float(pool_size)
    ys = (torch.arange(h, dtype=regions.dtype, device=regions.device) + 0.5) * k
    xs = (torch.arange(w, dtype=regions.dtype, device=regions.device) + 0.5) * k
    r = regions[:, :, None, None]

    def along(centres: Tensor, low: Tensor, high: Tensor) -> Tensor:
        strictly = ((centres > low) & (centres < high)).to(regions.dtype)
        return torch.where((centres == low) | (centres == high), 0.5 * (low < high).to(regions.dtype), strictly)

    return (along(xs, r[:, 0], r[:, 2]) * along(ys[:, None], r[:, 1], r[:, 3]))[:, None]
