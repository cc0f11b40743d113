"""The soft (sigmoid) rectangle of paper eqs. 1–2, in separable form.

Convention: ``theta`` is Tensor[B, 3] = (x_c, y_c, r) in saliency-pixel coordinates,
where pooled pixel ``j`` sits at coordinate ``j`` (the paper's meshgrid,
``0 .. w-1``). The half-width is ``r_total = r_min + r`` and the half-height
``aspect * r_total``, with ``aspect`` = height / width. The rectangle's edges are

    x1, x2 = x_c -+ r_total        y1, y2 = y_c -+ aspect * r_total

and ``z(x, y) = u(x) v(y)`` with
``u(x) = sigmoid(g (x - x1)) sigmoid(g (x2 - x))`` and ``v`` likewise, g the sharpness.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import DACInputError, check_int, check_positive, check_theta

__all__ = ["soft_rectangle", "box_edges"]


def box_edges(theta: Tensor, r_min: Tensor | float, aspect: float) -> Tensor:
    """Edges (x1, x2, y1, y2) of the box ``theta`` = (x_c, y_c, r), Tensor[B, 4].

    Examples:
        >>> box_edges(torch.tensor([[10.0, 5.0, 1.0]]), r_min=3.0, aspect=0.5)
        tensor([[ 6., 14.,  3.,  7.]])
    """
    x_c, y_c, r = theta.unbind(-1)
    r_total = _as_batch(r_min, theta) + r
    half_h = aspect * r_total
    return torch.stack((x_c - r_total, x_c + r_total, y_c - half_h, y_c + half_h), dim=-1)


def edge_jacobian(aspect: float, like: Tensor) -> Tensor:
    """d(x1, x2, y1, y2) / d(x_c, y_c, r): the constant 4x3 matrix M of :func:`box_edges`."""
    return like.new_tensor(
        [[1.0, 0.0, -1.0], [1.0, 0.0, 1.0], [0.0, 1.0, -aspect], [0.0, 1.0, aspect]]
    )


def edge_profiles(coords: Tensor, low: Tensor, high: Tensor, sharpness: Tensor, order: int) -> Tensor:
    """One axis of the soft rectangle and its derivatives in its two edges.

    ``p(x) = a(x) b(x)``, ``a = sigmoid(g (x - low))``, ``b = sigmoid(g (high - x))``.
    With ``a' = 1 - a`` and ``b' = 1 - b`` (each a sigmoid of its own, no
    cancellation), every row is ``p`` times a factor: ``d/dlow = -g a'``,
    ``d/dhigh = g b'``, ``d2/dlow2 = -g^2 a' tanh(t_a / 2)``, ``d2/dlow dhigh =
    -g^2 a' b'``, ``d2/dhigh2 = -g^2 b' tanh(t_b / 2)``.

    Args:
        coords: Tensor[n] pixel coordinates.
        low, high: Tensor[B] edge positions, or Tensor[B, n], one per coordinate
            (both axes of a box in one call: x coordinates then y coordinates).
        sharpness: Tensor[B] or scalar tensor, g > 0.
        order: 0 -> [p]; 1 -> [p, p_low, p_high];
            2 -> [p, p_low, p_high, p_low_low, p_low_high, p_high_high].

    Returns:
        Tensor[B, 1 | 3 | 6, n].
    """
    g = sharpness.reshape(-1, 1, 1)
    low = low[:, None] if low.dim() == 1 else low
    high = high[:, None] if high.dim() == 1 else high
    return _profiles(torch.stack((coords - low, high - coords), dim=1) * g, g, order)


def _profiles(t: Tensor, g: Tensor, order: int) -> Tensor:
    """:func:`edge_profiles` from ``t`` = Tensor[B, 2, n] = (g (x - low), g (high - x))."""
    if order == 0:
        s = torch.sigmoid(t)
        return (s[:, 0] * s[:, 1])[:, None]
    s = torch.sigmoid(torch.cat((t, -t), dim=1))  # a, b, a', b'
    p = (s[:, 0] * s[:, 1])[:, None]
    first = s[:, 2:] * g
    first[:, 0].neg_()  # -g a', g b'
    if order == 1:
        return p * torch.cat((torch.ones_like(p), first), dim=1)
    curl = torch.tanh(0.5 * t) * g
    curl[:, 1].neg_()  # g tanh(t_a / 2), -g tanh(t_b / 2)
    second = first * curl
    cross = first[:, :1] * first[:, 1:]
    return p * torch.cat((torch.ones_like(p), first, second[:, :1], cross, second[:, 1:]), dim=1)


def soft_rectangle(
    theta: Tensor,
    height: int,
    width: int,
    *,
    r_min: Tensor | float,
    aspect: float,
    sharpness: Tensor | float,
) -> Tensor:
    """The full soft rectangle ``z`` (paper eq. 2) sampled on the saliency grid.

    Builds the dense H x W field for display and for reference checks; the cost
    itself never needs it (see :func:`dac.functional.dac_cost`).

    Args:
        theta: Tensor[B, 3] = (x_c, y_c, r), saliency-pixel coordinates.
        height, width: size (h, w) of the grid; pixel ``j`` at coordinate ``j``.
        r_min: minimum half-width, float or Tensor[B]; ``r_total = r_min + r``.
        aspect: box height / width.
        sharpness: gamma > 0 of the sigmoids, float or Tensor[B].

    Returns:
        Tensor[B, h, w] with values in (0, 1).

    Examples:
        >>> z = soft_rectangle(torch.tensor([[74.0, 40.0, 0.0]]), 80, 148,
        ...                    r_min=30.0, aspect=0.5, sharpness=10.0)
        >>> z.shape, round(z[0, 40, 74].item(), 3), round(z[0, 0, 0].item(), 3)
        (torch.Size([1, 80, 148]), 1.0, 0.0)
    """
    check_theta(theta)
    height, width = check_int(height, "height", 1), check_int(width, "width", 1)
    check_positive(aspect, "aspect")
    gamma = _positive_batch(sharpness, "sharpness", theta)
    x1, x2, y1, y2 = box_edges(theta, _positive_batch(r_min, "r_min", theta), aspect).unbind(-1)
    xs = torch.arange(width, dtype=theta.dtype, device=theta.device)
    ys = torch.arange(height, dtype=theta.dtype, device=theta.device)
    u = edge_profiles(xs, x1, x2, gamma, 0)[:, 0]
    v = edge_profiles(ys, y1, y2, gamma, 0)[:, 0]
    return v[:, :, None] * u[:, None, :]


def _as_batch(value: Tensor | float, like: Tensor) -> Tensor:
    """A float, Tensor[] or Tensor[B] (or [B, 1]) as Tensor[B] on ``like``'s device/dtype."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    return t.expand(like.shape[0]) if t.numel() == 1 else t.reshape(like.shape[0])


def _positive_batch(value: Tensor | float, name: str, like: Tensor) -> Tensor:
    """A number, Tensor[] or Tensor[B] of finite values > 0, as Tensor[B] like ``like``."""
    if not isinstance(value, Tensor):
        check_positive(value, name)
    try:
        values = _as_batch(value, like)
    except RuntimeError:
        raise DACInputError(f"{name}: expected a number or Tensor[{like.shape[0]}], got shape {tuple(value.shape)}") from None
    if not bool((values > 0).all()) or not bool(torch.isfinite(values).all()):
        raise DACInputError(f"{name}: expected finite values > 0")
    return values
