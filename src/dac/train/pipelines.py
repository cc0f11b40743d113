"""The four input pipelines in front of the classifier, and the network they make together.

* ``resize`` — :class:`ResizeFront`: the whole image to ``input_size`` (224 x 224 in the
  paper; aspect ratio distorted): the paper's non-DAC baseline.
* ``dac`` — :class:`DACFront` without a learned part: ``DACrop`` finds the box on the
  raw image and crops it to ``input_size`` (200 x 370), aspect kept.
* ``dac_e2e`` — :class:`DACFront` whose ``DACrop`` searches the map of a
  :class:`dac.saliency.SaliencyNet` (which starts as the paper's max–min map): the crop
  is taken from the original image, so the net's parameters get their gradient *only
  through the box* (the implicit gradient of the search, or whichever
  ``backward_mode``), from the classifier's loss alone — no box labels.
* ``oracle`` — :class:`OracleFront`: the true region (known for generated data), as the
  smallest box of the crop's aspect around it inside the image, resampled like the DAC
  crop: the accuracy a perfect box buys, for data that carries its regions.
* ``stn`` — :class:`SpatialTransformerCrop`: a localisation CNN predicts a
  scale-and-translate box of the same aspect, sampled to the same size (Jaderberg et
  al. 2015), trained from the task loss alone.

Every front takes a Tensor[B, C, H, W] (integer or float images) or a list of
differently sized Tensor[C, H, W], and returns a :class:`FrontOutput`: the crops
(floats Tensor[B, C, h, w] in [0, 1]), their boxes and, for DAC, which searches did
not converge. A front computes; it keeps nothing of a call (the engine counts).

Examples:
    >>> from dac.train.config import PipelineConfig
    >>> net = build_pipeline(PipelineConfig(kind="stn", input_size=(20, 37), localization_size=(32, 59)), width=4)
    >>> net(torch.randint(0, 255, (2, 1, 96, 177), dtype=torch.uint8)).shape
    torch.Size([2, 5])
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._batching import Images, by_size
from .._checks import DACInputError, check_angle, check_bool, check_choice, check_int, check_positive, check_size
from ..functional.boxes import box_inside
from ..functional.crop import crop_resize
from ..functional.soft_crop import soft_crop
from ..functional.pooling import to_unit_range
from ..layer import DACrop, quiet_unconverged
from ..saliency import SaliencyNet, load_saliency
from .augment import BatchAugment, augmentation, max_inside_rotation, roi_rotation_crop
from .config import CANDIDATE_BASELINES, PipelineConfig
from .models import resnet

__all__ = [
    "DACFront",
    "FrontOutput",
    "OracleFront",
    "Pipeline",
    "ResizeFront",
    "SpatialTransformerCrop",
    "Standardize",
    "build_pipeline",
    "standardize",
    "start_from_stage",
]

#: (rows, columns) of the feature map the STN's localisation head reads, flattened.
LOCALIZATION_GRID = (4, 8)


class FrontOutput(NamedTuple):
    """What a front computed for a batch: the crops and where they came from.

    Convention: boxes are xyxy in input pixels (torchvision's).
    """

    crops: Tensor  #: Tensor[B, C, h, w] floating, in [0, 1]: what the classifier sees
    boxes: Tensor  #: Tensor[B, 4]: each crop's box (the whole image for a resize)
    unconverged: Tensor | None = None  #: Tensor[B] bool: DAC boxes short of a stationary point; None for other fronts
    #: Tensor[B, K] log-weights of K candidate crops per image (crops are then Tensor[B, K, C, h, w]:
    #: a row per image, so batches of several sizes merge in order); None: one crop per image.
    #: See :class:`DACFront` ``candidates``.
    log_weights: Tensor | None = None
    #: Tensor[B] the log-weight of the one candidate drawn per image (``candidate_sampling``):
    #: its gradient carries the score-function term of :meth:`Pipeline.training_loss`; None otherwise.
    sample_log_weight: Tensor | None = None
    #: Tensor[B, C, h, w] the best candidate's crop per image, for the drawn one's baseline
    #: (``candidate_baseline="best"``); None otherwise.
    baseline_crops: Tensor | None = None
    #: Tensor[B, num_classes] the classifier's logits of ``baseline_crops`` (no gradient),
    #: set by :meth:`Pipeline.forward`.
    baseline_logits: Tensor | None = None
    #: Tensor[B] bool: DAC searches that found no strict maximum (a flat map: a blank or
    #: uniform image; the box is the start box, :attr:`dac.DACSolverInfo.frozen`); None
    #: for fronts with no search, and for training with ``candidates``.
    frozen: Tensor | None = None


class ResizeFront(nn.Module):
    """Resize the whole image to ``size`` (bilinear, anti-aliased; the aspect ratio is not kept).

    Args:
        size: (H_out, W_out) (paper's baseline: 224 x 224).
    """

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        self.size = check_size(size, "size")

    def forward(self, images: Images, noise: Tensor | None = None) -> FrontOutput:
        """Tensor[B, C, H, W] or list of Tensor[C, H, W] -> :class:`FrontOutput`, crops
        Tensor[B, C, H_out, W_out] in [0, 1] (``noise`` is not used)."""
        return by_size(images, self._resize)

    def _resize(self, x: Tensor) -> FrontOutput:
        x = to_unit_range(x, torch.float32) if not x.dtype.is_floating_point else x
        crops = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        height, width = x.shape[-2:]
        whole = x.new_tensor([0.0, 0.0, float(width), float(height)]).expand(x.shape[0], 4)
        return FrontOutput(crops, whole)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class DACFront(nn.Module):
    """DACrop as the first layer: find each image's box, crop it to ``output_size``.

    Without ``saliency`` this is the paper's DAC (the box is searched on the max–min
    pooled image). With one (``dac_e2e``: a :class:`~dac.saliency.SaliencyNet`) the box
    is searched on its map and the crop is taken from the original image, so the
    saliency's parameters receive gradients through the box only. Both use the same
    search (``DACrop``'s defaults: the paper's schedule and minimum width), so the two
    pipelines differ in the map alone. With ``roi_rotate_degrees`` > 0, training crops
    are turned about the box centre by a random angle, limited per image so the
    rotated box stays inside the image (:func:`~dac.train.augment.roi_rotation_crop`);
    otherwise crops are resampled by :func:`~dac.functional.crop_resize`.

    With ``edge_margin`` > 0, training crops are soft-edged
    (:func:`~dac.functional.soft_crop.soft_crop`): the box and a band of ``edge_margin``
    output pixels around it, weighted by the box's soft rectangle, whose sharpness
    goes geometrically from ``edge_sharpness[0]`` to ``edge_sharpness[1]`` as
    :attr:`progress` goes from 0 to 1 (the training engine sets it each epoch), so the
    task loss's gradient in the box feels content outside it. In eval mode the crop is
    hard, the band zero (the soft crop's limit): crops are then
    (H_out + 2 margin) x (W_out + 2 margin) in both modes.

    Convention: boxes are xyxy in input pixels (torchvision's).

    Args:
        output_size: (H_out, W_out) of the crops (paper: 200 x 370).
        pool_size: DACrop's max-min pooling window (paper: 10).
        backward_mode: DACrop's backward mode.
        saliency: ``DACrop``'s saliency stage (images -> Tensor[B, 1, H // k, W // k]),
            or None for the paper's map.
        roi_rotate_degrees: largest rotation about the box centre (0: none).
        r_min_fraction, sharpness_factor, search: ``DACrop``'s (paper: 1/3.5, 2, "paper").
        edge_margin: the soft edge's band in output pixels (0: hard crops).
        edge_sharpness: (first, last) sharpness per output pixel of the soft edge.
        candidates: K > 1 (``search="global"``): in training, crop every maximum the
            global search polished (:meth:`~dac.layer.DACrop.candidates`), weighted by
            ``f_k ** candidate_power`` normalised over the image's distinct candidates;
            the pipeline's output is then the mixture ``log sum_k w_k p(y | crop_k)``.
            The task loss then tells the saliency which maximum holds what decides the
            label (through the weights, the costs f_k of the candidates' boxes) rather
            than nudging one box. Evaluation crops the candidate of the highest f (the box
            ``DACrop`` returns). 1: one box, as plain DAC.
        candidate_power: beta of the weights ``f_k ** beta`` (> 0).
        candidate_sampling: with ``candidates``: crop one candidate per image, drawn by
            its weight (from the image's noise column, as the RoI rotation would), instead
            of all K: the classifier sees one crop per image, as in plain DAC. The
            objective is then the expected loss ``sum_k w_k (-log p(y | crop_k))`` (an upper
            bound of the mixture's), whose gradient in the weights is a score-function
            term added by :meth:`Pipeline.training_loss`. Costs a K-th of the mixture's
            classifier passes.
        candidate_baseline: with ``candidate_sampling``, what the drawn candidate's loss
            is compared with in the score-function term: ``"batch"``, the mean loss of
            the batch's other images; ``"best"``, the loss of the same image's best
            candidate (one more classifier pass per image, forward only, with the same
            augmentation and in training mode, so BatchNorm's running statistics see
            those crops too). Neither depends on the image's own draw: both keep the
            estimate unbiased; ``"best"`` compares candidates of the same image.
        learn_constants: ``DACrop``'s ``learn``: r_min and / or the search's sharpness
            trained with the front (bounded parameters of :attr:`crop`).

    Attributes:
        crop: the :class:`~dac.layer.DACrop` (its ``saliency`` is the stage above).
        progress: where training is, 0..1 (sets the soft edge's sharpness).
    """

    def __init__(
        self,
        output_size: Sequence[int] = (200, 370),
        pool_size: int = 10,
        backward_mode: str = "implicit",
        saliency: nn.Module | None = None,
        roi_rotate_degrees: float = 0.0,
        *,
        r_min_fraction: float = 1 / 3.5,
        sharpness_factor: float = 2.0,
        search: str = "paper",
        edge_margin: int = 0,
        edge_sharpness: Sequence[float] = (0.25, 8.0),
        candidates: int = 1,
        candidate_power: float = 1.0,
        candidate_sampling: bool = False,
        candidate_baseline: str = "batch",
        learn_constants: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.candidates = check_int(candidates, "candidates", 1)
        self.candidate_power = check_positive(candidate_power, "candidate_power")
        check_bool(candidate_sampling, "candidate_sampling")
        if candidate_sampling and self.candidates < 2:
            raise DACInputError("candidate_sampling: draws one of several candidates; set candidates > 1")
        self.candidate_sampling = candidate_sampling
        self.candidate_baseline = check_choice(candidate_baseline, CANDIDATE_BASELINES, "candidate_baseline")
        if self.candidate_baseline != "batch" and not candidate_sampling:
            raise DACInputError("candidate_baseline: only with candidate_sampling=True (the mixture needs no baseline)")
        grid = {"grid_candidates": self.candidates} if self.candidates > 1 else {}
        self.crop = DACrop(output_size=output_size, pool_size=pool_size, backward_mode=backward_mode, saliency=saliency,
                           r_min_fraction=r_min_fraction, sharpness_factor=sharpness_factor, search=search,
                           learn=learn_constants, **grid)
        if self.candidates > 1 and search != "global":
            raise DACInputError(f"candidates: {self.candidates} candidates come from the global search, not search={search!r}")
        self.roi_rotate_degrees = check_angle(roi_rotate_degrees, "roi_rotate_degrees")
        self.edge_margin = check_int(edge_margin, "edge_margin", 0)
        if len(edge_sharpness) != 2 or not all(float(g) > 0 for g in edge_sharpness):
            raise DACInputError(f"edge_sharpness: expected (first, last) > 0, got {edge_sharpness!r}")
        self.edge_sharpness = (float(edge_sharpness[0]), float(edge_sharpness[1]))
        if self.edge_margin and self.roi_rotate_degrees:
            raise DACInputError("edge_margin: not with roi_rotate_degrees (a rotated crop has no soft edge)")
        if self.candidates > 1 and (self.edge_margin or self.roi_rotate_degrees):
            raise DACInputError("candidates: not with edge_margin or roi_rotate_degrees (candidates are cropped hard)")
        self.progress = 0.0

    @property
    def sharpness(self) -> float:
        """The soft edge's sharpness now (per output pixel): geometric in :attr:`progress`."""
        first, last = self.edge_sharpness
        return first * (last / first) ** min(max(self.progress, 0.0), 1.0)

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop.output_size

    @property
    def saliency(self) -> nn.Module:
        """The map the box is searched on (``MaxMinPool`` for plain DAC)."""
        return self.crop.saliency

    #: Uniform numbers read per image (the RoI rotation angle, or which candidate is drawn:
    #: the two never go together).
    noise_dims = 1

    def forward(self, images: Images, noise: Tensor | None = None) -> FrontOutput:
        """Tensor[B, C, H, W] or list of Tensor[C, H, W] -> :class:`FrontOutput` (crops
        Tensor[B, C, H_out, W_out] float, the boxes, the unconverged and the frozen searches; training
        with ``candidates``: crops Tensor[B, K, C, H_out, W_out] and their log-weights, or with
        ``candidate_sampling`` one drawn crop per image and its log-weight).

        ``noise``: Tensor[B, 1] uniform numbers in [0, 1) that set each training crop's
        RoI rotation, or which candidate it is drawn from (``candidate_sampling``); drawn
        from torch's global RNG when None.
        """
        if self.training and (self.roi_rotate_degrees > 0 or self.candidate_sampling) and noise is None:
            noise = torch.rand(len(images), self.noise_dims)
        return by_size(images, self._crop_batch, noise)

    def locate(self, images: Images) -> Tensor:
        """Boxes Tensor[B, 4], xyxy in input pixels (differentiable in the saliency's parameters)."""
        return by_size(images, lambda x: self._search(x)[0])

    def _search(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(boxes, unconverged, frozen) of a same-size batch."""
        with quiet_unconverged():  # counted by the caller instead
            boxes, info = self.crop.locate(images, return_info=True)
        return boxes, ~(info.converged | info.frozen), info.frozen

    def _crop_batch(self, images: Tensor, noise: Tensor | None = None) -> FrontOutput:
        if self.training and self.candidates > 1:
            return self._candidate_crops(images, noise)
        boxes, unconverged, frozen = self._search(images)
        if self.training and self.roi_rotate_degrees > 0:
            limit = max_inside_rotation(boxes.detach().float(), images.shape[-2:], self.roi_rotate_degrees)
            draw = noise[:, 0].to(device=limit.device, dtype=limit.dtype) * 2 - 1
            crops = roi_rotation_crop(images, boxes, draw * limit, self.output_size)
        elif self.edge_margin:
            sharpness = self.sharpness if self.training else math.inf
            crops = soft_crop(images, boxes, self.output_size, margin=self.edge_margin, sharpness=sharpness)
        else:
            crops = crop_resize(images, boxes, self.output_size, antialias=True)
        return FrontOutput(crops.float(), boxes, unconverged, frozen=frozen)

    def _candidate_crops(self, images: Tensor, noise: Tensor | None = None) -> FrontOutput:
        """Training with ``candidates``: every candidate cropped, Tensor[B, K, C, h, w], and
        their log-weights ``log(f_k ** beta / sum_j f_j ** beta)`` over the distinct ones;
        with ``candidate_sampling`` one drawn per image (inverse CDF of ``noise[:, 0]``)."""
        boxes, cost, distinct = self.crop.candidates(images)
        batch, count = cost.shape
        tiny = torch.finfo(cost.dtype).tiny
        score = self.candidate_power * cost.clamp_min(tiny).log()
        log_weights = torch.log_softmax(score.masked_fill(~distinct, -math.inf), dim=1)
        unconverged = torch.zeros(batch, dtype=torch.bool, device=boxes.device)

        def take(index: Tensor) -> Tensor:  # Tensor[B] candidate index -> its box, Tensor[B, 4]
            return boxes.gather(1, index[:, None, None].expand(-1, 1, 4))[:, 0]

        best = take(cost.detach().argmax(1))
        if self.candidate_sampling:
            # the first k whose cumulative weight passes u * total: never a zero-weight (repeated) candidate
            cumulative = log_weights.detach().double().exp().cumsum(1)
            u = noise[:, :1].to(cumulative) * cumulative[:, -1:]
            pick = torch.searchsorted(cumulative, u, right=True).clamp_max(count - 1)
            drawn = take(pick[:, 0])
            crops = crop_resize(images, drawn.to(cost.dtype), self.output_size, antialias=True).float()
            sample_log_weight = log_weights.gather(1, pick)[:, 0].float()
            baseline = None
            if self.candidate_baseline == "best":
                baseline = crop_resize(images, best.to(cost.dtype), self.output_size, antialias=True).float()
            return FrontOutput(crops, drawn, unconverged, sample_log_weight=sample_log_weight, baseline_crops=baseline)
        crops = crop_resize(images.repeat_interleave(count, dim=0), boxes.reshape(-1, 4).to(cost.dtype), self.output_size,
                            antialias=True)
        crops = crops.reshape(batch, count, *crops.shape[1:]).float()
        return FrontOutput(crops, best, unconverged, log_weights.float())

    def extra_repr(self) -> str:
        edge = f", edge_margin={self.edge_margin}, edge_sharpness={self.edge_sharpness}" if self.edge_margin else ""
        pick = (f", candidates={self.candidates}, candidate_power={self.candidate_power}"
                f"{f', candidate_sampling=True, candidate_baseline={self.candidate_baseline!r}' if self.candidate_sampling else ''}"
                ) if self.candidates > 1 else ""
        return f"roi_rotate_degrees={self.roi_rotate_degrees}{edge}{pick}"


class OracleFront(nn.Module):
    """Crop each image's true region: the headroom of a box, for data whose regions are known.

    The box is :func:`~dac.saliency.aspect_box` of the region: the smallest box of
    aspect ``H_out / W_out`` around it, shifted into the image (as wide as the image
    allows where the region needs more), resampled to ``output_size`` by
    :func:`~dac.functional.crop_resize` like the DAC front's crops. Nothing to learn,
    nothing random: its crops are computed once per run.

    Convention: boxes and regions are xyxy in input pixels (torchvision's).

    Args:
        output_size: (H_out, W_out).

    Examples:
        >>> front = OracleFront((20, 37))
        >>> out = front(torch.rand(2, 1, 96, 177), regions=torch.tensor([[10.0, 10, 60, 30], [0, 0, 177, 96]]))
        >>> out.crops.shape, [round(v, 2) for v in out.boxes[0].tolist()]
        (torch.Size([2, 1, 20, 37]), [10.0, 6.49, 60.0, 33.51])
    """

    #: The engine passes each batch's true regions (``roi``) as ``regions``.
    needs_regions = True

    def __init__(self, output_size: Sequence[int] = (200, 370)) -> None:
        super().__init__()
        self.output_size = check_size(output_size, "output_size")

    def forward(self, images: Images, noise: Tensor | None = None, regions: Tensor | None = None) -> FrontOutput:
        """Tensor[B, C, H, W] or list of Tensor[C, H, W] and their ``regions`` Tensor[B, 4]
        -> :class:`FrontOutput` (``noise`` is not used).

        Raises:
            DACInputError: no regions, or not one per image.
        """
        if regions is None:
            raise DACInputError("regions: the oracle pipeline crops each image's true region; it needs data that carries "
                                "them (data.source: phantom or distractors, or a folder with data.regions / --regions)")
        regions = torch.as_tensor(regions) if not isinstance(regions, Tensor) else regions
        if regions.ndim != 2 or regions.shape != (len(images), 4):
            raise DACInputError(f"regions: expected Tensor[{len(images)}, 4] (one xyxy box per image), got {tuple(regions.shape)}")
        if isinstance(images, Tensor):
            return self._crop_batch(images, regions)
        outs = [self._crop_batch(image[None], region[None]) for image, region in zip(images, regions)]
        return FrontOutput(torch.cat([o.crops for o in outs]), torch.cat([o.boxes for o in outs]))

    def _crop_batch(self, images: Tensor, regions: Tensor) -> FrontOutput:
        from ..saliency import aspect_box

        x = to_unit_range(images, torch.float32) if not images.dtype.is_floating_point else images
        sizes = torch.tensor([x.shape[-2:]] * x.shape[0], device=x.device)
        boxes = aspect_box(regions.to(x.device, torch.float32), self.output_size[0] / self.output_size[1], sizes)
        return FrontOutput(crop_resize(x, boxes.to(x.dtype), self.output_size, antialias=True), boxes)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class SpatialTransformerCrop(nn.Module):
    """A spatial transformer restricted to scale and translation, with the crop's aspect.

    A small CNN sees the image resized to ``localization_size``; its features, pooled to
    a coarse :data:`LOCALIZATION_GRID` map and flattened (so the head knows *where*
    things are, unlike a global average), predict ``(a, b, c)``; the box has width ``sigmoid(a) * w_max`` (``w_max`` = the widest box
    of aspect ``H_out / W_out`` that fits the image) and its centre moves by
    ``tanh(b)``, ``tanh(c)`` of the free room, so it stays in the image. The box is
    resampled to ``output_size`` by :func:`~dac.functional.crop_resize`, the resampler
    of the DAC front (anti-aliased, differentiable in the box), so that comparing the
    two compares where they look, not how they sample. Initialised to the centred box
    of width ``init_scale * w_max``; trained from the task loss alone.

    Convention: boxes are xyxy in input pixels (torchvision's).

    Args:
        output_size: (H_out, W_out).
        localization_size: (H, W) the localisation CNN sees.
        channels: image channels C.
        init_scale: the initial box width as a fraction of ``w_max``, in (0, 1).
    """

    def __init__(
        self,
        output_size: Sequence[int] = (200, 370),
        localization_size: Sequence[int] = (64, 118),
        channels: int = 1,
        init_scale: float = 0.8,
    ) -> None:
        super().__init__()
        self.output_size = check_size(output_size, "output_size")
        self.localization_size = check_size(localization_size, "localization_size")
        if not 0 < init_scale < 1:
            raise DACInputError(f"init_scale: expected a number in (0, 1), got {init_scale!r}")
        self.init_scale = float(init_scale)
        self.localization = nn.Sequential(
            nn.Conv2d(channels, 8, 5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(LOCALIZATION_GRID),  # a coarse map, not one average: where things are survives
            nn.Flatten(),
            nn.Linear(32 * LOCALIZATION_GRID[0] * LOCALIZATION_GRID[1], 32),
            nn.ReLU(inplace=True),
            nn.Linear(32, 3),
        )
        head = self.localization[-1]
        nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(torch.tensor([math.log(init_scale / (1 - init_scale)), 0.0, 0.0]))

    @property
    def aspect(self) -> float:
        return self.output_size[0] / self.output_size[1]

    def forward(self, images: Images, noise: Tensor | None = None) -> FrontOutput:
        """Tensor[B, C, H, W] or list of Tensor[C, H, W] -> :class:`FrontOutput`, crops
        Tensor[B, C, H_out, W_out] float (``noise`` is not used)."""
        return by_size(images, self._crop_batch)

    def locate(self, images: Images) -> Tensor:
        """Boxes Tensor[B, 4], xyxy in input pixels."""
        return by_size(images, lambda x: self._boxes(self._float(x)))

    def _float(self, x: Tensor) -> Tensor:
        return to_unit_range(x, torch.float32) if not x.dtype.is_floating_point else x

    def _boxes(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        small = F.interpolate(x, size=self.localization_size, mode="bilinear", antialias=True, align_corners=False)
        a, b, c = self.localization(small).unbind(-1)
        w_max = min(float(width), float(height) / self.aspect)
        box_w = torch.sigmoid(a) * w_max
        box_h = box_w * self.aspect
        cx = width / 2 + torch.tanh(b) * (width - box_w) / 2  # inside by construction: tanh of the free room
        cy = height / 2 + torch.tanh(c) * (height - box_h) / 2
        return box_inside(torch.stack((cx, cy), -1), box_w, self.aspect, x.new_tensor([float(height), float(width)]))

    def _crop_batch(self, images: Tensor) -> FrontOutput:
        x = self._float(images)
        boxes = self._boxes(x)
        return FrontOutput(crop_resize(x, boxes, self.output_size, antialias=True), boxes)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, localization_size={self.localization_size}, init_scale={self.init_scale}"


def standardize(images: Tensor, eps: float = 1e-6) -> Tensor:
    """Each image minus its mean, divided by its standard deviation (over C, H, W).

    What the classifier sees then does not depend on exposure or contrast: panoramic
    crops are dim and flat (mean ~0.37, std ~0.03 in [0, 1]), which left unscaled
    makes the first BatchNorm's statistics fragile.

    Args:
        images: Tensor[B, C, H, W] floating.
        eps: added to the variance (a flat image becomes zeros).

    Returns:
        Tensor[B, C, H, W]: each image with mean 0 and standard deviation ~1.

    Examples:
        >>> y = standardize(0.37 + 0.03 * torch.randn(2, 1, 20, 37))
        >>> bool(y.mean().abs() < 1e-5), round(float(y.std()), 2)
        (True, 1.0)
    """
    var, mean = torch.var_mean(images, dim=(1, 2, 3), keepdim=True, correction=0)
    return (images - mean) / torch.sqrt(var + eps)


class Standardize(nn.Module):
    """:func:`standardize` as a module."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, images: Tensor) -> Tensor:
        """Tensor[B, C, H, W] floating -> the same shape, each image standardised."""
        return standardize(images, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class Pipeline(nn.Module):
    """front -> augmentation (training only) -> per-image standardisation -> classifier.

    Args:
        front: one of the fronts above (Tensor or list of images -> :class:`FrontOutput`).
        classifier: Tensor[B, C, h, w] -> logits Tensor[B, num_classes].
        augment: applied to the front's crops in training mode (or None).
        normalize: standardise each classifier input (:func:`standardize`).

    ``forward(images)`` runs everything; ``forward(crops=...)`` starts after the front,
    from crops it made before (the training engine caches the crops of fronts with
    nothing to learn); :meth:`classify` is that second half. ``noise`` holds each
    image's uniform random numbers, Tensor[B, noise_dims] (the front's columns first,
    then the augmentation's), so that an image's random transform depends on the image
    alone, not on the batch or process it is in; without it they are drawn from
    torch's global RNG.
    """

    def __init__(self, front: nn.Module, classifier: nn.Module, augment: nn.Module | None = None, normalize: bool = True) -> None:
        super().__init__()
        self.front = front
        self.augment = augment if augment is not None else BatchAugment(None)
        self.normalize = Standardize() if normalize else nn.Identity()
        self.classifier = classifier

    @property
    def noise_dims(self) -> int:
        """Uniform numbers one training image reads (front, then augmentation)."""
        return self._front_noise + int(getattr(self.augment, "noise_dims", 0))

    @property
    def _front_noise(self) -> int:
        return int(getattr(self.front, "noise_dims", 0))

    @property
    def front_is_fixed(self) -> bool:
        """True when the front has no trainable parameters and no training-time randomness:
        its output can be computed once per image and cached."""
        trainable = any(p.requires_grad for p in self.front.parameters())
        random = getattr(self.front, "roi_rotate_degrees", 0.0) > 0 or getattr(self.front, "edge_margin", 0) > 0  # soft edges change per epoch
        return not trainable and not random

    def forward(
        self, images: Images | None = None, noise: Tensor | None = None, *, crops: Tensor | None = None,
        return_front: bool = False,
    ) -> Tensor | tuple[Tensor, FrontOutput | None]:
        """Logits Tensor[B, num_classes] of raw ``images``, or of the front's ``crops``.

        With ``return_front`` also the :class:`FrontOutput` (None when ``crops`` were given).
        """
        if (images is None) == (crops is None):
            raise DACInputError("images, crops: give exactly one of them")
        count = len(images) if crops is None else crops.shape[0]
        if noise is None and self.training:
            noise = torch.rand(count, self.noise_dims)
        k = self._front_noise
        front = None
        if crops is None:
            front = self.front(images, None if noise is None or not k else noise[:, :k])
            crops = front.crops
        noise = None if noise is None else noise[:, k:]
        if front is not None and front.log_weights is not None:  # K candidate crops per image: their mixture
            copies = front.log_weights.shape[1]
            crops = crops.flatten(0, 1)  # [B, K, C, h, w] -> [B K, C, h, w], image-major
            log_p = torch.log_softmax(self.classify(crops, None if noise is None else noise.repeat_interleave(copies, dim=0)), dim=-1)
            logits = torch.logsumexp(front.log_weights[:, :, None] + log_p.reshape(count, copies, -1), dim=1)  # log sum_k w_k p(y | crop_k)
        else:
            logits = self.classify(crops, noise)
        if front is not None and front.baseline_crops is not None:  # the drawn candidate's baseline: the best one's loss
            with torch.no_grad():
                front = front._replace(baseline_logits=self.classify(front.baseline_crops, noise))
        return (logits, front) if return_front else logits

    def training_loss(self, logits: Tensor, labels: Tensor, front: FrontOutput | None = None) -> Tensor:
        """The summed cross-entropy of a training batch, and the front's score-function term.

        For a front that drew one candidate per image (``candidate_sampling``) the
        loss's value is the cross-entropy's; its gradient also has, per image,
        ``(nll_i - b_i) * d log w_i``, the REINFORCE estimate of the expected loss's
        gradient in the weights. The baseline ``b_i`` does not depend on image i's draw,
        so the estimate stays unbiased: the loss of the image's best candidate where the
        front gave its logits (``candidate_baseline="best"``), otherwise the mean loss of
        the batch's *other* images (0 for a batch of one; under DDP, of this process's
        share of the batch).

        Args:
            logits: Tensor[B, num_classes] of :meth:`forward` (``return_front=True``).
            labels: Tensor[B] class indices.
            front: the :class:`FrontOutput` that came with them (None: plain cross-entropy).

        Returns:
            A scalar: the sum over the batch.
        """
        nll = F.cross_entropy(logits, labels, reduction="none")
        loss = nll.sum()
        if front is not None and front.sample_log_weight is not None:
            if front.baseline_logits is not None:
                baseline = F.cross_entropy(front.baseline_logits.to(nll.dtype), labels, reduction="none")
            elif nll.numel() > 1:
                baseline = (nll.sum() - nll).detach() / (nll.numel() - 1)
            else:
                baseline = torch.zeros_like(nll)
            log_w = front.sample_log_weight.to(nll.dtype)
            loss = loss + ((nll.detach() - baseline) * (log_w - log_w.detach())).sum()  # value 0, gradient the estimate's
        return loss

    def classify(self, crops: Tensor, noise: Tensor | None = None) -> Tensor:
        """Logits of a front's crops: augmentation (training mode), standardisation, classifier."""
        if isinstance(self.augment, BatchAugment):
            crops = self.augment(crops, noise)
        else:
            crops = self.augment(crops)
        return self.classifier(self.normalize(crops))


def start_from_stage(net: SaliencyNet, path: str | Path) -> None:
    """Copy a trained stage's weights (``saliency.pt`` of ``dac fit-saliency``) into ``net``, in place.

    Raises:
        DACInputError: naming ``saliency_init``: no such file, not a stage, or a stage of
            another pool size, width, dilations or number of members than ``net``.
    """
    try:
        stage = load_saliency(path)
    except DACInputError as err:
        raise DACInputError(f"saliency_init: {str(err).removeprefix('saliency: ')}") from None
    if stage.config() != net.config():
        have, want = stage.config(), net.config()
        differ = ", ".join(f"{k} {have[k]} (pipeline: {want[k]})" for k in want if have[k] != want[k])
        raise DACInputError(f"saliency_init: {str(path)!r} is a stage of {differ}; set the pipeline's pool_size / "
                            f"saliency_width / saliency_members to the stage's")
    net.load_state_dict(stage.state_dict())


def build_pipeline(
    config: PipelineConfig,
    *,
    arch: str = "resnet18",
    width: int = 64,
    num_classes: int = 5,
    channels: int = 1,
    load_stage: bool = True,
) -> Pipeline:
    """The network of one pipeline: its front, its augmentation, a fresh ResNet.

    Args:
        config: the pipeline's settings (kind, input size, augmentation, ...).
        arch, width: the ResNet (see :func:`dac.train.models.resnet`).
        num_classes: outputs.
        channels: image channels (1: the paper's grayscale).
        load_stage: with ``config.saliency_init``, read the stage's weights into the
            saliency net (False: its architecture only, for weights loaded next from a
            checkpoint).

    Returns:
        A :class:`Pipeline`, randomly initialised from torch's global RNG (the ResNet
        first, so one seed gives every pipeline the same initial classifier).
    """
    kind = config.kind
    size = config.input_size
    # The classifier first: one seed gives every pipeline the same initial ResNet.
    classifier = resnet(arch, num_classes, in_channels=channels, width=width)
    if kind == "resize":
        front: nn.Module = ResizeFront(size)
    elif kind in ("dac", "dac_e2e"):
        saliency = None
        if kind == "dac_e2e" or config.saliency_init is not None:
            saliency = SaliencyNet(config.pool_size, width=config.saliency_width, members=config.saliency_members)
        if config.saliency_init is not None:
            if load_stage:
                start_from_stage(saliency, config.saliency_init)
            saliency.requires_grad_(kind == "dac_e2e")  # plain DAC keeps the stage fixed
        front = DACFront(size, config.pool_size, config.backward_mode, saliency, config.roi_rotate_degrees,
                         r_min_fraction=config.r_min_fraction, sharpness_factor=config.sharpness_factor,
                         search=config.search, edge_margin=config.edge_margin, edge_sharpness=config.edge_sharpness,
                         candidates=config.candidates, candidate_power=config.candidate_power,
                         candidate_sampling=config.candidate_sampling, candidate_baseline=config.candidate_baseline,
                         learn_constants=config.learn_constants)
    elif kind == "stn":
        front = SpatialTransformerCrop(size, config.localization_size, channels)
    elif kind == "oracle":
        front = OracleFront(size)
    else:
        raise DACInputError(f"config.kind: expected resize, dac, dac_e2e, oracle or stn, got {kind!r}")
    ranges = augmentation(config.augment, rotate=config.roi_rotate_degrees == 0)
    return Pipeline(front, classifier, BatchAugment(ranges))
