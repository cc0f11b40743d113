"""``DACrop``: differentiable auto-cropping as a network layer (the paper's method on Theseus)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Sequence

import theseus as th
import torch
from torch import Tensor, nn

from ._batching import Images, by_size
from ._checks import DACInputError, check_bool, check_dense, check_image_batch, check_int, check_poolable, check_positive, check_size, check_unit_range
from .functional.boxes import _fit_r_min, _initial_theta, _theta_to_boxes, theta_to_boxes
from .functional.cost import _cost_derivatives
from .functional.crop import crop_resize
from .functional.pooling import MaxMinPool
from .optim.global_search import GlobalSearch, GridSchedule, _iou
from .optim.solver import AscentSchedule, DACSolverInfo, StagedAscent, build_objective

__all__ = ["DACrop", "BACKWARD_MODES", "SEARCHES", "LEARNABLE"]

BACKWARD_MODES = ("implicit", "unroll", "truncated", "dlm")
SEARCHES = ("paper", "global")
LEARNABLE = ("r_min", "sharpness")  #: the paper's constants DACrop(learn=...) can train
#: Steepest sigmoid of any stage, per saliency pixel. Far sharper than any search uses (the
#: paper ends at 0.2); beyond it the soft rectangle is a hard step in float32, the
#: search's derivatives vanish, and at ~1e30 they overflowed into a torch error.
MAX_SHARPNESS = 1e6
SHARPNESS_RANGE = 4.0  #: a learned sharpness stays within [1/4, 4] times the set one


def _eager(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run eagerly under ``torch.compile`` (see DACrop's docstring: compiling the
    search cost far more than it saved; functions compiled explicitly inside still
    compile), and refused by ``torch.jit.trace`` and ``torch.export``, which failed
    inside Theseus or dynamo with messages that did not say why.

    Not ``torch.compiler.disable`` at import: that imports dynamo, +1.3 s and +150 MB to
    every ``import dac``. Only a call that dynamo is tracing takes the disabled twin
    (dynamo is loaded by then), which dynamo then runs eagerly."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError(
                f"DACrop.{method.__name__}: torch.jit.trace and torch.export cannot capture the DAC search (a loop "
                "whose steps depend on the pixels); run DACrop eagerly and trace or export the network after it"
            )
        if torch.compiler.is_compiling():
            return _disabled_twin(method)(*args, **kwargs)
        return method(*args, **kwargs)

    return run


_TWINS: dict[Callable[..., Any], Callable[..., Any]] = {}


def _disabled_twin(method: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(method)``, made once."""
    if method not in _TWINS:
        _TWINS[method] = torch.compiler.disable(method, reason="dac: the DAC search runs eagerly (a data-dependent loop of small steps)")
    return _TWINS[method]


