"""What a learned saliency stage sees: per pooling window, five numbers of one pass over the image.

* :func:`saliency_features` — per window (k x k): the max–min range (the paper's map,
  eq. 5), mean, max, min and standard deviation.
* :func:`standardize_features` — each image's features with zero mean and unit variance
  per channel (what the networks are fed: exposure-free).
* :func:`check_features` — the shape check of a batch of features.

Convention: features are Tensor[B, 5, H // k, W // k]; pooled pixel ``(i, j)`` covers
input pixels ``[i k, (i + 1) k) x [j k, (j + 1) k)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import INTEGER_IMAGE_SCALE, DACInputError, check_image_batch, check_int, check_poolable
from ..functional.pooling import window_extremes

__all__ = ["FEATURES", "check_features", "saliency_features", "standardize_features"]

#: The channels of :func:`saliency_features`, in order.
FEATURES = ("max_min", "mean", "max", "min", "std")


def saliency_features(images: Tensor, pool_size: int = 10) -> Tensor:
    """Per pooling window: max–min range (eq. 5), mean, max, min, standard deviation.

    Args:
        images: Tensor[B, C, H, W] (C = 1 or 3), floating in [0, 1] or integer
            (scaled as :func:`dac.functional.to_unit_range`).
        pool_size: window and stride k.

    Returns:
        Tensor[B, 5, H // k, W // k] (:data:`FEATURES`), float32 (float64 for float64
        images); colour images give the mean over channels of each feature. Channel 0
        equals :func:`dac.functional.max_min_pool`.

    Examples:
        >>> saliency_features(torch.rand(2, 1, 40, 60), 10).shape
        torch.Size([2, 5, 4, 6])
    """
    check_image_batch(images)
    k = check_int(pool_size, "pool_size", 1)
    h, w = check_poolable(images, k)
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    # Window max and min in the images' own dtype (no full-size float copy); mean and
    # standard deviation of the raw values, scaled afterwards. The variance is taken
    # around each window's mean (two passes): E[x^2] - E[x]^2 in float32 left rounding
    # noise of ~4e-4 in flat windows, brightness-dependent fake texture.
    high, low = window_extremes(images, k)
    scale = 1.0 if images.dtype.is_floating_point else float(INTEGER_IMAGE_SCALE[images.dtype])
    high, low = high.to(dtype), low.to(dtype)
    spread = ((high - low) / scale).mean(dim=1, keepdim=True)  # = max_min_pool(images, k)
    b, c = images.shape[:2]
    raw = images[:, :, : h * k, : w * k].to(dtype).reshape(b, c, h, k, w, k)
    mean = raw.mean(dim=(3, 5))
    std = (raw - mean[:, :, :, None, :, None]).square_().mean(dim=(3, 5)).sqrt_()
    rest = torch.stack((mean, high, low, std), dim=1).mean(dim=2) / scale  # [B, 4, h, w], channels averaged
    return torch.cat((spread, rest), dim=1)


def standardize_features(features: Tensor) -> Tensor:
    """Each image's features with zero mean and unit variance per channel (exposure-free).

    Args:
        features: Tensor[B, 5, h, w].

    Returns:
        Tensor[B, 5, h, w].

    Examples:
        >>> z = standardize_features(torch.rand(1, 5, 4, 6) * 7 + 3)
        >>> bool(z.mean(dim=(2, 3)).abs().max() < 1e-5)
        True
    """
    mean = features.mean(dim=(2, 3), keepdim=True)
    return (features - mean) / features.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def check_features(features: Tensor) -> Tensor:
    """``features`` if it is a Tensor[B, 5, h, w] of :func:`saliency_features`.

    Raises:
        DACInputError: another shape or not a tensor (the message names ``features``).

    Examples:
        >>> check_features(torch.zeros(1, 5, 2, 2)).shape
        torch.Size([1, 5, 2, 2])
    """
    if not isinstance(features, Tensor) or features.ndim != 4 or features.shape[1] != len(FEATURES):
        raise DACInputError(f"features: expected Tensor[B, {len(FEATURES)}, h, w], got {tuple(getattr(features, 'shape', ())) or type(features).__name__}")
    return features
