"""The classifier: torchvision ResNets with a 1-channel stem, trained from scratch (paper section 3.3).

The paper's network is ResNet-101 with one input channel and five outputs. ``width``
scales every stage (torchvision's ResNets are ``width = 64``: stages of 64, 128, 256
and 512 planes); small widths make CPU runs on phantoms fast while keeping the
architecture.

Examples:
    >>> net = resnet("resnet18", num_classes=5, width=8)
    >>> net(torch.rand(2, 1, 48, 88)).shape
    torch.Size([2, 5])
"""
from __future__ import annotations

import torch  # noqa: F401  (doctest namespace)
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .._checks import DACInputError

__all__ = ["RESNET_LAYERS", "resnet"]

#: Block type and blocks per stage of each ResNet (He et al. 2016).
RESNET_LAYERS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class _ResNet(ResNet):
    """torchvision's ResNet with ``in_channels`` input channels and stage widths ``width * (1, 2, 4, 8)``.

    The blocks are torchvision's own (built with its ``_make_layer``); only the stem's
    input channels and the base width differ. With ``width = 64`` and
    ``in_channels = 3`` this is exactly ``torchvision.models.resnetXX(num_classes=...)``.
    """

    def __init__(self, block, layers, num_classes: int, in_channels: int, width: int) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # torchvision's width_per_group: Bottleneck width = planes
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def resnet(arch: str = "resnet101", num_classes: int = 5, *, in_channels: int = 1, width: int = 64) -> nn.Module:
    """A randomly initialised torchvision ResNet taking ``in_channels`` channels.

    Args:
        arch: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"`` (paper).
        num_classes: outputs (paper: 5).
        in_channels: input channels (paper: 1, grayscale).
        width: planes of the stem and first stage; later stages double it (64 is
            torchvision's and the paper's network).

    Returns:
        ``torchvision.models.ResNet``: Tensor[B, in_channels, H, W] -> logits Tensor[B, num_classes].
        Any H, W >= 32 works (global average pooling).
    """
    if arch not in RESNET_LAYERS:
        raise DACInputError(f"arch: expected one of {sorted(RESNET_LAYERS)}, got {arch!r}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DACInputError(f"{name}: expected an int >= 1, got {value!r}")
    if num_classes < 2:
        raise DACInputError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    block, layers = RESNET_LAYERS[arch]
    return _ResNet(block, layers, num_classes, in_channels, width)
