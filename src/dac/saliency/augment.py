"""Augmentation of labelled images for a fit: new layouts from few labels, features and boxes moved alike.

* :func:`flip_left_right` — mirror chosen images of a batch (features and regions).
* :func:`stretch_and_shift` — stretch each image left-right about its region's centre,
  then move it by whole pooled pixels; the region moves alike and never leaves the grid.
* :func:`film_border` — cover the columns beyond one end of chosen images' regions with
  a flat collimator border (dark or bright, with noise), a little way from the region.

All work on cached :func:`~dac.saliency.saliency_features` (not on images); the random
ones draw from an explicit ``numpy.random.Generator``.

Convention: regions are xyxy in input pixels; pooled pixel ``j`` spans ``[k j, k (j + 1))``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._film import border_level, noise_levels
from .features import saliency_features

__all__ = ["film_border", "flip_left_right", "stretch_and_shift"]


def flip_left_right(features: Tensor, regions: Tensor, pool_size: int, mirror: Tensor) -> tuple[Tensor, Tensor]:
    """The images where ``mirror`` is True mirrored left-right, features and regions alike.

    The axis is the pooled grid's middle, ``k w / 2`` (the grid spans ``[0, k w)``).

    Args:
        features: Tensor[b, 5, h, w].
        regions: Tensor[b, 4] xyxy, input pixels.
        pool_size: k.
        mirror: Tensor[b] bool.

    Returns:
        (features, regions) of the same shapes.

    Examples:
        >>> f, r = flip_left_right(torch.arange(4.0).reshape(1, 1, 1, 4), torch.tensor([[0.0, 0, 10, 5]]), 5,
        ...                        torch.tensor([True]))
        >>> f.flatten().tolist(), r.tolist()
        ([3.0, 2.0, 1.0, 0.0], [[10.0, 0.0, 20.0, 5.0]])
    """
    mirror = mirror.to(features.device)
    features = torch.where(mirror[:, None, None, None], features.flip(-1), features)
    axis = float(pool_size * features.shape[-1])
    flipped = torch.stack((axis - regions[:, 2], regions[:, 1], axis - regions[:, 0], regions[:, 3]), -1)
    return features, torch.where(mirror.to(regions.device)[:, None], flipped, regions)


def stretch_and_shift(features: Tensor, regions: Tensor, pool_size: int, rng: np.random.Generator, stretch: float,
                       shift: float) -> tuple[Tensor, Tensor]:
    """Each image stretched left-right about its region's centre by a factor drawn from
    ``[1 - stretch, 1 + stretch]``, then moved by whole pooled pixels, up to ``shift``
    image widths each way in x and in y; its region moved alike: a wider or narrower
    arch elsewhere in the frame, new layouts from few labels.

    The features are resampled column by column (each new column takes the old column
    under its centre, so some columns repeat or drop out, and beyond the grid the edge
    column or row repeats): every window's features are those of some window of the
    image, not averaged; rows move by whole pixels. The image size is kept. The labels
    stay true: a stretch is capped where the region would leave the grid, a move stops
    at the grid's edge, and an image whose region reaches into the grid's first or last
    column (row) is neither stretched nor moved along x (y), as the repeated edge would
    be region that its label leaves out.

    Args:
        features: Tensor[b, 5, h, w].
        regions: Tensor[b, 4] float64 xyxy, input pixels (pooled pixel ``j`` spans
            ``[k j, k (j + 1))``).
        rng: draws b factors and then 2 b moves (whatever is used).

        pool_size: k.
        stretch: the largest relative change of the width (0: none).
        shift: the largest move, image widths (0: none).

    Returns:
        (features, regions) of the same shapes.

    Examples:
        >>> f, r = stretch_and_shift(torch.rand(2, 5, 6, 12), torch.tensor([[20.0, 10, 60, 40]] * 2, dtype=torch.float64),
        ...                          10, np.random.default_rng(0), 0.1, 0.1)
        >>> f.shape, r.shape
        (torch.Size([2, 5, 6, 12]), torch.Size([2, 4]))
    """
    b, _, h, w = features.shape
    k, device = float(pool_size), regions.device
    x = regions[:, 0::2] / k  # pooled units: (x1, x2), (y1, y2)
    y = regions[:, 1::2] / k
    free_x = (x[:, 0] >= 1) & (x[:, 1] <= w - 1)
    free_y = (y[:, 0] >= 1) & (y[:, 1] <= h - 1)
    centre = x.mean(dim=1, keepdim=True)
    scale = torch.ones(b, 1, dtype=torch.float64, device=device)
    if stretch:
        drawn = torch.as_tensor(1 + rng.uniform(-stretch, stretch, b), dtype=torch.float64, device=device)[:, None]
        room = torch.minimum(centre / (centre - x[:, :1]), (w - centre) / (x[:, 1:] - centre))  # the widest that stays on the grid
        scale = torch.where(free_x[:, None], torch.minimum(drawn, room), scale)
        x = ((x - centre) * scale + centre).clamp(0, w)  # on the grid (rounding at the cap)
    dx = torch.zeros(b, dtype=torch.float64, device=device)
    dy = torch.zeros_like(dx)
    reach = int(round(shift * w))
    if reach:
        drawn = torch.as_tensor(rng.integers(-reach, reach + 1, size=(2, b)), dtype=torch.float64, device=device)

        def kept(moves: Tensor, low: Tensor, high: Tensor, size: int) -> Tensor:  # the region stays on the grid
            return torch.minimum(torch.maximum(moves, torch.ceil(-low)), torch.floor(size - high))

        dx = torch.where(free_x, kept(drawn[0], x[:, 0], x[:, 1], w), dx)
        dy = torch.where(free_y, kept(drawn[1], y[:, 0], y[:, 1], h), dy)
    centres = torch.arange(w, dtype=torch.float64, device=device) + 0.5
    cols = torch.floor((centres - dx[:, None] - centre) / scale + centre).long().clamp(0, w - 1)  # [b, w]
    rows = (torch.arange(h, device=device) - dy[:, None].long()).clamp(0, h - 1)  # [b, h]
    picked = torch.arange(b, device=device)[:, None, None]
    moved = features.permute(0, 2, 3, 1)[picked, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    x, y = x + dx[:, None], y + dy[:, None]
    return moved.contiguous(), k * torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=-1)


def film_border(features: Tensor, regions: Tensor, pool_size: int, rng: np.random.Generator, share: float,
                gap: tuple[int, int] = (1, 10)) -> Tensor:
    """Chosen images with a collimator border beside one end of their region: the
    columns from the image's left (or right) edge to ``g`` pooled pixels before the
    region (``g`` drawn from ``gap``, inclusive) hold the features of a flat border,
    as a film whose collimator edge comes close to the arch.

    Each image is chosen with probability ``share``; its side is drawn, its level dark
    (uniform in [0, 0.06], 7 in 10) or bright ([0.85, 1]), with read and shot noise, as
    :func:`dac.data.phantoms.make_phantom` draws them (both draw from ``dac._film``),
    quantised to 8 bits: the border's features are
    :func:`~dac.saliency.saliency_features` of such a strip. Regions are
    untouched (the border never reaches them); an image whose region leaves fewer than
    two pooled columns on the drawn side is left as it is.

    Args:
        features: Tensor[b, 5, h, w].
        regions: Tensor[b, 4] xyxy, input pixels.
        pool_size: k.
        rng: draws ``b`` choices, then per chosen image its side, gap, level, noise levels
            and the seed of its noise (drawn by a ``torch.Generator``).
        share: probability of a border per image, in [0, 1].
        gap: the fewest and most pooled pixels between the border and the region.

    Returns:
        Tensor[b, 5, h, w] (a new tensor where anything changed).

    Examples:
        >>> f = torch.zeros(2, 5, 4, 20)
        >>> out = film_border(f, torch.tensor([[80.0, 0, 120, 40]] * 2), 10, np.random.default_rng(0), 1.0, (2, 2))
        >>> [int((out[i].abs().sum(dim=(0, 1)) > 0).sum()) for i in range(2)]  # 6 columns up to 2 before the region
        [6, 6]
    """
    b, _, h, w = features.shape
    k = int(pool_size)
    chosen = rng.random(b) < share
    if not chosen.any():
        return features
    out = features.clone()
    for i in np.flatnonzero(chosen):
        left = rng.random() < 0.5
        g = int(rng.integers(gap[0], gap[1] + 1))
        x1, x2 = float(regions[i, 0]) / k, float(regions[i, 2]) / k
        cols = int(np.floor(x1)) - g if left else w - (int(np.ceil(x2)) + g)
        level = border_level(rng)
        read, shot = noise_levels(rng)
        if cols < 2:  # no room, or one pooled column: too narrow for the strip's own features (two windows)
            continue
        std = float(np.sqrt(read * read + shot * shot * level))
        # The noise from torch's generator, seeded from rng: ~3x faster than numpy's float64
        # normals (a strip is ~1M pixels; they took ~a fifth of a box step), as reproducible.
        noise = torch.Generator().manual_seed(int(rng.integers(2**63)))
        strip = torch.randn(h * k, cols * k, generator=noise).mul_(std).add_(level).clamp_(0.0, 1.0)
        strip = strip.mul_(255).round_().to(torch.uint8)[None, None]  # 8 bits, rounding half to even as np.rint
        border = saliency_features(strip, k)[0].to(out)
        if left:
            out[i, :, :, :cols] = border
        else:
            out[i, :, :, w - cols:] = border
    return out
