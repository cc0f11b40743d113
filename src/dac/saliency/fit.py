"""Where the box should be: scores against labelled regions, and learning from labelled boxes.

* :func:`aspect_box` — the best box a crop of fixed aspect can be: the smallest box of
  that aspect (and at least the minimum width) around the region, kept in the image.
  Its IoU with the region is the *ceiling* a DAC box can reach.
* :func:`localisation_scores` — per image: IoU with the region, the share of each
  tooth's area inside the box, and whether every tooth is inside.
* :func:`fit_saliency` — trains a :class:`~dac.saliency.SaliencyNet` *through the
  box*: the loss is on the boxes ``DACrop`` finds on the learned map, and its gradient
  reaches the network by the layer's exact implicit gradient of the box.
* :class:`BoxRegressor` — the natural alternative: the same features, a CNN with a box
  head, trained on the same labels with the same loss (:func:`fit_box_regressor`).

Convention: boxes are xyxy in input pixel coordinates (torchvision's): pixel ``i``
covers ``[i, i + 1)``, the whole image is ``(0, 0, W, H)``.
"""
from __future__ import annotations

import csv
import json
import math
import numbers
import time
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import DACInputError, check_int, check_positive
from .layer import DACrop, quiet_unconverged
from .saliency import FEATURES, SaliencyNet, check_features, feature_trunk, standardize_features, trunk_map

__all__ = [
    "FIT_DEFAULTS",
    "LEARNED_DEFAULTS",
    "BoxRegressor",
    "FitHistory",
    "aspect_box",
    "box_loss",
    "check_fit_options",
    "check_fit_out",
    "fit_box_regressor",
    "fit_region_masks",
    "fit_saliency",
    "labelled_fit",
    "load_dacrop",
    "localisation_scores",
    "margin_target",
    "minimum_width",
    "region_masks",
    "train_saliency",
]


def aspect_box(regions: Tensor, aspect: float, image_sizes: Tensor, min_width: Tensor | float = 0.0) -> Tensor:
    """The smallest box of ``aspect`` (height / width), at least ``min_width`` wide,
    centred on each region and shifted to lie inside its image.

    Args:
        regions: Tensor[B, 4] xyxy.
        aspect: box height / width.
        image_sizes: Tensor[B, 2] = (H, W) of each image.
        min_width: smallest width, pixels (float or Tensor[B]).

    Returns:
        Tensor[B, 4] xyxy (as wide as the image allows, if the region needs more).

    Example:
        >>> aspect_box(torch.tensor([[10.0, 10.0, 30.0, 20.0]]), 0.5, torch.tensor([[100, 200]]))
        tensor([[10., 10., 30., 20.]])
    """
    regions = regions.to(torch.promote_types(regions.dtype, torch.float32))
    sizes = image_sizes.to(regions)
    height, width = sizes[:, 0], sizes[:, 1]
    w = torch.maximum(regions[:, 2] - regions[:, 0], (regions[:, 3] - regions[:, 1]) / aspect)
    w = torch.maximum(w, torch.as_tensor(min_width, dtype=w.dtype).expand_as(w))
    w = torch.minimum(w, torch.minimum(width, height / aspect))
    h = aspect * w
    cx = ((regions[:, 0] + regions[:, 2]) / 2).clamp(w / 2, width - w / 2)
    cy = ((regions[:, 1] + regions[:, 3]) / 2).clamp(h / 2, height - h / 2)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def localisation_scores(boxes: Tensor, regions: Tensor, teeth: Sequence[Tensor] | None = None, inside: float = 0.99) -> dict[str, Tensor]:
    """How well ``boxes`` find ``regions`` (and keep ``teeth``), per image.

    Args:
        boxes: Tensor[B, 4] xyxy, the crops.
        regions: Tensor[B, 4] xyxy, the true regions.
        teeth: per image a Tensor[N_i, 4] of tooth boxes (phantoms carry them), or None.
        inside: a tooth counts as inside when at least this share of its box's area is.

    Returns:
        ``iou`` Tensor[B]; with ``teeth`` also ``tooth_coverage`` (mean share of each
        tooth's area inside the box), ``worst_tooth`` (the smallest share) and
        ``all_teeth_inside`` (bool), each Tensor[B]. An image without teeth
        (Tensor[0, 4]) keeps all of them: coverage 1, worst 1, all inside.

    Raises:
        DACInputError: ``boxes`` and ``regions`` are not both Tensor[B, 4], or ``teeth``
            does not hold B items.

    Example:
        >>> s = localisation_scores(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 5]]),
        ...                         [torch.tensor([[0.0, 0, 2, 2], [8, 8, 12, 12]])])
        >>> s["iou"].item(), s["tooth_coverage"].item(), s["all_teeth_inside"].item()
        (0.5, 0.625, False)
    """
    from torchvision.ops import box_iou

    for value, name in ((boxes, "boxes"), (regions, "regions")):
        if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[-1] != 4 or len(value) != len(boxes):
            raise DACInputError(f"{name}: expected Tensor[B, 4] with B = {len(boxes)} (as boxes), got {tuple(getattr(value, 'shape', ())) or type(value).__name__}")
    if teeth is not None and len(teeth) != len(boxes):
        raise DACInputError(f"teeth: expected one Tensor[N, 4] per box ({len(boxes)}), got {len(teeth)}")
    boxes, regions = boxes.detach().double(), regions.detach().double()
    scores = {"iou": box_iou(boxes, regions).diagonal()}
    if teeth is not None:
        coverage, worst, every = [], [], []
        for box, tooth in zip(boxes, teeth):
            tooth = tooth.double().reshape(-1, 4).to(box.device)
            share = _overlap(tooth, box) / ((tooth[:, 2] - tooth[:, 0]) * (tooth[:, 3] - tooth[:, 1])).clamp_min(1e-9)
            if not len(share):
                share = box.new_ones(1)  # no teeth to cut off
            coverage.append(share.mean())
            worst.append(share.min())
            every.append(bool((share >= inside).all()))
        scores["tooth_coverage"] = torch.stack(coverage)
        scores["worst_tooth"] = torch.stack(worst)
        scores["all_teeth_inside"] = torch.tensor(every)
    return scores


