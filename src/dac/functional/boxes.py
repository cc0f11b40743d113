"""Box conventions: the search's (x_c, y_c, r) and the user's xyxy input-pixel boxes.

Convention:
    * Saliency coordinates: pooled pixel ``j`` sits at coordinate ``j`` (the paper's
      meshgrid), so the pooled grid spans ``[-0.5, w - 0.5]``.
    * Boxes handed to users are ``xyxy`` in *input* pixel coordinates, torchvision's
      convention: pixel ``i`` covers ``[i, i + 1)``, the whole image is
      ``(0, 0, W, H)``. Pooled pixel ``j`` covers input ``[k j, k (j + 1))``, so
      ``X = k (x + 0.5)`` maps a saliency coordinate ``x`` to input pixels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .rectangle import _as_batch, box_edges
from .stationarity import r_upper, shift_into_image

__all__ = ["box_inside", "fit_r_min", "initial_theta", "theta_to_boxes"]


def fit_r_min(h: int, w: int, r_min_fraction: float | Tensor, aspect: float, like: Tensor) -> Tensor:
    """The paper's ``r_min = w * r_min_fraction`` (1/3.5), clipped so the box fits.

    ``r_min_fraction`` may be a Tensor[] (a learned fraction, ``DACrop(learn=("r_min",))``):
    the result is then differentiable in it.

    Returns:
        Tensor[B] on ``like``'s device and dtype (B = like.shape[0]).
    """
    r_min = _as_batch(w * r_min_fraction, like)
    return torch.minimum(r_min, torch.full_like(r_min, min(w / 2.0, h / (2.0 * aspect))))


def initial_theta(h: int, w: int, r_min: Tensor, aspect: float, r_init_fraction: float) -> Tensor:
    """Algorithm 1's start: the box centred on the grid with ``r_total = w * r_init_fraction``.

    The paper uses ``x_c = width / 2`` in its meshgrid; the grid's centre is
    ``(w - 1) / 2``, which is used here. ``r = w * r_init_fraction - r_min`` (paper:
    ``w / 2.3 - w / 3.5``), then centre shifting keeps the box inside the grid.

    Returns:
        Tensor[B, 3] = (x_c, y_c, r).
    """
    centre_x = torch.full_like(r_min, (w - 1) / 2.0)
    centre_y = torch.full_like(r_min, (h - 1) / 2.0)
    r = (w * r_init_fraction - r_min).clamp_min(0.0)
    r = torch.minimum(r, r_upper(h, w, r_min, aspect))
    theta = torch.stack((centre_x, centre_y, r), dim=-1)
    return shift_into_image(theta, h, w, r_min, aspect)


def theta_to_boxes(theta: Tensor, r_min: Tensor | float, aspect: float, kernel_size: int) -> Tensor:
    """Map (x_c, y_c, r) in saliency coordinates to xyxy boxes in input pixels.

    Args:
        theta: Tensor[B, 3]; r_min: float or Tensor[B]; aspect: height / width;
        kernel_size: the pooling window k.

    Returns:
        Tensor[B, 4] = (x1, y1, x2, y2), differentiable in theta.

    Examples:
        >>> theta_to_boxes(torch.tensor([[9.5, 4.5, 0.0]]), 10.0, 0.5, 10)
        tensor([[  0.,   0., 200., 100.]])
    """
    x1, x2, y1, y2 = box_edges(theta, _as_batch(r_min, theta), aspect).unbind(-1)
    return kernel_size * (torch.stack((x1, y1, x2, y2), dim=-1) + 0.5)


def box_inside(centres: Tensor, widths: Tensor, aspect: float, image_sizes: Tensor) -> Tensor:
    """A box of fixed aspect kept inside its image: xyxy in input pixels.

    Each box is ``widths`` wide (at most the widest box of ``aspect`` that fits the image)
    and ``aspect * width`` tall, centred at ``centres`` where it fits, else shifted just
    enough to lie inside ``[0, W] x [0, H]``. The one geometry of every box that dac
    makes from a centre and a width (the labelled regions' best boxes, the box
    regressor, the spatial transformer); the search keeps its own box inside the pooled
    grid in its own coordinates (:func:`~dac.functional.shift_into_image`).

    Args:
        centres: Tensor[B, 2] = (x, y), input pixels.
        widths: Tensor[B] (or a number), input pixels.
        aspect: box height / width.
        image_sizes: Tensor[B, 2] (or [2]) = (H, W).

    Returns:
        Tensor[B, 4] xyxy, differentiable in ``centres`` and ``widths``.

    Examples:
        >>> box_inside(torch.tensor([[5.0, 50.0]]), torch.tensor([40.0]), 0.5, torch.tensor([100, 200]))
        tensor([[ 0., 40., 40., 60.]])
    """
    sizes = torch.as_tensor(image_sizes).to(centres).expand(centres.shape[0], 2)
    height, width = sizes[:, 0], sizes[:, 1]
    w = torch.minimum(torch.as_tensor(widths).to(centres).expand(centres.shape[0]), torch.minimum(width, height / aspect))
    h = aspect * w
    cx = torch.minimum(torch.maximum(centres[:, 0], w / 2), width - w / 2)
    cy = torch.minimum(torch.maximum(centres[:, 1], h / 2), height - h / 2)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)

