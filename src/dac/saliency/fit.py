"""Training a saliency stage from labelled regions, through the box.

* :class:`FitOptions` — how a fit trains (steps, learning rates, loss, augmentation,
  clip, time limit): checked once, when it is made; :data:`FIT_DEFAULTS` its defaults.
* :func:`box_loss` — per box: distance to the target box plus the region left outside.
* :func:`fit_region_masks` — the warm start: the gate fitted to the regions as masks.
* :func:`fit_saliency` — trains a :class:`~dac.saliency.SaliencyNet` *through the box*:
  the loss is on the boxes ``DACrop`` finds on the learned map, and its gradient
  reaches the network by the layer's exact implicit gradient of the box.
* :func:`fit_boxes` — the loop :func:`fit_saliency` and the box-regression baseline
  (:func:`~dac.saliency.fit_box_regressor`) share.

Reproducible by seed: the batches, flips, stretches and shifts of the box steps and of
the warm start are drawn from independent ``numpy`` streams of the seed
(:func:`random_stream`), and :func:`init_generator` gives the ``torch.Generator`` a
stage's initial weights are drawn from; nothing reads the global random state, so one
seed, the same arguments, machine and thread count give bitwise the same weights (the
CPU kernels used are deterministic). Another thread count sums in another order (weights
~1e-5 apart after 8 steps), and a ``time_limit`` that cuts the fit short depends on the
machine's speed.

One trainer? No. ``dac.train.Engine.fit`` runs epochs of cross-entropy over a ``Dataset`` of images
through a ``Pipeline`` (checkpoints, resume, DDP, BatchNorm recalibration); this runs steps of a
box loss through the search over cached features of mixed image sizes (one size per batch), with
a warm-start phase, gradient clipping and a wall-clock limit: they share no step but
``backward(); step()``, and ``dac.train`` imports ``dac.saliency``, so either built on the other
would import upward.

Convention: boxes are xyxy in input pixel coordinates (torchvision's).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import DACInputError, check_bool, check_int, check_pool_size, check_real
from ..layer import DACrop, quiet_unconverged
from .augment import film_border, flip_left_right, stretch_and_shift
from .features import FEATURES
from .net import SaliencyNet
from .targets import margin_target, region_masks

__all__ = [
    "FIT_DEFAULTS", "FitHistory", "FitOptions", "box_loss", "fit_boxes", "fit_region_masks", "fit_saliency",
    "init_generator", "random_stream",
]

_log = logging.getLogger(__name__)

#: Progress is logged (``logging``, logger ``dac.saliency.fit``) every this many steps of each phase.
LOG_EVERY = 20

#: How ``dac fit-saliency`` trains, unless asked otherwise: a mask warm start, then the
#: box loss through the search (measured on phantoms in the README's "Localisation").
#: Two members (gates averaged) scatter less than one; stretch and shift augment the few
#: labelled images (every step: new arch widths and places); the gradient-norm clip keeps
#: one ill-conditioned box from stalling Adam (see :class:`FitOptions`). The margin trades
#: tightness for teeth kept: the target's own IoU with the region is 0.748 at 0.015 of the
#: width (0.764 at 0.012, 0.723 at 0.02), leaving ~43 px per side of a 2836-wide image for
#: the boxes' scatter. The film border (half the images) and the coverage weight 64 (16
#: before) were chosen on tuning phantoms (seeds 5000-5299), each for keeping every tooth
#: inside in more images on both training seeds tried, at some IoU: the boxes that cut
#: teeth were shifted toward a collimator edge near an arch end, then too tight
#: (docs/results_localisation.md). ``count`` and ``members`` are ``dac fit-saliency``'s;
#: the rest are :class:`FitOptions`'s defaults.
FIT_DEFAULTS = {
    "count": 32, "members": 2, "steps": 600, "mask_steps": 400, "batch_size": 8, "lr": 3e-3, "mask_lr": 1e-2,
    "coverage_weight": 64.0, "margin": 0.015, "stretch": 0.1, "shift": 0.035, "clip_norm": 1.0, "border": 0.5,
}

_STREAMS = ("init", "mask", "box")


def random_stream(seed: int, purpose: str) -> np.random.Generator:
    """The random numbers of one ``purpose`` (``"init"``, ``"mask"``, ``"box"``) of a fit of
    ``seed``: independent of the other purposes, of other seeds and of any global state.

    Examples:
        >>> int(random_stream(3, "box").integers(100)) == int(random_stream(3, "box").integers(100))
        True
    """
    return np.random.default_rng([check_int(seed, "seed", 0), _STREAMS.index(purpose)])


def init_generator(seed: int) -> torch.Generator:
    """The ``torch.Generator`` a fit of ``seed`` draws its stage's initial weights from
    (``SaliencyNet(..., generator=init_generator(seed))``).

    Examples:
        >>> a = SaliencyNet(4, width=4, generator=init_generator(1))
        >>> b = SaliencyNet(4, width=4, generator=init_generator(1))
        >>> torch.equal(a.trunk[0].weight, b.trunk[0].weight)
        True
    """
    return torch.Generator().manual_seed(int(random_stream(seed, "init").integers(2**63)))


@dataclass(frozen=True)
class FitOptions:
    """How a fit trains; every value is checked once, when the options are made.

    Args:
        steps: Adam steps on the box loss (fewer if ``time_limit`` runs out first; 0: the
            warm start alone).
        mask_steps: steps of the mask warm start (:func:`fit_region_masks`) before them; 0: none.
        batch_size: images per step (of one image size).
        lr: Adam learning rate of the box steps (cosine decay over ``steps``).
        mask_lr: that of the warm start (cosine decay over ``mask_steps``).
        coverage_weight: of :func:`box_loss` (finite, >= 0).
        margin: the target is the best box of the aspect around the region grown by
            ``margin`` image widths on every side (room for the boxes' scatter, so that
            teeth near the region's edge stay inside), in [0, 0.5).
        stretch: stretch each image left-right about its region's centre by a factor
            drawn from ``[1 - stretch, 1 + stretch]`` (features and boxes; 0: not), in [0, 0.5).
        shift: then move it by up to ``shift`` image widths in x and in y, whole pooled
            pixels, never moving the region off the grid (0: not), in [0, 0.5).
        clip_norm: the largest gradient norm of a box step (a larger one is scaled down
            to it; counted in ``FitHistory.clipped``; inf: none). A box on a nearly flat
            ridge of the cost has an ill-conditioned implicit gradient: on phantoms at
            the paper's size, norms up to ~200 against a median of ~0.2. Unclipped, one
            such step fills Adam's second moment, shrinks the steps after it for
            hundreds of steps, and the fit stalls with its loss high.
        flip: mirror about half of each batch left-right (features and boxes).
        border: the share of images given a collimator border beside one end of their
            region (:func:`~dac.saliency.augment.film_border`; 0: none), in [0, 1].
        time_limit: seconds for the whole fit, warm start included: each phase stops
            after the step that passes it (None: no limit).
        flags: name the options as ``dac fit-saliency``'s (``--mask-steps``) in errors.

    Raises:
        DACInputError: a value of another type or out of its range, naming the option.

    Examples:
        >>> FitOptions(steps=3).steps, FitOptions().margin == FIT_DEFAULTS["margin"]
        (3, True)
        >>> FitOptions(margin=0.7, flags=True)
        Traceback (most recent call last):
        ...
        dac._checks.DACInputError: --margin: expected a fraction of the image width in [0, 0.5), got 0.7
    """

    steps: int = FIT_DEFAULTS["steps"]
    mask_steps: int = FIT_DEFAULTS["mask_steps"]
    batch_size: int = FIT_DEFAULTS["batch_size"]
    lr: float = FIT_DEFAULTS["lr"]
    mask_lr: float = FIT_DEFAULTS["mask_lr"]
    coverage_weight: float = FIT_DEFAULTS["coverage_weight"]
    margin: float = FIT_DEFAULTS["margin"]
    stretch: float = FIT_DEFAULTS["stretch"]
    shift: float = FIT_DEFAULTS["shift"]
    clip_norm: float = FIT_DEFAULTS["clip_norm"]
    flip: bool = True
    border: float = FIT_DEFAULTS["border"]
    time_limit: float | None = None
    flags: InitVar[bool] = False

    def __post_init__(self, flags: bool) -> None:
        def name(option: str) -> str:
            return "--" + option.replace("_", "-") if flags else option

        inf = math.inf
        check_int(self.steps, name("steps"), 0)
        check_int(self.mask_steps, name("mask_steps"), 0)
        check_int(self.batch_size, name("batch_size"), 1)
        for option in ("lr", "mask_lr"):
            check_real(getattr(self, option), name(option), 0, inf, low_open=True, high_open=True)
        check_real(self.coverage_weight, name("coverage_weight"), 0, inf, high_open=True, what="a finite number")
        check_real(self.margin, name("margin"), 0, 0.5, high_open=True, what="a fraction of the image width")
        check_real(self.stretch, name("stretch"), 0, 0.5, high_open=True, what="a fraction (the largest relative change of the width)")
        check_real(self.shift, name("shift"), 0, 0.5, high_open=True, what="a fraction of the image width")
        check_real(self.clip_norm, name("clip_norm"), 0, inf, low_open=True, what="a number (inf: no clipping)")
        check_bool(self.flip, name("flip"))
        check_real(self.border, name("border"), 0, 1, what="a share of the images")
        if self.time_limit is not None:
            check_real(self.time_limit, name("time_limit"), 0, inf, low_open=True, high_open=True, what="seconds")

    @classmethod
    def of(cls, options: FitOptions | None = None, **changes) -> FitOptions:
        """``options`` (None: the defaults) with ``changes``, checked once: what the fit
        functions take (``fit_saliency(..., options, steps=20)``).

        Examples:
            >>> FitOptions.of(FitOptions(steps=5), mask_steps=0).steps
            5
        """
        if options is None:
            return cls(**changes)
        if not isinstance(options, cls):
            raise DACInputError(f"options: expected FitOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **changes) if changes else options


@dataclass
class FitHistory:
    """What :func:`fit_saliency` / :func:`fit_box_regressor` did."""

    steps: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)  #: mean loss per step
    boxes: int = 0  #: boxes searched in the box steps (images x members, over all steps)
    frozen: int = 0  #: of them, boxes with no strict maximum (zero gradient)
    unconverged: int = 0  #: of them, boxes not at a stationary point (approximate gradient)
    mask_steps: int = 0  #: steps of the mask warm start (their time is in ``seconds``)
    mask_loss: list[float] = field(default_factory=list)  #: its loss per step
    clipped: int = 0  #: box steps whose gradient norm was above ``clip_norm`` (scaled down to it)


def box_loss(boxes: Tensor, regions: Tensor, targets: Tensor, widths: Tensor, coverage_weight: float = 1.0) -> Tensor:
    """Per box: smooth-L1 distance to the target box, plus the region left outside (teeth
    cut off), both in image widths.

    ``loss = sum_corners smoothL1((box - target) / W) + coverage_weight * sum_sides
    relu(region side outside the box) / W``.

    Convention: xyxy in input pixels.

    Args:
        boxes, regions, targets: Tensor[B, 4] xyxy (targets from :func:`~dac.saliency.margin_target`).
        widths: Tensor[B], image widths W.
        coverage_weight: weight of the region outside the box.

    Returns:
        Tensor[B].

    Examples:
        >>> box = torch.tensor([[10.0, 10, 50, 30]])
        >>> box_loss(box, box, box, torch.tensor([100.0])).item()
        0.0
    """
    scale = widths.to(boxes)[:, None]
    fit = F.smooth_l1_loss(boxes / scale, targets.to(boxes) / scale, beta=0.01, reduction="none").sum(-1)
    regions = regions.to(boxes)
    outside = torch.cat((boxes[:, :2] - regions[:, :2], regions[:, 2:] - boxes[:, 2:]), dim=-1).clamp_min(0)
    return fit + coverage_weight * (outside / scale).sum(-1)


Locator = Callable[[Tensor, tuple[int, int]], tuple[Tensor, Any]]


def fit_saliency(
    net: SaliencyNet,
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    layer: DACrop,
    options: FitOptions | None = None,
    *,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
    **changes,
) -> FitHistory:
    """Train ``net`` so that the boxes ``layer`` finds on its map fit labelled regions.

    Each step draws a batch of same-size images, computes ``net``'s map from their
    cached features, searches it with ``layer.search`` (whose ``saliency`` should be
    ``net``, so the layer's minimum width and aspect are the ones used later), and
    takes an Adam step on :func:`box_loss`; the gradient reaches ``net`` through the
    box (the layer's backward mode; implicit by default). A net of several members
    trains each on the boxes of its own map (:meth:`~dac.saliency.SaliencyNet.member_maps`,
    all searched at once; the loss is their mean). Frozen boxes (no strict maximum)
    give no gradient; they and unconverged boxes are counted (per member).

    With ``mask_steps`` > 0 the gate is first fitted to the labelled regions as masks
    (:func:`fit_region_masks`: gate 1 inside, 0 outside), which starts the box
    training from a map already dark outside the region; the boxes are then trained
    through the search as above.

    Args:
        net: the saliency stage to train (in place).
        features: per image Tensor[5, h, w] from :func:`~dac.saliency.saliency_features`.
        regions: Tensor[N, 4] xyxy, the labelled region of each image (input pixels).
        image_sizes: per image (H, W).
        layer: the ``DACrop`` whose search is trained through.
        options: how it trains (default :class:`FitOptions`'s defaults, as ``dac
            fit-saliency``); ``**changes`` replace some (``steps=20``).
        seed: the batches, flips, stretches and shifts (:func:`random_stream`).
        callback: ``callback(step, loss)`` after each box step.

    Returns:
        :class:`FitHistory`.

    Raises:
        DACInputError: bad options, a ``net`` of another ``pool_size`` than ``layer``, or
            features, regions and sizes that do not match (before any step).

    Examples:
        >>> from dac.data.phantoms import make_phantom
        >>> from dac.saliency import saliency_features
        >>> p = make_phantom(0, 96, 177)
        >>> net = SaliencyNet(4, width=4, generator=init_generator(0))
        >>> layer = DACrop(output_size=(20, 37), pool_size=4, saliency=net)
        >>> history = fit_saliency(net, [saliency_features(p.image[None], 4)[0]], p.roi[None], [(96, 177)], layer,
        ...                        steps=2, mask_steps=2, batch_size=1)
        >>> history.steps, history.mask_steps, history.boxes
        (2, 2, 2)
    """
    options = FitOptions.of(options, **changes)
    check_pool_size(net, layer.pool_size, "net")

    def locate(feats: Tensor, size: tuple[int, int]):
        maps = net.member_maps(feats)  # [b, members, h, w] -> one search of members x b maps, member-major
        return layer.search(maps.transpose(0, 1).reshape(-1, 1, *maps.shape[-2:]))

    return fit_boxes(net, locate, (net.member_logits, 0.5), features, regions, image_sizes, layer, options, seed=seed, callback=callback)


def fit_region_masks(
    model: nn.Module,
    logits: Callable[[Tensor], Tensor],
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    pool_size: int,
    options: FitOptions | None = None,
    *,
    inside: float = 1.0,
    seed: int = 0,
    **changes,
) -> FitHistory:
    """Fit ``sigmoid(logits(features))`` to the labelled regions as masks: the warm start.

    Per pooled pixel, binary cross-entropy against ``inside`` where the pixel's centre
    lies in the region (:func:`~dac.saliency.region_masks`) and 0 outside. Adam on
    ``model``'s parameters for ``options.mask_steps`` steps at ``options.mask_lr`` with
    cosine decay, on the batches of :func:`fit_saliency` (flips, stretches and shifts
    of ``options``), drawn from the seed's ``"mask"`` stream: the warm start of
    ``fit_saliency(..., seed=s)`` is ``fit_region_masks(..., seed=s)``.

    Args:
        model: owns the parameters ``logits`` uses (trained in place).
        logits: features Tensor[b, 5, h, w] -> logits Tensor[b, m, h, w] (each of the
            m maps fitted to the same masks).
        features, regions, image_sizes: as :func:`fit_saliency`.
        pool_size: k of the features.
        options: as :func:`fit_saliency` (``mask_steps``, ``mask_lr``, ``batch_size``,
            ``flip``, ``stretch``, ``shift``, ``time_limit`` count here).
        inside: the target inside the region (0.5 makes a :class:`SaliencyNet`'s gate
            ``2 sigmoid`` equal 1 there: the paper's map inside, dark outside).
        seed: the batches and augmentation.

    Returns:
        :class:`FitHistory` (its ``steps`` and ``loss`` are the warm start's).

    Examples:
        >>> net = SaliencyNet(4, width=4, generator=init_generator(0))
        >>> fit_region_masks(net, net.member_logits, [torch.rand(5, 8, 12)], torch.tensor([[8.0, 8, 32, 24]]),
        ...                  [(32, 48)], 4, mask_steps=3, batch_size=1).steps
        3
    """
    options = FitOptions.of(options, **changes)
    groups = _size_groups(features, regions, image_sizes, pool_size)
    batches = _draw(features, regions, groups, pool_size, options, options.mask_steps, random_stream(seed, "mask"))
    return _fit_masks(model, logits, inside, batches, pool_size, options, _deadline(options.time_limit))


def fit_boxes(
    model: nn.Module,
    locate: Locator,
    mask_head: tuple[Callable[[Tensor], Tensor], float],
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    layer: DACrop,
    options: FitOptions,
    *,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> FitHistory:
    """The training loop :func:`fit_saliency` and :func:`~dac.saliency.fit_box_regressor`
    share: an optional mask warm start, then Adam (cosine learning-rate decay over
    ``steps``) on :func:`box_loss` towards :func:`~dac.saliency.margin_target`, batches
    of one image size. ``options`` are trusted (checked when they were made).

    Args:
        model: owns the trained parameters.
        locate: ``locate(features Tensor[b, 5, h, w], (H, W))`` -> (boxes Tensor[c b, 4]
            xyxy, ``DACSolverInfo`` or None): c copies of the batch, member-major.
        mask_head: (logits, inside) the warm start fits (:func:`fit_region_masks`).
        features, regions, image_sizes, layer: as :func:`fit_saliency`.
        options: :class:`FitOptions`.
        seed: the box steps' batches draw from its ``"box"`` stream, the warm start's
            from its ``"mask"`` stream.
        callback: ``callback(step, loss)`` after each box step.

    Returns:
        :class:`FitHistory`.
    """
    k = layer.pool_size
    groups = _size_groups(features, regions, image_sizes, k)  # the inputs checked before any step
    boxes_rng, masks_rng = random_stream(seed, "box"), random_stream(seed, "mask")
    history = FitHistory()
    began = time.perf_counter()
    out_of_time = _deadline(options.time_limit)
    if options.mask_steps:
        logits, inside = mask_head
        mask_batches = _draw(features, regions, groups, k, options, options.mask_steps, masks_rng)
        warm = _fit_masks(model, logits, inside, mask_batches, k, options, out_of_time)
        history.mask_steps, history.mask_loss = warm.steps, warm.loss
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.steps)
    model.train()
    for step, (feats, target_regions, (height, width)) in enumerate(_draw(features, regions, groups, k, options, options.steps, boxes_rng)):
        if out_of_time():  # the warm start may have used it all
            break
        with quiet_unconverged():
            boxes, info = locate(feats, (k * feats.shape[-2], k * feats.shape[-1]))
        copies = len(boxes) // len(feats)  # boxes of several members: member-major copies of the batch
        targets = margin_target(target_regions, options.margin, layer, (height, width)).repeat(copies, 1)
        target_regions = target_regions.repeat(copies, 1)
        loss = box_loss(boxes, target_regions, targets, torch.full((len(boxes),), float(width)), options.coverage_weight).mean()
        _step(optimizer, schedule, loss, history, options.clip_norm)
        history.boxes += len(boxes)
        if info is not None:
            history.frozen += int(info.frozen.sum())
            history.unconverged += int((~(info.converged | info.frozen)).sum())
        _progress("step", step, options.steps, history.loss[-1])
        if callback:
            callback(step, history.loss[-1])
    history.seconds = time.perf_counter() - began
    model.eval()
    return history


def _fit_masks(model: nn.Module, logits: Callable[[Tensor], Tensor], inside: float, batches: Iterator, pool_size: int,
               options: FitOptions, out_of_time: Callable[[], bool]) -> FitHistory:
    """The warm start's loop (see :func:`fit_region_masks`): Adam with cosine decay on the
    masks' binary cross-entropy, stopping after the step at which ``out_of_time()``."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=options.mask_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.mask_steps)
    history = FitHistory()
    began = time.perf_counter()
    model.train()
    for step, (feats, target_regions, _) in enumerate(batches):
        out = logits(feats)
        target = inside * region_masks(target_regions, feats.shape[-2:], pool_size).to(out).expand_as(out)
        _step(optimizer, schedule, F.binary_cross_entropy_with_logits(out, target), history)
        _progress("warm-start step", step, options.mask_steps, history.loss[-1])
        if out_of_time():
            break
    history.seconds = time.perf_counter() - began
    return history


def _progress(what: str, step: int, steps: int, loss: float) -> None:
    if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
        _log.info("%s %d/%d: loss %.4f", what, step + 1, steps, loss)


def _deadline(time_limit: float | None) -> Callable[[], bool]:
    """``out_of_time()``: whether ``time_limit`` seconds (None: no limit) have passed since this call."""
    if time_limit is None:
        return lambda: False
    began = time.perf_counter()
    return lambda: time.perf_counter() - began > time_limit


def _step(optimizer: torch.optim.Optimizer, schedule, loss: Tensor, history: FitHistory, clip_norm: float | None = None) -> None:
    """One Adam step on ``loss`` and one of its learning-rate schedule, recorded in ``history``;
    with ``clip_norm``, a gradient of larger norm is scaled down to it first (and counted)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if float(torch.nn.utils.clip_grad_norm_(params, clip_norm)) > clip_norm:
            history.clipped += 1
    optimizer.step()
    schedule.step()
    history.steps += 1
    history.loss.append(float(loss.detach()))


def _size_groups(
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    pool_size: int,
) -> dict[tuple, list[int]]:
    """The images grouped by size, ``{(feature shape, (H, W)): [indices]}``, after checking
    that ``features``, ``regions`` and ``image_sizes`` describe the same N images at
    ``pool_size`` (the check of a fit's inputs, before any step)."""
    n = len(features)
    if n == 0 or not isinstance(regions, Tensor) or regions.shape != (n, 4) or len(image_sizes) != n:
        raise DACInputError(f"features, regions, image_sizes: expected N items each and regions Tensor[N, 4], got {n}, "
                            f"{tuple(getattr(regions, 'shape', ()))}, {len(image_sizes)}")
    groups: dict[tuple, list[int]] = {}
    for i, (f, size) in enumerate(zip(features, image_sizes)):
        expected = (len(FEATURES), int(size[0]) // pool_size, int(size[1]) // pool_size)
        if not isinstance(f, Tensor) or tuple(f.shape) != expected:
            raise DACInputError(f"features[{i}]: expected Tensor{list(expected)} (saliency_features of an image of (H, W) = "
                                f"{tuple(int(v) for v in size)} at the layer's pool_size {pool_size}), got {tuple(getattr(f, 'shape', ())) or type(f).__name__}")
        groups.setdefault((tuple(f.shape), tuple(int(s) for s in size)), []).append(i)
    if not (torch.isfinite(regions).all() and (regions[:, 2:] > regions[:, :2]).all()):
        raise DACInputError("regions: expected finite xyxy boxes with x1 < x2 and y1 < y2")
    return groups


def _draw(
    features: Sequence[Tensor],
    regions: Tensor,
    groups: dict[tuple, list[int]],
    pool_size: int,
    options: FitOptions,
    steps: int,
    rng: np.random.Generator,
) -> Iterator[tuple[Tensor, Tensor, tuple[int, int]]]:
    """``steps`` random batches of one image size: (features Tensor[b, 5, h, w], their
    regions Tensor[b, 4] float64 in input pixels, the image size (H, W)).

    Sizes (``groups`` of :func:`_size_groups`) are drawn in proportion to their images;
    with ``options.flip``, about half of each batch is mirrored left-right
    (:func:`~dac.saliency.augment.flip_left_right`); then each image is stretched and
    shifted (:func:`~dac.saliency.augment.stretch_and_shift`; ``stretch`` = ``shift`` = 0:
    not at all).
    """
    keys = list(groups)
    sizes = np.array([len(groups[k]) for k in keys], dtype=float)
    for _ in range(steps):
        key = keys[rng.choice(len(keys), p=sizes / sizes.sum())]
        members = groups[key]
        pick = rng.choice(members, size=min(options.batch_size, len(members)), replace=False)
        feats = torch.stack([features[i] for i in pick])
        target_regions = regions[torch.as_tensor(pick, device=regions.device)].to(feats.device, torch.float64)
        if options.flip:
            feats, target_regions = flip_left_right(feats, target_regions, pool_size, torch.as_tensor(rng.random(len(pick)) < 0.5))
        if options.border:
            feats = film_border(feats, target_regions, pool_size, rng, options.border)
        if options.stretch or options.shift:
            feats, target_regions = stretch_and_shift(feats, target_regions, pool_size, rng, options.stretch, options.shift)
        yield feats, target_regions, key[1]
