"""The paper's staged gradient ascent (Algorithm 1) as a Theseus optimizer.

Forward: ``stages`` stages of ``steps_per_stage`` clipped ascent steps
``theta <- shift(theta + clip(eta grad f))`` (centre shifting and ``|r|``, see
:func:`dac.functional.shift_into_image`); after each stage the sharpness grows by
``sharpness_factor`` and the step shrinks by ``step_factor``. The ascent alone stalls
short of a stationary point (curvature along r is tiny), so a *polish* follows at
the last stage's sharpness: Newton steps on the stationarity residual, shifted
(Levenberg–Marquardt) where the reduced Hessian is not negative definite, capped at
``newton_max_step`` pixels and backtracked so that f never drops — else one more
clipped ascent step — until a plain Newton step is below ``eps**0.75 * max(h, w)``
saliency pixels, or a box has taken :data:`STALL_STEPS` plain steps in a row too short
for f to judge yet too long to converge (a nearly flat map: it stops there, not
converged).

Backward modes (Theseus' names): ``unroll`` differentiates every step; ``truncated``
the last ``backward_num_iterations`` steps; ``implicit`` runs the loop without
autograd and then takes Theseus' implicit Gauss–Newton step on the stationarity
residual (exact implicit-function gradient); ``dlm`` is Theseus' direct loss
minimisation, computed by ``th.TheseusLayer`` from the objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import theseus as th
import torch
from torch import Tensor

from ..functional.cost import CostGrid, _cost_derivatives, cost_grid
from ..functional.stationarity import active_set, shift_into_image, stationarity_residual
from .cost_function import DACCost

__all__ = ["AscentSchedule", "DACSolverInfo", "StagedAscent", "build_objective"]

_Status = th.NonlinearOptimizerStatus
_MapSums = tuple[CostGrid, Tensor]  # (cost_grid of the map, its total saliency), built once per search


@dataclass(frozen=True)
class AscentSchedule:
    """Algorithm 1's constants. Defaults follow the paper's text (gamma 0.025 -> 0.2,
    eta 96 -> 12 over 4 stages, i.e. gamma x2 and eta /2 per stage; Algorithm 1
    itself says gamma x4).

    Attributes:
        stages: number of ascent stages (paper: 4).
        steps_per_stage: ascent steps per stage (the paper does not say; 50).
        step_size: eta of the first stage (paper: 96).
        step_factor: eta multiplier between stages (paper: 1/2).
        sharpness_factor: gamma multiplier between stages (paper text: 2;
            Algorithm 1: 4). The *first* stage's gamma lives in the layer.
        max_step: gradient clipping: largest move of x_c, y_c or r in one ascent
            step, in saliency pixels (the paper clips but gives no value).
        polish_steps: most guarded Newton steps after the stages (0 = none).
        newton_max_step: largest Newton step accepted, in saliency pixels.
    """

    stages: int = 4
    steps_per_stage: int = 50
    step_size: float = 96.0
    step_factor: float = 0.5
    sharpness_factor: float = 2.0
    max_step: float = 4.0
    polish_steps: int = 50
    newton_max_step: float = 2.0

    def __post_init__(self) -> None:
        from .._checks import check_int, check_positive

        for name, low in (("stages", 1), ("steps_per_stage", 0), ("polish_steps", 0)):
            check_int(getattr(self, name), name, low)
        for name in ("step_size", "step_factor", "sharpness_factor", "max_step", "newton_max_step"):
            check_positive(getattr(self, name), name)

    @property
    def ascent_steps(self) -> int:
        return self.stages * self.steps_per_stage

    @property
    def total_steps(self) -> int:
        return self.ascent_steps + self.polish_steps


@dataclass
class DACSolverInfo(th.OptimizerInfo):
    """What the search did, per image (all batched).

    Attributes:
        converged: Tensor[B] bool — the polish reached a stationary point.
        frozen: Tensor[B] bool — no strict maximum (a blank or constant map, a flat
            or saddle region): the box is treated as a constant and its gradient is
            zero in every backward mode (``implicit`` and ``dlm`` through the frozen
            rows of the stationarity residual, ``unroll`` and ``truncated`` because
            the box is detached). On a map whose values are all equal (all zero, or
            a constant image) the box is the search's start (Algorithm 1's box),
            with either search.
        near_tie: Tensor[B] bool — the global search found another maximum of the
            cost, a separate box (IoU < 0.5 with the chosen one), whose f is within
            ``tie_tolerance`` (relative) of the chosen f: a small change of the image
            can make the box jump there. The gradient is the gradient at the chosen
            maximum. Always False for the paper's staged ascent, which follows one
            path and sees one maximum.
        held: Tensor[B, 3] int — coordinates (x_c, y_c, r) held at a bound
            (-1 lower, +1 upper): r at 0, or the box against the image border.
        iterations: Tensor[B] long — ascent steps plus polish steps used (the
            global search: polish steps of the chosen candidate).
        cost: Tensor[B] — final f at the last stage's sharpness.
        residual_norm: Tensor[B] — max-norm of the stationarity residual at the end.
        stage_thetas: Tensor[B, stages + 2, 3] — theta at the start, after each
            stage, and at the end (detached), for pictures like the paper's Fig. 6.
            The global search: Tensor[B, 3, 3] — Algorithm 1's start, the chosen
            grid box (before the polish) and the end.
        candidates: Tensor[B, K, 3] — the global search: every polished candidate
            (x_c, y_c, r), detached, in lattice order (the chosen one among them);
            None for the staged ascent.
    """

    converged: Tensor = None  # type: ignore[assignment]
    frozen: Tensor = None  # type: ignore[assignment]
    held: Tensor = None  # type: ignore[assignment]
    iterations: Tensor = None  # type: ignore[assignment]
    cost: Tensor = None  # type: ignore[assignment]
    residual_norm: Tensor = None  # type: ignore[assignment]
    stage_thetas: Tensor = None  # type: ignore[assignment]
    near_tie: Tensor = None  # type: ignore[assignment]
    candidates: Optional[Tensor] = None


def build_objective(
    theta: Tensor, saliency: Tensor, sharpness: Tensor, r_min: Tensor, aspect: float
) -> tuple[th.Objective, DACCost, dict[str, Tensor]]:
    """An objective with one :class:`DACCost` over these tensors, built per search.

    Args:
        theta: Tensor[B, 3], the start (x_c, y_c, r).
        saliency: Tensor[B, 1, h, w], the map searched.
        sharpness: Tensor[1, 1] or [B, 1], gamma of the last stage.
        r_min: Tensor[B, 1], minimum half-width.
        aspect: box height / width.

    Returns:
        ``(objective, cost, inputs)``: ``inputs`` maps the variable names (``theta``,
        ``saliency``, ``sharpness``, ``r_min``, ``active``) to the tensors a
        ``th.TheseusLayer`` over the objective takes. ``active`` (the solution's
        active set) is NaN; the solver fills it in place.
    """
    active = torch.full((theta.shape[0], 4), float("nan"), dtype=theta.dtype, device=theta.device)
    inputs = {"theta": theta, "saliency": saliency, "sharpness": sharpness, "r_min": r_min, "active": active}
    variables = {name: th.Variable(tensor, name=name) for name, tensor in inputs.items() if name != "theta"}
    cost = DACCost(
        th.Vector(tensor=theta, name="theta"),
        variables["saliency"],
        variables["sharpness"],
        variables["r_min"],
        aspect,
        name="dac_cost",
        active=variables["active"],
    )
    objective = th.Objective(dtype=theta.dtype)
    objective.add(cost)
    objective.to(theta.device)  # an objective starts on the CPU; it must be where its tensors are
    return objective, cost, inputs


class StagedAscent(th.NonlinearLeastSquares):
    """Theseus optimizer running :class:`AscentSchedule` on one :class:`DACCost`."""

    def __init__(self, objective: th.Objective, schedule: AscentSchedule = AscentSchedule()) -> None:
        costs = list(objective.cost_functions.values())
        if len(costs) != 1 or not isinstance(costs[0], DACCost):
            raise ValueError("objective: StagedAscent needs exactly one DACCost")
        super().__init__(objective, max_iterations=schedule.total_steps, vectorize=False)
        self.schedule = schedule
        self.cost = costs[0]

    def compute_delta(self, **kwargs: Any) -> Tensor:  # abstract in Theseus; _optimize_impl never calls it
        return self.linear_solver.solve()

    # ------------------------------------------------------------------ steps
    def _ascent_step(
        self, theta: Tensor, saliency: Tensor, r_min: Tensor, gamma: Tensor, eta: float, sums: _MapSums
    ) -> Tensor:
        _, grad, _ = _cost_derivatives(theta, saliency, r_min, self.cost.aspect, gamma, 1, *sums)
        step = (eta * grad).clamp(-self.schedule.max_step, self.schedule.max_step)
        return shift_into_image(theta + step, saliency.shape[1], saliency.shape[2], r_min, self.cost.aspect)

    def _polish_step(
        self, theta: Tensor, saliency: Tensor, r_min: Tensor, gamma: Tensor, eta: float, sums: _MapSums
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One guarded, backtracking Newton step on the stationarity residual.

        Where the reduced Hessian is not negative definite (a saddle or a flat region,
        e.g. when the ascent stopped early) its free diagonal is shifted down by
        ``mu`` until it is (a Levenberg–Marquardt step), so the step still climbs.
        The step is capped at ``newton_max_step`` pixels, projected into the image, and
        tried at lengths 1, 1/2, 1/4, 1/8; the longest that does not lower f is taken
        (a full, unshifted step below ``sqrt(eps) * max(h, w)`` pixels is taken without
        that test: there f's rounding exceeds what the step gains). Boxes with no
        acceptable length take a clipped ascent step instead.

        Returns:
            (theta, converged, untested): converged where an unshifted, uncapped,
            full Newton step was taken and it moved less than ``eps**0.75 * max(h,
            w)`` saliency pixels; untested where such a step moved less than
            ``sqrt(eps) * max(h, w)`` (f cannot judge it; see :func:`_stalled`).
        """
        h, w = saliency.shape[1:]
        aspect = self.cost.aspect
        st = stationarity_residual(theta, saliency, r_min, aspect, gamma, freeze=False, grid=sums[0], total=sums[1])
        eps = torch.finfo(theta.dtype).eps
        with torch.no_grad():
            shift = torch.where(st.frozen, st.curvature + 1e-2 * st.scale, torch.zeros_like(st.scale))
            free = (st.held == 0).to(theta.dtype)
        jacobian = st.jacobian - torch.diag_embed(free * shift[:, None])
        delta = -torch.linalg.solve(jacobian, st.residual.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            size = delta.abs().amax(-1)
            cap = (self.schedule.newton_max_step / size.clamp_min(torch.finfo(theta.dtype).tiny)).clamp(max=1.0)
        delta = delta * cap[:, None]
        slack = 64 * eps * st.cost.detach().abs()
        # max(r, 0), not the paper's |r|: the reflection never settles on r = 0.
        step = (eta * st.grad).clamp(-self.schedule.max_step, self.schedule.max_step)
        new_theta = shift_into_image(theta + step, h, w, r_min, aspect, reflect=False)
        pending = torch.ones_like(st.frozen)
        converged = torch.zeros_like(pending)
        untested = torch.zeros_like(pending)
        for length in (1.0, 0.5, 0.25, 0.125):
            trial = shift_into_image(theta + length * delta, h, w, r_min, aspect, reflect=False)
            with torch.no_grad():
                f_trial, _, _ = _cost_derivatives(trial, saliency, r_min, aspect, gamma, 0, *sums)
                accept = pending & (f_trial >= st.cost - slack)
                if length == 1.0:
                    moved = (trial - theta).abs().amax(-1)
                    exact = ~st.frozen & (cap >= 1.0)
                    # A full Newton step shorter than sqrt(eps) * max(h, w) (float32: 0.1 px
                    # on a 283-wide map) where f is concave gains less than f's own rounding
                    # (float32 sums over the map: ~2e-5 of f, above the slack): the f test
                    # cannot judge it and would reject it at random; it is taken untested.
                    untested = pending & exact & (moved <= eps**0.5 * max(h, w))
                    accept = accept | untested
                    converged = accept & exact & (moved <= eps**0.75 * max(h, w))
            new_theta = torch.where(accept[:, None], trial, new_theta)
            pending = pending & ~accept
            if not bool(pending.any()):
                break
        return new_theta, converged, untested

    def _polish_round(
        self, theta: Tensor, converged: Tensor, untested_run: Tensor, differentiated: bool,
        saliency: Tensor, r_min: Tensor, gamma: Tensor, eta: float, sums: _MapSums,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One :meth:`_polish_step` for every box not yet settled (converged, or stalled:
        :func:`_stalled`). Settled boxes stay put, except in differentiated steps, where
        the (zero-length) Newton step carries the derivative.

        Returns:
            (theta, converged, untested_run, took): took is Tensor[B] long, 1 for the
            boxes that were not settled before this step (their iteration count).
        """
        new_theta, done, untested = self._polish_step(theta, saliency, r_min, gamma, eta, sums)
        settled = converged | _stalled(untested_run)
        keep = settled if not differentiated else torch.zeros_like(settled)
        theta = torch.where(keep[:, None], theta, new_theta)
        converged = converged | (done & ~settled)
        untested_run = torch.where(settled | (untested & ~done), untested_run + (~settled).long(), 0)
        return theta, converged, untested_run, (~settled).long()

    # ------------------------------------------------------------- main loop
    def _optimize_impl(  # type: ignore[override]
        self,
        backward_mode: Any = "implicit",
        backward_num_iterations: Optional[int] = None,
        verbose: bool = False,
        **kwargs: Any,
    ) -> DACSolverInfo:
        mode = th.BackwardMode.resolve(backward_mode)
        sched = self.schedule
        total = sched.total_steps
        grad_from = differentiated_from(mode, total, backward_num_iterations)
        grad_enabled = torch.is_grad_enabled()

        cost = self.cost
        theta, saliency, r_min, gamma_final, sums, flat = self._setup()
        batch = theta.shape[0]
        theta_start = theta.detach()

        stage_thetas = [theta.detach()]
        iterations = torch.zeros(batch, dtype=torch.long, device=theta.device)
        converged = torch.zeros(batch, dtype=torch.bool, device=theta.device)
        untested_run = torch.zeros(batch, dtype=torch.long, device=theta.device)
        eta = sched.step_size
        step = 0
        while step < total:
            differentiated = grad_enabled and step >= grad_from
            with torch.set_grad_enabled(differentiated):
                if step < sched.ascent_steps:
                    stage = step // sched.steps_per_stage
                    gamma = gamma_final * sched.sharpness_factor ** (stage - sched.stages + 1)
                    eta = sched.step_size * sched.step_factor**stage
                    theta = self._ascent_step(theta, saliency, r_min, gamma, eta, sums)
                    iterations += 1
                    if (step + 1) % sched.steps_per_stage == 0:
                        stage_thetas.append(theta.detach())
                else:
                    theta, converged, untested_run, took = self._polish_round(
                        theta, converged, untested_run, differentiated, saliency, r_min, gamma_final, eta, sums
                    )
                    iterations += took
                    if verbose:
                        print(f"polish step {step - sched.ascent_steps}: {int(converged.sum())}/{batch} converged")
                    if bool((converged | _stalled(untested_run)).all()) and step + 1 < grad_from:
                        step = grad_from  # skip the no-op steps before the differentiated ones
                        continue
            step += 1

        return self._finish(theta, theta_start, flat, converged, iterations, stage_thetas, mode, grad_enabled)

    # ------------------------------------------------------- shared by searches
    def _setup(self) -> tuple[Tensor, Tensor, Tensor, Tensor, _MapSums, Tensor]:
        """The start, the maps Tensor[B, h, w], r_min and gamma Tensor[B], the maps'
        shared sums, and which maps are flat (all values equal), Tensor[B] bool."""
        cost = self.cost
        if cost.active is not None:
            cost.active.tensor.fill_(float("nan"))  # not known until the solution is
        theta = cost.theta.tensor
        batch = theta.shape[0]
        raw = cost.saliency.tensor
        saliency = raw.reshape(raw.shape[0], raw.shape[-2], raw.shape[-1]).expand(batch, -1, -1)
        r_min = cost.r_min.tensor.reshape(-1).expand(batch)
        gamma_final = cost.sharpness.tensor.reshape(-1).expand(batch)
        # What every evaluation on this map shares, computed once (differentiable in S).
        sums = (cost_grid(saliency.shape[1], saliency.shape[2], cost.aspect, theta), saliency.sum(dim=(1, 2)))
        with torch.no_grad():
            flat = saliency.amax(dim=(1, 2)) == saliency.amin(dim=(1, 2))
        return theta, saliency, r_min, gamma_final, sums, flat

    def _finish(
        self,
        theta: Tensor,
        theta_start: Tensor,
        flat: Tensor,
        converged: Tensor,
        iterations: Tensor,
        stage_thetas: list[Tensor],
        mode: Any,
        grad_enabled: bool,
        near_tie: Optional[Tensor] = None,
        candidates: Optional[Tensor] = None,
    ) -> DACSolverInfo:
        """Put the solution in the objective, fix its active set, take the implicit
        step, and describe it.

        A flat map (every value equal: f is the same for every box, and the ascent only
        follows rounding noise) gets the start box, frozen. A frozen box is detached,
        so that ``unroll`` and ``truncated`` give it the zero gradient that
        ``implicit`` and ``dlm`` give it through the stationarity residual.
        """
        cost = self.cost
        theta = torch.where(flat[:, None], theta_start, theta)
        cost.theta.update(theta)
        with torch.no_grad():
            st = cost.stationarity()
            frozen = st.frozen | flat
            if cost.active is not None:
                active = active_set(st)
                active[:, 3] = frozen.to(active.dtype)
                cost.active.tensor.copy_(active)  # every derivative from here on uses it
        cost.theta.update(torch.where(frozen[:, None], theta.detach(), theta))
        if grad_enabled and mode == th.BackwardMode.IMPLICIT:
            self._implicit_step()
        stage_thetas.append(cost.theta.tensor.detach())
        converged = converged & ~flat
        status = np.array(
            [_Status.CONVERGED if c else _Status.MAX_ITERATIONS for c in converged.tolist()]
        )
        return DACSolverInfo(
            best_solution=None,
            status=status,
            converged=converged,
            frozen=frozen,
            held=st.held,
            iterations=iterations,
            cost=st.cost,
            residual_norm=st.residual.abs().amax(-1),
            stage_thetas=torch.stack(stage_thetas, dim=1),
            near_tie=near_tie if near_tie is not None else torch.zeros_like(frozen),
            candidates=candidates,
        )

    def _implicit_step(self) -> None:
        """Theseus' implicit step: one Gauss–Newton step at the solution, J detached.

        Only the step's derivative is applied (its value is subtracted back out).
        """
        linearization = self.linear_solver.linearization
        linearization.linearize(_detach_hessian=True)
        try:
            delta = self.linear_solver.solve()
        except RuntimeError:
            # J^T J too ill-conditioned for Cholesky (float32): same step via LU on J.
            st = self.cost.stationarity()
            delta = -torch.linalg.solve(st.jacobian.detach(), st.residual.unsqueeze(-1)).squeeze(-1)
        # Keep the box where the solver put it (the step is ~0 at a converged box, but
        # not elsewhere) while its derivative is the implicit one: d(delta)/dS.
        delta = delta - delta.detach()
        self.objective.retract_vars_sequence(delta, linearization.ordering, force_update=True)


STALL_STEPS = 3  #: untested Newton steps in a row after which a box stops polishing


def _stalled(untested_run: Tensor) -> Tensor:
    """Boxes whose last :data:`STALL_STEPS` polish steps were full Newton steps shorter
    than ``sqrt(eps) * max(h, w)`` that did not converge: Tensor[B] bool.

    Below that length Newton converges quadratically where f is smooth (one such step
    lands within ``eps**0.75 * max(h, w)``, the convergence test); steps that stay
    longer wander in the rounding of a nearly flat f (a map of uniform noise in float32:
    0.01 px at random, for all 50 steps). Such boxes stop there, not converged.
    """
    return untested_run >= STALL_STEPS


def differentiated_from(mode: th.BackwardMode, total: int, backward_num_iterations: Optional[int]) -> int:
    """The first of ``total`` solver steps that autograd records in backward ``mode``:
    every step (unroll), the last ``backward_num_iterations`` (truncated), none
    (implicit and DLM differentiate at the solution, not through the loop)."""
    if mode == th.BackwardMode.UNROLL:
        return 0
    if mode == th.BackwardMode.TRUNCATED:
        if backward_num_iterations is None or int(backward_num_iterations) < 1:
            raise ValueError("backward_num_iterations: truncated mode needs an int >= 1")
        return max(total - int(backward_num_iterations), 0)
    return total
