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

from .._checks import DACInputError, check_int, check_positive, check_theta
from .rectangle import _as_batch, _positive_batch, box_edges
from .stationarity import r_upper, shift_into_image

__all__ = ["box_inside", "fit_r_min", "initial_theta", "theta_to_boxes"]


def fit_r_min(h: int, w: int, r_min_fraction: float | Tensor, aspect: float, like: Tensor) -> Tensor:
    """The paper's ``r_min = w * r_min_fraction`` (1/3.5), clipped so the box fits.

    ``r_min_fraction`` may be a Tensor[] (a learned fraction, ``DACrop(learn=("r_min",))``):
    the result is then differentiable in it.

    Returns:
        Tensor[B] on ``like``'s device and dtype (B = like.shape[0]).
    """
    h, w, aspect = check_int(h, "h", 1), check_int(w, "w", 1), check_positive(aspect, "aspect")
    if not isinstance(like, Tensor) or like.ndim == 0 or not like.dtype.is_floating_point:
        raise DACInputError(f"like: expected a floating Tensor[B, ...] (the batch's device and dtype), got {_describe(like)}")
    _check_positive_values(r_min_fraction, "r_min_fraction", like)
    return _fit_r_min(h, w, r_min_fraction, aspect, like)


def _fit_r_min(h: int, w: int, r_min_fraction: float | Tensor, aspect: float, like: Tensor) -> Tensor:
    """Unchecked core of :func:`fit_r_min` (the layer's arguments are checked once)."""
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
    h, w, aspect = check_int(h, "h", 1), check_int(w, "w", 1), check_positive(aspect, "aspect")
    r_init_fraction = check_positive(r_init_fraction, "r_init_fraction")
    if not isinstance(r_min, Tensor) or r_min.ndim != 1 or not r_min.dtype.is_floating_point:
        raise DACInputError(f"r_min: expected a floating Tensor[B] (see fit_r_min), got {_describe(r_min)}")
    _check_positive_values(r_min, "r_min", r_min)
    return _initial_theta(h, w, r_min, aspect, r_init_fraction)


def _initial_theta(h: int, w: int, r_min: Tensor, aspect: float, r_init_fraction: float) -> Tensor:
    """Unchecked core of :func:`initial_theta`."""
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
    check_theta(theta)
    _check_positive_values(r_min, "r_min", theta)
    return _theta_to_boxes(theta, r_min, check_positive(aspect, "aspect"), check_int(kernel_size, "kernel_size", 1))


def _theta_to_boxes(theta: Tensor, r_min: Tensor | float, aspect: float, kernel_size: int) -> Tensor:
    """Unchecked core of :func:`theta_to_boxes`."""
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


def _check_positive_values(value: float | Tensor, name: str, like: Tensor) -> None:
    """A number, or a floating Tensor[] or Tensor[B] (B of ``like``), of finite values > 0."""
    if isinstance(value, Tensor) and not value.dtype.is_floating_point:
        raise DACInputError(f"{name}: expected a floating Tensor, got {value.dtype}")
    _positive_batch(value.detach() if isinstance(value, Tensor) else value, name, like)


def _describe(value: object) -> str:
    return f"Tensor of shape {tuple(value.shape)} and {value.dtype}" if isinstance(value, Tensor) else repr(value)
