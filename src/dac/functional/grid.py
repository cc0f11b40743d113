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


#: Most boxes one map's grid may hold: 2^27 (~134 million, ~512 steps along each axis).
#: A finer step asks for more memory and time than a coarse-to-fine search needs (the
#: polish refines the best boxes): a step of 1e-4 on a 20 x 40 map asked for 55 PB.
MAX_GRID_BOXES = 1 << 27


def _check_grid_size(h: int, w: int, r_min: float, aspect: float, step: float, name: str = "step") -> None:
    """Refuse a ``step`` whose lattice over an h x w map would hold more than
    :data:`MAX_GRID_BOXES` boxes, naming the argument ``name`` and a step that fits."""
    x_range, y_range = _centre_ranges(h, w, r_min, aspect)
    try:  # in floats: counts no int could hold
        n_x, n_y = x_range / step + 2, y_range / aspect / step + 2
        boxes = min(n_x, n_y) * n_y * n_x
    except (OverflowError, ZeroDivisionError):
        boxes = math.inf
    if boxes > MAX_GRID_BOXES:
        # boxes ~ (x_range / s) (y_range / (aspect s)) min(...): the s that gives the most allowed
        fits = 1.01 * (min(x_range, y_range / aspect) * x_range * (y_range / aspect) / MAX_GRID_BOXES) ** (1 / 3)
        raise DACInputError(
            f"{name}: a step of {step:g} saliency pixels gives ~{boxes:.3g} grid boxes on a {h} x {w} map, "
            f"more than {MAX_GRID_BOXES}; use a step of at least {fits:.3g}"
        )


def _centre_ranges(h: int, w: int, r_min: float, aspect: float) -> tuple[float, float]:
    """x_hi - x_lo and y_hi - y_lo of the box's centre at r = 0 (0 where it has no room)."""
    return max(w - 2.0 * r_min, 0.0), max(h - 2.0 * aspect * r_min, 0.0)


