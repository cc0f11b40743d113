"""Training augmentation (torchvision.transforms.v2), applied to what a pipeline feeds the classifier.

* ``"paper"`` — the paper's DAC ranges (section 3.2), given at 370 x 200 and scaled with
  the crop: translate +-26 px in x and +-14 px in y (fractions 26/370 and 14/200 of the
  crop), horizontal flip, rotate +-7 degrees, scale 0.97-1.03, shear 0-2 degrees.
* ``"strong"`` — for the resize baseline, which sees the whole radiograph (the paper's
  earlier setting is not given in numbers; these are ours): translate +-10 % of each
  side, horizontal flip, rotate +-10 degrees, scale 0.9-1.1, shear 0-5 degrees.
* ``"none"``.

Augmentation follows cropping (as in the paper): DAC crops are augmented at the
crop's resolution, resized images at theirs. Each image of a batch draws its own
parameters (a v2 transform called on a batch would draw once for all).

The paper's future-work idea is :func:`roi_rotation_crop`: rotate about the centre of
the found box and sample the rotated box from the *whole* image, with the angle
limited per image so that the rotated box stays inside the image — no black corners.

Example:
    >>> aug = BatchAugment(augmentation("paper"))
    >>> aug(torch.rand(3, 1, 20, 37)).shape
    torch.Size([3, 1, 20, 37])
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from .._checks import DACInputError, check_boxes, check_image_batch, check_size
from ..functional.pooling import to_unit_range

__all__ = [
    "PAPER_DAC_RANGES",
    "STRONG_RANGES",
    "BatchAugment",
    "augmentation",
    "max_inside_rotation",
    "roi_rotation_crop",
]

#: The paper's DAC augmentation (section 3.2); translate as fractions of a 370 x 200 crop.
PAPER_DAC_RANGES = {"translate": (26 / 370, 14 / 200), "degrees": 7.0, "scale": (0.97, 1.03), "shear": (0.0, 2.0), "flip": True}
#: The stronger set for the resize baseline (ours; the paper gives no numbers for it).
STRONG_RANGES = {"translate": (0.10, 0.10), "degrees": 10.0, "scale": (0.90, 1.10), "shear": (0.0, 5.0), "flip": True}


def augmentation(preset: str, *, rotate: bool = True) -> v2.Transform | None:
    """The v2 transform of a preset (``"paper"``, ``"strong"`` or ``"none"`` -> None).

    Args:
        preset: the preset's name.
        rotate: keep the preset's rotation (False when rotation is done about the box
            centre by :func:`roi_rotation_crop`).

    Returns:
        ``v2.Compose`` of a horizontal flip and one ``RandomAffine`` for a single image
        Tensor[C, H, W] (floats; uncovered pixels are 0), or None.
    """
    if preset == "none":
        return None
    ranges = {"paper": PAPER_DAC_RANGES, "strong": STRONG_RANGES}.get(preset)
    if ranges is None:
        raise DACInputError(f"preset: expected 'paper', 'strong' or 'none', got {preset!r}")
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(0.5)] if ranges["flip"] else []
    steps.append(
        v2.RandomAffine(
            degrees=ranges["degrees"] if rotate else 0.0,
            translate=ranges["translate"],
            scale=ranges["scale"],
            shear=ranges["shear"],
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=None,  # plain zero padding: v2's fill path works in place and breaks autograd
        )
    )
    return v2.Compose(steps)


class BatchAugment(nn.Module):
    """Apply a v2 transform to each image of a batch separately, in training mode only.

    Differentiable (bilinear resampling), so a learned front upstream still gets its
    gradient through augmented crops.

    Args:
        transform: a transform of one Tensor[C, H, W], or None (identity).
    """

    def __init__(self, transform: v2.Transform | None) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, images: Tensor) -> Tensor:
        """Tensor[B, C, H, W] float -> the same shape (augmented only when training)."""
        if self.transform is None or not self.training:
            return images
        return torch.stack([self.transform(image) for image in images])

    def extra_repr(self) -> str:
        return repr(self.transform)


def max_inside_rotation(boxes: Tensor, image_size: Sequence[int], limit: float, steps: int = 91) -> Tensor:
    """The largest angle (degrees, <= ``limit``) each box can turn about its centre and stay in the image.

    Convention: boxes are xyxy in input pixel coordinates (torchvision's; the whole
    image is ``(0, 0, W, H)``).

    Args:
        boxes: Tensor[B, 4].
        image_size: (H, W) of the image the boxes are in.
        limit: the largest angle wanted, degrees in [0, 90).
        steps: angles tried between 0 and ``limit``.

    Returns:
        Tensor[B] of angles in [0, limit]: every rotation by at most that much, either
        way, keeps the whole rotated box inside the image (0 for a box touching a border).

    Example:
        >>> max_inside_rotation(torch.tensor([[40.0, 30, 60, 40], [0, 0, 100, 50]]), (100, 100), 10.0)
        tensor([10.,  0.])
    """
    h, w = check_size(image_size, "image_size")
    if not isinstance(boxes, Tensor) or boxes.ndim != 2:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise DACInputError(f"boxes: expected shape [B, 4] (x1, y1, x2, y2), got {shape}")
    check_boxes(boxes, boxes.shape[0])
    if not 0 <= limit < 90:
        raise DACInputError(f"limit: expected an angle in [0, 90) degrees, got {limit!r}")
    b = boxes.detach().double()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    half_w, half_h = (b[:, 2] - b[:, 0]) / 2, (b[:, 3] - b[:, 1]) / 2
    angles = torch.linspace(0.0, limit, steps, dtype=torch.float64)
    cos, sin = torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))
    reach_x = half_w[:, None] * cos + half_h[:, None] * sin  # [B, steps]
    reach_y = half_w[:, None] * sin + half_h[:, None] * cos
    eps = 1e-6
    fits = (
        (cx[:, None] - reach_x >= -eps) & (cx[:, None] + reach_x <= w + eps)
        & (cy[:, None] - reach_y >= -eps) & (cy[:, None] + reach_y <= h + eps)
    )
    prefix = torch.cumprod(fits.to(torch.int64), dim=1)  # fits at every angle up to this one
    last = (prefix.sum(1) - 1).clamp_min(0)
    allowed = torch.where(prefix[:, 0] > 0, angles[last], torch.zeros_like(cx))
    return allowed.to(boxes.dtype if boxes.dtype.is_floating_point else torch.float32)


def roi_rotation_crop(images: Tensor, boxes: Tensor, angles: Tensor, size: Sequence[int]) -> Tensor:
    """Crop each box turned by its angle about its centre, sampled from the whole image.

    The paper's future-work augmentation: where a plain rotation of a crop brings black
    (no-data) corners in, this samples the rotated box from the original image, so the
    corners hold real pixels as long as the rotated box stays inside the image (see
    :func:`max_inside_rotation`). Bilinear sampling from the image average-pooled by
    ``floor(box width / W_out)`` (so a large box does not alias). Differentiable in
    ``images`` (floating) and ``boxes``.

    Convention: boxes are xyxy in input pixel coordinates (torchvision's; the whole
    image is ``(0, 0, W, H)``); positive angles turn the box counter-clockwise as
    shown (y down).

    Args:
        images: Tensor[B, C, H, W], floating or integer (scaled to [0, 1]).
        boxes: Tensor[B, 4] floating.
        angles: Tensor[B], degrees.
        size: (H_out, W_out).

    Returns:
        Tensor[B, C, H_out, W_out], floating. With zero angles it equals the crop of the
        box (up to the sampling filter).

    Example:
        >>> img = torch.ones(1, 1, 60, 100)
        >>> box = torch.tensor([[30.0, 20, 70, 40]])
        >>> roi_rotation_crop(img, box, torch.tensor([20.0]), (10, 20)).min() > 0.999
        tensor(True)
    """
    check_image_batch(images)
    batch, _, height, width = images.shape
    check_boxes(boxes, batch)
    out_h, out_w = check_size(size)
    if not isinstance(angles, Tensor) or angles.shape != (batch,):
        shape = tuple(angles.shape) if isinstance(angles, Tensor) else type(angles).__name__
        raise DACInputError(f"angles: expected shape [{batch}] (degrees), got {shape}")
    dtype = images.dtype if images.dtype.is_floating_point else (boxes.dtype if boxes.dtype.is_floating_point else torch.float32)
    boxes = boxes.to(dtype=dtype, device=images.device)
    rad = torch.deg2rad(angles.detach().to(dtype=dtype, device=images.device))
    cos, sin = torch.cos(rad), torch.sin(rad)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # Output x_o, y_o in [-1, 1] (pixel centres, align_corners=False) -> input normalised coords.
    theta = torch.stack(
        [
            torch.stack([cos * bw / width, -sin * bh / width, 2 * cx / width - 1], -1),
            torch.stack([sin * bw / height, cos * bh / height, 2 * cy / height - 1], -1),
        ],
        dim=1,
    )  # [B, 2, 3]
    crops = []
    for b in range(batch):
        image = to_unit_range(images[b : b + 1], dtype)
        factor = int(float(bw[b].detach()) // out_w)
        if factor >= 2:  # average-pool first, over the whole extent (normalised coords unchanged)
            image = F.adaptive_avg_pool2d(image, (max(1, round(height / factor)), max(1, round(width / factor))))
        grid = F.affine_grid(theta[b : b + 1], [1, image.shape[1], out_h, out_w], align_corners=False)
        crops.append(F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.cat(crops)

