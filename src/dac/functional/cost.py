"""The DAC cost (paper eq. 3), its gradient and its Hessian in theta = (x_c, y_c, r).

With the soft rectangle ``z = v u^T`` (see :mod:`dac.functional.rectangle`) and
saliency ``S`` (h x w, N = h w pixels, T = sum S):

    U = sum u,  V = sum v,  Z = sum z = U V,  A = sum S z = v^T S u
    f_in = A / Z,   f_out = (T - A) / (N - Z),   f = f_in / (f_out + 1)

so one evaluation costs one mat-vec, never an h x w sigmoid field. Derivatives in the
four edges (x1, x2, y1, y2) come from the same mat-vecs applied to the edge
derivatives of u and v, and map to theta through the constant matrix
``M = d(edges)/d(theta)``: ``grad = M^T grad_e``, ``H = M^T H_e M``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import DACInputError, check_positive, check_saliency, check_theta
from .rectangle import _positive_batch, _profiles, box_edges, edge_jacobian

__all__ = ["dac_cost", "dac_cost_derivatives"]


def dac_cost(
    theta: Tensor,
    saliency: Tensor,
    *,
    r_min: Tensor | float,
    aspect: float,
    sharpness: Tensor | float,
) -> Tensor:
    """The DAC cost ``f = f_in / (f_out + 1)`` (paper eq. 3), evaluated separably.

    Convention: ``theta`` = (x_c, y_c, r) in saliency-pixel coordinates (pooled pixel
    ``j`` at coordinate ``j``); half-width ``r_min + r``, half-height
    ``aspect * (r_min + r)``.

    Args:
        theta: Tensor[B, 3].
        saliency: Tensor[B, 1, h, w] (or [B, h, w]), values >= 0, e.g. from
            :func:`dac.functional.max_min_pool` times a saliency scale.
        r_min: minimum half-width in saliency pixels, float or Tensor[B].
        aspect: box height / width (> 0).
        sharpness: gamma > 0 of the sigmoids, float or Tensor[B].

    Returns:
        Tensor[B], differentiable in ``theta`` and ``saliency``.

    Examples:
        >>> s = torch.zeros(1, 1, 20, 40); s[..., 5:15, 10:30] = 1.0
        >>> dac_cost(torch.tensor([[19.5, 9.5, 0.0]]), s, r_min=10.0, aspect=0.5,
        ...          sharpness=5.0).item() > 0.9
        True
    """
    f, _, _ = dac_cost_derivatives(
        theta, saliency, r_min=r_min, aspect=aspect, sharpness=sharpness, order=0
    )
    return f


def dac_cost_derivatives(
    theta: Tensor,
    saliency: Tensor,
    *,
    r_min: Tensor | float,
    aspect: float,
    sharpness: Tensor | float,
    order: int = 2,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The cost with its closed-form gradient and Hessian in theta.

    Same arguments and convention as :func:`dac_cost`, plus ``order`` (0, 1 or 2).

    Returns:
        ``(f, grad, hess)``: Tensor[B]; Tensor[B, 3] or None when ``order`` < 1;
        Tensor[B, 3, 3] or None when ``order`` < 2. All differentiable (autograd
        through them gives third derivatives, used by unrolled backward modes).

    Examples:
        >>> s = torch.rand(2, 1, 30, 50, dtype=torch.float64)
        >>> th = torch.tensor([[25.0, 15.0, 2.0], [20.0, 14.0, 1.0]], dtype=torch.float64)
        >>> f, g, H = dac_cost_derivatives(th, s, r_min=10.0, aspect=0.5, sharpness=0.5)
        >>> g.shape, H.shape, torch.allclose(H, H.transpose(1, 2))
        (torch.Size([2, 3]), torch.Size([2, 3, 3]), True)
    """
    saliency = check_saliency(saliency)
    batch, h, w = saliency.shape
    check_theta(theta, batch)
    check_positive(aspect, "aspect")
    if order not in (0, 1, 2):
        raise DACInputError(f"order: expected 0, 1 or 2, got {order!r}")
    if theta.dtype != saliency.dtype or theta.device != saliency.device:
        raise DACInputError(
            f"theta: dtype/device {theta.dtype}/{theta.device} differ from saliency's "
            f"{saliency.dtype}/{saliency.device}"
        )
    gamma = _positive_batch(sharpness, "sharpness", theta)
    return _cost_derivatives(theta, saliency, _positive_batch(r_min, "r_min", theta), float(aspect), gamma, order)


