"""Training augmentation: batched random affine transforms with explicit per-image randomness.

* ``"paper"`` — the paper's DAC ranges (section 3.2), given at 370 x 200 and scaled with
  the crop: translate +-26 px in x and +-14 px in y (fractions 26/370 and 14/200 of the
  crop), horizontal flip, rotate +-7 degrees, scale 0.97-1.03, shear 0-2 degrees.
* ``"strong"`` — for the resize baseline, which sees the whole radiograph (the paper's
  earlier setting is not given in numbers; these are ours): translate +-10 % of each
  side, horizontal flip, rotate +-10 degrees, scale 0.9-1.1, shear 0-5 degrees.
* ``"none"``.

Augmentation follows cropping (as in the paper): DAC crops are augmented at the
crop's resolution, resized images at theirs. The transform is torchvision's
``RandomAffine`` (same matrix: flip, then rotation, scale and x-shear about the centre,
then translation), applied to a whole batch in one ``grid_sample``, with two
differences that matter for training:

* Uncovered pixels are filled by **reflecting the image at its border**, not with
  zeros: a zero border in a low-contrast radiograph shifts each image's mean and
  inflates its variance, so BatchNorm statistics gathered on augmented batches no
  longer describe the clean images seen at evaluation.
* Each image's parameters come from its own row of uniform numbers ``noise[b]``
  (:func:`random_affine`); the engine derives that row from (seed, epoch, image
  index), so an image is augmented the same way whatever batch, process or number of
  processes it lands in.

The paper's future-work idea is :func:`roi_rotation_crop`: rotate about the centre of
the found box and sample the rotated box from the *whole* image, with the angle
limited per image so that the rotated box stays inside the image — no black corners.

Examples:
    >>> aug = BatchAugment(augmentation("paper"))
    >>> aug(torch.rand(3, 1, 20, 37)).shape
    torch.Size([3, 1, 20, 37])
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import DACInputError, check_boxes, check_image_batch, check_size
from ..functional.pooling import to_unit_range

__all__ = [
    "PAPER_DAC_RANGES",
    "STRONG_RANGES",
    "AffineRanges",
    "BatchAugment",
    "augmentation",
    "max_inside_rotation",
    "random_affine",
    "roi_rotation_crop",
]


@dataclass(frozen=True)
class AffineRanges:
    """The ranges a random affine transform draws from (torchvision ``RandomAffine``'s meaning).

    Attributes:
        translate: (fx, fy): shifts up to +-fx * W and +-fy * H pixels.
        degrees: rotation up to +-degrees.
        scale: (low, high) zoom factor.
        shear: (low, high) x-shear in degrees.
        flip: flip horizontally with probability 1/2 (before the affine).
    """

    translate: tuple[float, float] = (0.0, 0.0)
    degrees: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    shear: tuple[float, float] = (0.0, 0.0)
    flip: bool = False


#: The paper's DAC augmentation (section 3.2); translate as fractions of a 370 x 200 crop.
PAPER_DAC_RANGES = AffineRanges(translate=(26 / 370, 14 / 200), degrees=7.0, scale=(0.97, 1.03), shear=(0.0, 2.0), flip=True)
#: The stronger set for the resize baseline (ours; the paper gives no numbers for it).
STRONG_RANGES = AffineRanges(translate=(0.10, 0.10), degrees=10.0, scale=(0.90, 1.10), shear=(0.0, 5.0), flip=True)

#: Uniform numbers :func:`random_affine` reads per image: flip, angle, x shift, y shift, scale, shear.
AFFINE_NOISE_DIMS = 6


def augmentation(preset: str, *, rotate: bool = True) -> AffineRanges | None:
    """The ranges of a preset (``"paper"``, ``"strong"``) or None for ``"none"``.

    Args:
        preset: the preset's name.
        rotate: keep the preset's rotation (False when rotation is done about the box
            centre by :func:`roi_rotation_crop`).

    Examples:
        >>> augmentation("paper").degrees, augmentation("paper", rotate=False).degrees
        (7.0, 0.0)
    """
    if preset == "none":
        return None
    ranges = {"paper": PAPER_DAC_RANGES, "strong": STRONG_RANGES}.get(preset)
    if ranges is None:
        raise DACInputError(f"preset: expected 'paper', 'strong' or 'none', got {preset!r}")
    return ranges if rotate else AffineRanges(ranges.translate, 0.0, ranges.scale, ranges.shear, ranges.flip)


def affine_parameters(noise: Tensor, ranges: AffineRanges, size: Sequence[int]) -> dict[str, Tensor]:
    """Per-image parameters from uniform numbers: ``flip`` (bool), ``angle``, ``shear`` (degrees),
    ``translate`` (pixels, Tensor[B, 2]) and ``scale``, each of batch length B.

    Args:
        noise: Tensor[B, 6] of numbers in [0, 1) (:data:`AFFINE_NOISE_DIMS` columns).
        ranges: what to draw from.
        size: (H, W) of the images (translations scale with them).
    """
    height, width = size
    u = noise.to(torch.float64)
    sym = 2 * u - 1
    return {
        "flip": (u[:, 0] < 0.5) if ranges.flip else torch.zeros_like(u[:, 0], dtype=torch.bool),
        "angle": ranges.degrees * sym[:, 1],
        "translate": torch.stack([ranges.translate[0] * width * sym[:, 2], ranges.translate[1] * height * sym[:, 3]], -1),
        "scale": ranges.scale[0] + (ranges.scale[1] - ranges.scale[0]) * u[:, 4],
        "shear": ranges.shear[0] + (ranges.shear[1] - ranges.shear[0]) * u[:, 5],
    }


def affine_theta(params: dict[str, Tensor], size: Sequence[int]) -> Tensor:
    """``F.affine_grid`` matrices Tensor[B, 2, 3] (float64) of torchvision's affine transform.

    Output pixel ``p`` (pixel-centred coordinates about the image centre) samples the
    input at ``flip(M^-1 (p - t))``, ``M = scale * R(angle) * ShX(shear)`` — the matrix of
    ``torchvision.transforms.v2.functional.affine`` after ``horizontal_flip``.
    """
    height, width = size
    rot, shx = torch.deg2rad(params["angle"]), torch.deg2rad(params["shear"])
    a, c = torch.cos(rot), torch.sin(rot)
    b = -(a * torch.tan(shx) + torch.sin(rot))
    d = torch.cos(rot) - c * torch.tan(shx)
    s = params["scale"]
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / s[:, None, None]  # M^-1 (det RSS = 1)
    sign = torch.where(params["flip"], -1.0, 1.0).to(inv)
    inv = inv * torch.stack([sign, torch.ones_like(sign)], -1)[:, :, None]  # flip the sampled x
    half = torch.tensor([width / 2, height / 2], dtype=inv.dtype, device=inv.device)
    linear = inv * half[None, None, :] / half[None, :, None]  # D^-1 M^-1 D, normalised coordinates
    shift = -(inv @ params["translate"].to(inv)[..., None])[..., 0] / half
    return torch.cat([linear, shift[..., None]], -1)


def random_affine(images: Tensor, noise: Tensor, ranges: AffineRanges, *, padding_mode: str = "reflection") -> Tensor:
    """Flip, rotate, scale, shear and translate each image by its own parameters.

    Bilinear sampling (differentiable in ``images``); pixels the transformed image does
    not cover are filled by reflection at the border (``padding_mode="zeros"`` gives
    torchvision's default fill).

    Args:
        images: Tensor[B, C, H, W] floating.
        noise: Tensor[B, 6] uniform numbers in [0, 1), one row per image (see
            :func:`affine_parameters`).
        ranges: the ranges the numbers are mapped to.
        padding_mode: ``grid_sample``'s: ``"reflection"``, ``"border"`` or ``"zeros"``.

    Returns:
        Tensor[B, C, H, W] of ``images``' dtype.

    Examples:
        >>> x = torch.full((2, 1, 20, 37), 0.37)
        >>> y = random_affine(x, torch.rand(2, 6), PAPER_DAC_RANGES)
        >>> bool(torch.allclose(y, x))  # reflection padding: a flat image stays flat
        True
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.dtype.is_floating_point:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DACInputError(f"images: expected a floating Tensor[B, C, H, W], got {shape}")
    batch = images.shape[0]
    if not isinstance(noise, Tensor) or tuple(noise.shape) != (batch, AFFINE_NOISE_DIMS):
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise DACInputError(f"noise: expected shape [{batch}, {AFFINE_NOISE_DIMS}], got {shape}")
    size = images.shape[-2:]
    theta = affine_theta(affine_parameters(noise.to(images.device), ranges, size), size).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


class BatchAugment(nn.Module):
    """:func:`random_affine` in training mode, the identity in eval mode.

    Args:
        ranges: what to draw from, or None (identity).
        padding_mode: how uncovered pixels are filled (default: reflection).

    ``forward(images, noise)`` takes the batch's uniform numbers Tensor[B, 6]
    (:attr:`noise_dims` columns); without them it draws from torch's global RNG.
    """

    noise_dims = AFFINE_NOISE_DIMS

    def __init__(self, ranges: AffineRanges | None, padding_mode: str = "reflection") -> None:
        super().__init__()
        if ranges is not None and not isinstance(ranges, AffineRanges):
            raise DACInputError(f"ranges: expected AffineRanges or None, got {type(ranges).__name__}")
        if padding_mode not in ("reflection", "border", "zeros"):
            raise DACInputError(f"padding_mode: expected reflection, border or zeros, got {padding_mode!r}")
        self.ranges = ranges
        self.padding_mode = padding_mode

    def forward(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """Tensor[B, C, H, W] float -> the same shape (augmented only when training)."""
        if self.ranges is None or not self.training:
            return images
        if noise is None:
            noise = torch.rand(images.shape[0], self.noise_dims)
        return random_affine(images, noise, self.ranges, padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        return f"{self.ranges!r}, padding_mode={self.padding_mode!r}"


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

    Examples:
        >>> max_inside_rotation(torch.tensor([[40.0, 30, 60, 40], [0, 0, 100, 50]]), (100, 100), 10.0)
        tensor([10.,  0.])
    """
    h, w = check_size(image_size, "image_size")
    if not isinstance(boxes, Tensor) or boxes.ndim != 2:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise DACInputError(f"boxes: expected shape [B, 4] (x1, y1, x2, y2), got {shape}")
    if boxes.device.type != "meta":  # values are unknown on the meta device
        check_boxes(boxes, boxes.shape[0])
    if not 0 <= limit < 90:
        raise DACInputError(f"limit: expected an angle in [0, 90) degrees, got {limit!r}")
    b = boxes.detach().double()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    half_w, half_h = (b[:, 2] - b[:, 0]) / 2, (b[:, 3] - b[:, 1]) / 2
    angles = torch.linspace(0.0, limit, steps, dtype=torch.float64, device=boxes.device)
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

    Examples:
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

