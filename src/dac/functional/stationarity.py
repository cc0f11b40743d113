"""Where the search stops: centre shifting, held bounds, and the stationarity residual.

The box must stay in the image. With ``R = r_min + r`` and the saliency grid spanning
``[-0.5, w - 0.5] x [-0.5, h - 0.5]`` (pixel ``j`` at ``j``), the feasible set is

    0 <= r <= r_hi,   R - 0.5 <= x_c <= w - 0.5 - R,   a R - 0.5 <= y_c <= h - 0.5 - a R

with ``r_hi = min(w / 2, h / (2 a)) - r_min``. The paper keeps the box there by
"centre shifting" and ``|r|``: :func:`shift_into_image`. The search is a fixed point of
``theta <- shift(theta + eta grad f)``, which heads for the maximum of f over the
feasible set. At that maximum (a KKT point) each coordinate is either *free* or
*held* on a bound the gradient pushes against; a held centre coordinate moves with
r (its bound does). With ``T`` the 3x3 matrix whose columns say how theta moves per
free coordinate, :func:`stationarity_residual` writes the optimum as a square system
``F(theta; S) = 0``: ``F_i = (T^T grad f)_i`` for free coordinates (the reduced
gradient) and ``F_i = k (theta_i - bound_i(theta))`` for held ones, k = max|H| so
the rows are on one scale. Its Jacobian has rows ``(T^T H)_i`` and the bounds'
normals, so ``-J^-1 dF/dS = -T (T^T H T)^-1 T^T d(grad f)/dS`` is the
implicit-function derivative of the box on the reduced problem.

Where the reduced Hessian is not negative definite (a blank image, a flat or saddle
region) the box is not a strict maximum and has no derivative: such rows are *frozen*,
``F = k (theta - stop_grad(theta))``, so the box's gradient is zero there, by definition.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cost import CostGrid, _cost_derivatives

__all__ = ["active_set", "shift_into_image", "stationarity_residual", "Stationarity"]


def r_upper(h: int, w: int, r_min: Tensor, aspect: float) -> Tensor:
    """Largest r for which the box fits the h x w grid (>= 0 when r_min fits)."""
    return (min(w / 2.0, h / (2.0 * aspect)) - r_min).clamp_min(0.0)


def centre_bounds(theta: Tensor, h: int, w: int, r_min: Tensor, aspect: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_lo, x_hi, y_lo, y_hi): the range of (x_c, y_c) that keeps the box inside."""
    return _centre_range(r_min + theta[:, 2], h, w, aspect)


