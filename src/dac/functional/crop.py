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
    bands_y, window_y = _bands(weights_y, index_y)
    bands_x, window_x = _bands(weights_x, index_x)
    n_y, span_y = bands_y.shape[1], bands_y.shape[3]
    n_x, span_x = bands_x.shape[1], bands_x.shape[3]
    first_x, last_x = index_x[:, 0, 0].tolist(), index_x[:, -1, -1].tolist()  # one sync per call

    crops = []
    for b in range(batch):
        # Only the columns the crop reads; rows first: each band's window of rows
        # (still in the input dtype), then one product per band -> [H_out, C, W'].
        lo, hi = first_x[b], last_x[b] + 1
        rows = images[b, :, :, lo:hi].index_select(1, window_y[b])
        rows = to_unit_range(rows, dtype).transpose(0, 1).reshape(n_y, span_y, channels * (hi - lo))
        rows = torch.bmm(bands_y[b], rows).view(n_y * _BAND, channels, hi - lo)[:out_h]
        # Then columns, the same way on the transposed rows -> [C, H_out, W_out].
        cols = rows.permute(2, 0, 1).reshape(hi - lo, out_h * channels).index_select(0, window_x[b] - lo)
        cols = torch.bmm(bands_x[b], cols.view(n_x, span_x, out_h * channels))
        crops.append(cols.view(n_x * _BAND, out_h, channels)[:out_w].permute(2, 1, 0))
    return torch.stack(crops).to(out_dtype)


# Output pixels per band. A band's taps read a window of consecutive input pixels, so
# resampling is one small dense product per band: reading ~1.2x the box instead of
# gathering every tap's rows (~2.6x at 5 input pixels per output pixel), and a cheap
# backward. 16 was fastest forward and backward at the paper's size (8 to 32 tried).
_BAND = 16


def _bands(weights: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The taps of :func:`_axis_filter` as dense band matrices over input windows.

    Output pixels are grouped in bands of ``_BAND`` (the last band padded with zero
    weights); band ``j`` reads the window of ``span`` consecutive input pixels from
    its first tap (``span`` the widest band's, the same for all).

    Returns:
        matrices Tensor[B, bands, _BAND, span] (``weights`` scattered to their window
        positions, so differentiable in them) and windows Tensor[B, bands * span]
        (long input indices, clamped to each image's last tap: those columns weigh 0).
    """
    batch, n_out, taps = weights.shape
    bands = -(-n_out // _BAND)
    pad = bands * _BAND - n_out
    if pad:
        weights = torch.cat([weights, weights.new_zeros(batch, pad, taps)], 1)
        index = torch.cat([index, index[:, -1:].expand(batch, pad, taps)], 1)
    weights = weights.reshape(batch, bands, _BAND * taps)
    index = index.reshape(batch, bands, _BAND * taps)
    start = index[..., :1]  # taps ascend within an output pixel and with it
    with torch.no_grad():
        span = int((index[..., -1:] - start).max()) + 1
        offsets = torch.arange(_BAND, device=index.device).repeat_interleave(taps) * span
        positions = torch.arange(span, device=index.device)
        windows = torch.minimum(start + positions, index[:, -1:, -1:]).reshape(batch, bands * span)
    matrices = weights.new_zeros(batch, bands, _BAND * span).scatter_add(2, index - start + offsets, weights)
    return matrices.view(batch, bands, _BAND, span), windows


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
        if taps > n_in:
            # A footprint wider than the image (a box in the wrong units: 1e10 px asked for
            # 20 GB of taps): only the image's pixels can weigh, so n_in taps from the
            # first one inside; taps past the footprint get the triangle's weight 0.
            taps = n_in
            first = first.clamp(0, n_in - 1)
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
