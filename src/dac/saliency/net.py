"""Saliency stages for ``DACrop``: cheap window features and a small learned network.

The paper searches the max–min pooled image (eq. 5), which is as bright on collimator
edges, lead markers and texture as on the region a person wants. A learned stage keeps
the search and changes only the map it runs on:

* :func:`saliency_features` — one pass over the image, per pooling window (k x k):
  the max–min range (eq. 5), mean, max, min and standard deviation.
* :class:`SaliencyNet` — a small dilated CNN on those features, at half the pooled
  resolution, whose output *gates* the max–min map: ``S = maxmin * 2 sigmoid(g) * exp(scale)``.
  The last layer and the scale start at zero, so an untrained net gives exactly the
  paper's map and training starts at the paper's DAC. Trained through the box by
  :func:`dac.localisation.fit_saliency` (from labelled boxes, after an optional mask
  warm start) or from a task loss.

Convention: maps are Tensor[B, 1, H // k, W // k]; pooled pixel ``(i, j)`` covers
input pixels ``[i k, (i + 1) k) x [j k, (j + 1) k)``.

Example:
    >>> net = SaliencyNet(pool_size=4)
    >>> x = torch.rand(2, 1, 40, 80)
    >>> torch.allclose(net(x), max_min_pool(x, 4))  # untrained: the paper's map
    True
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import INTEGER_IMAGE_SCALE, DACInputError, check_image_batch, check_int, check_poolable
from .functional.pooling import max_min_pool, window_extremes

__all__ = [
    "FEATURES", "SaliencyNet", "check_features", "feature_trunk", "load_saliency", "save_saliency", "saliency_features", "standardize_features", "trunk_map",
]

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

    Example:
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


def feature_trunk(width: int = 16, dilations: Sequence[int] = (1, 2, 4, 8), groups: int = 1) -> nn.Sequential:
    """The CNN both learned localisers use on standardised features (:func:`standardize_features`).

    A stride-2 3 x 3 convolution (half the pooled resolution, a quarter of the work),
    then one 3 x 3 convolution per entry of ``dilations``, ReLU after each; receptive
    field ``3 + 4 sum(dilations)`` pooled pixels (63 by default: 630 input pixels at
    k = 10). Tensor[B, 5 groups, h, w] -> Tensor[B, width groups, ceil(h / 2), ceil(w / 2)]:
    ``groups`` independent trunks side by side (grouped convolutions, called on the
    features repeated ``groups`` times; :func:`trunk_map` runs them a group at a time).
    Weights are channels-last, which :func:`trunk_map` feeds (~1.4x faster on CPU).
    """
    width = check_int(width, "width", 1)
    groups = check_int(groups, "groups", 1)
    dilations = tuple(check_int(d, "dilations", 1) for d in dilations)
    channels = width * groups
    layers: list[nn.Module] = [nn.Conv2d(len(FEATURES) * groups, channels, 3, stride=2, padding=1, groups=groups), nn.ReLU(inplace=True)]
    for d in dilations:
        layers += [nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=groups), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def standardize_features(features: Tensor) -> Tensor:
    """Each image's features with zero mean and unit variance per channel (exposure-free)."""
    mean = features.mean(dim=(2, 3), keepdim=True)
    return (features - mean) / features.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def trunk_map(trunk: nn.Module, head: nn.Module, features: Tensor, copies: int = 1) -> Tensor:
    """``head(trunk(standardised features))`` upsampled (bilinear) back to the features'
    h x w: Tensor[B, 5, h, w] -> Tensor[B, O, h, w] (O: ``head``'s outputs), in ``head``'s
    dtype. The map both learned localisers draw (:class:`SaliencyNet`'s gate logits, the
    box regressor's heat map). ``copies``: the groups of a grouped trunk and head
    (:func:`feature_trunk`), each fed the features; their outputs side by side."""
    x = check_features(features).to(next(head.parameters()).dtype)
    z = standardize_features(x).contiguous(memory_format=torch.channels_last)
    out = head(trunk(z)) if copies == 1 else _by_group([*trunk, head], z, copies)
    return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False).contiguous()


def _by_group(layers: Sequence[nn.Module], z: Tensor, groups: int) -> Tensor:
    """``layers`` (grouped convolutions and activations) applied to ``z`` repeated ``groups``
    times, one group at a time: the same numbers as the grouped convolutions, 1.25x
    faster on CPU (grouped convolutions have no fast path there), and no repeated input."""
    outs = []
    for g in range(groups):
        h = z
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                n = layer.out_channels // groups
                h = F.conv2d(h, layer.weight[g * n : (g + 1) * n], layer.bias[g * n : (g + 1) * n],
                             layer.stride, layer.padding, layer.dilation)
            else:
                h = layer(h)
        outs.append(h)
    return torch.cat(outs, dim=1)


def check_features(features: Tensor) -> Tensor:
    """``features`` if it is a Tensor[B, 5, h, w] of :func:`saliency_features`; else DACInputError."""
    if not isinstance(features, Tensor) or features.ndim != 4 or features.shape[1] != len(FEATURES):
        raise DACInputError(f"features: expected Tensor[B, {len(FEATURES)}, h, w], got {tuple(getattr(features, 'shape', ())) or type(features).__name__}")
    return features