def box_grid(h: int, w: int, r_min: float, aspect: float, step: float) -> BoxGrid:
    """The lattice of boxes over the feasible set of an h x w map (see module doc)."""
    x_range, y_range = _centre_ranges(h, w, r_min, aspect)
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
            ``aspect`` times it); the lattice holds at most ``MAX_GRID_BOXES`` (2^27).
        chunk_elements: largest number of grid entries (over the batch) computed at
            once (None: a quarter of the maps' size, at least 2^16); bounds the temporary memory.

    Returns:
        ``(cost, grid)``: cost Tensor[B, n_r, n_y, n_x] in the saliency's dtype, -inf
        at infeasible entries; grid the :class:`BoxGrid`.

    Examples:
        >>> s = torch.zeros(1, 1, 20, 40); s[..., 5:15, 10:30] = 1.0
        >>> cost, grid = grid_cost(s, r_min=8.0, aspect=0.5, sharpness=2.0, step=2.0)
        >>> grid.thetas(cost.flatten(1).argmax(1))  # x_c, y_c, r of the best box
        tensor([[19.5000,  9.5000,  0.0000]])
    """
    saliency = _check_grid_args(saliency, r_min, aspect, sharpness, step, chunk_elements)
    return _grid_cost(saliency, float(r_min), float(aspect), float(sharpness), float(step), chunk_elements)


def _check_grid_args(saliency: Tensor, r_min: float, aspect: float, sharpness: float, step: float, chunk_elements: int | None) -> Tensor:
    """The checks of :func:`grid_cost` and :func:`grid_candidates`; the map as Tensor[B, h, w]."""
    saliency = check_saliency(saliency)
    _, h, w = saliency.shape
    check_positive(aspect, "aspect")
    check_positive(sharpness, "sharpness")
    check_positive(step, "step")
    r_min = check_positive(r_min, "r_min")
    if r_min > min(w, h / aspect) / 2 + 1e-9:
        raise DACInputError(f"r_min: {r_min} does not fit a {h} x {w} map at aspect {aspect} (at most {min(w, h / aspect) / 2})")
    _check_grid_size(h, w, r_min, aspect, step)
    if chunk_elements is not None:
        check_int(chunk_elements, "chunk_elements", 1)
    if bool((saliency < 0).any()):
        raise DACInputError("saliency: expected values >= 0")
    return saliency


def _grid_cost(
    saliency: Tensor, r_min: float, aspect: float, gamma: float, step: float, chunk_elements: int | None = None
) -> tuple[Tensor, BoxGrid]:
    """Unchecked core of :func:`grid_cost`; saliency is Tensor[B, h, w]."""
    grid = box_grid(saliency.shape[1], saliency.shape[2], r_min, aspect, step)
    cost = saliency.new_full((saliency.shape[0], grid.n_r, grid.n_y, grid.n_x), float("-inf"))
    for k0, k1, f in _grid_levels(saliency, grid, gamma, _levels(saliency, grid, chunk_elements), halo=0):
        cost[:, k0:k1, : f.shape[2], : f.shape[3]] = f
    return cost, grid


_MIN_CHUNK = 1 << 16  # grid entries per chunk at the least (by default)


def _levels(saliency: Tensor, grid: BoxGrid, chunk_elements: int | None) -> int:
    """r levels per chunk: about a quarter of the maps' size by default, and at least
    2^16 entries (256 KB in float32), so that one small map is scored in one chunk (at
    batch 1 each chunk's ~60 small operations, not their arithmetic, are the time)."""
    batch, h, w = saliency.shape
    budget = chunk_elements if chunk_elements is not None else max(batch * h * w // 4, _MIN_CHUNK)
    return max(1, budget // (batch * grid.n_y * grid.n_x))


def _grid_levels(saliency: Tensor, grid: BoxGrid, gamma: float, levels: int, halo: int):
    """Yield ``(k0, k1, f)``: f Tensor[B, k1 - k0 + 2 halo, m_y, m_x] of r levels
    ``k0 - halo .. k1 + halo - 1`` (-inf outside the lattice and outside the feasible set).

    Only the window ``i < m_y, j < m_x`` of each chunk is scored, ``m = n - k`` at its
    lowest level ``k = max(k0 - halo, 0)``: no box of the chunk is feasible outside it
    (``i + k < n_y``, ``j + k < n_x``), and about two thirds of the whole lattice is not."""
    batch, h, w = saliency.shape
    n_r, n_y, n_x = grid.n_r, grid.n_y, grid.n_x
    r_min, aspect = grid.r_min, grid.aspect
    kw = {"dtype": saliency.dtype, "device": saliency.device}
    j = torch.arange(n_x, **kw)
    i = torch.arange(n_y, **kw)
    # Edge lattices: left edges, then right edges (x); top, then bottom (y).
    x_edges = torch.cat((j * grid.step_x - 0.5, j * grid.step_x + (2 * r_min - 0.5)))
    y_edges = torch.cat((i * grid.step_y - 0.5, i * grid.step_y + (2 * aspect * r_min - 0.5)))
    step_x = torch.sigmoid(gamma * (torch.arange(w, **kw)[:, None] - x_edges))  # [w, 2 n_x]
    step_y = torch.sigmoid(gamma * (torch.arange(h, **kw)[:, None] - y_edges))  # [h, 2 n_y]
    # G = Ly^T S Lx on the lattice, with n_r + halo zeros around so that shifted views stay inside.
    pad = n_r + 2 * halo
    padded = saliency.new_zeros(batch, 2 * n_y + pad, 2 * n_x + pad)
    padded[:, halo : halo + 2 * n_y, halo : halo + 2 * n_x] = step_y.T @ (saliency @ step_x)
    sum_x = torch.cat((step_x.new_zeros(halo), step_x.sum(0), step_x.new_zeros(n_r + halo)))  # ones map
    sum_y = torch.cat((step_y.new_zeros(halo), step_y.sum(0), step_y.new_zeros(n_r + halo)))
    total = saliency.sum(dim=(1, 2)).reshape(batch, 1, 1, 1)
    n = float(h * w)
    eps = torch.finfo(saliency.dtype).eps
    s_b, s_row = padded.stride(0), padded.stride(1)
    for k0 in range(0, n_r, levels):
        k1 = min(n_r, k0 + levels)
        ks = torch.arange(k0 - halo, k1 + halo, device=saliency.device)  # r levels of this chunk
        m_y, m_x = n_y - max(k0 - halo, 0), n_x - max(k0 - halo, 0)  # the chunk's feasible window
        size = (batch, len(ks), m_y, m_x)
        kr = ks.clamp_min(0).to(saliency.dtype)
        r_total = r_min + kr * grid.step_r
        norm_x = 1.0 / -torch.expm1(-2.0 * gamma * r_total)  # 1 / (1 - e^-c), c = g (x2 - x1)
        norm_y = 1.0 / -torch.expm1(-2.0 * gamma * aspect * r_total)

        def corner(row: int, col: int, row_k: int, col_k: int) -> Tensor:
            # padded[b, halo + row + i + row_k k, halo + col + j + col_k k] for k in ks: a view.
            # (Levels k < 0 of the halo read the zero padding and are masked below.)
            start = k0 - halo
            offset = padded.storage_offset() + (halo + row + row_k * start) * s_row + halo + col + col_k * start
            return padded.as_strided(size, (s_b, row_k * s_row + col_k, s_row, 1), offset)

        # A = (G(x1, y1) - G(x2, y1) - G(x1, y2) + G(x2, y2)) / ((1 - e^-2gR)(1 - e^-2gaR))
        area_in = corner(0, 0, 0, 0) - corner(0, n_x, 0, 1)
        area_in.sub_(corner(n_y, 0, 1, 0)).add_(corner(n_y, n_x, 1, 1))
        area_in.mul_((norm_x * norm_y)[None, :, None, None])
        kl = ks[:, None]
        jw, iw = j[:m_x].long(), i[:m_y].long()
        u_sum = (sum_x[halo : halo + m_x] - sum_x[(halo + n_x + jw + kl).clamp_max(len(sum_x) - 1)]) * norm_x[:, None]
        v_sum = (sum_y[halo : halo + m_y] - sum_y[(halo + n_y + iw + kl).clamp_max(len(sum_y) - 1)]) * norm_y[:, None]
        z_sum = v_sum[None, :, :, None] * u_sum[None, :, None, :]  # Z, [1, levels, m_y, m_x]
        # f = (A / Z) / ((T - A) / (N - Z) + 1), with the clamps of the separable cost.
        outside = (n - z_sum).clamp_min_(eps * n)
        denominator = (total - area_in).clamp_min_(0.0).add_(outside).mul_(z_sum)
        f = area_in.mul_(outside).div_(denominator)
        del z_sum, outside, denominator  # not kept alive while the consumer works on f
        invalid = ((jw + kl[:, :, None]) >= n_x) | ((iw + kl)[:, :, None] >= n_y) | (kl[:, :, None] < 0) | (kl[:, :, None] >= n_r)
        f.masked_fill_(invalid[None], float("-inf"))
        del invalid
        yield k0, k1, f


def grid_candidates(
    saliency: Tensor,
    *,
    r_min: float,
    aspect: float,
    sharpness: float,
    step: float = 4.0,
    count: int = 4,
    chunk_elements: int | None = None,
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
        chunk_elements: as in :func:`grid_cost`: the grid is scored a chunk of r
            levels at a time and never held whole.

    Returns:
        ``(thetas, cost)``: Tensor[B, count, 3] and their f, Tensor[B, count].

    Examples:
        >>> s = torch.zeros(1, 1, 20, 60); s[..., 4:16, 2:22] = 1.0; s[..., 4:16, 38:58] = 1.0
        >>> thetas, cost = grid_candidates(s, r_min=10.0, aspect=0.5, sharpness=2.0, step=2.0, count=2)
        >>> thetas[0, :, 0]  # x_c of the two separate maxima (left and right blocks)
        tensor([11.5000, 47.5000])
    """
    saliency = _check_grid_args(saliency, r_min, aspect, sharpness, step, chunk_elements)
    count = check_int(count, "count", 1)
    return _grid_candidates(saliency, float(r_min), float(aspect), float(sharpness), float(step), count, chunk_elements)


def _grid_candidates(
    saliency: Tensor, r_min: float, aspect: float, gamma: float, step: float, count: int, chunk_elements: int | None = None
) -> tuple[Tensor, Tensor]:
    """Unchecked core of :func:`grid_candidates`; saliency is Tensor[B, h, w].

    Streams over chunks of r levels (each with one level of halo for the local-maximum
    test) and keeps a running top ``count``: the whole grid is never in memory.
    """
    batch, h, w = saliency.shape
    grid = box_grid(h, w, r_min, aspect, step)
    plane = grid.n_y * grid.n_x
    for k0, k1, f in _grid_levels(saliency, grid, gamma, _levels(saliency, grid, chunk_elements), halo=1):
        values, index = _local_maxima(f, count)  # index within the chunk's inner levels and window
        m_y, m_x = f.shape[2], f.shape[3]
        if m_x < grid.n_x:  # to the lattice's flat index (the same order: k, then i, then j)
            level, rest = torch.div(index, m_y * m_x, rounding_mode="floor"), index % (m_y * m_x)
            index = (level * grid.n_y + torch.div(rest, m_x, rounding_mode="floor")) * grid.n_x + rest % m_x
        if k0 > 0:  # merged with the running best (the first chunk's are it: one chunk for one map)
            # Both in lattice order (later chunks hold later boxes), so ties go to the earlier box.
            values = torch.cat((best_values, values), dim=1)
            index = torch.cat((best_index, index + k0 * plane), dim=1)
            values, order = _top(values, count)
            index = index.gather(1, order)
        best_values, best_index = values, index
    # Fewer maxima than asked (or none above -inf): repeat the best one.
    first_best = best_index.gather(1, best_values.argmax(dim=1, keepdim=True))
    best_index = torch.where(best_values > float("-inf"), best_index, first_best)
    if best_index.shape[1] < count:
        best_index = torch.cat((best_index, first_best.expand(batch, count - best_index.shape[1])), dim=1)
    index, _ = best_index.sort(dim=1)  # lattice order
    thetas = grid.thetas(index, saliency.dtype)
    values = _cost_at(saliency, grid, gamma, index)
    return thetas, values


def _cost_at(saliency: Tensor, grid: BoxGrid, gamma: float, index: Tensor) -> Tensor:
    """f at the grid boxes ``index`` Tensor[B, K] (flat lattice indices), Tensor[B, K]."""
    from .cost import _cost_derivatives

    batch, count = index.shape
    thetas = grid.thetas(index, saliency.dtype).reshape(batch * count, 3)
    r_min = thetas.new_full((batch * count,), grid.r_min)
    f, _, _ = _cost_derivatives(thetas, saliency, r_min, grid.aspect, thetas.new_full((batch * count,), gamma), 0)
    return f.reshape(batch, count)


def _local_maxima(f: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Top ``count`` local maxima of the inner levels of ``f`` [B, L + 2, n_y, n_x] (one
    halo level each side): values and flat indices within the inner levels."""
    peak = f
    for dim in (1, 2, 3):  # 3 x 3 x 3 running maximum, one axis at a time (-inf outside)
        pad = [0, 0] * (3 - dim) + [1, 1]
        ext = torch.nn.functional.pad(peak, pad, value=float("-inf"))
        n = peak.shape[dim]
        peak = torch.maximum(torch.maximum(ext.narrow(dim, 0, n), ext.narrow(dim, 1, n)), ext.narrow(dim, 2, n))
        del ext
    inner = f[:, 1:-1]
    # (NaN, from an f that under- or overflowed, is no maximum: _top compares values.)
    beaten = ~(inner >= peak[:, 1:-1]) | (inner == float("-inf"))
    del peak
    flat = inner.masked_fill(beaten, float("-inf")).flatten(1)
    del beaten
    return _top(flat, count)


def _top(values: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest of ``values`` Tensor[B, N] per row, exact ties going to the
    earlier position, returned in position order: (values, positions).

    ``topk`` alone picks among equal values in an order of its own, which then depended
    on how the grid was cut into chunks (that is, on the batch size): a plateau of equal
    maxima gave other candidates, and other boxes, in another batch.
    """
    k = min(count, values.shape[1])
    kth = values.topk(k, dim=1).values[:, -1:]
    above = values > kth
    tied = values == kth
    # int32 counts and keys (a map's lattice holds at most MAX_GRID_BOXES < 2^31): the
    # int64 ones were the largest temporaries of one map's search.
    take = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= k - above.sum(1, keepdim=True, dtype=torch.int32)))
    del above, tied
    # The taken positions in order, without a host sync (nonzero would wait for a GPU).
    position = torch.arange(values.shape[1], 0, -1, dtype=torch.int32, device=values.device)  # earlier -> larger key
    _, order = torch.where(take, position, 0).topk(k, dim=1)  # distinct keys: exact
    order, _ = order.sort(dim=1)
    return values.gather(1, order), order