def _overlap(boxes: Tensor, box: Tensor) -> Tensor:
    width = (torch.minimum(boxes[:, 2], box[2]) - torch.maximum(boxes[:, 0], box[0])).clamp_min(0)
    height = (torch.minimum(boxes[:, 3], box[3]) - torch.maximum(boxes[:, 1], box[1])).clamp_min(0)
    return width * height


def labelled_fit(net: nn.Module, layer: DACrop, features: Sequence[Tensor], regions: Tensor, batch_size: int = 16) -> dict[str, float]:
    """How a trained saliency stage's boxes fit the labelled regions it was trained on.

    The stage's map of each image (from its cached features) is searched by ``layer``
    as in use, and the boxes are compared with the labels: a fit that went wrong (a
    training loss that stayed high, boxes cutting the regions) shows here, not only
    on held-out images that a user may not have.

    Args:
        net: the stage (its ``from_features`` gives the map).
        features: per image Tensor[5, h, w] (sizes may differ).
        regions: Tensor[N, 4] xyxy, the labelled regions (input pixels).
        batch_size: maps searched at once.

    Raises:
        DACInputError: ``regions`` is not one Tensor[4] row per image.

    Returns:
        ``labelled_iou`` (mean IoU of box and region), ``labelled_region_kept`` (mean
        share of the region's area inside the box) and ``labelled_region_inside`` (share
        of images with at least 99 % of the region inside).
    """
    from ._batching import by_size

    def boxes_of(group: Tensor) -> Tensor:
        found = []
        with torch.no_grad(), quiet_unconverged():
            for start in range(0, len(group), batch_size):
                found.append(layer.search(net.from_features(group[start : start + batch_size]))[0])
        return torch.cat(found)

    if not isinstance(regions, Tensor) or tuple(regions.shape) != (len(features), 4):
        got = tuple(regions.shape) if isinstance(regions, Tensor) else type(regions).__name__
        raise DACInputError(f"regions: expected Tensor[{len(features)}, 4] (one per image), got {got}")
    boxes = by_size(list(features), boxes_of)
    regions = regions.to(boxes.device)
    scores = localisation_scores(boxes, regions, [region[None] for region in regions])
    return {
        "labelled_iou": float(scores["iou"].mean()),
        "labelled_region_kept": float(scores["tooth_coverage"].mean()),
        "labelled_region_inside": float(scores["all_teeth_inside"].float().mean()),
    }


def box_loss(boxes: Tensor, regions: Tensor, targets: Tensor, widths: Tensor, coverage_weight: float = 1.0) -> Tensor:
    """Per box: smooth-L1 distance to the best box of the aspect, plus the region left
    outside (teeth cut off), both in image widths.

    ``loss = sum_corners smoothL1((box - target) / W) + coverage_weight * sum_sides
    relu(region side outside the box) / W``.

    Args:
        boxes, regions, targets: Tensor[B, 4] xyxy (targets from :func:`aspect_box`).
        widths: Tensor[B], image widths W.

    Returns:
        Tensor[B].
    """
    scale = widths.to(boxes)[:, None]
    fit = F.smooth_l1_loss(boxes / scale, targets.to(boxes) / scale, beta=0.01, reduction="none").sum(-1)
    regions = regions.to(boxes)
    outside = torch.cat((boxes[:, :2] - regions[:, :2], regions[:, 2:] - boxes[:, 2:]), dim=-1).clamp_min(0)
    return fit + coverage_weight * (outside / scale).sum(-1)


@dataclass
class FitHistory:
    """What :func:`fit_saliency` / :func:`fit_box_regressor` did."""

    steps: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)  #: mean loss per step
    frozen: int = 0  #: boxes with no strict maximum (zero gradient), over all steps
    unconverged: int = 0  #: boxes not at a stationary point (approximate gradient)
    mask_steps: int = 0  #: steps of the mask warm start (their time is in ``seconds``)
    mask_loss: list[float] = field(default_factory=list)  #: its loss per step
    clipped: int = 0  #: box steps whose gradient norm was above ``clip_norm`` (scaled down to it)