class SaliencyNet(nn.Module):
    """A learned saliency stage: window features -> CNN -> gate on the max–min map.

    ``S = maxmin * 2 sigmoid(g(features)) * exp(log_scale)``, with ``g`` (:meth:`gate_logits`)
    the :func:`feature_trunk` on the per-image standardised features, a 1 x 1 convolution,
    and bilinear upsampling back to the pooled resolution. The receptive field (630
    input pixels by default) is enough to tell a collimator edge or a marker from teeth.
    The gate can silence a region (0) or double it (2); the global scale matters
    because the "+1" of eq. 3 makes the optimum depend on the map's scale. The last
    convolution and the scale start at zero: an untrained net *is* the paper's map.

    With ``members`` > 1 the net is that many independently initialised gates side by
    side (grouped convolutions), and ``g`` is the mean of their logits: an ensemble,
    whose boxes scatter less than one member's. :func:`dac.localisation.fit_saliency`
    trains each member by the boxes found on its own map (:meth:`member_maps`), all
    members' maps searched in one batch: a training step of two members takes ~1.4x
    one member's (batch 8 at the paper's size, 2 CPU threads: the search, most of a
    step, costs little more for twice the maps; the nets cost twice).

    Args:
        pool_size: the window k (must equal ``DACrop``'s ``pool_size``).
        width: channels of each member's hidden layers.
        dilations: of the trunk's 3 x 3 convolutions after the first.
        members: gates averaged (1: a single net).

    Example:
        >>> from dac import DACrop
        >>> layer = DACrop(output_size=(20, 37), pool_size=4, saliency=SaliencyNet(4))
        >>> layer(torch.rand(1, 1, 96, 177)).shape
        torch.Size([1, 1, 20, 37])
    """

    def __init__(self, pool_size: int = 10, width: int = 16, dilations: Sequence[int] = (1, 2, 4, 8), members: int = 1) -> None:
        super().__init__()
        self.pool_size = check_int(pool_size, "pool_size", 1)
        self.members = check_int(members, "members", 1)
        self.trunk = feature_trunk(width, dilations, groups=self.members)
        self.width = width
        self.dilations = tuple(int(d) for d in dilations)
        self.gate = nn.Conv2d(width * self.members, self.members, 1, groups=self.members)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, images: Tensor) -> Tensor:
        """Images Tensor[B, C, H, W] -> map Tensor[B, 1, H // k, W // k], >= 0."""
        return self.from_features(saliency_features(images, self.pool_size))

    def from_features(self, features: Tensor) -> Tensor:
        """The map from precomputed :func:`saliency_features` Tensor[B, 5, h, w]."""
        return self._gated(features, self.gate_logits(features))

    def member_maps(self, features: Tensor) -> Tensor:
        """Each member's own map, Tensor[B, members, h, w] (what training searches)."""
        return self._gated(features, self.member_logits(features))

    def gate_logits(self, features: Tensor) -> Tensor:
        """Logits ``g`` of the gate ``2 sigmoid(g)``, Tensor[B, 1, h, w], from features
        Tensor[B, 5, h, w]: the mean of the members' logits."""
        return self.member_logits(features).mean(dim=1, keepdim=True)

    def member_logits(self, features: Tensor) -> Tensor:
        """Each member's gate logits, Tensor[B, members, h, w] (what
        :func:`dac.localisation.fit_region_masks` fits)."""
        return trunk_map(self.trunk, self.gate, features, self.members)

    def _gated(self, features: Tensor, logits: Tensor) -> Tensor:
        return features[:, :1].to(logits) * 2 * torch.sigmoid(logits) * self.log_scale.exp()

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}" + (f", members={self.members}" if self.members > 1 else "")

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (what :func:`save_saliency` stores)."""
        return {"pool_size": self.pool_size, "width": self.width, "dilations": list(self.dilations), "members": self.members}


def save_saliency(net: SaliencyNet, path: str | Path, **meta: Any) -> None:
    """Write ``net`` (its arguments, weights and ``meta`` numbers/strings) to ``path`` atomically."""
    from ._files import atomic_write

    state = {"kind": "SaliencyNet", "config": net.config(), "state_dict": net.state_dict(), "meta": dict(meta)}
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_saliency(path: str | Path, map_location: Any = "cpu") -> SaliencyNet:
    """A :class:`SaliencyNet` saved by :func:`save_saliency` (read weights-only), in eval mode.

    Raises:
        DACInputError: the file is missing or is not a saved saliency stage.
    """
    path = Path(path)
    if not path.is_file():
        raise DACInputError(f"saliency: no such file {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or state.get("kind") != "SaliencyNet":
            raise ValueError("not a saved SaliencyNet")
        net = SaliencyNet(**state["config"])
        net.load_state_dict(state["state_dict"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise DACInputError(f"saliency: {str(path)!r} is not a saliency stage saved by dac ({exc})") from None
    return net.eval()
