"""The baseline: direct box regression from the features a learned saliency stage sees.

* :class:`BoxRegressor` — the same trunk as :class:`~dac.saliency.SaliencyNet`, ending
  in a heat map whose soft-argmax is the box centre and a width from the pooled
  features: a box of the crop's aspect, with no search.
* :func:`fit_box_regressor` — trains it exactly as :func:`~dac.saliency.fit_saliency`
  trains a stage (same batches, loss, targets, warm start): the fair comparison of
  DESIGN.md section 6.

Convention: boxes are xyxy in input pixel coordinates (torchvision's).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import DACInputError, check_int, check_pool_size, check_positive
from ..functional.boxes import box_inside
from ..layer import DACrop
from .features import check_features, standardize_features
from .fit import FitHistory, FitOptions, fit_boxes
from .net import feature_trunk, initialised, trunk_map

__all__ = ["BoxRegressor", "fit_box_regressor"]


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
        generator: draws the initial weights (None: the global random state; given, the
            global state is left alone).

    Examples:
        >>> model = BoxRegressor(0.5, pool_size=4, width=4, dilations=(1,))
        >>> model(torch.rand(1, 5, 24, 44), (96, 176)).shape
        torch.Size([1, 4])
    """

    def __init__(
        self,
        aspect: float,
        pool_size: int = 10,
        width: int = 16,
        dilations: Sequence[int] = (1, 2, 4, 8),
        min_width_fraction: float = 2 / 3.5,
        init_width_fraction: float = 2 / 2.3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.aspect = check_positive(aspect, "aspect")
        self.pool_size = check_int(pool_size, "pool_size", 1)
        self.min_width_fraction = float(min_width_fraction)
        self.trunk = feature_trunk(width, dilations, generator=generator)
        self.heat = initialised(nn.Conv2d, width, 1, 1, generator=generator)
        self.size = initialised(nn.Linear, width, 1, generator=generator)
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
        return box_inside(torch.stack((cx, cy), dim=-1), box_w, self.aspect, x.new_tensor([height, width]))


def fit_box_regressor(
    model: BoxRegressor,
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
    """Train the :class:`BoxRegressor` baseline exactly as :func:`~dac.saliency.fit_saliency`
    trains a saliency stage: same batches, loss, targets (``layer``'s aspect and minimum
    width), and the same mask warm start (``mask_steps``; of its trunk and heat map, whose
    soft-argmax then starts at the centre of the mask).

    Args:
        model: the regressor (trained in place); its aspect and ``pool_size`` must be ``layer``'s.
        features, regions, image_sizes, layer, options, seed, callback, **changes: as
            :func:`~dac.saliency.fit_saliency`.

    Returns:
        :class:`~dac.saliency.FitHistory` (no boxes frozen or unconverged: there is no search).

    Raises:
        DACInputError: bad options, or a model of another aspect or ``pool_size`` than ``layer``.
    """
    options = FitOptions.of(options, **changes)
    check_pool_size(model, layer.pool_size, "model")
    if not math.isclose(model.aspect, layer.aspect, rel_tol=1e-9):
        raise DACInputError(f"model: its aspect {model.aspect:g} is not the layer's {layer.aspect:g} (the targets' aspect)")

    def locate(feats: Tensor, size: tuple[int, int]):
        return model(feats, size), None

    return fit_boxes(model, locate, (model.heat_logits, 1.0), features, regions, image_sizes, layer, options, seed=seed, callback=callback)
