"""The learned saliency stage: a small CNN on window features that gates the paper's map.

The paper searches the max–min pooled image (eq. 5), which is as bright on collimator
edges, lead markers and texture as on the region a person wants. A learned stage keeps
the search and changes only the map it runs on:

* :func:`feature_trunk` / :func:`trunk_map` — the dilated CNN both learned localisers
  (this stage and the box-regression baseline) run on standardised features, at half
  the pooled resolution, and the map it draws back at the pooled resolution.
* :class:`SaliencyNet` — ``S = maxmin * 2 sigmoid(g) * exp(scale)``. The last layer and
  the scale start at zero, so an untrained net gives exactly the paper's map and
  training starts at the paper's DAC. Trained through the box by
  :func:`dac.saliency.fit_saliency` (from labelled boxes, after an optional mask warm
  start) or from a task loss.
* :data:`LEARNED_DEFAULTS` — the ``DACrop`` settings a learned stage is trained and used with.

Convention: maps are Tensor[B, 1, H // k, W // k]; pooled pixel ``(i, j)`` covers
input pixels ``[i k, (i + 1) k) x [j k, (j + 1) k)``.

Examples:
    >>> from dac.functional import max_min_pool
    >>> net = SaliencyNet(pool_size=4)
    >>> x = torch.rand(2, 1, 40, 80)
    >>> torch.allclose(net(x), max_min_pool(x, 4))  # untrained: the paper's map
    True
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .features import FEATURES, check_features, saliency_features, standardize_features

__all__ = ["LEARNED_DEFAULTS", "SaliencyNet", "feature_trunk", "trunk_map"]

#: The DACrop settings a learned saliency is trained and used with, unless asked
#: otherwise: a narrower minimum box than the paper's 2/3.5 of the width (the learned
#: map no longer needs the guard; the paper's minimum caps a 200 x 370 box's IoU with
#: the dental region near 0.75 on phantoms), and gamma x4 per stage (Algorithm 1): its
#: harder-edged last stages put the box at the edge of a map that is dark outside the
#: region, where gamma x2 overshoots (on a perfect gate: IoU 0.81 against 0.64); and the
#: global search, which on the tuning phantoms kept every tooth inside more often than the
#: staged ascent at the same IoU (docs/results_localisation.md).
LEARNED_DEFAULTS = {"r_min_fraction": 0.2, "sharpness_factor": 4.0, "search": "global"}


def feature_trunk(width: int = 16, dilations: Sequence[int] = (1, 2, 4, 8), groups: int = 1,
                  generator: torch.Generator | None = None) -> nn.Sequential:
    """The CNN both learned localisers use on standardised features (:func:`standardize_features`).

    A stride-2 3 x 3 convolution (half the pooled resolution, a quarter of the work),
    then one 3 x 3 convolution per entry of ``dilations``, ReLU after each; receptive
    field ``3 + 4 sum(dilations)`` pooled pixels (63 by default: 630 input pixels at
    k = 10). Tensor[B, 5 groups, h, w] -> Tensor[B, width groups, ceil(h / 2), ceil(w / 2)]:
    ``groups`` independent trunks side by side (grouped convolutions, called on the
    features repeated ``groups`` times; :func:`trunk_map` runs them a group at a time).
    Weights are channels-last, which :func:`trunk_map` feeds (~1.4x faster on CPU).

    Args:
        width: hidden channels per group.
        dilations: of the 3 x 3 convolutions after the first.
        groups: independent trunks.
        generator: draws the initial weights (PyTorch's default initialisation; None:
            from the global random state, as ``nn.Conv2d`` does).

    Returns:
        ``nn.Sequential`` of convolutions and ReLUs.

    Examples:
        >>> trunk = feature_trunk(4, (1,), generator=torch.Generator().manual_seed(0))
        >>> trunk(torch.rand(1, 5, 8, 12)).shape
        torch.Size([1, 4, 4, 6])
    """
    width = check_int(width, "width", 1)
    groups = check_int(groups, "groups", 1)
    dilations = tuple(check_int(d, "dilations", 1) for d in dilations)
    channels = width * groups
    conv = nn.Conv2d
    layers: list[nn.Module] = [initialised(conv, len(FEATURES) * groups, channels, 3, generator=generator, stride=2, padding=1, groups=groups),
                               nn.ReLU(inplace=True)]
    for d in dilations:
        layers += [initialised(conv, channels, channels, 3, generator=generator, padding=d, dilation=d, groups=groups), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def initialised(layer: type[nn.Conv2d] | type[nn.Linear], *args: Any, generator: torch.Generator | None = None, **kwargs: Any) -> nn.Module:
    """``layer(*args, **kwargs)`` (a convolution or linear layer); with ``generator``, its
    default initialisation (kaiming-uniform weights with a = sqrt(5), uniform bias within
    1 / sqrt(fan_in), as their ``reset_parameters``) drawn from it, and nothing drawn
    from the global random state.

    Examples:
        >>> a = initialised(nn.Linear, 3, 2, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(a.weight, initialised(nn.Linear, 3, 2, generator=torch.Generator().manual_seed(0)).weight)
        True
    """
    if generator is None:
        return layer(*args, **kwargs)
    module = nn.utils.skip_init(layer, *args, **kwargs)
    with torch.no_grad():
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(module.weight[0].numel())  # fan_in
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return module


def trunk_map(trunk: nn.Module, head: nn.Module, features: Tensor, copies: int = 1) -> Tensor:
    """``head(trunk(standardised features))`` upsampled (bilinear) back to the features' h x w.

    The map both learned localisers draw (:class:`SaliencyNet`'s gate logits, the box
    regressor's heat map).

    Args:
        trunk: a :func:`feature_trunk`.
        head: a convolution to O outputs.
        features: Tensor[B, 5, h, w].
        copies: the groups of a grouped trunk and head (:func:`feature_trunk`), each fed
            the features; their outputs side by side.

    Returns:
        Tensor[B, O, h, w], in ``head``'s dtype.

    Examples:
        >>> trunk_map(feature_trunk(4, (1,)), nn.Conv2d(4, 1, 1), torch.rand(2, 5, 8, 12)).shape
        torch.Size([2, 1, 8, 12])
    """
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
    whose boxes scatter less than one member's. :func:`dac.saliency.fit_saliency`
    trains each member by the boxes found on its own map (:meth:`member_maps`), all
    members' maps searched in one batch: a training step of two members takes ~1.4x
    one member's (batch 8 at the paper's size, 2 CPU threads: the search, most of a
    step, costs little more for twice the maps; the nets cost twice).

    Args:
        pool_size: the window k (must equal ``DACrop``'s ``pool_size``).
        width: channels of each member's hidden layers.
        dilations: of the trunk's 3 x 3 convolutions after the first.
        members: gates averaged (1: a single net).
        generator: draws the initial weights (None: the global random state, as
            ``nn.Conv2d`` does; given, the global state is left alone); not part of
            :meth:`config` (a loaded stage gets its weights from the file).

    Examples:
        >>> from dac import DACrop
        >>> from dac.data.phantoms import make_phantom
        >>> layer = DACrop(output_size=(20, 37), pool_size=4, saliency=SaliencyNet(4))
        >>> layer(make_phantom(0, 96, 177).image[None]).shape
        torch.Size([1, 1, 20, 37])
    """

    def __init__(self, pool_size: int = 10, width: int = 16, dilations: Sequence[int] = (1, 2, 4, 8), members: int = 1,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.pool_size = check_int(pool_size, "pool_size", 1)
        self.members = check_int(members, "members", 1)
        self.trunk = feature_trunk(width, dilations, groups=self.members, generator=generator)
        self.width = width
        self.dilations = tuple(int(d) for d in dilations)
        self.gate = initialised(nn.Conv2d, width * self.members, self.members, 1, generator=generator, groups=self.members)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, images: Tensor) -> Tensor:
        """Images Tensor[B, C, H, W] -> map Tensor[B, 1, H // k, W // k], >= 0."""
        return self.from_features(saliency_features(images, self.pool_size))

    def from_features(self, features: Tensor) -> Tensor:
        """The map Tensor[B, 1, h, w] from precomputed :func:`saliency_features` Tensor[B, 5, h, w]."""
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
        :func:`dac.saliency.fit_region_masks` fits)."""
        return trunk_map(self.trunk, self.gate, features, self.members)

    def _gated(self, features: Tensor, logits: Tensor) -> Tensor:
        return features[:, :1].to(logits) * 2 * torch.sigmoid(logits) * self.log_scale.exp()

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}" + (f", members={self.members}" if self.members > 1 else "")

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (what :func:`dac.saliency.save_saliency` stores)."""
        return {"pool_size": self.pool_size, "width": self.width, "dilations": list(self.dilations), "members": self.members}
