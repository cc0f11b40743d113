"""How well boxes find labelled regions: IoU, teeth kept, and a trained stage's fit of its own labels.

* :func:`localisation_scores` — per image: IoU with the region (``torchvision.ops.box_iou``),
  the share of each tooth's area inside the box, and whether every tooth is inside.
* :func:`labelled_fit` — the boxes a trained stage finds on the images it was trained
  on, scored against their labels (what ``fit.json`` reports).

Convention: boxes are xyxy in input pixel coordinates (torchvision's).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from .._batching import by_size
from .._checks import DACInputError
from ..layer import DACrop, quiet_unconverged

__all__ = ["labelled_fit", "localisation_scores"]


def localisation_scores(boxes: Tensor, regions: Tensor, teeth: Sequence[Tensor] | None = None, inside: float = 0.99) -> dict[str, Tensor]:
    """How well ``boxes`` find ``regions`` (and keep ``teeth``), per image.

    Convention: xyxy in input pixels.

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

    Examples:
        >>> s = localisation_scores(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 5]]),
        ...                         [torch.tensor([[0.0, 0, 2, 2], [8, 8, 12, 12]])])
        >>> s["iou"].item(), s["tooth_coverage"].item(), s["all_teeth_inside"].item()
        (0.5, 0.625, False)
    """
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
    """Area of each of ``boxes`` Tensor[N, 4] inside ``box`` Tensor[4] (xyxy): Tensor[N]."""
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
        layer: the ``DACrop`` that searches it.
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