class CostGrid(NamedTuple):
    """What every evaluation on an h x w grid shares, built once per search.

    One profile tensor serves both axes: its ``n = w + h`` columns are the x
    coordinates ``0 .. w-1`` then the y coordinates ``0 .. h-1``. ``edges @ select``
    puts each column's low edge (x1 or y1) in the first row and its negated high
    edge (-x2 or -y2) in the second, so ``coords - edges @ select`` is
    ``(x - low, high - x)``. ``m_edges`` is M = d(edges)/d(theta). ``picks`` are the
    flat positions, in the 6 x 6 tables of profile products (``q`` and ``o`` in
    :func:`_cost_derivatives`), of the 4 first and 16 second edge derivatives;
    ``picks_first`` those of the first ones in the 3 x 3 tables of order 1.
    """

    coords: Tensor  #: Tensor[2, n] = (c, -c)
    select: Tensor  #: Tensor[4, 2 n]
    m_edges: Tensor  #: Tensor[4, 3]
    picks: Tensor  #: Tensor[20] long
    picks_first: Tensor  #: Tensor[4] long


def _edge_picks(rows: int) -> list[int]:
    """Flat positions ``rows i + j`` (i a row of the y profiles, j of the x profiles; rows
    0 value, 1 d/low, 2 d/high, 3 d2/low2, 4 d2/low/high, 5 d2/high2) of the first
    derivatives in the edges (x1, x2, y1, y2), then of the second, row-major 4 x 4."""
    second = ((3, 4), (4, 5))  # the row of d2/(low or high)(low or high) of one axis

    def at(e: int, f: int) -> tuple[int, int]:  # (y row, x row) of d2 / d edge_e d edge_f
        xs, ys = [k for k in (e, f) if k < 2], [k - 2 for k in (e, f) if k >= 2]
        if not ys:  # both x edges: v itself times u's second derivative
            return 0, second[xs[0]][xs[1]]
        if not xs:
            return second[ys[0]][ys[1]], 0
        return 1 + ys[0], 1 + xs[0]  # one of each: both first derivatives

    first = [(0, 1), (0, 2), (1, 0), (2, 0)]
    if rows == 3:
        return [3 * i + j for i, j in first]
    return [6 * i + j for i, j in first + [at(e, f) for e in range(4) for f in range(4)]]


def cost_grid(h: int, w: int, aspect: float, like: Tensor) -> CostGrid:
    """The :class:`CostGrid` of an h x w map, on ``like``'s device and dtype."""
    kw = {"dtype": like.dtype, "device": like.device}
    c = torch.cat((torch.arange(w, **kw), torch.arange(h, **kw)))
    n = w + h
    select = torch.zeros(4, 2, n, **kw)
    select[0, 0, :w] = 1.0  # x1
    select[2, 0, w:] = 1.0  # y1
    select[1, 1, :w] = -1.0  # -x2
    select[3, 1, w:] = -1.0  # -y2
    picks = [torch.tensor(_edge_picks(rows), dtype=torch.long, device=like.device) for rows in (6, 3)]
    return CostGrid(torch.stack((c, -c)), select.reshape(4, 2 * n), edge_jacobian(aspect, like), *picks)


