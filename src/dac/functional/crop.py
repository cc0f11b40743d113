"""Crop a box from each image and resize it to a fixed size, anti-aliased and differentiable."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_boxes, check_image_batch, check_size
from .pooling import to_unit_range

__all__ = ["crop_resize", "CropResize"]


def crop_resize(
    images: Tensor, boxes: Tensor, size: Sequence[int], *, antialias: bool = True
) -> Tensor:
    """Crop ``boxes`` from ``images`` and resample each crop to ``size`` = (H_out, W_out).

    Separable resampling with a triangle (bilinear) filter. When a box shrinks
    (more than one input pixel per output pixel) the filter is widened to the
    output pixel's footprint, so a 2000-px box going to 370 px averages ~5.4 input
    pixels per output pixel instead of aliasing; with the whole image as the box this
    equals ``F.interpolate(..., mode="bilinear", antialias=True)``. When it grows the
    filter is plain bilinear. Input pixels outside the image are ignored (weights
    renormalised over the pixels inside); an output pixel whose footprint lies wholly
    outside the image is 0.

    Convention: boxes are xyxy in input pixel coordinates (torchvision's):
    pixel ``i`` covers ``[i, i + 1)``, the whole image is ``(0, 0, W, H)``. The
    aspect ratio is kept only if the box's aspect equals ``H_out / W_out``.

    Differentiable in ``images`` (floating) and in ``boxes``.

    Args:
        images: Tensor[B, C, H, W], floating or integer (integer images are scaled to
            [0, 1] as in :func:`dac.functional.to_unit_range`).
        boxes: Tensor[B, 4] = (x1, y1, x2, y2), floating, x2 > x1 and y2 > y1.
        size: (H_out, W_out).
        antialias: widen the filter when shrinking (default True).

    Returns:
        Tensor[B, C, H_out, W_out], floating (images' dtype, or boxes' dtype for
        integer images). Half-precision images are resampled in float32.

    Examples:
        >>> img = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> crop_resize(img, torch.tensor([[0.0, 0.0, 2.0, 2.0]]), (2, 2))[0, 0]
        tensor([[0., 1.],
                [4., 5.]])
    """
    check_image_batch(images)
    batch, channels, height, width = images.shape
    check_boxes(boxes, batch)
    out_h, out_w = check_size(size)
    antialias = check_bool(antialias, "antialias")  # a truthy string such as "false" is not True
    if not boxes.dtype.is_floating_point:
        boxes = boxes.to(torch.get_default_dtype())
    out_dtype = images.dtype if images.dtype.is_floating_point else boxes.dtype
    # Positions need float32 at least (float16 cannot place a box in a 2836-px image).
    dtype = torch.promote_types(out_dtype, torch.float32)
    boxes = boxes.to(dtype=dtype, device=images.device)

    weights_y, index_y = _axis_filter(boxes[:, 1], boxes[:, 3], height, out_h, antialias)
    weights_x, index_x = _axis_filter(boxes[:, 0], boxes[:, 2], width, out_w, antialias)

    taps_y, taps_x = index_y.shape[-1], index_x.shape[-1]
    crops = []
    for b in range(batch):
        # Only the columns the crop reads, then rows first: gather every tap's input
        # rows at once (still in the input dtype), weight and sum -> [C, H_out, W'].
        lo, hi = int(index_x[b].min()), int(index_x[b].max()) + 1
        rows = images[b, :, :, lo:hi].index_select(1, index_y[b].reshape(-1))
        rows = to_unit_range(rows, dtype).reshape(channels, out_h, taps_y, hi - lo)
        rows = torch.einsum("ok,cokw->cow", weights_y[b], rows)
        # Then columns -> [C, H_out, W_out].
        cols = rows.index_select(2, (index_x[b] - lo).reshape(-1)).reshape(channels, out_h, out_w, taps_x)
        crops.append(torch.einsum("cpqk,qk->cpq", cols, weights_x[b]))
    return torch.stack(crops).to(out_dtype)


def _axis_filter(low: Tensor, high: Tensor, n_in: int, n_out: int, antialias: bool) -> tuple[Tensor, Tensor]:
    """Triangle-filter taps along one axis: weights Tensor[B, n_out, K], indices (long)."""
    scale = (high - low) / n_out  # input pixels per output pixel
    support = scale.clamp_min(1.0) if antialias else torch.ones_like(scale)
    steps = torch.arange(n_out, dtype=low.dtype, device=low.device)
    # Output pixel centres in input index coordinates (pixel i's centre at i).
    centre = low[:, None] + (steps + 0.5) * scale[:, None] - 0.5
    with torch.no_grad():
        taps = int(torch.ceil(2 * support.max()).item()) + 1
        first = torch.floor(centre - support[:, None]) + 1
        index = first[..., None] + torch.arange(taps, dtype=low.dtype, device=low.device)
    weights = (1.0 - (index - centre[..., None]).abs() / support[:, None, None]).clamp_min(0.0)
    inside = (index >= 0) & (index <= n_in - 1)
    weights = weights * inside
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)), weights)
    return weights, index.clamp(0, n_in - 1).long()


class CropResize(nn.Module):
    """Module form of :func:`crop_resize`; ``forward(images, boxes)``.

    Examples:
        >>> CropResize((200, 370))(torch.rand(1, 1, 500, 900),
        ...                        torch.tensor([[10.0, 20.0, 750.0, 420.0]])).shape
        torch.Size([1, 1, 200, 370])
    """

    def __init__(self, size: Sequence[int], *, antialias: bool = True) -> None:
        super().__init__()
        self.size = check_size(size)
        self.antialias = check_bool(antialias, "antialias")

    def forward(self, images: Tensor, boxes: Tensor) -> Tensor:
        return crop_resize(images, boxes, self.size, antialias=self.antialias)

    def extra_repr(self) -> str:
        return f"size={self.size}, antialias={self.antialias}"