def _centre_range(r_total: Tensor, h: int, w: int, aspect: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`centre_bounds` of half-width ``r_total`` = r_min + r, Tensor[B]."""
    half_h = aspect * r_total
    return r_total - 0.5, w - 0.5 - r_total, half_h - 0.5, h - 0.5 - half_h


def shift_into_image(
    theta: Tensor, h: int, w: int, r_min: Tensor, aspect: float, *, reflect: bool = True
) -> Tensor:
    """Paper's guards: ``r <- |r|`` (or ``max(r, 0)`` when ``reflect`` is False),
    ``r <= r_hi``, then shift the centre so the box lies inside the grid.

    Args:
        theta: Tensor[B, 3] = (x_c, y_c, r), saliency-pixel coordinates.
        h, w: saliency grid size.
        r_min: Tensor[B], minimum half-width (must fit the grid).
        aspect: box height / width.

    Returns:
        Tensor[B, 3], feasible; differentiable almost everywhere.
    """
    r = theta[:, 2].abs() if reflect else theta[:, 2].clamp_min(0.0)
    r = torch.minimum(r, r_upper(h, w, r_min, aspect))
    x_lo, x_hi, y_lo, y_hi = _centre_range(r_min + r, h, w, aspect)
    x_c = torch.minimum(torch.maximum(theta[:, 0], x_lo), x_hi)
    y_c = torch.minimum(torch.maximum(theta[:, 1], y_lo), y_hi)
    return torch.stack((x_c, y_c, r), dim=-1)


@dataclass
class Stationarity:
    """Result of :func:`stationarity_residual` (all batched)."""

    residual: Tensor  #: F, Tensor[B, 3]
    jacobian: Tensor  #: dF/dtheta, Tensor[B, 3, 3]
    cost: Tensor  #: f, Tensor[B]
    grad: Tensor  #: grad f, Tensor[B, 3]
    hess: Tensor  #: Hessian of f, Tensor[B, 3, 3]
    held: Tensor  #: Tensor[B, 3] int: -1 held at lower bound, +1 at upper, 0 free
    frozen: Tensor  #: Tensor[B] bool: no strict maximum, box treated as constant
    curvature: Tensor  #: Tensor[B]: largest eigenvalue of the reduced Hessian (< 0 at a strict max)
    scale: Tensor  #: Tensor[B]: k = max |H| (1 where H = 0), the scale of held rows


def held_bounds(theta: Tensor, grad: Tensor, h: int, w: int, r_min: Tensor, aspect: float) -> Tensor:
    """Which bounds are active with a positive multiplier (KKT) at ``theta``.

    A centre coordinate is held when it sits on its bound and its own gradient points
    out of the image (its multiplier is that gradient). ``r`` is held at 0 (or at
    ``r_hi``) when the gradient along the move that changes r, with held centres
    following their bounds, points out of ``[0, r_hi]``.

    Returns:
        Tensor[B, 3] int8 in {-1, 0, +1} for (x_c, y_c, r).
    """
    tol = 64 * torch.finfo(theta.dtype).eps * float(max(h, w))
    # Both centre coordinates at once: columns (x_c, y_c).
    x_lo, x_hi, y_lo, y_hi = centre_bounds(theta, h, w, r_min, aspect)
    low_bound, high_bound = torch.stack((x_lo, y_lo), dim=-1), torch.stack((x_hi, y_hi), dim=-1)
    centre, g_centre = theta[:, :2], grad[:, :2]
    # A box as wide (tall) as the image has no room to move: its centre is held
    # whichever way the gradient points.
    pinned = high_bound - low_bound <= tol
    low = (centre - low_bound <= tol) & ((g_centre < 0) | (pinned & (g_centre <= 0)))
    high = (high_bound - centre <= tol) & ((g_centre > 0) | pinned) & ~low
    held = torch.zeros(theta.shape, dtype=torch.int8, device=theta.device)
    held[:, :2] = high.to(torch.int8) - low.to(torch.int8)
    g_reduced = (_follow_r(held, aspect, theta.dtype) * grad).sum(-1)
    r = theta[:, 2]
    r_low = (r <= tol) & (g_reduced < 0)
    r_high = (r >= r_upper(h, w, r_min, aspect) - tol) & (g_reduced > 0) & ~r_low
    held[:, 2] = r_high.to(torch.int8) - r_low.to(torch.int8)
    return held


def _follow_r(held: Tensor, aspect: float, dtype: torch.dtype) -> Tensor:
    """d theta / d r when held centre coordinates follow their bounds: Tensor[B, 3].

    x_lo = R - 1/2 and x_hi = w - 1/2 - R move by +1 / -1 per unit of r;
    y_lo, y_hi by +aspect / -aspect.
    """
    sign = held[:, :2].to(dtype)
    follow = torch.ones(held.shape[0], 3, dtype=dtype, device=held.device)
    follow[:, 0] = -sign[:, 0]
    follow[:, 1] = -sign[:, 1] * aspect
    return follow


def stationarity_residual(
    theta: Tensor,
    saliency: Tensor,
    r_min: Tensor,
    aspect: float,
    sharpness: Tensor,
    freeze: bool = True,
    active: Tensor | None = None,
    grid: CostGrid | None = None,
    total: Tensor | None = None,
) -> Stationarity:
    """F(theta; S) and dF/dtheta (see module doc). Unchecked: callers validate.

    Args:
        theta: Tensor[B, 3]; saliency: Tensor[B, h, w]; r_min, sharpness: Tensor[B].
        freeze: replace the rows of frozen boxes by ``k (theta - stop_grad(theta))``
            (what the implicit gradient uses); False keeps the reduced system
            everywhere (what a solver stepping through a saddle needs).
        active: the active set found at the solution, Tensor[B, 4] = (held x_c,
            held y_c, held r, frozen) as from :func:`active_set`, or None to find it
            at ``theta``. Derivatives taken at a point *near* the solution (Theseus'
            DLM perturbs the box) need the solution's active set: a bound released
            or a box frozen there would change the system discontinuously.
        grid, total: the map's :func:`~dac.functional.cost.cost_grid` and
            ``saliency.sum((1, 2))``, for a caller that evaluates one map many times.
    """
    _, h, w = saliency.shape
    f, grad, hess = _cost_derivatives(theta, saliency, r_min, aspect, sharpness, 2, grid, total)
    with torch.no_grad():
        if active is None:
            held = held_bounds(theta, grad, h, w, r_min, aspect)
        else:
            held = active[:, :3].round().to(torch.int8)
        free = held == 0
        # Columns of T: how theta moves per free coordinate (held centres follow r).
        basis = torch.diag_embed(free.to(theta.dtype))
        basis[:, :, 2] = torch.where(free[:, 2:], _follow_r(held, aspect, theta.dtype), basis[:, :, 2])
        hess_d = hess.detach()
        kappa = hess_d.abs().amax(dim=(1, 2))
        held_diag = torch.diag_embed((~free).to(theta.dtype)) * kappa[:, None, None]
        reduced = basis.transpose(1, 2) @ hess_d @ basis - held_diag
        top = torch.linalg.eigvalsh(reduced)[:, -1]
        frozen = ~(top < -100 * torch.finfo(theta.dtype).eps * kappa) if active is None else active[:, 3] > 0.5
        kappa = torch.where(kappa > 0, kappa, torch.ones_like(kappa))

    # Held rows: k (theta_i - bound_i(theta)), Jacobian rows k (e_i - grad bound_i).
    x_lo, x_hi, y_lo, y_hi = centre_bounds(theta, h, w, r_min, aspect)
    r_hi = r_upper(h, w, r_min, aspect)
    bound = torch.stack(
        (
            torch.where(held[:, 0] < 0, x_lo, x_hi),
            torch.where(held[:, 1] < 0, y_lo, y_hi),
            torch.where(held[:, 2] < 0, torch.zeros_like(r_hi), r_hi),
        ),
        dim=-1,
    )
    k = kappa[:, None]
    basis_t = basis.transpose(1, 2)
    residual = torch.where(free, (basis_t @ grad.unsqueeze(-1)).squeeze(-1), k * (theta - bound))
    eye = torch.eye(3, dtype=theta.dtype, device=theta.device).expand_as(hess)
    bound_rows = eye.clone()
    sign = held.to(theta.dtype)
    bound_rows[:, 0, 2] = sign[:, 0]  # x_c - (R - 0.5) -> -1 ; x_c - (w - 0.5 - R) -> +1
    bound_rows[:, 1, 2] = sign[:, 1] * aspect
    jacobian = torch.where(free[:, :, None], basis_t @ hess, k[:, :, None] * bound_rows)
    if not freeze:
        return Stationarity(residual, jacobian, f, grad, hess, held, frozen, top, kappa)
    # Frozen: F = k (theta - stop_grad(theta)) = 0, J = k I.
    residual = torch.where(frozen[:, None], k * (theta - theta.detach()), residual)
    jacobian = torch.where(frozen[:, None, None], k[:, :, None] * eye, jacobian)
    return Stationarity(residual, jacobian, f, grad, hess, held, frozen, top, kappa)


def active_set(st: Stationarity) -> Tensor:
    """The active set of a solution, Tensor[B, 4] = (held x_c, held y_c, held r, frozen),
    in ``st``'s dtype: what :func:`stationarity_residual` takes as ``active``."""
    return torch.cat((st.held.to(st.cost.dtype), st.frozen.to(st.cost.dtype)[:, None]), dim=-1)