def _cost_derivatives(
    theta: Tensor,
    saliency: Tensor,
    r_min: Tensor,
    aspect: float,
    gamma: Tensor,
    order: int,
    grid: CostGrid | None = None,
    total: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Unchecked core of :func:`dac_cost_derivatives`; saliency is Tensor[B, h, w].

    A search evaluates the cost hundreds of times on one map: it passes the map's
    ``grid`` (:func:`cost_grid`) and ``total`` (``saliency.sum((1, 2))``) once, so
    that each evaluation is a few fused operations and two small matrix products.

    ``theta`` may hold K boxes per map, Tensor[B K, 3] (rows ``b K .. b K + K - 1`` on
    map b; r_min and gamma Tensor[B K]): a global search polishes several candidates
    per map without copying the map K times.
    """
    maps, h, w = saliency.shape
    per_map = theta.shape[0] // maps
    if grid is None:
        grid = cost_grid(h, w, aspect, theta)
    edges = box_edges(theta, r_min, aspect)
    # Both axes' profiles in one tensor: u and its edge derivatives over x, then v over y.
    g = gamma.reshape(-1, 1, 1)
    t = (grid.coords - (edges @ grid.select).reshape(-1, 2, w + h)) * g
    prof = _profiles(t, g, order)
    px, py = prof[..., :w], prof[..., w:]  # [B, k, w], [B, k, h]
    # Q[b, i, j] = py_i^T S px_j: every sum of S z and of its edge derivatives. The
    # profiles' few rows first (py S: a product with 1-6 rows): S px^T, a product with
    # 1-6 columns, is slower on CPU (8 x 153 x 283 on 2 threads: 0.21 ms against 0.11,
    # and 3.8 against 0.24 while another job shares the cores).
    if per_map == 1:
        q = (py @ saliency) @ px.transpose(1, 2)
    else:  # K boxes' rows against one map in one product: [B, K k, h] @ [B, h, w]
        rows = py.shape[1]
        q = (py.reshape(maps, per_map * rows, h) @ saliency).reshape(-1, rows, w) @ px.transpose(1, 2)
    sx, sy = px.sum(-1), py.sum(-1)  # sums of u, v and of their derivatives
    n = float(h * w)
    total = saliency.sum(dim=(1, 2)) if total is None else total
    if per_map > 1:
        total = total.repeat_interleave(per_map)

    area_in = q[:, 0, 0]  # A
    u_sum, v_sum = sx[:, 0], sy[:, 0]
    z_sum = u_sum * v_sum  # Z
    tiny = torch.finfo(theta.dtype).tiny
    eps = torch.finfo(theta.dtype).eps
    # Z in (0, N) and T >= A hold exactly; the clamps only absorb rounding
    # (a sharp box that fills the grid in float32).
    outside = (n - z_sum).clamp_min(eps * n)
    rest = (total - area_in).clamp_min(0.0)
    k_sum = rest + outside  # K = T + N - A - Z > 0
    m = outside / (z_sum.clamp_min(tiny) * k_sum)
    f = area_in * m  # = (A/Z) / ((T-A)/(N-Z) + 1)
    if order == 0:
        return f, None, None

    # Derivatives of f in (A, Z), written without dividing by A (A = 0 on blank maps).
    inv_k, inv_out, inv_z = 1.0 / k_sum, 1.0 / outside, 1.0 / z_sum
    lam = -inv_out - inv_z + inv_k  # d log m / dZ
    f_a = m * (1.0 + area_in * inv_k)
    f_z = area_in * m * lam

    # Derivatives of A and Z in the edges (x1, x2, y1, y2), read off two 6 x 6 tables at
    # grid.picks: q[i, j] = py_i^T S px_j holds every one of A (A = v^T S u), and
    # o[i, j] = (sum py_i)(sum px_j) every one of Z = (sum v)(sum u), at the same places.
    o = sy[:, :, None] * sx[:, None, :]
    picks = grid.picks_first if order == 1 else grid.picks
    picked = torch.stack((q, o), dim=1).flatten(2).index_select(2, picks)  # [B, 2, 4 or 20]
    a_e, z_e = picked[:, 0, :4], picked[:, 1, :4]
    m_edges = grid.m_edges
    grad = (f_a[:, None] * a_e + f_z[:, None] * z_e) @ m_edges
    if order == 1:
        return f, grad, None

    lam_z = -inv_out.square() + inv_z.square() + inv_k.square()
    f_aa = 2.0 * m * inv_k * (1.0 + area_in * inv_k)
    f_az = m * lam + area_in * m * (lam * inv_k + inv_k.square())
    f_zz = area_in * m * (lam.square() + lam_z)
    a_ee, z_ee = picked[:, 0, 4:].reshape(-1, 4, 4), picked[:, 1, 4:].reshape(-1, 4, 4)

    def outer(p: Tensor, r: Tensor) -> Tensor:
        return p[:, :, None] * r[:, None, :]

    hess_e = (
        f_aa[:, None, None] * outer(a_e, a_e)
        + f_az[:, None, None] * (outer(a_e, z_e) + outer(z_e, a_e))
        + f_zz[:, None, None] * outer(z_e, z_e)
        + f_a[:, None, None] * a_ee
        + f_z[:, None, None] * z_ee
    )
    hess = m_edges.T @ hess_e @ m_edges
    return f, grad, hess