class BoxRegressor(nn.Module):
    """Direct box regression from the features :class:`SaliencyNet` sees: the baseline.

    The same trunk (:func:`~dac.saliency.feature_trunk` on standardised features) ends
    in a heat map whose soft-argmax is the box centre, and a width from the pooled
    features; the box has the crop's aspect, is at least ``min_width_fraction`` of the
    image wide and is kept inside the image. It starts at the centred box of width
    ``init_width_fraction``.

    Args:
        aspect: box height / width.
        pool_size: the window k of the features.
        width, dilations: as :class:`SaliencyNet`.
        min_width_fraction, init_width_fraction: of the image width.
    """

    def __init__(
        self,
        aspect: float,
        pool_size: int = 10,
        width: int = 16,
        dilations: Sequence[int] = (1, 2, 4, 8),
        min_width_fraction: float = 2 / 3.5,
        init_width_fraction: float = 2 / 2.3,
    ) -> None:
        super().__init__()
        self.aspect = check_positive(aspect, "aspect")
        self.pool_size = check_int(pool_size, "pool_size", 1)
        self.min_width_fraction = float(min_width_fraction)
        self.trunk = feature_trunk(width, dilations)
        self.heat = nn.Conv2d(width, 1, 1)
        self.size = nn.Linear(width, 1)
        for layer in (self.heat, self.size):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        span = 1 - self.min_width_fraction
        start = min(max((init_width_fraction - self.min_width_fraction) / span, 1e-3), 1 - 1e-3) if span > 0 else 0.5
        with torch.no_grad():
            self.size.bias.fill_(math.log(start / (1 - start)))

    def heat_logits(self, features: Tensor) -> Tensor:
        """The heat map's logits upsampled to the features' size, Tensor[B, 1, h, w] (what
        the mask warm start fits)."""
        return trunk_map(self.trunk, self.heat, features)

    def forward(self, features: Tensor, image_size: Sequence[int]) -> Tensor:
        """Boxes Tensor[B, 4] xyxy of images of ``image_size`` = (H, W) from their
        features Tensor[B, 5, H // k, W // k]."""
        height, width = float(image_size[0]), float(image_size[1])
        x = check_features(features).to(self.heat.weight.dtype)
        hidden = self.trunk(standardize_features(x).contiguous(memory_format=torch.channels_last))
        b, _, h, w = hidden.shape
        weights = torch.softmax(self.heat(hidden).flatten(1), dim=1).reshape(b, h, w)
        k = self.pool_size * x.shape[-1] / w, self.pool_size * x.shape[-2] / h  # input pixels per trunk pixel
        xs = k[0] * (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5)
        ys = k[1] * (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5)
        cx = (weights.sum(1) * xs).sum(-1)
        cy = (weights.sum(2) * ys).sum(-1)
        widest = min(width, height / self.aspect)
        low = min(self.min_width_fraction * width, widest)
        box_w = low + (widest - low) * torch.sigmoid(self.size(hidden.mean(dim=(2, 3)))[:, 0])
        box_h = self.aspect * box_w
        cx = torch.minimum(torch.maximum(cx, box_w / 2), width - box_w / 2)
        cy = torch.minimum(torch.maximum(cy, box_h / 2), height - box_h / 2)
        return torch.stack((cx - box_w / 2, cy - box_h / 2, cx + box_w / 2, cy + box_h / 2), dim=-1)


Locator = Callable[[Tensor, tuple[int, int]], tuple[Tensor, Tensor | None]]


