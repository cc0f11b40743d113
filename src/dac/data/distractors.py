"""Distractor scenes: marks to count inside a textured region, with a decoy region beside it.

A task built so that *where to look* decides the label and the paper's max–min map
cannot tell where: every scene holds two textured regions of the same texture
contrast, at random places and of random sizes — the **true region** (its ground
truth, ``roi``) and a **decoy** — and bright round marks of one kind: ``count`` of
them inside the true region (the label: classes of two counts each, 0-1 | 2-3 | 4-5 |
6-7 | 8-9), a random number inside the decoy and a few on the background, independent
of the label. The two regions differ in their mean level only (the true region is
darker than the background, the decoy brighter, by the same step), which a
classifier that sees the region's surroundings, and a saliency stage that sees window
means, can use; the max–min map (eq. 5) is equally bright on both, and as bright on
the marks as anywhere. So a crop of the whole image (marks a pixel wide), a crop of the
decoy or of both regions (marks of the wrong kind counted) lose what a crop of the true
region keeps: the headroom of a box is large by construction.

Convention: boxes are xyxy in input pixel coordinates (torchvision's): pixel ``i``
covers ``[i, i + 1)``, the whole image is ``(0, 0, W, H)``.

Examples:
    >>> s = make_distractor_scene(7, 96, 177, label=2)
    >>> s.image.shape, s.image.dtype, s.label, s.count in (4, 5)
    (torch.Size([1, 96, 177]), torch.uint8, 2, True)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._checks import DACInputError, check_int

__all__ = ["DISTRACTOR_CLASSES", "DistractorScene", "distractor_class", "make_distractor_scene"]

#: Class names: the count of marks inside the true region, two counts per class.
DISTRACTOR_CLASSES = ("0-1", "2-3", "4-5", "6-7", "8-9")
MIN_HEIGHT, MIN_WIDTH = 64, 118  # smallest size, pixels (room for two regions of 9 marks)

_BACKGROUND = 0.40  # mean level of the background
_STEP = 0.14  # the true region is this much darker than the background, the decoy this much brighter
_TEXTURE = 0.10  # half the range of the regions' texture (uniform noise of +-_TEXTURE)
_MARK = 0.92  # peak level of a mark
_DECOY_MARKS = 9  # a decoy holds 0.._DECOY_MARKS marks
_LOOSE_MARKS = 4  # the background holds 0.._LOOSE_MARKS marks


@dataclass
class DistractorScene:
    """One scene and its ground truth.

    Convention: ``roi``, ``decoy`` and ``marks`` are xyxy in input pixel coordinates.

    Attributes:
        image: Tensor[1, H, W] uint8.
        label: class of ``count`` (see :data:`DISTRACTOR_CLASSES`), 0..4.
        count: marks inside the true region, 0..9.
        roi: Tensor[4] float32, the true region (the box a crop should find).
        decoy: Tensor[4] float32, the decoy region.
        marks: Tensor[count, 4] float32, the boxes of the marks inside the true region.
        seed: the seed the scene was drawn from.
    """

    image: Tensor
    label: int
    count: int
    roi: Tensor
    decoy: Tensor
    marks: Tensor
    seed: int


def distractor_class(seed: int) -> tuple[int, int]:
    """The (class, count) ``make_distractor_scene(seed)`` draws, without drawing the image.

    Examples:
        >>> label, count = distractor_class(3)
        >>> count // 2 == label
        True
    """
    rng = np.random.default_rng([check_int(seed, "seed", 0), 7])
    label = int(rng.integers(len(DISTRACTOR_CLASSES)))
    return label, 2 * label + int(rng.integers(2))


def make_distractor_scene(seed: int, height: int = 192, width: int = 354, *, label: int | None = None) -> DistractorScene:
    """Draw one scene, deterministically from ``seed`` (never the global RNG).

    The class is drawn uniformly, then the count (one of its two); ``label`` overrides
    the class. Each region is 0.2–0.38 of the width wide with a height / width ratio of
    0.45–0.8 (at most 0.75 of the height); the two sit side by side in random order at
    independent random heights; marks are discs of radius 0.75 % of the width (of 1.85 x the
    height if smaller; at least 1.5 px), never touching each other or a region's border.

    Args:
        seed: an int >= 0.
        height, width: image size in pixels, at least 64 x 118.
        label: class 0..4, or None to draw it.

    Returns:
        A :class:`DistractorScene` with image Tensor[1, H, W] uint8.

    Examples:
        >>> a, b = make_distractor_scene(3, 96, 177), make_distractor_scene(3, 96, 177)
        >>> torch.equal(a.image, b.image), a.roi.shape, a.marks.shape[0] == a.count
        (True, torch.Size([4]), True)
    """
    seed = check_int(seed, "seed", 0)
    height = check_int(height, "height", MIN_HEIGHT)
    width = check_int(width, "width", MIN_WIDTH)
    drawn_label, count = distractor_class(seed)
    if label is not None:
        label = check_int(label, "label", 0, len(DISTRACTOR_CLASSES) - 1)
        count = 2 * label + (count - 2 * drawn_label)
    else:
        label = drawn_label
    rng = np.random.default_rng([seed, 1])
    radius = max(1.5, 0.0075 * min(1.85 * height, width))

    # Background: a smooth tilt and low noise.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # pixel centres (pixel i covers [i, i + 1))
    tilt = rng.uniform(-0.05, 0.05, size=2)
    image = _BACKGROUND + tilt[0] * (xs / width - 0.5) + tilt[1] * (ys / height - 0.5)
    image += rng.normal(0.0, 0.01, size=image.shape)

    for _ in range(50):  # a layout without room for every mark is drawn again
        regions = _place_regions(rng, height, width)
        roi, decoy = regions if rng.integers(2) else regions[::-1]
        taken: list[tuple[float, float]] = []
        try:
            marks = _place_marks(rng, roi, count, radius, taken)
            _place_marks(rng, decoy, int(rng.integers(_DECOY_MARKS + 1)), radius, taken)
            loose = int(rng.integers(_LOOSE_MARKS + 1))
            _place_marks(rng, (0.0, 0.0, float(width), float(height)), loose, radius, taken, avoid=(roi, decoy))
            break
        except _NoRoom:
            continue
    else:
        raise DACInputError(f"height, width: {height}x{width} leaves no room for the marks; use a larger image")
    for box, step in ((roi, -_STEP), (decoy, _STEP)):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        texture = rng.uniform(-_TEXTURE, _TEXTURE, size=(y2 - y1, x2 - x1))
        image[y1:y2, x1:x2] = _BACKGROUND + step + texture
    reach = int(np.ceil(radius + 1))
    for cx, cy in taken:  # anti-aliased discs, drawn in a window around each
        x0, y0 = max(int(cx) - reach, 0), max(int(cy) - reach, 0)
        x1, y1 = min(int(cx) + reach + 1, width), min(int(cy) + reach + 1, height)
        disc = np.clip(radius + 0.5 - np.hypot(xs[y0:y1, x0:x1] - cx, ys[y0:y1, x0:x1] - cy), 0.0, 1.0)
        image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - disc) + _MARK * disc
    pixels = torch.from_numpy(np.clip(np.round(image * 255), 0, 255).astype(np.uint8))[None]
    mark_boxes = torch.tensor([[x - radius, y - radius, x + radius, y + radius] for x, y in marks], dtype=torch.float32).reshape(-1, 4)
    return DistractorScene(pixels, label, count, torch.tensor(roi, dtype=torch.float32), torch.tensor(decoy, dtype=torch.float32),
                           mark_boxes, seed)


def _place_regions(rng: np.random.Generator, height: int, width: int) -> list[tuple[float, float, float, float]]:
    """Two boxes side by side (left, right), whole pixels, at least 2 % of the width apart."""
    sizes = []
    for _ in range(2):
        w = rng.uniform(0.2, 0.38) * width
        h = min(rng.uniform(0.45, 0.8) * w, 0.75 * height)
        sizes.append((round(w), round(h)))
    gap = round(0.02 * width)
    free = width - sizes[0][0] - sizes[1][0] - gap
    x_left = int(rng.integers(0, free // 2 + 1))
    x_right = int(rng.integers(x_left + sizes[0][0] + gap, width - sizes[1][0] + 1))
    boxes = []
    for x, (w, h) in zip((x_left, x_right), sizes):
        y = int(rng.integers(0, height - h + 1))
        boxes.append((float(x), float(y), float(x + w), float(y + h)))
    return boxes


def _place_marks(rng: np.random.Generator, box, n: int, radius: float, taken: list, avoid=()) -> list[tuple[float, float]]:
    """``n`` mark centres inside ``box`` (a margin of radius + 1 px), 3 radii from every
    centre in ``taken`` and outside the boxes of ``avoid``; appended to ``taken``."""
    x1, y1, x2, y2 = box
    pad = radius + 1.0
    placed: list[tuple[float, float]] = []
    for _ in range(200 * max(n, 1)):
        if len(placed) == n:
            break
        cx, cy = rng.uniform(x1 + pad, x2 - pad), rng.uniform(y1 + pad, y2 - pad)
        if any(np.hypot(cx - a, cy - b) < 3 * radius for a, b in taken):
            continue
        if any(a1 - pad < cx < a2 + pad and b1 - pad < cy < b2 + pad for a1, b1, a2, b2 in avoid):
            continue
        taken.append((cx, cy))
        placed.append((cx, cy))
    if len(placed) != n:
        raise _NoRoom
    return placed


class _NoRoom(Exception):
    """A region too small for its marks (the layout is drawn again)."""
