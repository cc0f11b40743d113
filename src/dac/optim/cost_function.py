"""The DAC cost as a Theseus cost function whose error is the stationarity residual.

Theseus minimises ``1/2 ||e||^2``. A scalar residual such as ``sqrt(2 (C - f))`` has
a zero Jacobian at the optimum (grad f = 0 there), so Theseus' implicit step has
nothing to invert. Instead the error is ``F(theta; S)`` of
:func:`dac.functional.stationarity_residual`, ~grad f, and its Jacobian ~the Hessian:
the implicit step ``-(J^T J)^-1 J^T F`` (J detached) then differentiates exactly as
the implicit-function theorem, ``d theta*/dS = -J^-1 dF/dS``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import theseus as th
import torch

from ..functional.stationarity import Stationarity, stationarity_residual

__all__ = ["DACCost"]


class DACCost(th.CostFunction):
    """Stationarity of the DAC cost (paper eq. 3) at ``theta`` = (x_c, y_c, r).

    Args:
        theta: ``th.Vector`` of dof 3, the optim variable (saliency-pixel coordinates).
        saliency: ``th.Variable`` Tensor[B, 1, h, w], the max–min pooled map (scaled).
        sharpness: ``th.Variable`` Tensor[B or 1, 1], gamma of the final stage.
        r_min: ``th.Variable`` Tensor[B or 1, 1], minimum half-width.
        aspect: box height / width.
        active: optional ``th.Variable`` Tensor[B, 4], the active set of the solution
            (see :func:`dac.functional.stationarity.active_set`); NaN until the solver
            has found it, and then used for every derivative, so that derivatives at a
            perturbed box (Theseus' DLM) keep the solution's bounds and frozen rows.
    """

    def __init__(
        self,
        theta: th.Vector,
        saliency: th.Variable,
        sharpness: th.Variable,
        r_min: th.Variable,
        aspect: float,
        cost_weight: Optional[th.CostWeight] = None,
        name: Optional[str] = None,
        active: Optional[th.Variable] = None,
    ) -> None:
        if cost_weight is None:
            cost_weight = th.ScaleCostWeight(torch.ones(1, 1, dtype=theta.dtype, device=theta.device))
        super().__init__(cost_weight, name=name)
        self.theta = theta
        self.saliency = saliency
        self.sharpness = sharpness
        self.r_min = r_min
        self.aspect = float(aspect)
        self.active = active
        self.register_optim_vars(["theta"])
        self.register_aux_vars(["saliency", "sharpness", "r_min"] + (["active"] if active is not None else []))

    def stationarity(self) -> Stationarity:
        """Residual, Jacobian, cost, gradient, Hessian and flags at the current theta."""
        theta = self.theta.tensor
        batch = theta.shape[0]
        saliency = self.saliency.tensor
        saliency = saliency.reshape(saliency.shape[0], saliency.shape[-2], saliency.shape[-1])
        return stationarity_residual(
            theta,
            saliency.expand(batch, -1, -1),
            self.r_min.tensor.reshape(-1).expand(batch),
            self.aspect,
            self.sharpness.tensor.reshape(-1).expand(batch),
            active=self.known_active(),
        )

    def known_active(self) -> Optional[torch.Tensor]:
        """The solution's active set, Tensor[B, 4], or None while it is not known (NaN)."""
        if self.active is None or bool(torch.isnan(self.active.tensor).any()):
            return None
        return self.active.tensor

    def error(self) -> torch.Tensor:
        return self.stationarity().residual

    def jacobians(self) -> Tuple[List[torch.Tensor], torch.Tensor]:
        st = self.stationarity()
        return [st.jacobian], st.residual

    def dim(self) -> int:
        return 3

    def _copy_impl(self, new_name: Optional[str] = None) -> "DACCost":
        return DACCost(
            self.theta.copy(),
            self.saliency.copy(),
            self.sharpness.copy(),
            self.r_min.copy(),
            self.aspect,
            self.weight.copy(),
            name=new_name,
            active=None if self.active is None else self.active.copy(),
        )
