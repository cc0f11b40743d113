"""The DAC cost (paper eq. 3) of every box on a grid over the feasible set, at once.

A global search needs f at many boxes. Two facts make that cheap:

* **Separability** (:mod:`dac.functional.cost`): ``z = v u^T``, so ``A = sum S z =
  v^T S u`` and ``Z = (sum u)(sum v)``.
* **A soft rectangle is a difference of two soft steps.** With ``c = g (x2 - x1)``,
  ``u(x) = s(g (x - x1)) s(g (x2 - x)) = (s(g (x - x1)) - s(g (x - x2))) / (1 - e^-c)``
  exactly (s the logistic sigmoid; multiply out both sides). So the soft sum of S over
  *any* box comes from four values of one "soft integral image"

      G(a, b) = sum_{y,x} S(y, x) s(g (x - a)) s(g (y - b))  =  Ly^T S Lx,

  ``A = (G(x1, y1) - G(x2, y1) - G(x1, y2) + G(x2, y2)) / ((1 - e^-2gR)(1 - e^-2gaR))``,
  as an integral image gives a hard box's sum from its four corners.

The grid is laid so that every box edge lies on one of four lattices: ``r`` in steps
of ``d / 2``, ``x_c`` in steps of ``d`` from its lower bound, ``y_c`` in steps of
``aspect * d`` from its lower bound. Then left edges ``x1 = -1/2 + j d`` and right
edges ``x2 = x1 + 2 (r_min + r) = 2 r_min - 1/2 + (j + k) d`` (k the r index) take
``n_x`` values each, likewise the top and bottom edges; G is needed only on those
``2 n_y x 2 n_x`` lattice points: two matrix products per map,
``(2 n_y x h) (h x w) (w x 2 n_x)``, and every one of the ``n_r n_y n_x`` boxes is
four look-ups. ``d`` is the requested step shrunk so that it divides the range of
``x_c`` at r = 0 (``w - 2 r_min``): at every r the grid spans ``x_c`` from bound to
bound; ``y_c`` starts at its upper bound (top of the image) and ends within one step
of its lower one.

Feasible set and conventions as in :mod:`dac.functional.stationarity`: ``theta`` =
(x_c, y_c, r) in saliency pixels (pooled pixel ``j`` at coordinate ``j``),
``0 <= r <= r_hi``, the box inside ``[-1/2, w - 1/2] x [-1/2, h - 1/2]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import DACInputError, check_int, check_positive, check_saliency

__all__ = ["BoxGrid", "grid_cost", "grid_candidates"]


class BoxGrid(NamedTuple):
    """The lattice of :func:`grid_cost`: box ``(k, i, j)`` is
    ``r = k step_r``, ``x_c = r_min + r - 1/2 + j step_x``,
    ``y_c = aspect (r_min + r) - 1/2 + i step_y``; it is feasible iff
    ``j + k < n_x`` and ``i + k < n_y``."""

    n_r: int
    n_y: int
    n_x: int
    step_r: float
    step_y: float
    step_x: float
    r_min: float
    aspect: float

    def thetas(self, index: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """(x_c, y_c, r) of boxes given by flat (long) indices ``(k n_y + i) n_x + j``:
        Tensor[..., 3] in ``dtype`` (default: the default dtype)."""
        dtype = dtype or torch.get_default_dtype()
        k = torch.div(index, self.n_y * self.n_x, rounding_mode="floor").to(dtype)
        i = (torch.div(index, self.n_x, rounding_mode="floor") % self.n_y).to(dtype)
        j = (index % self.n_x).to(dtype)
        r = k * self.step_r
        r_total = self.r_min + r
        x_c = r_total - 0.5 + j * self.step_x
        y_c = self.aspect * r_total - 0.5 + i * self.step_y
        return torch.stack((x_c, y_c, r), dim=-1)


def box_grid(h: int, w: int, r_min: float, aspect: float, step: float) -> BoxGrid:
    """The lattice of boxes over the feasible set of an h x w map (see module doc)."""
    x_range = max(w - 2.0 * r_min, 0.0)  # x_hi - x_lo at r = 0
    y_range = max(h - 2.0 * aspect * r_min, 0.0)
    if x_range < step:  # less than one step of room: one column of centres, r = 0 only
        n_x, step_x = 1, step
    else:
        n_x = math.ceil(x_range / step - 1e-9) + 1
        step_x = x_range / (n_x - 1)
    step_y = aspect * step_x
    n_y = math.floor(y_range / step_y + 1e-9) + 1
    return BoxGrid(min(n_x, n_y), n_y, n_x, step_x / 2.0, step_y, step_x, float(r_min), float(aspect))


def grid_cost(
    saliency: Tensor,
    *,
    r_min: float,
    aspect: float,
    sharpness: float,
    step: float = 4.0,
    chunk_elements: int | None = None,
) -> tuple[Tensor, BoxGrid]:
    """f (paper eq. 3) of every box of a lattice over the feasible set.

    Convention: boxes are ``theta`` = (x_c, y_c, r) in saliency pixels (pooled pixel
    ``j`` at coordinate ``j``); half-width ``r_min + r``, half-height
    ``aspect * (r_min + r)``; see :class:`BoxGrid` for which box each entry is.

    Args:
        saliency: Tensor[B, 1, h, w] (or [B, h, w]), values >= 0.
        r_min: minimum half-width (one value for the batch), ``<= min(w, h / aspect) / 2``.
        aspect: box height / width.
        sharpness: gamma > 0 of the sigmoids.
        step: spacing of the boxes' left (and right) edges, saliency pixels; it is
            shrunk to divide the centre's range (r steps are half of it, y_c steps
            ``aspect`` times it).
        chunk_elements: largest number of grid entries (over the batch) computed at
            once (None: about 2 maps' worth); bounds the temporary memory.

    Returns:
        ``(cost, grid)``: cost Tensor[B, n_r, n_y, n_x] in the saliency's dtype, -inf
        at infeasible entries; grid the :class:`BoxGrid`.

    Example:
        >>> s = torch.zeros(1, 1, 20, 40); s[..., 5:15, 10:30] = 1.0
        >>> cost, grid = grid_cost(s, r_min=8.0, aspect=0.5, sharpness=2.0, step=2.0)
        >>> grid.thetas(cost.flatten(1).argmax(1))  # x_c, y_c, r of the best box
        tensor([[19.5000,  9.5000,  0.0000]])
    """
    saliency = check_saliency(saliency)
    _, h, w = saliency.shape
    check_positive(aspect, "aspect")
    check_positive(sharpness, "sharpness")
    check_positive(step, "step")
    r_min = check_positive(r_min, "r_min")
    if r_min > min(w, h / aspect) / 2 + 1e-9:
        raise DACInputError(f"r_min: {r_min} does not fit a {h} x {w} map at aspect {aspect} (at most {min(w, h / aspect) / 2})")
    if chunk_elements is not None:
        check_int(chunk_elements, "chunk_elements", 1)
    if bool((saliency < 0).any()):
        raise DACInputError("saliency: expected values >= 0")
    return _grid_cost(saliency, float(r_min), float(aspect), float(sharpness), float(step), chunk_elements)


def _grid_cost(
    saliency: Tensor, r_min: float, aspect: float, gamma: float, step: float, chunk_elements: int | None = None
) -> tuple[Tensor, BoxGrid]:
    """Unchecked core of :func:`grid_cost`; saliency is Tensor[B, h, w]."""
    batch, h, w = saliency.shape
    grid = box_grid(h, w, r_min, aspect, step)
    n_r, n_y, n_x = grid.n_r, grid.n_y, grid.n_x
    kw = {"dtype": saliency.dtype, "device": saliency.device}
    j = torch.arange(n_x, **kw)
    i = torch.arange(n_y, **kw)
    # Edge lattices: left edges, then right edges (x); top, then bottom (y).
    x_edges = torch.cat((j * grid.step_x - 0.5, j * grid.step_x + (2 * r_min - 0.5)))
    y_edges = torch.cat((i * grid.step_y - 0.5, i * grid.step_y + (2 * aspect * r_min - 0.5)))
    step_x = torch.sigmoid(gamma * (torch.arange(w, **kw)[:, None] - x_edges))  # [w, 2 n_x]
    step_y = torch.sigmoid(gamma * (torch.arange(h, **kw)[:, None] - y_edges))  # [h, 2 n_y]
    # G = Ly^T S Lx on the lattice, padded by n_r zeros so that shifted views stay inside.
    soft = step_y.T @ (saliency @ step_x)  # [B, 2 n_y, 2 n_x]
    padded = soft.new_zeros(batch, 2 * n_y + n_r, 2 * n_x + n_r)
    padded[:, : 2 * n_y, : 2 * n_x] = soft
    sum_x = torch.cat((step_x.sum(0), step_x.new_zeros(n_r)))  # soft steps of the ones map
    sum_y = torch.cat((step_y.sum(0), step_y.new_zeros(n_r)))

    r_total = r_min + torch.arange(n_r, **kw) * grid.step_r
    norm_x = 1.0 / -torch.expm1(-2.0 * gamma * r_total)  # 1 / (1 - e^-c), c = g (x2 - x1)
    norm_y = 1.0 / -torch.expm1(-2.0 * gamma * aspect * r_total)
    k_all = torch.arange(n_r, device=saliency.device)
    # Sums of u over every (k, j) and of v over every (k, i): Tensor[n_r, n_x], [n_r, n_y].
    u_sum = (sum_x[:n_x] - sum_x[n_x + j.long() + k_all[:, None]]) * norm_x[:, None]
    v_sum = (sum_y[:n_y] - sum_y[n_y + i.long() + k_all[:, None]]) * norm_y[:, None]
    valid = ((j.long() + k_all[:, None, None]) < n_x) & ((i.long() + k_all[:, None])[:, :, None] < n_y)

    total = saliency.sum(dim=(1, 2)).reshape(batch, 1, 1, 1)
    n = float(h * w)
    eps = torch.finfo(saliency.dtype).eps
    cost = torch.empty(batch, n_r, n_y, n_x, **kw)
    per_level = batch * n_y * n_x
    budget = chunk_elements if chunk_elements is not None else max(2 * batch * h * w, per_level)
    levels = max(1, budget // per_level)
    s_b, s_row = padded.stride(0), padded.stride(1)
    for k0 in range(0, n_r, levels):
        k1 = min(n_r, k0 + levels)
        size = (batch, k1 - k0, n_y, n_x)

        def corner(row: int, col: int, row_k: int, col_k: int) -> Tensor:
            # padded[b, row + i + row_k k, col + j + col_k k] for k in [k0, k1): a view.
            offset = padded.storage_offset() + (row + row_k * k0) * s_row + col + col_k * k0
            return padded.as_strided(size, (s_b, row_k * s_row + col_k, s_row, 1), offset)

        area_in = corner(0, 0, 0, 0) - corner(0, n_x, 0, 1)
        area_in = area_in - corner(n_y, 0, 1, 0)
        area_in = area_in + corner(n_y, n_x, 1, 1)
        area_in = area_in * (norm_x[k0:k1] * norm_y[k0:k1])[None, :, None, None]  # A
        z_sum = v_sum[None, k0:k1, :, None] * u_sum[None, k0:k1, None, :]  # Z
        # f = (A / Z) / ((T - A) / (N - Z) + 1), with the clamps of the separable cost.
        outside = (n - z_sum).clamp_min(eps * n)
        f = area_in * outside / (z_sum * ((total - area_in).clamp_min(0.0) + outside))
        cost[:, k0:k1] = torch.where(valid[None, k0:k1], f, torch.full_like(f, float("-inf")))
    return cost, grid


def grid_candidates(
    saliency: Tensor,
    *,
    r_min: float,
    aspect: float,
    sharpness: float,
    step: float = 4.0,
    count: int = 4,
) -> tuple[Tensor, Tensor]:
    """The ``count`` best local maxima of f on the :func:`grid_cost` lattice, per map.

    A grid box is a local maximum when no feasible neighbour (one lattice step in any
    of r, y_c, x_c, diagonals included) has a higher f. The best ``count`` of them are
    returned in lattice order (r, then y_c, then x_c), not by f: the order is fixed
    by the map, whatever the device. Maps with fewer local maxima repeat their best.

    Convention: ``theta`` = (x_c, y_c, r) in saliency pixels, as in :func:`grid_cost`.

    Args:
        saliency: Tensor[B, 1, h, w] (or [B, h, w]), values >= 0.
        r_min, aspect, sharpness, step: as in :func:`grid_cost`.
        count: number of candidates per map (>= 1).

    Returns:
        ``(thetas, cost)``: Tensor[B, count, 3] and their f, Tensor[B, count].

    Example:
        >>> s = torch.zeros(1, 1, 20, 60); s[..., 4:16, 2:22] = 1.0; s[..., 4:16, 38:58] = 1.0
        >>> thetas, cost = grid_candidates(s, r_min=10.0, aspect=0.5, sharpness=2.0, step=2.0, count=2)
        >>> thetas[0, :, 0]  # x_c of the two separate maxima (left and right blocks)
        tensor([11.5000, 47.5000])
    """
    saliency = check_saliency(saliency)
    count = check_int(count, "count", 1)
    cost, grid = grid_cost(saliency, r_min=r_min, aspect=aspect, sharpness=sharpness, step=step)
    return _candidates(cost, grid, count)


def _grid_candidates(
    saliency: Tensor, r_min: float, aspect: float, gamma: float, step: float, count: int
) -> tuple[Tensor, Tensor]:
    """Unchecked core of :func:`grid_candidates`; saliency is Tensor[B, h, w]."""
    cost, grid = _grid_cost(saliency, r_min, aspect, gamma, step)
    return _candidates(cost, grid, count)


def _candidates(cost: Tensor, grid: BoxGrid, count: int) -> tuple[Tensor, Tensor]:
    """Top ``count`` local maxima of ``cost`` [B, n_r, n_y, n_x], in lattice order."""
    batch = cost.shape[0]
    # 3 x 3 x 3 running maximum, one axis at a time (-inf outside the lattice).
    peak = cost
    for dim in (1, 2, 3):
        pad = [0, 0] * (3 - dim) + [1, 1]
        ext = torch.nn.functional.pad(peak, pad, value=float("-inf"))
        n = peak.shape[dim]
        peak = torch.maximum(torch.maximum(ext.narrow(dim, 0, n), ext.narrow(dim, 1, n)), ext.narrow(dim, 2, n))
    flat = torch.where((cost >= peak) & (cost > float("-inf")), cost, torch.full_like(cost, float("-inf"))).flatten(1)
    count_ = min(count, flat.shape[1])
    values, index = flat.topk(count_, dim=1)
    best = index[:, :1].expand_as(index)
    index = torch.where(values > float("-inf"), index, best)  # fewer maxima than asked: repeat the best
    index, _ = index.sort(dim=1)
    if count_ < count:
        index = torch.cat((index, index[:, :1].expand(batch, count - count_)), dim=1)
    values = cost.flatten(1).gather(1, index)
    return grid.thetas(index, cost.dtype), values
