"""A soft-edged crop: the box and a margin around it, weighted by the soft rectangle of eqs. 1–2.

A hard crop tells the box about the content under its edges only (the resampling
kernel's support): a mark ten pixels outside the box cannot ask the box to grow. The
soft-edged crop samples a band of ``margin`` output pixels around the box, at the
crop's own scale, and multiplies the whole canvas by the paper's soft rectangle
(eqs. 1–2) of the box, in output pixels with sharpness ``sharpness`` per output
pixel: content just outside the box reaches the loss, damped smoothly, and moving the
box moves it under that weight, so the loss's gradient in the box feels it. As the
sharpness grows the canvas tends to the hard crop padded by ``margin`` zeros, which
:func:`soft_crop` returns for ``sharpness=inf`` (what evaluation uses).

The inner ``H_out x W_out`` samples of the canvas are exactly those of
``crop_resize(images, boxes, (H_out, W_out))``: the outer box is the box grown by
``margin`` output pixels at the same scale.

Convention: boxes are xyxy in input pixel coordinates (torchvision's): pixel ``i``
covers ``[i, i + 1)``, the whole image is ``(0, 0, W, H)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import DACInputError, check_bool, check_boxes, check_image_batch, check_int, check_size
from .crop import crop_resize
from .rectangle import edge_profiles

__all__ = ["SoftCrop", "edge_weights", "soft_crop"]


def edge_weights(size: Sequence[int], margin: int, sharpness: float, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
    """The soft rectangle (eqs. 1–2) of an ``H_out x W_out`` box on its canvas grown by ``margin``.

    Output pixel ``j`` of the canvas (centre ``j + 0.5``) lies ``j + 0.5 - margin`` output
    pixels right of the box's left edge; the weight is ``u(x) v(y)`` with
    ``u = sigmoid(g (x - x1)) sigmoid(g (x2 - x))``, ``x1 = margin``, ``x2 = margin + W_out``.

    Args:
        size: (H_out, W_out) of the box's crop.
        margin: band width in output pixels, >= 0.
        sharpness: g per output pixel, > 0; ``math.inf`` gives 1 inside, 0 outside.
        dtype, device: of the result.

    Returns:
        Tensor[H_out + 2 margin, W_out + 2 margin].

    Examples:
        >>> w = edge_weights((2, 3), 1, 4.0)
        >>> w.shape, round(float(w[1, 2]), 3), round(float(w[0, 0]), 3)
        (torch.Size([4, 5]), 0.874, 0.014)
    """
    out_h, out_w = check_size(size)
    margin = check_int(margin, "margin", 0)
    if not (isinstance(sharpness, (int, float)) and sharpness > 0):
        raise DACInputError(f"sharpness: expected a number > 0 (math.inf for the hard crop), got {sharpness!r}")
    axes = []
    for n in (out_h, out_w):
        centres = torch.arange(n + 2 * margin, dtype=dtype, device=device) + 0.5
        if math.isinf(sharpness):
            axes.append(((centres > margin) & (centres < margin + n)).to(dtype))
        else:
            low, high = centres.new_full((1,), float(margin)), centres.new_full((1,), float(margin + n))
            axes.append(edge_profiles(centres, low, high, centres.new_tensor(float(sharpness)), 0)[0, 0])
    return axes[0][:, None] * axes[1][None, :]


def soft_crop(images: Tensor, boxes: Tensor, size: Sequence[int], *, margin: int, sharpness: float,
              antialias: bool = True) -> Tensor:
    """Crop ``boxes`` with a band of ``margin`` output pixels around them, weighted by their soft rectangle.

    Convention: boxes are xyxy in input pixel coordinates (torchvision's); the aspect
    ratio is kept only if the box's aspect equals ``H_out / W_out``.

    Differentiable in ``images`` (floating) and ``boxes``; the gradient in a box sees
    content up to ~``margin`` output pixels outside it, damped by the soft edge.

    Args:
        images: Tensor[B, C, H, W], floating or integer (scaled to [0, 1]).
        boxes: Tensor[B, 4] = (x1, y1, x2, y2), x2 > x1 and y2 > y1.
        size: (H_out, W_out) of the box's part of the canvas.
        margin: band width in output pixels, >= 0 (0: :func:`crop_resize` times the
            soft rectangle).
        sharpness: soft rectangle sharpness per output pixel, > 0; ``math.inf``: the
            hard crop padded by ``margin`` zeros (no sampling outside the box).
        antialias: as :func:`crop_resize`.

    Returns:
        Tensor[B, C, H_out + 2 margin, W_out + 2 margin], floating.

    Examples:
        >>> img = torch.rand(1, 1, 40, 80)
        >>> box = torch.tensor([[10.0, 10.0, 50.0, 30.0]])
        >>> soft_crop(img, box, (10, 20), margin=2, sharpness=1.0).shape
        torch.Size([1, 1, 14, 24])
    """
    check_image_batch(images)
    check_boxes(boxes, images.shape[0])
    out_h, out_w = check_size(size)
    margin = check_int(margin, "margin", 0)
    weights = edge_weights((out_h, out_w), margin, sharpness)  # checks the sharpness
    if math.isinf(sharpness):
        crops = crop_resize(images, boxes, (out_h, out_w), antialias=antialias)
        return F.pad(crops, (margin, margin, margin, margin))
    boxes = boxes if boxes.dtype.is_floating_point else boxes.to(torch.get_default_dtype())
    scale_x = (boxes[:, 2] - boxes[:, 0]) / out_w
    scale_y = (boxes[:, 3] - boxes[:, 1]) / out_h
    grow = torch.stack((-scale_x, -scale_y, scale_x, scale_y), dim=-1) * margin
    canvas = crop_resize(images, boxes + grow, (out_h + 2 * margin, out_w + 2 * margin), antialias=antialias)
    return canvas * weights.to(dtype=canvas.dtype, device=canvas.device)


class SoftCrop(nn.Module):
    """Module form of :func:`soft_crop`; ``forward(images, boxes)``.

    Examples:
        >>> SoftCrop((10, 20), margin=2, sharpness=1.0)(torch.rand(1, 1, 40, 80), torch.tensor([[0.0, 0, 40, 20]])).shape
        torch.Size([1, 1, 14, 24])
    """

    def __init__(self, size: Sequence[int], *, margin: int, sharpness: float, antialias: bool = True) -> None:
        super().__init__()
        self.size = check_size(size)
        self.margin = check_int(margin, "margin", 0)
        edge_weights((1, 1), 0, sharpness)  # checks it
        self.sharpness = float(sharpness)
        self.antialias = check_bool(antialias, "antialias")

    def forward(self, images: Tensor, boxes: Tensor) -> Tensor:
        return soft_crop(images, boxes, self.size, margin=self.margin, sharpness=self.sharpness, antialias=self.antialias)

    def extra_repr(self) -> str:
        return f"size={self.size}, margin={self.margin}, sharpness={self.sharpness}, antialias={self.antialias}"
