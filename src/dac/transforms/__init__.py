"""DAC in data pipelines: a torchvision v2 transform, a MONAI dictionary transform, and maps back.

* :class:`AutoCrop` (torchvision ``transforms.v2``): crops the image of a sample to the
  region DAC finds and moves its boxes, masks and key points with it.
* :class:`DACropd` (MONAI, optional: ``pip install 'dac[monai]'``): the same for MONAI
  dictionaries of ``MetaTensor``, with the affine updated and an ``inverse`` that
  ``Invertd`` uses. Imported on first use, so ``import dac.transforms`` does not need MONAI.
* :func:`boxes_to_original`, :func:`points_to_original`, :func:`heatmap_to_original` and
  their ``*_to_crop`` inverses: take what a model found on the crop to the original
  image's pixels, and back.

Convention: boxes are xyxy in pixels (pixel ``i`` covers ``[i, i + 1)``), points (x, y).

    >>> import torch
    >>> from dac.transforms import boxes_to_original
    >>> boxes_to_original(torch.tensor([[0.0, 0.0, 37.0, 20.0]]), torch.tensor([8.0, 4.0, 82.0, 44.0]), (20, 37))
    tensor([[ 8.,  4., 82., 44.]])
"""
from __future__ import annotations

from typing import Any

from .autocrop import AutoCrop
from .mapping import (
    boxes_to_crop,
    boxes_to_original,
    heatmap_to_crop,
    heatmap_to_original,
    points_to_crop,
    points_to_original,
)

__all__ = [
    "AutoCrop",
    "DACropd",
    "boxes_to_crop",
    "boxes_to_original",
    "heatmap_to_crop",
    "heatmap_to_original",
    "points_to_crop",
    "points_to_original",
]


def __getattr__(name: str) -> Any:
    # DACropd needs MONAI (an optional extra): import it only when asked for.
    if name == "DACropd":
        from .monai_dict import DACropd

        return DACropd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
