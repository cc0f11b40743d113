"""``DACrop``: differentiable auto-cropping as a network layer (the paper's method on Theseus)."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence, Union

import numpy as np
import theseus as th
import torch
from torch import Tensor, nn

from ._checks import DACInputError, check_image_batch, check_positive, check_size
from .functional.boxes import fit_r_min, initial_theta, theta_to_boxes
from .functional.crop import crop_resize
from .functional.pooling import max_min_pool
from .optim.solver import AscentSchedule, DACSolverInfo, StagedAscent, build_objective

__all__ = ["DACrop", "BACKWARD_MODES"]

BACKWARD_MODES = ("implicit", "unroll", "truncated", "dlm")
Images = Union[Tensor, Sequence[Tensor]]


class DACrop(nn.Module):
    """Find each image's region of interest and crop it to a fixed size.

    Per image: max–min pooling (eq. 5) gives a saliency map; staged gradient ascent
    (Algorithm 1) on the DAC cost (eq. 3) over a soft rectangle (eqs. 1–2) of aspect
    ``H_out / W_out`` finds the box; the box is cropped from the *original* image and
    resized to ``output_size`` (anti-aliased bilinear), so the aspect ratio is kept.
    The search is a Theseus optimizer inside a ``th.TheseusLayer``: gradients reach the
    input (and any layer upstream) both through the sampled pixels and through the box.

    Convention: boxes are xyxy in input pixels (torchvision's; whole image
    ``(0, 0, W, H)``). Images are floats in [0, 1]; ``uint8`` is divided by 255,
    ``uint16`` by 65535 (``int16`` by 32767, ``int32`` by 2**31 - 1).

    Args:
        output_size: (H_out, W_out) of the crops (paper: 200 x 370). Sets the aspect
            ``H_out / W_out`` of the search box.
        pool_size: max–min pooling window and stride k (paper: 10).
        backward_mode: ``"implicit"`` (default; exact implicit-function gradient at
            the found box), ``"unroll"`` (backprop through every ascent step),
            ``"truncated"`` (through the last ``backward_num_iterations`` steps) or
            ``"dlm"`` (Theseus' direct loss minimisation).
        sharpness: gamma of the first stage, per saliency pixel (paper: 0.025).
        step_size: eta of the first stage (paper: 96).
        stages: number of stages (paper: 4).
        sharpness_factor: gamma multiplier per stage. Paper text: 2 (0.025 -> 0.2);
            Algorithm 1 says 4. Default 2.
        step_factor: eta multiplier per stage (paper: 1/2, 96 -> 12).
        steps_per_stage: ascent steps per stage (not given in the paper; 50).
        max_step: gradient clipping, largest move per step in saliency pixels.
        polish_steps: most guarded Newton steps after the stages, which bring the box
            to a stationary point (0 disables; implicit gradients then are inexact).
        newton_max_step: largest Newton step accepted, saliency pixels.
        r_min_fraction: ``r_min = width * r_min_fraction`` in saliency pixels
            (paper: 1/3.5); clipped so the smallest box fits the image.
        r_init_fraction: initial half-width ``width * r_init_fraction`` (paper: 1/2.3).
        saliency_scale: the pooled map of [0, 1] images is multiplied by this before
            the search (255: the paper's 8-bit intensities, which the "+1" of eq. 3 and
            eta = 96 assume).
        backward_num_iterations: steps differentiated in ``"truncated"`` mode.
        dlm_epsilon: epsilon of ``"dlm"`` mode. It must be far below the Hessian's
            scale (~1e-3 here), not Theseus' default 1e-2, which gives ~0 gradients.
        antialias: anti-alias the crop when it shrinks.

    Example:
        >>> layer = DACrop(output_size=(20, 37), pool_size=4)
        >>> layer(torch.rand(2, 1, 120, 200)).shape
        torch.Size([2, 1, 20, 37])
    """

    def __init__(
        self,
        output_size: Sequence[int] = (200, 370),
        pool_size: int = 10,
        backward_mode: str = "implicit",
        *,
        sharpness: float = 0.025,
        step_size: float = 96.0,
        stages: int = 4,
        sharpness_factor: float = 2.0,
        step_factor: float = 0.5,
        steps_per_stage: int = 50,
        max_step: float = 4.0,
        polish_steps: int = 50,
        newton_max_step: float = 2.0,
        r_min_fraction: float = 1 / 3.5,
        r_init_fraction: float = 1 / 2.3,
        saliency_scale: float = 255.0,
        backward_num_iterations: int = 10,
        dlm_epsilon: float = 1e-8,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        self.output_size = check_size(output_size, "output_size")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise DACInputError(f"pool_size: expected an int >= 1, got {pool_size!r}")
        self.pool_size = pool_size
        if not isinstance(backward_mode, str) or backward_mode.lower() not in BACKWARD_MODES:
            raise DACInputError(f"backward_mode: expected one of {BACKWARD_MODES}, got {backward_mode!r}")
        self.backward_mode = backward_mode.lower()
        self.sharpness = check_positive(sharpness, "sharpness")
        self.schedule = AscentSchedule(
            stages=stages,
            steps_per_stage=steps_per_stage,
            step_size=check_positive(step_size, "step_size"),
            step_factor=step_factor,
            sharpness_factor=sharpness_factor,
            max_step=max_step,
            polish_steps=polish_steps,
            newton_max_step=newton_max_step,
        )
        self.r_min_fraction = check_positive(r_min_fraction, "r_min_fraction")
        self.r_init_fraction = check_positive(r_init_fraction, "r_init_fraction")
        self.saliency_scale = check_positive(saliency_scale, "saliency_scale")
        if isinstance(backward_num_iterations, bool) or not isinstance(backward_num_iterations, int) or backward_num_iterations < 1:
            raise DACInputError(f"backward_num_iterations: expected an int >= 1, got {backward_num_iterations!r}")
        self.backward_num_iterations = backward_num_iterations
        self.dlm_epsilon = check_positive(dlm_epsilon, "dlm_epsilon")
        self.antialias = bool(antialias)
        self.last_info: DACSolverInfo | None = None
        self._layers: dict[tuple[torch.dtype, str, int, int], th.TheseusLayer] = {}

    @property
    def aspect(self) -> float:
        """Box height / width = H_out / W_out."""
        return self.output_size[0] / self.output_size[1]

    @property
    def final_sharpness(self) -> float:
        """gamma of the last stage: the cost whose maximum the box is."""
        return self.sharpness * self.schedule.sharpness_factor ** (self.schedule.stages - 1)

    # ----------------------------------------------------------------- public
    def forward(
        self, images: Images, return_boxes: bool = False
    ) -> Tensor | tuple[Tensor, Tensor, DACSolverInfo]:
        """Crops Tensor[B, C, H_out, W_out] (floating) of ``images``.

        Args:
            images: Tensor[B, C, H, W] (C = 1 or 3), or a list of Tensor[C, H, W] of
                different sizes (one batch comes back, in order).
            return_boxes: also return the boxes (as :meth:`locate`) and the solver's
                info, from the same search.
        """
        groups, boxes, info = self._search(images)
        crops = [crop_resize(batch, boxes[k], self.output_size, antialias=self.antialias) for k, (_, batch) in enumerate(groups)]
        out = _merge(crops, [i for i, _ in groups])
        if return_boxes:
            return out, _merge(boxes, [i for i, _ in groups]), info
        return out

    def locate(self, images: Images, return_info: bool = False) -> Tensor | tuple[Tensor, DACSolverInfo]:
        """Boxes Tensor[B, 4], xyxy in input pixels, differentiable w.r.t. ``images``.

        With ``return_info`` also the :class:`~dac.optim.DACSolverInfo`, one row per
        image in input order (also kept in ``last_info``).
        """
        groups, boxes, info = self._search(images)
        out = _merge(boxes, [i for i, _ in groups])
        return (out, info) if return_info else out

    def thetas_to_boxes(self, thetas: Tensor, image_size: Sequence[int]) -> Tensor:
        """Map search parameters (e.g. ``info.stage_thetas``, Tensor[..., 3]) of images of
        ``image_size`` = (H, W) to xyxy boxes in input pixels, Tensor[..., 4]."""
        h, w = int(image_size[0]) // self.pool_size, int(image_size[1]) // self.pool_size
        flat = thetas.reshape(-1, 3)
        r_min = fit_r_min(h, w, self.r_min_fraction, self.aspect, flat)
        return theta_to_boxes(flat, r_min, self.aspect, self.pool_size).reshape(*thetas.shape[:-1], 4)

    def extra_repr(self) -> str:
        s = self.schedule
        return (
            f"output_size={self.output_size}, pool_size={self.pool_size}, "
            f"backward_mode={self.backward_mode!r}, sharpness={self.sharpness}, "
            f"step_size={s.step_size}, stages={s.stages}, sharpness_factor={s.sharpness_factor}, "
            f"step_factor={s.step_factor}, steps_per_stage={s.steps_per_stage}, "
            f"max_step={s.max_step}, polish_steps={s.polish_steps}"
        )

    # --------------------------------------------------------------- internal
    def _search(self, images: Images) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor], DACSolverInfo]:
        """Search each same-size group: (groups, boxes per group, info in input order)."""
        groups = _group(images)
        results = [self._locate_batch(batch) for _, batch in groups]
        info = _merge_info([r[1] for r in results], [i for i, _ in groups])
        self.last_info = info
        return groups, [r[0] for r in results], info

    def _locate_batch(self, images: Tensor) -> tuple[Tensor, DACSolverInfo]:
        check_image_batch(images)
        dtype = images.dtype if images.dtype.is_floating_point else torch.get_default_dtype()
        saliency = max_min_pool(images, self.pool_size).to(dtype) * self.saliency_scale
        batch, _, h, w = saliency.shape
        r_min = fit_r_min(h, w, self.r_min_fraction, self.aspect, saliency)
        theta0 = initial_theta(h, w, r_min, self.aspect, self.r_init_fraction)
        layer = self._theseus_layer(dtype, saliency.device, batch, h, w)
        inputs = {
            "theta": theta0,
            "saliency": saliency,
            "sharpness": saliency.new_full((1, 1), self.final_sharpness),
            "r_min": r_min[:, None],
        }
        kwargs: dict[str, Any] = {"backward_mode": self.backward_mode}
        if self.backward_mode == "truncated":
            kwargs["backward_num_iterations"] = self.backward_num_iterations
        if self.backward_mode == "dlm":
            kwargs["dlm_epsilon"] = self.dlm_epsilon
        values, info = layer(inputs, optimizer_kwargs=kwargs)
        if (
            self.backward_mode == "implicit"
            and torch.is_grad_enabled()
            and saliency.requires_grad
            and not bool((info.converged | info.frozen).all())
        ):
            missed = int((~(info.converged | info.frozen)).sum())
            warnings.warn(
                f"DACrop: {missed} of {batch} boxes did not reach a stationary point; "
                "their implicit gradients are approximate (raise polish_steps)",
                RuntimeWarning,
                stacklevel=3,
            )
        return theta_to_boxes(values["theta"], r_min, self.aspect, self.pool_size), info

    def _theseus_layer(self, dtype: torch.dtype, device: torch.device, batch: int, h: int, w: int) -> th.TheseusLayer:
        # Theseus variables keep their shape: one objective per saliency size.
        key = (dtype, str(device), h, w)
        if key not in self._layers:
            objective, _ = build_objective(batch, h, w, self.aspect, dtype, device)
            self._layers[key] = th.TheseusLayer(StagedAscent(objective, self.schedule), vectorize=False)
        return self._layers[key]


def _group(images: Images) -> list[tuple[Tensor, Tensor]]:
    """Split input into same-size batches: [(indices Tensor[n], Tensor[n, C, H, W])]."""
    if isinstance(images, Tensor):
        check_image_batch(images)
        return [(torch.arange(images.shape[0]), images)]
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise DACInputError(
            f"images: expected a Tensor[B, C, H, W] or a non-empty list of Tensor[C, H, W], got {type(images).__name__}"
        )
    keys: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.ndim != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise DACInputError(f"images[{i}]: expected Tensor[C, H, W], got {shape}")
        if image.device != images[0].device:
            raise DACInputError(f"images[{i}]: on {image.device}, images[0] on {images[0].device}")
        keys.setdefault((tuple(image.shape), image.dtype), []).append(i)
    return [(torch.tensor(idx), torch.stack([images[i] for i in idx])) for idx in keys.values()]


def _merge_info(infos: list[DACSolverInfo], indices: list[Tensor]) -> DACSolverInfo:
    """One :class:`DACSolverInfo` for all groups, rows in input order."""
    if len(infos) == 1:
        return infos[0]
    order = torch.argsort(torch.cat(indices))
    fields = ("converged", "frozen", "held", "iterations", "cost", "residual_norm", "stage_thetas")
    merged = {f: _merge([getattr(i, f) for i in infos], indices) for f in fields}
    status = np.concatenate([i.status for i in infos])[order.numpy()]
    return DACSolverInfo(best_solution=None, status=status, **merged)


def _merge(parts: list[Tensor], indices: list[Tensor]) -> Tensor:
    """Undo :func:`_group`: put each group's rows back at their input positions."""
    if len(parts) == 1:
        return parts[0]
    order = torch.cat(indices).to(parts[0].device)
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in parts])
    stacked = torch.cat([p.to(dtype) for p in parts])
    return stacked[torch.argsort(order)]
