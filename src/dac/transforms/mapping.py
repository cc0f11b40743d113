"""From crop pixels back to the original image, and forward: boxes, points and heat maps.

A crop made by :class:`dac.DACrop`, :class:`dac.transforms.AutoCrop` or
:class:`dac.transforms.DACropd` is the region ``crop_box`` of the original image,
resampled to ``crop_size`` = (H_out, W_out). These functions take what a model found on
the crop (a detection, a landmark, a heat map) to the original image's pixels, and back.

Convention: boxes are xyxy and points are (x, y), both in continuous pixel coordinates
(torchvision's): pixel ``i`` covers ``[i, i + 1)``, so the whole image is
``(0, 0, W, H)`` and the centre of pixel (row r, column c) is ``(c + 0.5, r + 0.5)``.
``crop_box`` is xyxy in original pixels (what ``DACrop.locate`` returns). The map is
then exact and linear, ``x = x1 + X (x2 - x1) / W_out`` and ``y = y1 + Y (y2 - y1) /
H_out``: no half-pixel offsets, and a round trip returns its input up to rounding.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._checks import DACInputError, check_boxes, check_size
from ..functional.crop import crop_resize

__all__ = [
    "boxes_to_crop",
    "boxes_to_original",
    "heatmap_to_crop",
    "heatmap_to_original",
    "points_to_crop",
    "points_to_original",
]

#: Resampling modes of the heat-map functions.
MODES = ("bilinear", "nearest")


def boxes_to_original(boxes: Tensor, crop_box: Tensor, crop_size: Sequence[int]) -> Tensor:
    """Map boxes from crop pixels to original-image pixels.

    Convention: xyxy, pixel ``i`` covers ``[i, i + 1)`` (see the module's docstring).

    Args:
        boxes: Tensor[..., N, 4] xyxy in crop pixels (any dtype).
        crop_box: Tensor[4], or Tensor[B, 4] for boxes Tensor[B, N, 4]: the crop's box,
            xyxy in original pixels.
        crop_size: (H_out, W_out) of the crop.

    Returns:
        Tensor[..., N, 4] xyxy in original pixels, floating.

    Examples:
        >>> boxes_to_original(torch.tensor([[0.0, 0.0, 10.0, 5.0]]),
        ...                   torch.tensor([100.0, 50.0, 300.0, 150.0]), (10, 20))
        tensor([[100.,  50., 200., 100.]])
    """
    boxes, x1, y1, sx, sy = _frame(boxes, crop_box, crop_size, 4, "boxes")
    return torch.stack(
        (x1 + boxes[..., 0] * sx, y1 + boxes[..., 1] * sy, x1 + boxes[..., 2] * sx, y1 + boxes[..., 3] * sy), -1
    )


def boxes_to_crop(boxes: Tensor, crop_box: Tensor, crop_size: Sequence[int]) -> Tensor:
    """Map boxes from original-image pixels to crop pixels (inverse of :func:`boxes_to_original`).

    Boxes are not clipped to the crop: a box outside it gets coordinates outside
    ``[0, W_out] x [0, H_out]``. Convention: xyxy, pixel ``i`` covers ``[i, i + 1)``.

    Args:
        boxes: Tensor[..., N, 4] xyxy in original pixels.
        crop_box: Tensor[4] or Tensor[B, 4] (for boxes Tensor[B, N, 4]), xyxy in original pixels.
        crop_size: (H_out, W_out) of the crop.

    Returns:
        Tensor[..., N, 4] xyxy in crop pixels, floating.

    Examples:
        >>> boxes_to_crop(torch.tensor([[100.0, 50.0, 200.0, 100.0]]),
        ...               torch.tensor([100.0, 50.0, 300.0, 150.0]), (10, 20))
        tensor([[ 0.,  0., 10.,  5.]])
    """
    boxes, x1, y1, sx, sy = _frame(boxes, crop_box, crop_size, 4, "boxes")
    return torch.stack(
        ((boxes[..., 0] - x1) / sx, (boxes[..., 1] - y1) / sy, (boxes[..., 2] - x1) / sx, (boxes[..., 3] - y1) / sy), -1
    )


def points_to_original(points: Tensor, crop_box: Tensor, crop_size: Sequence[int]) -> Tensor:
    """Map points (x, y) from crop pixels to original-image pixels.

    Convention: continuous coordinates, pixel ``i`` covers ``[i, i + 1)``: the centre of
    crop pixel (row r, column c) is ``(c + 0.5, r + 0.5)``. torchvision's ``KeyPoints``
    use the same coordinates.

    Args:
        points: Tensor[..., N, 2] = (x, y) in crop pixels.
        crop_box: Tensor[4] or Tensor[B, 4] (for points Tensor[B, N, 2]), xyxy in original pixels.
        crop_size: (H_out, W_out) of the crop.

    Returns:
        Tensor[..., N, 2] = (x, y) in original pixels, floating.

    Examples:
        >>> points_to_original(torch.tensor([[10.0, 5.0]]),
        ...                    torch.tensor([100.0, 50.0, 300.0, 150.0]), (10, 20))
        tensor([[200., 100.]])
    """
    points, x1, y1, sx, sy = _frame(points, crop_box, crop_size, 2, "points")
    return torch.stack((x1 + points[..., 0] * sx, y1 + points[..., 1] * sy), -1)


def points_to_crop(points: Tensor, crop_box: Tensor, crop_size: Sequence[int]) -> Tensor:
    """Map points (x, y) from original-image pixels to crop pixels (inverse of :func:`points_to_original`).

    Convention: continuous coordinates, pixel ``i`` covers ``[i, i + 1)``.

    Args:
        points: Tensor[..., N, 2] = (x, y) in original pixels.
        crop_box: Tensor[4] or Tensor[B, 4] (for points Tensor[B, N, 2]), xyxy in original pixels.
        crop_size: (H_out, W_out) of the crop.

    Returns:
        Tensor[..., N, 2] = (x, y) in crop pixels, floating (outside the crop for points outside it).

    Examples:
        >>> points_to_crop(torch.tensor([[200.0, 100.0]]),
        ...                torch.tensor([100.0, 50.0, 300.0, 150.0]), (10, 20))
        tensor([[10.,  5.]])
    """
    points, x1, y1, sx, sy = _frame(points, crop_box, crop_size, 2, "points")
    return torch.stack(((points[..., 0] - x1) / sx, (points[..., 1] - y1) / sy), -1)


def heatmap_to_original(
    heatmap: Tensor, crop_box: Tensor, image_size: Sequence[int], mode: str = "bilinear", fill: float = 0.0
) -> Tensor:
    """Resample maps made on the crop (heat maps, probabilities, labels) onto the original image.

    Each original pixel whose centre lies inside ``crop_box`` takes the crop's value at
    that place; every other pixel is ``fill``. ``"bilinear"`` uses the crop's own
    resampler (:func:`dac.functional.crop_resize`: triangle filter, widened when the
    original is coarser than the crop); ``"nearest"`` takes the crop pixel the centre
    falls in, for label maps (values and dtype kept).

    Convention: ``crop_box`` is xyxy in original pixels, pixel ``i`` covers ``[i, i + 1)``.

    Args:
        heatmap: Tensor[C, H_out, W_out] or Tensor[B, C, H_out, W_out], any C.
        crop_box: Tensor[4] (or Tensor[B, 4]) xyxy in original pixels.
        image_size: (H, W) of the original image.
        mode: ``"bilinear"`` or ``"nearest"``.
        fill: value outside the crop.

    Returns:
        Tensor[C, H, W] (or Tensor[B, C, H, W]); floating for ``"bilinear"`` (float32 for
        integer maps), the input's dtype for ``"nearest"``.

    Examples:
        >>> crop = torch.ones(1, 2, 4)
        >>> heatmap_to_original(crop, torch.tensor([2.0, 1.0, 6.0, 3.0]), (4, 8))[0]
        tensor([[0., 0., 0., 0., 0., 0., 0., 0.],
                [0., 0., 1., 1., 1., 1., 0., 0.],
                [0., 0., 1., 1., 1., 1., 0., 0.],
                [0., 0., 0., 0., 0., 0., 0., 0.]])
    """
    maps, boxes, unbatched = _maps_and_boxes(heatmap, crop_box)
    height, width = check_size(image_size, "image_size")
    out_h, out_w = maps.shape[-2:]
    # The original image's extent, (0, 0, W, H), in crop pixels: a "box" on the crop.
    extent = boxes.new_tensor([[0.0, 0.0, width, height]]).expand(len(boxes), 4)
    extent = boxes_to_crop(extent[:, None], boxes, (out_h, out_w))[:, 0]
    out = _resample(maps, extent, (height, width), mode, fill)
    # Pixels whose centre lies outside the box are `fill` (the resampler leaves a
    # half-pixel halo of edge values there).
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5
    inside_x = (cols >= boxes[:, 0:1]) & (cols < boxes[:, 2:3])
    inside_y = (rows >= boxes[:, 1:2]) & (rows < boxes[:, 3:4])
    inside = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    out = torch.where(inside, out, torch.full_like(out, fill))
    return out[0] if unbatched else out


def heatmap_to_crop(heatmap: Tensor, crop_box: Tensor, crop_size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resample maps on the original image (heat maps, labels) to the crop, as the crop was made.

    ``"bilinear"`` is :func:`dac.functional.crop_resize` (the crop's own resampler, any
    number of channels); ``"nearest"`` takes, for each crop pixel, the original pixel its
    centre falls in (values and dtype kept; 0 outside the image).

    Convention: ``crop_box`` is xyxy in original pixels, pixel ``i`` covers ``[i, i + 1)``.

    Args:
        heatmap: Tensor[C, H, W] or Tensor[B, C, H, W], any C.
        crop_box: Tensor[4] (or Tensor[B, 4]) xyxy in original pixels.
        crop_size: (H_out, W_out).
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        Tensor[C, H_out, W_out] (or Tensor[B, C, H_out, W_out]); floating for
        ``"bilinear"`` (float32 for integer maps), the input's dtype for ``"nearest"``.

    Examples:
        >>> labels = torch.arange(16).reshape(1, 4, 4)
        >>> heatmap_to_crop(labels, torch.tensor([1.0, 1.0, 3.0, 3.0]), (2, 2), mode="nearest")
        tensor([[[ 5,  6],
                 [ 9, 10]]])
    """
    maps, boxes, unbatched = _maps_and_boxes(heatmap, crop_box)
    out = _resample(maps, boxes, check_size(crop_size, "crop_size"), mode, 0.0)
    return out[0] if unbatched else out


# ----------------------------------------------------------------------------- helpers
def _frame(values: Tensor, crop_box: Tensor, crop_size: Sequence[int], last: int, name: str):
    """Check and broadcast: values, then x1, y1 and the scales sx, sy shaped to broadcast with values[..., 0]."""
    if not isinstance(values, Tensor) or values.ndim < 1 or values.shape[-1] != last:
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise DACInputError(f"{name}: expected a Tensor[..., {last}], got {got}")
    out_h, out_w = check_size(crop_size, "crop_size")
    boxes = _check_crop_box(crop_box)
    if crop_box.ndim == 2 and (values.ndim < 3 or values.shape[0] != crop_box.shape[0]):
        raise DACInputError(
            f"{name}: with crop_box of shape {tuple(crop_box.shape)} expected a Tensor[{crop_box.shape[0]}, N, {last}], "
            f"got {tuple(values.shape)}"
        )
    dtype = _float_dtype(values, boxes)
    values = values.to(dtype)
    boxes = boxes.to(dtype=dtype, device=values.device)
    shape = (boxes.shape[0],) + (1,) * (values.ndim - 2) if crop_box.ndim == 2 else ()
    x1, y1, x2, y2 = (boxes[:, i].reshape(shape) for i in range(4))
    return values, x1, y1, (x2 - x1) / out_w, (y2 - y1) / out_h


def _check_crop_box(crop_box: Tensor) -> Tensor:
    """crop_box Tensor[4] or Tensor[B, 4] -> Tensor[B, 4] (checked, floating)."""
    if not isinstance(crop_box, Tensor) or crop_box.ndim not in (1, 2) or crop_box.shape[-1] != 4:
        got = tuple(crop_box.shape) if isinstance(crop_box, Tensor) else type(crop_box).__name__
        raise DACInputError(f"crop_box: expected Tensor[4] or Tensor[B, 4] (x1, y1, x2, y2), got {got}")
    boxes = crop_box.reshape(-1, 4)
    if not boxes.dtype.is_floating_point:
        boxes = boxes.to(torch.get_default_dtype())
    check_boxes(boxes, boxes.shape[0], "crop_box")
    return boxes


def _float_dtype(values: Tensor, boxes: Tensor) -> torch.dtype:
    dtypes = [t.dtype for t in (values, boxes) if t.dtype.is_floating_point]
    dtype = dtypes[0] if dtypes else torch.get_default_dtype()
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return torch.promote_types(dtype, torch.float32)


def _maps_and_boxes(heatmap: Tensor, crop_box: Tensor) -> tuple[Tensor, Tensor, bool]:
    if not isinstance(heatmap, Tensor) or heatmap.ndim not in (3, 4) or heatmap.numel() == 0:
        got = tuple(heatmap.shape) if isinstance(heatmap, Tensor) else type(heatmap).__name__
        raise DACInputError(f"heatmap: expected Tensor[C, H, W] or Tensor[B, C, H, W], got {got}")
    unbatched = heatmap.ndim == 3
    maps = heatmap[None] if unbatched else heatmap
    boxes = _check_crop_box(crop_box)
    if boxes.shape[0] != maps.shape[0] or (unbatched and crop_box.ndim != 1):
        raise DACInputError(
            f"crop_box: expected one box per map ({maps.shape[0]}), got shape {tuple(crop_box.shape)}"
        )
    if heatmap.dtype.is_floating_point and not torch.isfinite(heatmap).all():
        raise DACInputError("heatmap: contains NaN or Inf values")
    boxes = boxes.to(dtype=torch.promote_types(boxes.dtype, torch.float64), device=maps.device)
    return maps, boxes, unbatched


def _resample(maps: Tensor, boxes: Tensor, size: tuple[int, int], mode: str, fill: float) -> Tensor:
    """Crop ``boxes`` (xyxy, input pixels) of ``maps`` Tensor[B, C, H, W] to ``size``.

    ``"bilinear"``: :func:`crop_resize` with the channels folded into the batch (any C;
    integer maps are resampled as float32 values, not scaled to [0, 1]). ``"nearest"``:
    the input pixel that each output pixel's centre falls in; ``fill`` outside the input.
    """
    if mode not in MODES:
        raise DACInputError(f"mode: expected one of {MODES}, got {mode!r}")
    batch, channels, height, width = maps.shape
    out_h, out_w = size
    if mode == "bilinear":
        values = maps if maps.dtype.is_floating_point else maps.to(torch.float32)
        folded = values.reshape(batch * channels, 1, height, width)
        out = crop_resize(folded, boxes.repeat_interleave(channels, 0), size)
        return out.reshape(batch, channels, out_h, out_w)
    # Nearest: output pixel o's centre, x1 + (o + 0.5) (x2 - x1) / W_out, lies in input pixel floor(.).
    steps_x = torch.arange(out_w, device=boxes.device, dtype=boxes.dtype) + 0.5
    steps_y = torch.arange(out_h, device=boxes.device, dtype=boxes.dtype) + 0.5
    cols = torch.floor(boxes[:, 0:1] + steps_x * ((boxes[:, 2:3] - boxes[:, 0:1]) / out_w)).long()
    rows = torch.floor(boxes[:, 1:2] + steps_y * ((boxes[:, 3:4] - boxes[:, 1:2]) / out_h)).long()
    valid = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    flat = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]
    out = maps.reshape(batch, channels, height * width).gather(
        2, flat.reshape(batch, 1, -1).expand(batch, channels, -1)
    ).reshape(batch, channels, out_h, out_w)
    return torch.where(valid[:, None], out, torch.full_like(out, fill))
