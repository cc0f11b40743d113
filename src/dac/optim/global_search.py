"""A global search of the DAC cost as a Theseus optimizer: grid, candidates, Newton polish.

Forward, per map, at the last stage's sharpness (the cost the implicit gradient uses):

1. **Grid** (no autograd): f of every box of a lattice over the feasible set
   (:func:`dac.functional.grid.grid_cost`: x-edges every ``step`` saliency pixels, r
   every ``step / 2``, y_c every ``aspect * step``), two matrix products per map.
2. **Candidates**: the ``candidates`` best local maxima of that grid
   (:func:`dac.functional.grid.grid_candidates`), in lattice order.
3. **Polish**: every candidate climbs to its own stationary point with the staged
   ascent's guarded Newton polish (:meth:`StagedAscent._polish_step`: Newton on the
   stationarity residual, Levenberg–Marquardt-shifted where the reduced Hessian is not
   negative definite, capped, backtracked so f never drops; all candidates of all maps
   as one batch).
4. **Choice**: the candidate with the highest f after the polish; exact ties go to the
   first in lattice order (r, then y_c, then x_c of its grid box), so the choice is
   fixed by the map alone. ``info.near_tie`` marks maps where a *separate* candidate
   (IoU < 0.5) comes within ``tie_tolerance`` (relative) of the chosen f.

Maps whose values are all equal are not searched: every box has the same f; the box
is the start (Algorithm 1's), frozen, as with the staged ascent.

Backward modes (Theseus' names): ``implicit`` (and ``dlm``) differentiate at the
chosen maximum, as for the staged ascent: the implicit-function gradient is exact
there whatever path led to it. ``unroll`` differentiates every polish step from the
chosen candidate's grid box, and ``truncated`` the last ``backward_num_iterations``
of them. The grid box itself, and which candidate wins, are piecewise constant in the
map (argmaxes): they contribute nothing. Since the polish ends with Newton steps at a
stationary point (whose Jacobian in theta is zero), ``unroll`` and ``truncated`` give
the implicit gradient wherever the polish converged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import theseus as th
import torch
from torch import Tensor

from ..functional.cost import _cost_derivatives
from ..functional.grid import _check_grid_size, _grid_candidates
from ..functional.rectangle import box_edges
from ..functional.stationarity import shift_into_image
from .solver import AscentSchedule, DACSolverInfo, StagedAscent, _stalled, differentiated_from

__all__ = ["GridSchedule", "GlobalSearch"]


@dataclass(frozen=True)
class GridSchedule:
    """Constants of :class:`GlobalSearch`.

    Attributes:
        step: spacing of the grid boxes' left and right edges, saliency pixels (r in
            half steps, y_c in ``aspect * step``). At the default final sharpness
            (0.2 per saliency pixel) a sigmoid edge rises over ~1 / 0.2 = 5 pixels:
            a step of 4 puts a grid box within 2 pixels of each edge of any box.
        candidates: local maxima of the grid polished per map.
        tie_tolerance: relative gap in f under which a separate maximum counts as a
            near tie (``info.near_tie``).
    """

    step: float = 4.0
    candidates: int = 4
    tie_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        from .._checks import check_int, check_positive

        check_positive(self.step, "grid_step")
        check_int(self.candidates, "grid_candidates", 1)
        check_positive(self.tie_tolerance, "tie_tolerance")


class GlobalSearch(StagedAscent):
    """Theseus optimizer: grid search of the DAC cost, then the guarded Newton polish.

    See the module doc for the steps and what each backward mode differentiates.
    Uses ``schedule.polish_steps`` (most polish steps per candidate),
    ``newton_max_step``, ``max_step`` and the last stage's step size (for the polish's
    fallback ascent steps); the ascent stages are not run.

    Args:
        objective: an objective with exactly one :class:`~dac.optim.DACCost`
            (:func:`~dac.optim.build_objective`); its theta is the start used for
            flat maps, its sharpness the one searched.
        schedule: the :class:`~dac.optim.AscentSchedule` (polish constants).
        grid: the :class:`GridSchedule`.
    """

    def __init__(
        self, objective: th.Objective, schedule: AscentSchedule = AscentSchedule(), grid: GridSchedule = GridSchedule()
    ) -> None:
        super().__init__(objective, schedule)
        self.grid = grid
        self.params.max_iterations = max(schedule.polish_steps, 1)

    def _optimize_impl(  # type: ignore[override]
        self,
        backward_mode: Any = "implicit",
        backward_num_iterations: Optional[int] = None,
        verbose: bool = False,
        **kwargs: Any,
    ) -> DACSolverInfo:
        mode = th.BackwardMode.resolve(backward_mode)
        sched = self.schedule
        total = sched.polish_steps
        grad_from = differentiated_from(mode, total, backward_num_iterations)
        grad_enabled = torch.is_grad_enabled()

        aspect = self.cost.aspect
        theta_start, saliency, r_min, gamma, sums, flat = self._setup()
        batch, h, w = saliency.shape
        count = self.grid.candidates
        r_min_k, gamma_k = r_min.repeat_interleave(count), gamma.repeat_interleave(count)
        with torch.no_grad():
            # One r_min and one sharpness per batch (the layer's): two host reads per call.
            r_min_0, gamma_0 = float(r_min[0]), float(gamma[0])
            _check_grid_size(h, w, r_min_0, aspect, self.grid.step, "grid_step")
            grid_thetas, _ = _grid_candidates(saliency.detach(), r_min_0, aspect, gamma_0, self.grid.step, count)
            grid_thetas = torch.where(flat[:, None, None], theta_start[:, None, :], grid_thetas)
            start = shift_into_image(grid_thetas.reshape(-1, 3), h, w, r_min_k, aspect, reflect=False)

        theta = start
        eta = sched.step_size * sched.step_factor ** (sched.stages - 1)  # the last stage's
        converged = torch.zeros(theta.shape[0], dtype=torch.bool, device=theta.device)
        iterations = torch.zeros(theta.shape[0], dtype=torch.long, device=theta.device)
        untested_run = torch.zeros_like(iterations)
        step = 0
        while step < total:
            differentiated = grad_enabled and step >= grad_from
            with torch.set_grad_enabled(differentiated):
                theta, converged, untested_run, took = self._polish_round(
                    theta, converged, untested_run, differentiated, saliency, r_min_k, gamma_k, eta, sums
                )
                iterations += took
                if verbose:
                    print(f"polish step {step}: {int(converged.sum())}/{theta.shape[0]} candidates converged")
                if bool((converged | _stalled(untested_run)).all()) and step + 1 < grad_from:
                    step = grad_from  # skip the no-op steps before the differentiated ones
                    continue
            step += 1

        with torch.no_grad():
            f, _, _ = _cost_derivatives(theta.detach(), saliency, r_min_k, aspect, gamma_k, 0, *sums)
            f = f.reshape(batch, count)
            best = f.argmax(dim=1)  # the first of exact ties: lattice order
            f_best = f.gather(1, best[:, None])
            edges = box_edges(theta.detach(), r_min_k, aspect).reshape(batch, count, 4)
            apart = _iou(edges, edges.gather(1, best[:, None, None].expand(-1, 1, 4))) < 0.5
            close = f >= f_best - self.grid.tie_tolerance * f_best.abs()
            near_tie = (apart & close).any(dim=1) & ~flat
        pick = best[:, None, None].expand(-1, 1, 3)
        chosen = theta.reshape(batch, count, 3).gather(1, pick)[:, 0]
        stage_thetas = [theta_start.detach(), start.reshape(batch, count, 3).gather(1, pick)[:, 0]]
        return self._finish(
            chosen,
            theta_start.detach(),
            flat,
            converged.reshape(batch, count).gather(1, best[:, None])[:, 0],
            iterations.reshape(batch, count).gather(1, best[:, None])[:, 0],
            stage_thetas,
            mode,
            grad_enabled,
            near_tie,
            theta.detach().reshape(batch, count, 3),
        )


def _iou(edges: Tensor, other: Tensor) -> Tensor:
    """IoU of boxes given as edges (x1, x2, y1, y2), Tensor[..., 4], broadcast."""
    width = (torch.minimum(edges[..., 1], other[..., 1]) - torch.maximum(edges[..., 0], other[..., 0])).clamp_min(0)
    height = (torch.minimum(edges[..., 3], other[..., 3]) - torch.maximum(edges[..., 2], other[..., 2])).clamp_min(0)
    inter = width * height
    area = (edges[..., 1] - edges[..., 0]) * (edges[..., 3] - edges[..., 2])
    area_other = (other[..., 1] - other[..., 0]) * (other[..., 3] - other[..., 2])
    return inter / (area + area_other - inter)