def fit_saliency(
    net: SaliencyNet,
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    layer: DACrop,
    **kwargs,
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
        **kwargs: see :func:`_fit` (steps, batch_size, lr, mask_steps, mask_lr, seed,
            flip, stretch, shift, clip_norm, coverage_weight, margin, time_limit, callback).

    Returns:
        :class:`FitHistory`.
    """

    _check_pool_size(net, layer, "net")

    def locate(feats: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        maps = net.member_maps(feats)  # [b, members, h, w] -> one search of members x b maps, member-major
        return layer.search(maps.transpose(0, 1).reshape(-1, 1, *maps.shape[-2:]))

    return _fit(net, locate, (net.member_logits, 0.5), features, regions, image_sizes, layer, **kwargs)


def fit_box_regressor(
    model: BoxRegressor,
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    layer: DACrop,
    **kwargs,
) -> FitHistory:
    """Train the :class:`BoxRegressor` baseline exactly as :func:`fit_saliency` trains a
    saliency stage: same batches, loss, targets (``layer``'s aspect and minimum width),
    and the same mask warm start (``mask_steps``; of its trunk and heat map, whose
    soft-argmax then starts at the centre of the mask)."""

    _check_pool_size(model, layer, "model")
    if not math.isclose(model.aspect, layer.aspect, rel_tol=1e-9):
        raise DACInputError(f"model: its aspect {model.aspect:g} is not the layer's {layer.aspect:g} (the targets' aspect)")

    def locate(feats: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        return model(feats, size), None

    return _fit(model, locate, (model.heat_logits, 1.0), features, regions, image_sizes, layer, **kwargs)


def _check_pool_size(model: nn.Module, layer: DACrop, name: str) -> None:
    if getattr(model, "pool_size", layer.pool_size) != layer.pool_size:
        raise DACInputError(f"{name}: works on windows of pool_size {model.pool_size}, the layer on {layer.pool_size}")


def minimum_width(layer: DACrop, image_size: Sequence[int]) -> float:
    """The narrowest box ``layer`` can return on an image of ``image_size`` = (H, W), pixels."""
    k = layer.pool_size
    h, w = int(image_size[0]) // k, int(image_size[1]) // k
    return 2 * k * min(w * layer.r_min_fraction, w / 2.0, h / (2.0 * layer.aspect))


def margin_target(regions: Tensor, margin: float, layer: DACrop, image_size: Sequence[int]) -> Tensor:
    """The boxes :func:`box_loss` pulls towards: the best box of ``layer``'s aspect and
    minimum width (:func:`aspect_box`) around each region grown by ``margin`` image widths
    per side, inside the part of the image the search covers (whole pooling windows).

    Args:
        regions: Tensor[B, 4] xyxy of images of ``image_size`` = (H, W).

    Returns:
        Tensor[B, 4] xyxy.
    """
    height, width, k = int(image_size[0]), int(image_size[1]), layer.pool_size
    grid = torch.tensor([[height // k * k, width // k * k]], dtype=torch.float64, device=regions.device).expand(len(regions), 2)
    pad = margin * float(width) * torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=regions.dtype, device=regions.device)
    return aspect_box(regions + pad, layer.aspect, grid, minimum_width(layer, (height, width)))


def region_masks(regions: Tensor, pooled_size: Sequence[int], pool_size: int) -> Tensor:
    """Tensor[B, 1, h, w]: 1 where a pooled pixel's centre lies inside the region, else 0;
    a centre on the region's edge counts half per axis (so the mask of a mirrored
    region is the mirrored mask, whatever the ties).

    Pooled pixel ``(i, j)`` covers input pixels ``[i k, (i + 1) k) x [j k, (j + 1) k)``;
    its centre is ``((j + 1/2) k, (i + 1/2) k)``.

    Example:
        >>> region_masks(torch.tensor([[10.0, 0.0, 30.0, 10.0]]), (2, 4), 10)[0, 0]
        tensor([[0., 1., 1., 0.],
                [0., 0., 0., 0.]])
    """
    h, w = int(pooled_size[0]), int(pooled_size[1])
    k = float(pool_size)
    ys = (torch.arange(h, dtype=regions.dtype, device=regions.device) + 0.5) * k
    xs = (torch.arange(w, dtype=regions.dtype, device=regions.device) + 0.5) * k
    r = regions[:, :, None, None]

    def along(centres: Tensor, low: Tensor, high: Tensor) -> Tensor:
        strictly = ((centres > low) & (centres < high)).to(regions.dtype)
        return torch.where((centres == low) | (centres == high), 0.5 * (low < high).to(regions.dtype), strictly)

    return (along(xs, r[:, 0], r[:, 2]) * along(ys[:, None], r[:, 1], r[:, 3]))[:, None]


def fit_region_masks(
    model: nn.Module,
    logits: Callable[[Tensor], Tensor],
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    pool_size: int,
    *,
    inside: float = 1.0,
    steps: int = 400,
    batch_size: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
    flip: bool = True,
    stretch: float | None = None,
    shift: float | None = None,
    time_limit: float | None = None,
) -> FitHistory:
    """Fit ``sigmoid(logits(features))`` to the labelled regions as masks: the warm start.

    Per pooled pixel, binary cross-entropy against ``inside`` where the pixel's centre
    lies in the region (:func:`region_masks`) and 0 outside. Adam on ``model``'s
    parameters with cosine decay, the batches (flips, stretches and shifts; ``stretch`` and
    ``shift`` left at None: those of :data:`FIT_DEFAULTS`) of :func:`_fit`.

    Args:
        model: owns the parameters ``logits`` uses (trained in place).
        logits: features Tensor[b, 5, h, w] -> logits Tensor[b, m, h, w] (each of the
            m maps fitted to the same masks).
        inside: the target inside the region (0.5 makes a :class:`SaliencyNet`'s gate
            ``2 sigmoid`` equal 1 there: the paper's map inside, dark outside).
        flip, stretch, shift: the augmentation, as in :func:`_fit`.
        time_limit: stop after the step that passes this many seconds (None: no limit).
    """
    stretch, shift = _or_defaults(stretch=stretch, shift=shift)
    _check_augmentation(stretch, shift)
    batches = _batches(features, regions, image_sizes, pool_size, steps, batch_size, seed, flip, stretch, shift)
    out_of_time = _deadline(time_limit)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    history = FitHistory()
    began = time.perf_counter()
    model.train()
    for feats, target_regions, _ in batches:
        out = logits(feats)
        target = inside * region_masks(target_regions, feats.shape[-2:], pool_size).to(out).expand_as(out)
        _step(optimizer, schedule, F.binary_cross_entropy_with_logits(out, target), history)
        if out_of_time():
            break
    history.seconds = time.perf_counter() - began
    return history


def _deadline(time_limit: float | None) -> Callable[[], bool]:
    """``out_of_time()``: whether ``time_limit`` seconds (checked: > 0, or None for no
    limit) have passed since this call."""
    if time_limit is None:
        return lambda: False
    limit, began = check_positive(time_limit, "time_limit"), time.perf_counter()
    return lambda: time.perf_counter() - began > limit


def check_fit_options(coverage_weight: float, margin: float, time_limit: float | None, *, stretch: float = 0.0,
                      shift: float = 0.0, clip_norm: float = math.inf, flags: bool = False) -> None:
    """Raise :class:`DACInputError` for a coverage weight that is not a finite number >= 0,
    a margin, stretch or shift that is not a number in [0, 0.5), a gradient clip that is
    not a number > 0 (inf: none) or a time limit that is not > 0 (None: no limit);
    ``flags`` names them as ``dac fit-saliency``'s options."""
    def name(argument: str) -> str:
        return "--" + argument.replace("_", "-") if flags else argument

    if not (math.isfinite(float(coverage_weight)) and coverage_weight >= 0):
        raise DACInputError(f"{name('coverage_weight')}: expected a finite number >= 0, got {coverage_weight!r}")
    _check_fraction(margin, name("margin"))
    _check_augmentation(stretch, shift, name)
    _check_clip_norm(clip_norm, name("clip_norm"))
    if time_limit is not None:
        check_positive(time_limit, name("time_limit"))


def _check_fraction(value: float, name: str, what: str = "a fraction of the image width") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 0.5:
        raise DACInputError(f"{name}: expected {what} in [0, 0.5), got {value!r}")


def _check_augmentation(stretch: float, shift: float, name: Callable[[str], str] = lambda argument: argument) -> None:
    _check_fraction(stretch, name("stretch"), "a fraction (the largest relative change of the width)")
    _check_fraction(shift, name("shift"))


def _or_defaults(**given) -> list:
    """The arguments in order, each left at None replaced by its :data:`FIT_DEFAULTS` value
    (so the Python API and ``dac fit-saliency`` train alike)."""
    return [FIT_DEFAULTS[name] if value is None else value for name, value in given.items()]


def _check_clip_norm(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise DACInputError(f"{name}: expected a number > 0 (inf: no clipping), got {value!r}")


def check_fit_out(out_dir: str | Path, overwrite: bool, *, flags: bool = False) -> None:
    """Raise :class:`DACInputError` if ``out_dir`` already holds a ``saliency.pt`` and
    ``overwrite`` is False: a trained stage (minutes of training) is never replaced
    without asking. ``flags`` names ``dac fit-saliency``'s options."""
    stage = Path(out_dir) / "saliency.pt"
    if not overwrite and (stage.exists() or stage.is_symlink()):
        out, again = ("--out", "--overwrite") if flags else ("out_dir", "overwrite=True")
        raise DACInputError(f"{out}: {str(out_dir)!r} already holds saliency.pt (a trained stage); "
                            f"choose another folder, or {again} to replace it")


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


def _batches(
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    pool_size: int,
    steps: int,
    batch_size: int,
    seed: int,
    flip: bool,
    stretch: float = 0.0,
    shift: float = 0.0,
):
    """``steps`` random batches of one image size: (features Tensor[b, 5, h, w], their
    regions Tensor[b, 4] float64 in input pixels, the image size (H, W)).

    Sizes are drawn in proportion to their images; with ``flip``, about half of each
    batch is mirrored left-right (features and regions, about the pooled grid's
    middle ``k w / 2``); then each image is stretched and shifted (:func:`_stretch_and_shift`;
    ``stretch`` = ``shift`` = 0: not at all).
    """
    n = len(features)
    if n == 0 or regions.shape != (n, 4) or len(image_sizes) != n:
        raise DACInputError(f"features, regions, image_sizes: expected N items each and regions Tensor[N, 4], got {n}, {tuple(regions.shape)}, {len(image_sizes)}")
    check_int(steps, "steps", 0)
    check_int(batch_size, "batch_size", 1)
    groups: dict[tuple, list[int]] = {}
    for i, (f, size) in enumerate(zip(features, image_sizes)):
        expected = (len(FEATURES), int(size[0]) // pool_size, int(size[1]) // pool_size)
        if not isinstance(f, Tensor) or tuple(f.shape) != expected:
            raise DACInputError(f"features[{i}]: expected Tensor{list(expected)} (saliency_features of an image of (H, W) = "
                                f"{tuple(int(v) for v in size)} at the layer's pool_size {pool_size}), got {tuple(getattr(f, 'shape', ())) or type(f).__name__}")
        groups.setdefault((tuple(f.shape), tuple(int(s) for s in size)), []).append(i)
    if not (torch.isfinite(regions).all() and (regions[:, 2:] > regions[:, :2]).all()):
        raise DACInputError("regions: expected finite xyxy boxes with x1 < x2 and y1 < y2")
    return _draw(features, regions, groups, pool_size, steps, batch_size, seed, flip, stretch, shift)


def _draw(features, regions, groups, pool_size, steps, batch_size, seed, flip, stretch, shift):
    """The generator of :func:`_batches` (the arguments are checked there, before the first batch)."""
    keys = list(groups)
    sizes = np.array([len(groups[k]) for k in keys], dtype=float)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        key = keys[rng.choice(len(keys), p=sizes / sizes.sum())]
        members = groups[key]
        pick = rng.choice(members, size=min(batch_size, len(members)), replace=False)
        feats = torch.stack([features[i] for i in pick])
        target_regions = regions[torch.as_tensor(pick, device=regions.device)].to(feats.device, torch.float64)
        if flip:
            mirror = torch.as_tensor(rng.random(len(pick)) < 0.5, device=feats.device)
            feats = torch.where(mirror[:, None, None, None], feats.flip(-1), feats)
            axis = float(pool_size * feats.shape[-1])  # the pooled grid spans [0, k w)
            flipped = torch.stack((axis - target_regions[:, 2], target_regions[:, 1], axis - target_regions[:, 0], target_regions[:, 3]), -1)
            target_regions = torch.where(mirror[:, None], flipped, target_regions)
        if stretch or shift:
            feats, target_regions = _stretch_and_shift(feats, target_regions, pool_size, rng, stretch, shift)
        yield feats, target_regions, key[1]


def _stretch_and_shift(features: Tensor, regions: Tensor, pool_size: int, rng: np.random.Generator, stretch: float,
                       shift: float) -> tuple[Tensor, Tensor]:
    """Each image stretched left-right about its region's centre by a factor drawn from
    ``[1 - stretch, 1 + stretch]``, then moved by whole pooled pixels, up to ``shift``
    image widths each way in x and in y; its region moved alike: a wider or narrower
    arch elsewhere in the frame, new layouts from few labels.

    The features are resampled column by column (each new column takes the old column
    under its centre, so some columns repeat or drop out, and beyond the grid the edge
    column or row repeats): every window's features are those of some window of the
    image, not averaged; rows move by whole pixels. The image size is kept. The labels
    stay true: a stretch is capped where the region would leave the grid, a move stops
    at the grid's edge, and an image whose region reaches into the grid's first or last
    column (row) is neither stretched nor moved along x (y), as the repeated edge would
    be region that its label leaves out.

    Args:
        features: Tensor[b, 5, h, w].
        regions: Tensor[b, 4] float64 xyxy, input pixels (pooled pixel ``j`` spans
            ``[k j, k (j + 1))``).
        rng: draws b factors and then 2 b moves (whatever is used).

    Returns:
        (features, regions) of the same shapes.
    """
    b, _, h, w = features.shape
    k, device = float(pool_size), regions.device
    x = regions[:, 0::2] / k  # pooled units: (x1, x2), (y1, y2)
    y = regions[:, 1::2] / k
    free_x = (x[:, 0] >= 1) & (x[:, 1] <= w - 1)
    free_y = (y[:, 0] >= 1) & (y[:, 1] <= h - 1)
    centre = x.mean(dim=1, keepdim=True)
    scale = torch.ones(b, 1, dtype=torch.float64, device=device)
    if stretch:
        drawn = torch.as_tensor(1 + rng.uniform(-stretch, stretch, b), dtype=torch.float64, device=device)[:, None]
        room = torch.minimum(centre / (centre - x[:, :1]), (w - centre) / (x[:, 1:] - centre))  # the widest that stays on the grid
        scale = torch.where(free_x[:, None], torch.minimum(drawn, room), scale)
        x = ((x - centre) * scale + centre).clamp(0, w)  # on the grid (rounding at the cap)
    dx = torch.zeros(b, dtype=torch.float64, device=device)
    dy = torch.zeros_like(dx)
    reach = int(round(shift * w))
    if reach:
        drawn = torch.as_tensor(rng.integers(-reach, reach + 1, size=(2, b)), dtype=torch.float64, device=device)

        def kept(moves: Tensor, low: Tensor, high: Tensor, size: int) -> Tensor:  # the region stays on the grid
            return torch.minimum(torch.maximum(moves, torch.ceil(-low)), torch.floor(size - high))

        dx = torch.where(free_x, kept(drawn[0], x[:, 0], x[:, 1], w), dx)
        dy = torch.where(free_y, kept(drawn[1], y[:, 0], y[:, 1], h), dy)
    centres = torch.arange(w, dtype=torch.float64, device=device) + 0.5
    cols = torch.floor((centres - dx[:, None] - centre) / scale + centre).long().clamp(0, w - 1)  # [b, w]
    rows = (torch.arange(h, device=device) - dy[:, None].long()).clamp(0, h - 1)  # [b, h]
    picked = torch.arange(b, device=device)[:, None, None]
    moved = features.permute(0, 2, 3, 1)[picked, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    x, y = x + dx[:, None], y + dy[:, None]
    return moved.contiguous(), k * torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=-1)


def _fit(
    model: nn.Module,
    locate: Locator,
    mask_head: tuple[Callable[[Tensor], Tensor], float],
    features: Sequence[Tensor],
    regions: Tensor,
    image_sizes: Sequence[Sequence[int]],
    layer: DACrop,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    mask_steps: int | None = None,
    mask_lr: float | None = None,
    seed: int = 0,
    flip: bool = True,
    stretch: float | None = None,
    shift: float | None = None,
    clip_norm: float | None = None,
    coverage_weight: float | None = None,
    margin: float | None = None,
    time_limit: float | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> FitHistory:
    """The training loop both fits share: an optional mask warm start, then Adam
    (cosine learning-rate decay over ``steps``) on :func:`box_loss`, batches of one
    image size. Arguments left at None take their value from :data:`FIT_DEFAULTS`
    (what ``dac fit-saliency`` uses), so the Python API and the command train alike.

    Args:
        mask_head: (logits, inside) the warm start fits (:func:`fit_region_masks`).
        steps: Adam steps on the box loss (fewer if ``time_limit`` seconds run out first;
            0: the warm start alone).
        batch_size: images per step.
        lr: Adam learning rate of the box steps.
        mask_steps: steps of the warm start (:func:`fit_region_masks`) before them; 0: none.
        mask_lr: its learning rate.
        seed: seeds the batches, flips, stretches and shifts.
        flip: mirror half of each batch left-right (features and boxes).
        stretch: stretch each image left-right about its region's centre by a factor
            drawn from ``[1 - stretch, 1 + stretch]`` (features and boxes; 0: not).
        shift: then move it by up to ``shift`` image widths in x and in y, whole pooled
            pixels, never moving the region off the grid (0: not).
        clip_norm: the largest gradient norm of a box step (a larger one is scaled down
            to it; counted in ``FitHistory.clipped``). A box on a nearly flat ridge of
            the cost has an ill-conditioned implicit gradient: on phantoms at the paper's
            size, norms up to ~200 against a median of ~0.2. Unclipped, one such step
            fills Adam's second moment, shrinks the steps after it for hundreds of
            steps, and the fit stalls with its loss high.
        coverage_weight: of :func:`box_loss`.
        margin: the target is the best box of the aspect around the region grown by
            ``margin`` image widths on every side (room for the boxes' scatter, so
            that teeth near the region's edge stay inside).
        time_limit: seconds for the whole fit, warm start included: each phase stops
            after the step that passes it (no box step starts after it).
        callback: ``callback(step, loss)`` after each box step.
    """
    steps, batch_size, lr, mask_steps, mask_lr, coverage_weight, margin, stretch, shift, clip_norm = _or_defaults(
        steps=steps, batch_size=batch_size, lr=lr, mask_steps=mask_steps, mask_lr=mask_lr, coverage_weight=coverage_weight,
        margin=margin, stretch=stretch, shift=shift, clip_norm=clip_norm)
    k = layer.pool_size
    check_int(mask_steps, "mask_steps", 0)
    check_fit_options(coverage_weight, margin, time_limit, stretch=stretch, shift=shift, clip_norm=clip_norm)
    batches = _batches(features, regions, image_sizes, k, steps, batch_size, seed, flip, stretch, shift)  # checks the inputs first
    history = FitHistory()
    began = time.perf_counter()
    out_of_time = _deadline(time_limit)
    if mask_steps:
        logits, inside = mask_head
        warm = fit_region_masks(model, logits, features, regions, image_sizes, k, inside=inside, steps=mask_steps,
                                batch_size=batch_size, lr=mask_lr, seed=seed + 1, flip=flip, stretch=stretch, shift=shift,
                                time_limit=time_limit)
        history.mask_steps, history.mask_loss = warm.steps, warm.loss
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for step, (feats, target_regions, (height, width)) in enumerate(batches):
        if out_of_time():  # the warm start may have used it all
            break
        with quiet_unconverged():
            boxes, info = locate(feats, (k * feats.shape[-2], k * feats.shape[-1]))
        copies = len(boxes) // len(feats)  # boxes of several members: member-major copies of the batch
        targets = margin_target(target_regions, margin, layer, (height, width)).repeat(copies, 1)
        target_regions = target_regions.repeat(copies, 1)
        loss = box_loss(boxes, target_regions, targets, torch.full((len(boxes),), float(width)), coverage_weight).mean()
        _step(optimizer, schedule, loss, history, clip_norm)
        if info is not None:
            history.frozen += int(info.frozen.sum())
            history.unconverged += int((~(info.converged | info.frozen)).sum())
        if callback:
            callback(step, history.loss[-1])
    history.seconds = time.perf_counter() - began
    model.eval()
    return history


# --------------------------------------------------------------------- one command
#: The DACrop settings a learned saliency is trained and used with, unless asked
#: otherwise: a narrower minimum box than the paper's 2/3.5 of the width (the learned
#: map no longer needs the guard; the paper's minimum caps a 200 x 370 box's IoU with
#: the dental region near 0.75 on phantoms), and gamma x4 per stage (Algorithm 1): its
#: harder-edged last stages put the box at the edge of a map that is dark outside the
#: region, where gamma x2 overshoots (on a perfect gate: IoU 0.81 against 0.64).
LEARNED_DEFAULTS = {"r_min_fraction": 0.2, "sharpness_factor": 4.0}

#: How :func:`train_saliency` (``dac fit-saliency``) trains, unless asked otherwise:
#: a mask warm start, then the box loss through the search (measured on phantoms in
#: the README's "Localisation"). Two members (gates averaged) scatter less than one;
#: stretch and shift augment the few labelled images (every step: new arch widths and
#: places); the gradient-norm clip keeps one ill-conditioned box from stalling Adam
#: (see :func:`_fit`). The margin trades tightness for teeth kept: the target's own IoU
#: with the region is 0.748 at 0.015 of the width (0.764 at 0.012, 0.723 at 0.02),
#: leaving ~43 px per side of a 2836-wide image for the boxes' scatter.
FIT_DEFAULTS = {
    "count": 32, "members": 2, "steps": 600, "mask_steps": 400, "batch_size": 8, "lr": 3e-3, "mask_lr": 1e-2,
    "coverage_weight": 16.0, "margin": 0.015, "stretch": 0.1, "shift": 0.035, "clip_norm": 1.0,
}


def train_saliency(
    out_dir: str | Path,
    *,
    count: int = FIT_DEFAULTS["count"],
    data: str | None = None,
    seed: int = 0,
    image_size: Sequence[int] = (1536, 2836),
    output_size: Sequence[int] = (200, 370),
    pool_size: int = 10,
    r_min_fraction: float = LEARNED_DEFAULTS["r_min_fraction"],
    sharpness_factor: float = LEARNED_DEFAULTS["sharpness_factor"],
    width: int = 16,
    members: int = FIT_DEFAULTS["members"],
    steps: int = FIT_DEFAULTS["steps"],
    mask_steps: int = FIT_DEFAULTS["mask_steps"],
    time_limit: float | None = None,
    batch_size: int = FIT_DEFAULTS["batch_size"],
    lr: float = FIT_DEFAULTS["lr"],
    mask_lr: float = FIT_DEFAULTS["mask_lr"],
    coverage_weight: float = FIT_DEFAULTS["coverage_weight"],
    margin: float = FIT_DEFAULTS["margin"],
    stretch: float = FIT_DEFAULTS["stretch"],
    shift: float = FIT_DEFAULTS["shift"],
    clip_norm: float = FIT_DEFAULTS["clip_norm"],
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train a :class:`~dac.saliency.SaliencyNet` from labelled boxes and save it:
    what ``dac fit-saliency`` runs.

    Args:
        out_dir: writes ``saliency.pt`` (atomically; read with :func:`load_dacrop` or
            :func:`dac.saliency.load_saliency`) and ``fit.json``.
        count: generated phantoms to train on (used when ``data`` is None).
        data: a CSV of ``path,x1,y1,x2,y2`` (xyxy, input pixels; an optional header
            row; relative paths from the CSV's folder) of real images.
        seed: phantoms and batches.
        image_size: (H, W) of the phantoms.
        output_size, pool_size, r_min_fraction, sharpness_factor: the ``DACrop`` the
            stage is trained with, stored with it and used again by :func:`load_dacrop`.
        width: the net's hidden channels (per member).
        members: gates trained side by side and averaged (:class:`~dac.saliency.SaliencyNet`).
        steps, mask_steps, time_limit, batch_size, lr, mask_lr, coverage_weight, margin, stretch, shift,
            clip_norm: of :func:`fit_saliency` (checked before any work).
        overwrite: replace a ``saliency.pt`` already in ``out_dir`` (else DACInputError,
            before any work).
        log: called with progress lines.

    Returns:
        The summary written to ``fit.json``, with how the trained stage's boxes fit its
        own labelled regions (:func:`labelled_fit`).
    """
    from ._files import write_json
    from .saliency import save_saliency, saliency_features

    out = Path(out_dir)
    check_fit_out(out, overwrite)
    check_fit_options(coverage_weight, margin, time_limit, stretch=stretch, shift=shift, clip_norm=clip_norm)
    say = log or (lambda message: None)
    net = SaliencyNet(pool_size=pool_size, width=width, members=members)
    layer = DACrop(output_size, pool_size, saliency=net, r_min_fraction=r_min_fraction, sharpness_factor=sharpness_factor)
    if data is None:
        from .data.phantoms import make_phantom

        count = check_int(count, "count", 1)
        height, width_px = (check_int(v, "image_size", 64) for v in image_size)
        features, regions, sizes = [], [], []
        for i in range(count):
            p = make_phantom(seed * 1_000_003 + i, height, width_px)
            features.append(saliency_features(p.image[None], pool_size)[0])
            regions.append(p.roi)
            sizes.append((height, width_px))
            say(f"phantom {i + 1}/{count}")
        source = f"{count} phantoms of {height}x{width_px}, seed {seed}"
    else:
        features, regions, sizes = _labelled_images(Path(data), pool_size)
        source = f"{len(features)} images from {data}"
    regions = torch.stack(regions)
    say(f"training on {source}" + (f": {mask_steps} mask warm-start steps, then" if mask_steps else ":") + f" {steps} steps through the box")
    history = fit_saliency(
        net, features, regions, sizes, layer, steps=steps, mask_steps=mask_steps, time_limit=time_limit,
        batch_size=batch_size, lr=lr, mask_lr=mask_lr, seed=seed, coverage_weight=coverage_weight, margin=margin,
        stretch=stretch, shift=shift, clip_norm=clip_norm, callback=lambda step, loss: say(f"step {step + 1}/{steps}: loss {loss:.4f}") if (step + 1) % 20 == 0 else None,
    )
    settings = {"output_size": list(layer.output_size), "pool_size": pool_size, "r_min_fraction": r_min_fraction, "sharpness_factor": sharpness_factor}
    summary = {
        "source": source, "images": len(features), "members": net.members, "mask_steps": history.mask_steps, "steps": history.steps, "seconds": round(history.seconds, 1),
        "first_loss": history.loss[0] if history.loss else None,
        "last_loss": float(np.mean(history.loss[-10:])) if history.loss else None,
        "frozen_boxes": history.frozen, "unconverged_boxes": history.unconverged, "clipped_steps": history.clipped,
        **labelled_fit(net, layer, features, regions), "dacrop": settings,
    }
    save_saliency(net, out / "saliency.pt", dacrop=json.dumps(settings), source=source)
    write_json(out / "fit.json", summary)
    return summary


def load_dacrop(path: str | Path, **overrides) -> DACrop:
    """The ``DACrop`` a saved saliency stage was trained with, using it (eval mode).

    The settings are those :func:`train_saliency` stores with the stage. A stage saved
    without them (:func:`~dac.saliency.save_saliency` with no ``dacrop``) gets
    :data:`LEARNED_DEFAULTS` and ``DACrop``'s other defaults, with a warning.
    ``overrides`` replace stored settings or add others (``backward_mode``, ...).

    Raises:
        DACInputError: not a saved stage, or its stored settings are not a ``DACrop``'s.
    """
    from .saliency import load_saliency

    net = load_saliency(path)
    meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
    if "dacrop" not in meta:
        warnings.warn(f"saliency: {str(path)!r} holds no DACrop settings; using LEARNED_DEFAULTS {LEARNED_DEFAULTS} "
                      "(store them: save_saliency(net, path, dacrop=json.dumps(settings)))", UserWarning, stacklevel=2)
    try:
        stored = json.loads(meta.get("dacrop", json.dumps(LEARNED_DEFAULTS)))
    except ValueError as exc:
        raise DACInputError(f"saliency: {str(path)!r} stores DACrop settings that are not JSON ({exc})") from None
    if not isinstance(stored, dict) or "saliency" in stored:
        raise DACInputError(f"saliency: {str(path)!r} stores DACrop settings that are not a dict of DACrop arguments: {stored!r}")
    settings = stored | overrides
    if int(settings.get("pool_size", net.pool_size)) != net.pool_size:
        raise DACInputError(f"pool_size: the saliency stage {str(path)!r} works on windows of {net.pool_size}, not {settings['pool_size']}")
    settings["pool_size"] = net.pool_size
    try:
        return DACrop(saliency=net, **settings)
    except TypeError as exc:  # an argument DACrop does not have (bad values raise DACInputError naming it)
        raise DACInputError(f"saliency: {str(path)!r} with {sorted(settings)}: {exc}") from None


def _labelled_images(csv_path: Path, pool_size: int) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
    """Features, regions and sizes of the images a ``path,x1,y1,x2,y2`` CSV lists, read
    as ``dac crop`` reads them (:func:`dac.data.io.read_input`): the features the
    stage will search."""
    from .data.io import ImageReadError, read_input
    from .saliency import saliency_features

    if not csv_path.is_file():
        raise DACInputError(f"data: no such file {str(csv_path)!r}")
    features, regions, sizes = [], [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if line == 1 and cells and cells[0].lower() in ("path", "file", "image"):
                if [c.lower() for c in cells[1:]] != ["x1", "y1", "x2", "y2"]:  # xywh, y first...: not read as xyxy
                    raise DACInputError(f"data: {str(csv_path)!r}: the header {row!r} names other columns; expected path,x1,y1,x2,y2 (xyxy, input pixels)")
                continue
            if len(cells) != 5:
                raise DACInputError(f"data: {str(csv_path)!r} line {line}: expected path,x1,y1,x2,y2, got {row!r}")
            file = Path(cells[0]) if Path(cells[0]).is_absolute() else csv_path.parent / cells[0]
            try:
                box = [float(v) for v in cells[1:]]
                image, _ = read_input(str(file))
            except ValueError:
                raise DACInputError(f"data: {str(csv_path)!r} line {line}: the box {cells[1:]} is not four numbers") from None
            except ImageReadError as err:
                raise DACInputError(f"data: {str(csv_path)!r} line {line}: {err}") from None
            height, width = image.shape[-2:]
            if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
                raise DACInputError(f"data: {str(csv_path)!r} line {line}: box {box} is not xyxy inside the {width}x{height} image")
            features.append(saliency_features(image[None], pool_size)[0])
            regions.append(torch.tensor(box, dtype=torch.float32))
            sizes.append((height, width))
    if not features:
        raise DACInputError(f"data: {str(csv_path)!r} lists no images")
    return features, regions, sizes