class DACrop(nn.Module):
    """Find each image's region of interest and crop it to a fixed size.

    Per image: a saliency stage (default: the paper's max–min pooling, eq. 5) gives a
    map at pooled resolution; a search of the DAC cost (eq. 3) over a soft rectangle
    (eqs. 1–2) of aspect ``H_out / W_out`` finds the box on that map (``search``:
    the paper's staged gradient ascent, Algorithm 1, or a global grid search); the
    box is cropped from the *original* image and resized to
    ``output_size`` (anti-aliased bilinear), so the aspect ratio is kept. The search is
    a Theseus optimizer inside a ``th.TheseusLayer``: gradients reach the input, the
    saliency stage's parameters and any layer upstream, through the sampled pixels
    and through the box.

    Convention: boxes are xyxy in input pixels (torchvision's; pixel ``i`` covers
    ``[i, i + 1)``). The search runs on whole pooling windows, so a box ends at most
    at ``k * (W // k)`` (2830 for W = 2836, k = 10). Images are floats in [0, 1]
    (values outside [-0.05, 1.05] raise: a forgotten ``/ 255``); ``uint8`` is divided
    by 255, ``uint16`` by 65535, ``int16`` by 32767.

    Precision: the search runs in float64 when the saliency map is float64 and in
    float32 otherwise (float16 / bfloat16 maps are widened), with autocast off,
    whatever the input dtype or the caller's ``torch.autocast``; the crop is resampled
    in at least float32 and returned in the images' dtype (float32 for integer images).

    State: the module holds configuration and the saliency stage's parameters only.
    Each call builds its own Theseus objective, so calls from several threads,
    ``copy.deepcopy``, ``pickle`` and ``state_dict`` round trips are independent, and
    nothing of a call (input, graph) outlives it.

    ``torch.compile``: ``forward``, ``locate``, ``search`` and ``candidates`` run eagerly
    in a compiled model (dynamo gets a ``torch.compiler.disable``-d twin: a graph break
    before and after them); the model's other code compiles. The search is a loop of
    many small steps whose length depends on the data: traced by dynamo, a tiny model
    took 13-48 s to compile, 16-21 s again for each new batch size, and then ran
    2.3-16x slower than eager (``benchmarks/compile_model.py``, two runs). A learned
    saliency stage runs eagerly with them unless compiled itself
    (``DACrop(saliency=torch.compile(net))``). Dynamo runs a whole ``nn.Sequential``
    eagerly when one of its modules breaks the graph: compile the modules after the
    layer instead (``nn.Sequential(DACrop(...), torch.compile(classifier))``).
    ``torch.jit.trace`` and ``torch.export`` cannot capture the search: they raise a
    RuntimeError that says so (trace or export the network after the layer).

    Args:
        output_size: (H_out, W_out) of the crops (paper: 200 x 370). Sets the aspect
            ``H_out / W_out`` of the search box.
        pool_size: the pooling window and stride k (paper: 10): the saliency map of an
            H x W image is (H // k) x (W // k). At least 2 for the paper's max–min map
            (1 with a ``saliency`` stage of one's own).
        backward_mode: ``"implicit"`` (default; exact implicit-function gradient at
            the found box), ``"unroll"`` (backprop through every step of the search:
            the ascent and polish steps with ``search="paper"``; the polish steps from
            the chosen grid box with ``search="global"``, the grid's argmax being
            piecewise constant), ``"truncated"`` (through the last
            ``backward_num_iterations`` steps) or ``"dlm"`` (Theseus' direct loss
            minimisation). Only ``"unroll"`` and ``"truncated"`` (with
            ``backward_num_iterations`` >= 2) have second derivatives; the others
            raise on ``create_graph=True``. A frozen box (``info.frozen``) has a zero
            gradient in every mode.
        search: ``"paper"`` (default): the paper's staged ascent from Algorithm 1's
            start, then a guarded Newton polish: a local maximum of the cost.
            ``"global"``: the cost at the last stage's sharpness
            (:attr:`final_sharpness`) scored on a grid over every feasible box
            (``grid_step``), its ``grid_candidates`` best local maxima polished by the
            same guarded Newton steps, the highest f kept (ties: see
            :class:`~dac.optim.GlobalSearch`); ``info.near_tie`` marks maps with a
            separate maximum within ``tie_tolerance``. The ascent's constants
            (``sharpness_factor`` etc.) then only set the final sharpness.
        saliency: a module mapping the images (as given to the layer: integer or
            floating Tensor[B, C, H, W]) to a non-negative map Tensor[B, 1, H // k,
            W // k] in the paper's units (the max–min range of [0, 1] images), e.g.
            :class:`dac.saliency.SaliencyNet`. Default (None): ``MaxMinPool(pool_size)``,
            the paper's map. Its parameters get gradients through the box.
        sharpness: gamma of the first stage, per saliency pixel (paper: 0.025); no stage's
            may exceed ``MAX_SHARPNESS`` (1e6).
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
            (paper: 1/3.5): the box is never narrower than ``2 * r_min_fraction`` of
            the image width; clipped so the smallest box fits the image.
        r_init_fraction: initial half-width ``width * r_init_fraction`` (paper: 1/2.3).
        saliency_scale: the map is multiplied by this before the search (255: the
            paper's 8-bit intensities, which the "+1" of eq. 3 and eta = 96 assume).
        backward_num_iterations: steps differentiated in ``"truncated"`` mode.
        dlm_epsilon: epsilon of ``"dlm"`` mode. It must be far below the Hessian's
            scale (~1e-3 here), not Theseus' default 1e-2, which gives ~0 gradients.
        antialias: anti-alias the crop when it shrinks.
        grid_step: ``search="global"``: spacing of the grid boxes' left and right
            edges, saliency pixels (r in half steps); a step whose grid would hold more
            than 2^27 boxes on the map is refused when the map is known.
        grid_candidates: ``search="global"``: grid maxima polished per image.
        tie_tolerance: ``search="global"``: relative gap in f under which a
            separate maximum is a near tie.
        learn: paper's constants trained with the box's gradient (as parameters of
            this module), a list or tuple of names from :data:`LEARNABLE`:
            ``"r_min"``, the minimum half-width as ``r_min_fraction = 0.5 sigmoid(p)``
            (bounded in (0, 0.5), starting at ``r_min_fraction``, which must then be
            below 0.5); ``"sharpness"``, every stage's gamma times ``4 ** tanh(q)``
            (within [1/4, 4] times the set one, starting at 1). Their current values:
            :attr:`r_min_value`, :attr:`sharpness_gain`. The box depends on r_min only
            where it is held at the minimum width (elsewhere the box's own r absorbs a
            change of r_min).

    Examples:
        >>> layer = DACrop(output_size=(20, 37), pool_size=4)
        >>> layer(torch.rand(2, 1, 120, 200)).shape
        torch.Size([2, 1, 20, 37])
        >>> DACrop(output_size=(20, 37), pool_size=4, search="global")(torch.rand(2, 1, 120, 200)).shape
        torch.Size([2, 1, 20, 37])
    """

    def __init__(
        self,
        output_size: Sequence[int] = (200, 370),
        pool_size: int = 10,
        backward_mode: str = "implicit",
        *,
        saliency: nn.Module | None = None,
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
        search: str = "paper",
        grid_step: float = 4.0,
        grid_candidates: int = 4,
        tie_tolerance: float = 1e-3,
        learn: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.output_size = check_size(output_size, "output_size")
        self.pool_size = check_int(pool_size, "pool_size", 1)
        if not isinstance(backward_mode, str) or backward_mode.lower() not in BACKWARD_MODES:
            raise DACInputError(f"backward_mode: expected one of {BACKWARD_MODES}, got {backward_mode!r}")
        self.backward_mode = backward_mode.lower()
        if saliency is not None and not isinstance(saliency, nn.Module):
            raise DACInputError(f"saliency: expected an nn.Module or None, got {type(saliency).__name__}")
        if saliency is None and self.pool_size == 1:
            raise DACInputError("pool_size: 1 makes the paper's max-min map zero everywhere (each window is one "
                                "pixel, its max equal to its min), so every box would be the start box; use 2 or more")
        self.saliency = saliency if saliency is not None else MaxMinPool(self.pool_size)
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
        steepest = max(self.sharpness, self.final_sharpness)
        if not steepest <= MAX_SHARPNESS:
            raise DACInputError(
                f"sharpness: the stages' sharpness reaches {steepest:.3g} per saliency pixel "
                f"(sharpness={self.sharpness:g} times sharpness_factor={self.schedule.sharpness_factor:g} per stage, "
                f"{self.schedule.stages} stages); at most {MAX_SHARPNESS:g}"
            )
        self.r_min_fraction = check_positive(r_min_fraction, "r_min_fraction")
        self.r_init_fraction = check_positive(r_init_fraction, "r_init_fraction")
        self.saliency_scale = check_positive(saliency_scale, "saliency_scale")
        self.backward_num_iterations = check_int(backward_num_iterations, "backward_num_iterations", 1)
        self.dlm_epsilon = check_positive(dlm_epsilon, "dlm_epsilon")
        self.antialias = check_bool(antialias, "antialias")
        if not isinstance(search, str) or search.lower() not in SEARCHES:
            raise DACInputError(f"search: expected one of {SEARCHES}, got {search!r}")
        self.search_method = search.lower()
        self.grid = GridSchedule(step=grid_step, candidates=grid_candidates, tie_tolerance=tie_tolerance)
        if not isinstance(learn, (list, tuple)) or not all(isinstance(name, str) and name in LEARNABLE for name in learn):
            raise DACInputError(f"learn: expected names among {LEARNABLE}, got {learn!r}")
        self.learn = tuple(name for name in LEARNABLE if name in learn)
        if "r_min" in self.learn:
            if self.r_min_fraction >= 0.5:
                raise DACInputError(f"r_min_fraction: a learned r_min starts below 0.5 (its bound), got {self.r_min_fraction}")
            self.r_min_logit = nn.Parameter(torch.logit(torch.tensor(2.0 * self.r_min_fraction, dtype=torch.float64)).float())
        if "sharpness" in self.learn:
            self.sharpness_logit = nn.Parameter(torch.zeros(()))

    @property
    def aspect(self) -> float:
        """Box height / width = H_out / W_out."""
        return self.output_size[0] / self.output_size[1]

    @property
    def final_sharpness(self) -> float:
        """gamma of the last stage: the cost whose maximum the box is (as set; a learned
        sharpness multiplies it by :attr:`sharpness_gain`)."""
        try:
            return self.sharpness * self.schedule.sharpness_factor ** (self.schedule.stages - 1)
        except OverflowError:  # a float power beyond 1.8e308
            return math.inf

    @property
    def r_min_value(self) -> Tensor:
        """The minimum half-width as a fraction of the map's width, Tensor[] (learned
        with ``learn=("r_min",)``, else ``r_min_fraction``)."""
        if "r_min" in self.learn:
            return 0.5 * torch.sigmoid(self.r_min_logit)
        return torch.tensor(self.r_min_fraction)

    @property
    def sharpness_gain(self) -> Tensor:
        """The factor on every stage's sharpness, Tensor[] (learned with
        ``learn=("sharpness",)``, else 1)."""
        if "sharpness" in self.learn:
            return SHARPNESS_RANGE ** torch.tanh(self.sharpness_logit)
        return torch.tensor(1.0)

    def _r_min(self, h: int, w: int, like: Tensor) -> Tensor:
        """r_min of a batch of h x w maps, Tensor[B] in ``like``'s dtype (differentiable in
        the learned fraction)."""
        fraction = self.r_min_value if "r_min" in self.learn else self.r_min_fraction
        return _fit_r_min(h, w, fraction, self.aspect, like)

    def _final_sharpness(self, like: Tensor) -> Tensor:
        """The searched gamma, Tensor[1, 1] in ``like``'s dtype (differentiable when learned)."""
        if "sharpness" not in self.learn:
            return like.new_full((1, 1), self.final_sharpness)
        return (self.final_sharpness * self.sharpness_gain).to(like.dtype).reshape(1, 1)

    # ----------------------------------------------------------------- public
    @_eager
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
        _check_has_values(images)
        crops, boxes, info = by_size(images, self._crop_batch)
        return (crops, boxes, info) if return_boxes else crops

    @_eager
    def locate(self, images: Images, return_info: bool = False) -> Tensor | tuple[Tensor, DACSolverInfo]:
        """Boxes Tensor[B, 4], xyxy in input pixels, differentiable w.r.t. ``images``
        and the saliency stage's parameters.

        With ``return_info`` also the :class:`~dac.optim.DACSolverInfo`, one row per
        image in input order.
        """
        _check_has_values(images)
        boxes, info = by_size(images, self._locate_batch)
        return (boxes, info) if return_info else boxes

    def saliency_map(self, images: Images) -> Tensor | list[Tensor]:
        """The map the search runs on (before ``saliency_scale``): Tensor[B, 1, H // k,
        W // k] for a batch, a list of Tensor[1, h, w] for a list of images."""
        _check_has_values(images)
        if isinstance(images, Tensor):
            return self._saliency(images)
        return [self._saliency(image[None])[0] for image in images]

    def thetas_to_boxes(self, thetas: Tensor, image_size: Sequence[int]) -> Tensor:
        """Map search parameters (e.g. ``info.stage_thetas``, Tensor[..., 3]) of images of
        ``image_size`` = (H, W) to xyxy boxes in input pixels, Tensor[..., 4]."""
        height, width = check_size(image_size, "image_size")
        h, w = height // self.pool_size, width // self.pool_size
        if h < 1 or w < 1:
            raise DACInputError(f"image_size: {(height, width)} is smaller than one pooling window ({self.pool_size})")
        if not isinstance(thetas, Tensor) or thetas.ndim == 0 or thetas.shape[-1] != 3:
            raise DACInputError(f"thetas: expected a Tensor[..., 3] = (x_c, y_c, r), got {getattr(thetas, 'shape', type(thetas).__name__)}")
        flat = thetas.reshape(-1, 3)
        r_min = self._r_min(h, w, flat).detach()
        return theta_to_boxes(flat, r_min, self.aspect, self.pool_size).reshape(*thetas.shape[:-1], 4)

    def extra_repr(self) -> str:
        s = self.schedule
        return (
            f"output_size={self.output_size}, pool_size={self.pool_size}, "
            f"backward_mode={self.backward_mode!r}, sharpness={self.sharpness}, "
            f"step_size={s.step_size}, stages={s.stages}, sharpness_factor={s.sharpness_factor}, "
            f"step_factor={s.step_factor}, steps_per_stage={s.steps_per_stage}, "
            f"max_step={s.max_step}, polish_steps={s.polish_steps}, "
            f"r_min_fraction={self.r_min_fraction:.4g}, saliency_scale={self.saliency_scale}, "
            f"search={self.search_method!r}"
            + (f", learn={self.learn}" if self.learn else "")
            + (
                f", grid_step={self.grid.step}, grid_candidates={self.grid.candidates}, "
                f"tie_tolerance={self.grid.tie_tolerance}"
                if self.search_method == "global"
                else ""
            )
        )

    # --------------------------------------------------------------- internal
    def _crop_batch(self, images: Tensor) -> tuple[Tensor, Tensor, DACSolverInfo]:
        boxes, info = self._locate_batch(images)
        with _autocast_off(images.device):
            crops = crop_resize(images, boxes, self.output_size, antialias=self.antialias)
        return crops, boxes, info

    def _saliency(self, images: Tensor) -> Tensor:
        """The saliency stage's map of one same-size batch, checked."""
        check_image_batch(images)
        check_unit_range(images)
        h, w = check_poolable(images, self.pool_size)
        saliency = self.saliency(images)
        expected = (images.shape[0], 1, h, w)
        if not isinstance(saliency, Tensor) or tuple(saliency.shape) != expected:
            got = tuple(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__
            raise DACInputError(
                f"saliency: the module must map images {tuple(images.shape)} to a map of shape "
                f"{expected} (B, 1, H // pool_size, W // pool_size), got {got}"
            )
        _check_map(saliency)
        return saliency

    @_eager
    def search(self, saliency: Tensor) -> tuple[Tensor, DACSolverInfo]:
        """Boxes found on given maps, as if the saliency stage had made them.

        For maps computed once and searched many times (training a saliency stage on
        cached features). ``locate(images)`` is ``search(saliency_map(images))``.

        Args:
            saliency: Tensor[B, 1, h, w], finite and >= 0, the maps of images whose
                pooled size is h x w (h = H // pool_size, w = W // pool_size).

        Returns:
            (boxes Tensor[B, 4] xyxy in input pixels, :class:`~dac.optim.DACSolverInfo`).
        """
        if not isinstance(saliency, Tensor) or saliency.ndim != 4 or saliency.shape[1] != 1:
            got = tuple(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__
            raise DACInputError(f"saliency: expected Tensor[B, 1, h, w], got {got}")
        _check_has_values(saliency, "saliency")
        _check_map(saliency)
        return self._search(saliency)

    @_eager
    def candidates(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every maximum the global search polished, with its cost: what a front that
        learns which maximum to pick trains on.

        The search runs without autograd; each candidate's f is then evaluated on the
        map with autograd, so it is differentiable in the saliency stage's parameters.
        At a stationary point that is f's whole derivative in the map (the box's own
        move contributes ``grad_theta f . d theta = 0``); a candidate held by the image
        border or not converged gets the part at its fixed box.

        Args:
            images: Tensor[B, C, H, W] of one size.

        Returns:
            ``(boxes, cost, distinct)``: boxes Tensor[B, K, 4] xyxy in input pixels
            (detached; K = ``grid_candidates``, lattice order); their f (eq. 3 at the last
            stage's sharpness) Tensor[B, K]; distinct Tensor[B, K] bool, False for a
            candidate whose box overlaps an earlier one's by IoU > 0.9 (two grid maxima
            polished to one maximum, or a map with fewer maxima repeating its best).
            The box :meth:`locate` returns is the candidate of the highest f.

        Raises:
            DACInputError: ``search`` is not ``"global"``.
        """
        if self.search_method != "global":
            raise DACInputError(f"search: candidates come from the global search; this DACrop has search={self.search_method!r}")
        saliency = self._saliency(images)
        with _autocast_off(saliency.device):
            scaled = self._searched_map(saliency)
            with torch.no_grad():
                _, info = self._search(scaled.detach(), scaled=True)  # as locate: the same maxima
            batch, _, h, w = scaled.shape
            count = info.candidates.shape[1]
            thetas = info.candidates.reshape(-1, 3)
            r_min = self._r_min(h, w, scaled).repeat_interleave(count)
            gamma = self._final_sharpness(scaled).reshape(1).expand(len(thetas))
            cost, _, _ = _cost_derivatives(thetas, scaled[:, 0], r_min, self.aspect, gamma, 0)
            boxes = _theta_to_boxes(thetas, r_min, self.aspect, self.pool_size).reshape(batch, count, 4)
            edges = boxes.float()[..., [0, 2, 1, 3]]  # (x1, x2, y1, y2), as _iou takes them
            overlap = _iou(edges[:, :, None], edges[:, None, :]).tril(-1)  # [B, K, K]: with earlier ones
            distinct = ~(overlap > 0.9).any(dim=2)
        return boxes, cost.reshape(batch, count), distinct

    def _locate_batch(self, images: Tensor) -> tuple[Tensor, DACSolverInfo]:
        return self._search(self._saliency(images))

    def _searched_map(self, saliency: Tensor) -> Tensor:
        """The map as the search sees it: float32 (float64 kept), times ``saliency_scale``,
        a faint map lifted (:func:`_lift_faint`)."""
        dtype = torch.float64 if saliency.dtype == torch.float64 else torch.float32
        scaled = saliency.to(dtype) * self.saliency_scale
        # The cost's derivatives multiply sums over the map: in float32 the search ended
        # in a torch linear-algebra error once a map summed to ~3e21-9e21 (phantoms at two
        # sizes, saliency_scale 1e19 and 3e18). The limit, the square root of the dtype's
        # range (1.8e19 in float32), leaves ~100x of room.
        largest, limit = float(scaled.detach().sum(dim=(1, 2, 3)).max()), math.sqrt(torch.finfo(dtype).max)
        if not largest <= limit:
            raise DACInputError(
                f"saliency_scale: the map times saliency_scale={self.saliency_scale:g} sums to {largest:.3g} in an "
                f"image, more than the search's {dtype} arithmetic holds ({limit:.3g}); lower saliency_scale "
                "or the map, or search a float64 map"
            )
        return _lift_faint(scaled)

    def _search(self, saliency: Tensor, scaled: bool = False) -> tuple[Tensor, DACSolverInfo]:
        # Without autograd the search runs in inference mode (less overhead per operation:
        # at batch 1 it is bound by that, not by arithmetic); what it returns is cloned out
        # of it, so that callers get ordinary tensors. (One function, not a wrapper: the
        # caller's map is let go when ``saliency`` is rebound, as it is below.)
        # ``scaled``: the map is already :meth:`_searched_map`'s.
        inference = not torch.is_grad_enabled()
        with _autocast_off(saliency.device), torch.inference_mode() if inference else contextlib.nullcontext():
            if not scaled:
                saliency = self._searched_map(saliency)
            batch, _, h, w = saliency.shape
            r_min = self._r_min(h, w, saliency)
            theta0 = _initial_theta(h, w, r_min.detach(), self.aspect, self.r_init_fraction)
            sharpness = self._final_sharpness(saliency)
            objective, _, inputs = build_objective(theta0, saliency, sharpness, r_min[:, None], self.aspect)
            if self.search_method == "global":
                optimizer: StagedAscent = GlobalSearch(objective, self.schedule, self.grid)
            else:
                optimizer = StagedAscent(objective, self.schedule)
            layer = th.TheseusLayer(optimizer, vectorize=False)
            kwargs: dict[str, Any] = {"backward_mode": self.backward_mode}
            if self.backward_mode == "truncated":
                kwargs["backward_num_iterations"] = self.backward_num_iterations
            if self.backward_mode == "dlm":
                kwargs["dlm_epsilon"] = self.dlm_epsilon
            values, info = layer(inputs, optimizer_kwargs=kwargs)
            theta = values["theta"]
            if self.backward_mode in ("implicit", "dlm") and theta.requires_grad:
                theta = _FirstOrderOnly.apply(theta, self.backward_mode)
                self._warn_if_inexact(info, batch)
            elif self.backward_mode == "truncated" and self.backward_num_iterations < 2 and theta.requires_grad:
                # One Newton step at the converged box has zero Jacobian in theta: its first
                # derivative is exact, its second misses how the start moves (46 % off).
                theta = _FirstOrderOnly.apply(theta, "truncated with backward_num_iterations=1")
            boxes = _theta_to_boxes(theta, r_min, self.aspect, self.pool_size)
        if inference:
            _release(objective)
            return boxes.clone(), _out_of_inference(info)
        return boxes, info

    def _warn_if_inexact(self, info: DACSolverInfo, batch: int) -> None:
        missed = int((~(info.converged | info.frozen)).sum())
        if missed:
            warnings.warn(
                f"DACrop: {missed} of {batch} boxes did not reach a stationary point; "
                f"their {self.backward_mode} gradients are approximate (raise polish_steps; where the map is nearly flat, search it in float64)",
                RuntimeWarning,
                stacklevel=4,
            )

    def config(self) -> dict[str, Any]:
        """What changes the boxes and crops, as JSON-ready values (the settings key of ``dac crop``).

        The constructor's arguments that change outputs (``output_size``, ``pool_size``,
        ``sharpness``, the schedule's fields, ``r_min_fraction``, ``r_init_fraction``,
        ``saliency_scale``, ``antialias``, ``search`` and, for the global search, its
        grid) and the saliency stage's class with its own ``config()`` where it has one; not ``backward_mode``, ``backward_num_iterations``
        or ``dlm_epsilon`` (they change gradients, not outputs), nor the module's mode,
        device or weights (a caller digests ``state_dict`` separately).

        Examples:
            >>> DACrop(output_size=(20, 37), pool_size=4).config()["pool_size"]
            4
        """
        saliency = self.saliency
        stage = {"class": f"{type(saliency).__module__}.{type(saliency).__qualname__}"}
        if callable(getattr(saliency, "config", None)):
            stage |= saliency.config()
        return {
            "output_size": list(self.output_size),
            "pool_size": self.pool_size,
            "sharpness": self.sharpness,
            "schedule": {f.name: getattr(self.schedule, f.name) for f in dataclasses.fields(self.schedule)},
            "r_min_fraction": self.r_min_fraction,
            "r_init_fraction": self.r_init_fraction,
            "saliency_scale": self.saliency_scale,
            "antialias": self.antialias,
            "saliency": stage,
            "search": self.search_method,
        } | ({"learn": list(self.learn)} if self.learn else {}) | ({"grid": {f.name: getattr(self.grid, f.name) for f in dataclasses.fields(self.grid)}}
             if self.search_method == "global" else {})


@contextlib.contextmanager
def quiet_unconverged():
    """Silence :class:`DACrop`'s warning about boxes that did not reach a stationary
    point, for callers that count those boxes themselves (``info.converged``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DACrop: .* did not reach a stationary point", category=RuntimeWarning)
        yield


def _check_has_values(images: Images | Tensor, name: str = "images") -> None:
    """Refuse tensors with no pixels to read as a grid: on the meta device (shapes, no
    values; a box depends on them) or sparse (:func:`check_dense`)."""
    if isinstance(images, Tensor):
        items = [(name, images)]
    else:
        items = [(f"{name}[{i}]", t) for i, t in enumerate(images)] if isinstance(images, (list, tuple)) else []
    for label, tensor in items:
        if not isinstance(tensor, Tensor):
            continue  # the batch checks name it
        if tensor.device.type == "meta":
            raise DACInputError(
                f"{label}: on the meta device, which holds shapes but no values; DACrop's box depends on "
                "the pixels (move the tensor to a real device, e.g. .to('cpu'))"
            )
        check_dense(tensor, label)


def _release(objective: th.Objective) -> None:
    """Let an objective that no backward pass will use be freed when its last reference goes.

    A Theseus ``Objective`` keeps a bound method of itself (``_get_error_iter``): a
    reference cycle, so it and the searched map it holds lived until the next garbage
    collection, through the crop (4 MB more at the layer's peak at batch 24).
    """
    objective.__dict__.pop("_get_error_iter", None)


def _out_of_inference(info: DACSolverInfo) -> DACSolverInfo:
    """``info`` with its tensors (inference tensors, made in ``torch.inference_mode``) cloned
    into ordinary ones."""

    def cloned(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {key: cloned(item) for key, item in value.items()}
        return value

    return dataclasses.replace(info, **{f.name: cloned(getattr(info, f.name)) for f in dataclasses.fields(info) if f.init})


def _lift_faint(saliency: Tensor) -> Tensor:
    """Maps whose peak is below the dtype's eps, scaled up to a peak of eps (the same boxes).

    There the ``+ 1`` of eq. 3 swamps the map: ``f = f_in / (f_out + 1)`` equals ``f_in``
    to rounding, and ``f_in`` does not change when the map is scaled, so neither does
    its maximum. Left as they are, such maps (a saliency net whose gate collapsed to
    ~1e-38) underflow in the Hessian and give NaN boxes. The scale is detached, so the
    box's gradient in the map is the exact one, divided by it.
    """
    eps = torch.finfo(saliency.dtype).eps
    peak = saliency.detach().amax(dim=(1, 2, 3), keepdim=True)
    faint = (peak > 0) & (peak < eps)
    # map / peak first: eps / peak overflows for a subnormal peak
    return torch.where(faint, saliency / torch.where(faint, peak, torch.ones_like(peak)) * eps, saliency)


def _check_map(saliency: Tensor) -> None:
    if not saliency.dtype.is_floating_point:
        raise DACInputError(f"saliency: expected a floating map, got {saliency.dtype}")
    if saliency.shape[-2] < 2 or saliency.shape[-1] < 2:
        raise DACInputError(f"saliency: needs at least 2x2 pooled pixels per image, got {tuple(saliency.shape)}")
    detached = saliency.detach()
    if not bool(torch.isfinite(detached).all()) or float(detached.min()) < 0:
        raise DACInputError("saliency: the map must be finite and >= 0 (got NaN, Inf or negative values)")


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses ``create_graph=True``.

    The implicit step (Theseus detaches the Hessian) and DLM give exact first
    derivatives but not second ones: differentiating them again would return a wrong
    number, so it raises instead.
    """

    @staticmethod
    def forward(ctx, theta: Tensor, mode: str) -> Tensor:
        ctx.mode = mode
        return theta.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"DACrop: backward_mode={ctx.mode!r} gives exact first derivatives only; "
                "for second derivatives (create_graph=True) use backward_mode='unroll' or 'truncated' "
                "(backward_num_iterations >= 2)"
            )
        return grad, None


def _autocast_off(device: torch.device):
    """A context with autocast disabled on ``device``'s type (a no-op where autocast has none)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
