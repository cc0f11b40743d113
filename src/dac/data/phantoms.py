"""Synthetic panoramic phantoms: panoramic-radiograph-like images with their ground truth.

A phantom is a panoramic-radiograph-like image that carries what makes the paper's
task hard: a dental arch (upper and lower teeth along a smile-shaped occlusal curve)
whose position, scale and tilt change per image; radiopaque restorations whose count
sets one of the paper's five classes (0, 1-3, 4-6, 7-11, 12-32 restorations); and
structures outside the region of interest that also have strong local contrast
(cervical spine ghosts, mandibular rami and lower border, skull base, collimator
edges, a lead marker), under varying exposure, contrast, edge blur and noise. Each
phantom comes with its label and the true region box (the tight box around all teeth),
so a crop can be scored by IoU.

Convention: boxes are xyxy in input pixel coordinates (torchvision's): pixel ``i``
covers ``[i, i + 1)``, the whole image is ``(0, 0, W, H)``.

Examples:
    >>> p = make_phantom(7, 96, 177, label=2)
    >>> p.image.shape, p.image.dtype, p.label, 4 <= p.restorations <= 6
    (torch.Size([1, 96, 177]), torch.uint8, 2, True)
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import DACInputError, check_int
from .._film import border_level, noise_levels

__all__ = ["CLASS_EDGES", "CLASS_NAMES", "Phantom", "make_phantom", "phantom_class", "restoration_class"]

#: Class ``c`` holds restoration counts ``CLASS_EDGES[c] <= n < CLASS_EDGES[c + 1]`` (paper, Table 1).
CLASS_EDGES = (0, 1, 4, 7, 12, 33)
#: The paper's class names, in class-index order.
CLASS_NAMES = ("0", "1-3", "4-6", "7-11", "12-32")
#: File suffixes (lower case) that :class:`ImageFolderDataset` treats as images.
MIN_SIZE = 64  # smallest phantom side, pixels

# Per quadrant, from the midline: central incisor, lateral incisor, canine, two premolars,
# three molars. Relative crown widths (mesio-distal), lengths and crown fractions.
_WIDTH = ((8.5, 6.5, 7.5, 7.0, 6.5, 10.0, 9.0, 8.5), (5.5, 6.0, 7.0, 7.0, 7.0, 11.0, 10.5, 10.0))
_LENGTH = ((1.0, 0.92, 1.12, 0.95, 0.93, 0.85, 0.80, 0.74), (0.92, 0.95, 1.08, 0.95, 0.95, 0.88, 0.85, 0.80))
_CROWN = (0.42, 0.42, 0.38, 0.36, 0.36, 0.33, 0.33, 0.34)
_MISSING_WEIGHT = (1.0, 1.0, 0.6, 1.5, 1.5, 2.0, 2.0, 6.0)  # third molars go missing most
_RESTORED_WEIGHT = (0.6, 0.6, 0.8, 1.0, 1.0, 1.6, 1.4, 0.8)  # molars are restored most
_COARSE = 4  # smooth anatomy is drawn at 1/4 resolution, then upsampled
_POSITION = np.tile(np.r_[np.arange(7, -1, -1), np.arange(8)], 2)  # 0..7 from the midline, per tooth


def restoration_class(count: int) -> int:
    """The paper's class (0..4) of a restoration count: 0 | 1-3 | 4-6 | 7-11 | 12-32.

    Args:
        count: number of restorations, an int in [0, 32].

    Returns:
        Class index c with ``CLASS_EDGES[c] <= count < CLASS_EDGES[c + 1]``.

    Examples:
        >>> [restoration_class(n) for n in (0, 1, 3, 4, 7, 11, 12, 32)]
        [0, 1, 1, 2, 3, 3, 4, 4]
    """
    n = check_int(count, "count", 0, CLASS_EDGES[-1] - 1)
    return bisect.bisect_right(CLASS_EDGES, n) - 1


@dataclass
class Phantom:
    """One synthetic panoramic radiograph and its ground truth.

    Convention: ``roi`` and ``teeth`` are xyxy in input pixel coordinates
    (torchvision's; the whole image is ``(0, 0, W, H)``).

    Attributes:
        image: Tensor[1, H, W], ``torch.uint8`` (``bits=8``) or ``torch.uint16`` (``bits=16``).
        label: the paper's class of ``restorations``, 0..4 (see :data:`CLASS_NAMES`).
        restorations: number of restored teeth (crowns, fillings, root-canal fillings).
        roi: Tensor[4] float32, the tight box around every tooth: the region a crop
            should find.
        seed: the seed the phantom was drawn from.
        teeth: Tensor[N, 4] float32, the tight box of each of the N teeth present.
    """

    image: Tensor
    label: int
    restorations: int
    roi: Tensor
    seed: int
    teeth: Tensor | None = None


def make_phantom(
    seed: int, height: int = 1536, width: int = 2836, *, label: int | None = None, bits: int = 8
) -> Phantom:
    """Draw one panoramic-radiograph-like phantom, deterministically from ``seed``.

    The class is drawn uniformly (the paper's classes are balanced), then the
    restoration count uniformly inside it; ``label`` overrides the class only, so
    ``make_phantom(s, label=c)`` equals ``make_phantom(s)`` when ``c`` is the class
    ``s`` draws. All randomness comes from generators seeded by ``seed`` (never the
    global RNG state). The arch spans 0.45-0.7 of the width (less if the image is too
    short to hold it), is tilted by up to 6 degrees and placed off-centre; 0-4 teeth are
    missing (never fewer teeth than restorations).

    Args:
        seed: an int >= 0.
        height: image height H in pixels, >= 64 (paper: 1536).
        width: image width W in pixels, >= 64 (paper: 2836 or 2860).
        label: class 0..4 to draw the restoration count from, or None to draw it.
        bits: 8 (``torch.uint8`` image) or 16 (``torch.uint16``).

    Returns:
        A :class:`Phantom` with image Tensor[1, H, W] and roi Tensor[4] (xyxy).

    Examples:
        >>> a, b = make_phantom(3, 96, 177), make_phantom(3, 96, 177)
        >>> torch.equal(a.image, b.image), a.roi.shape
        (True, torch.Size([4]))
    """
    seed = check_int(seed, "seed", 0)
    height = check_int(height, "height", MIN_SIZE)
    width = check_int(width, "width", MIN_SIZE)
    if label is not None:
        label = check_int(label, "label", 0, len(CLASS_NAMES) - 1)
    if isinstance(bits, bool) or bits not in (8, 16):
        raise DACInputError(f"bits: expected 8 or 16, got {bits!r}")

    label, restorations = _draw_class(seed, label)
    # Separate streams: the anatomy, exposure and noise do not depend on the restorations,
    # so one seed drawn with different labels is one "patient" with different dental work.
    rng = np.random.default_rng([seed, 1])
    restore_rng = np.random.default_rng([seed, 3])
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 2]).integers(2**62)))

    arch = _place_arch(rng, height, width)
    present = _present_teeth(rng, restorations)
    restored = _restored_teeth(restore_rng, present, restorations)
    edge = float(rng.uniform(0.8, 2.2)) * height / 1536 + 0.4  # edge blur, pixels

    density = _anatomy(rng, gen, arch, height, width)
    _spine(rng, density, arch, edge)
    metal, boxes, peak = [], [], 0.0
    for i in np.flatnonzero(present):
        frame, tooth, inside = _tooth(arch, i, edge, height, width)
        patch = density[frame.rows, frame.cols]
        patch += tooth
        peak = max(peak, float(patch.amax()))
        if restored[i]:
            mask, level = _restoration(restore_rng, arch, i, edge, frame)
            metal.append((frame.rows, frame.cols, mask * level))
            inside = torch.maximum(inside, mask)
        boxes.append(_tight_box(inside, frame.rows.start, frame.cols.start))
    teeth = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    roi = torch.cat([teeth[:, :2].amin(0), teeth[:, 2:].amax(0)])

    image = _expose(rng, density, peak)
    for rows, cols, mask in metal:  # metal saturates the detector whatever the exposure
        view = image[rows, cols]
        view.copy_(torch.maximum(view, mask))
    _frame(rng, image, roi)
    _add_noise(rng, gen, image)
    scale = 255.0 if bits == 8 else 65535.0
    image = image.mul_(scale).round_().to(torch.uint8 if bits == 8 else torch.uint16)
    return Phantom(image[None], label, restorations, roi, seed, teeth)



def phantom_class(seed: int, label: int | None = None) -> tuple[int, int]:
    """(class, restoration count) that :func:`make_phantom` draws for ``seed`` (and
    ``label``), computed without drawing the image."""
    return _draw_class(check_int(seed, "seed", 0), label)


# ----------------------------------------------------------------------------- phantom internals


@dataclass
class _Arch:
    """Where the dental arch sits: frame, sizes and the 32 teeth (upper then lower, left to right)."""

    cx: float  # image coordinates of the occlusal curve's midpoint
    cy: float
    tilt: float  # radians, image rotation of the arch frame
    half_width: float  # A: half the arch's width, pixels
    tooth_length: float  # L: length scale of a tooth, pixels
    smile: float  # occlusal curve y = -smile * A * u^2 (u = x / A), arch frame
    apex: np.ndarray  # [32, 2] occlusal point of each tooth, image coords
    axis: np.ndarray  # [32, 2] unit vector crown -> root
    width: np.ndarray  # [32] pixels
    length: np.ndarray  # [32] pixels
    crown: np.ndarray  # [32] crown length, pixels
    position: np.ndarray  # [32] 0..7 from the midline


def _draw_class(seed: int, label: int | None) -> tuple[int, int]:
    """(class, restoration count) of ``seed``, from a generator of its own (no image drawn)."""
    rng = np.random.default_rng([seed, 0])
    drawn = int(rng.integers(len(CLASS_NAMES)))
    c = drawn if label is None else label
    return c, int(rng.integers(CLASS_EDGES[c], CLASS_EDGES[c + 1]))


def _place_arch(rng: np.random.Generator, height: int, width: int) -> _Arch:
    """Lay the 32 teeth along a smile-shaped occlusal curve; scale, tilt and shift it into the image."""
    half = float(rng.uniform(0.45, 0.70)) * width / 2
    length = 0.19 * 2 * half * float(rng.uniform(0.9, 1.1))
    smile = float(rng.uniform(0.03, 0.11))
    tilt = math.radians(float(rng.uniform(-6.0, 6.0)))
    gap = float(rng.uniform(0.01, 0.05)) * length  # open bite between the jaws
    apex, axis, widths, lengths, crowns, positions = [], [], [], [], [], []
    for jaw in (0, 1):  # 0 upper, 1 lower
        w = np.asarray(_WIDTH[jaw])
        centres = (np.cumsum(w) - w / 2) / w.sum()  # tooth centres along the arch, 0..1 from the midline
        for side in (-1, 1):
            order = range(7, -1, -1) if side < 0 else range(8)
            for k in order:
                u = side * centres[k] * (0.97 if jaw else 1.0)
                slope = -2 * smile * u  # dy/dx of the occlusal curve
                normal = np.array([-slope, 1.0]) / math.hypot(slope, 1.0)  # pointing down
                jitter = math.radians(float(rng.normal(0.0, 2.5)))
                direction = _rotate(normal if jaw else -normal, jitter)
                point = np.array([u * half, -smile * half * u * u]) + (gap / 2) * (normal if jaw else -normal)
                apex.append(point)
                axis.append(direction)
                widths.append(0.92 * w[k] / w.sum() * half)
                lengths.append(_LENGTH[jaw][k] * length * float(rng.uniform(0.93, 1.07)))
                crowns.append(_CROWN[k])
                positions.append(k)
    apex = _rotate(np.array(apex), tilt)
    axis = _rotate(np.array(axis), tilt)
    widths, lengths = np.array(widths), np.array(lengths)
    crowns = np.array(crowns) * lengths

    # Shrink the arch if it does not fit (short images), then place its centre.
    lo, hi = _teeth_extent(apex, axis, widths, lengths)
    margin = np.array([0.02 * width, 0.02 * height])
    room = np.array([width, height]) - 2 * margin
    shrink = min(1.0, *(room / (hi - lo)))
    apex, widths, lengths, crowns = apex * shrink, widths * shrink, lengths * shrink, crowns * shrink
    lo, hi = lo * shrink, hi * shrink
    centre = []
    for dim, (want_lo, want_hi) in enumerate(((0.40, 0.60), (0.44, 0.62))):
        size = (width, height)[dim]
        feasible = (margin[dim] - lo[dim], size - margin[dim] - hi[dim])
        a, b = max(feasible[0], want_lo * size), min(feasible[1], want_hi * size)
        centre.append(float(rng.uniform(a, b)) if a < b else float(np.clip((a + b) / 2, *feasible)))
    cx, cy = centre
    return _Arch(
        cx, cy, tilt, half * shrink, length * shrink, smile,
        apex + np.array([cx, cy]), axis, widths, lengths, crowns, np.array(positions),
    )


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return v @ np.array([[c, s], [-s, c]])  # rows rotated by +angle (image axes, y down)


def _teeth_extent(apex: np.ndarray, axis: np.ndarray, widths: np.ndarray, lengths: np.ndarray):
    """Lower and upper corners [2] of the oriented rectangles that bound the teeth."""
    across = np.stack([-axis[:, 1], axis[:, 0]], 1) * (widths[:, None] / 2)
    tip = apex + axis * lengths[:, None]
    corners = np.concatenate([apex + across, apex - across, tip + across, tip - across])
    return corners.min(0), corners.max(0)


def _present_teeth(rng: np.random.Generator, restorations: int) -> np.ndarray:
    """Bool[32]: which teeth are present; 0-4 missing, never fewer than ``restorations`` left."""
    missing = min(int(rng.integers(0, 5)), 32 - restorations)
    weight = np.asarray(_MISSING_WEIGHT)[_POSITION]
    gaps = rng.choice(32, 4, replace=False, p=weight / weight.sum())  # same draws whatever the count
    present = np.ones(32, dtype=bool)
    present[gaps[:missing]] = False
    return present


def _restored_teeth(rng: np.random.Generator, present: np.ndarray, restorations: int) -> np.ndarray:
    """Bool[32]: exactly ``restorations`` of the present teeth, molars most likely."""
    restored = np.zeros(32, dtype=bool)
    candidates = np.flatnonzero(present)
    if restorations:
        weight = np.asarray(_RESTORED_WEIGHT)[_POSITION[candidates]]
        restored[rng.choice(candidates, restorations, replace=False, p=weight / weight.sum())] = True
    return restored


def _step(t: Tensor) -> Tensor:
    """Soft step, a sigmoid; the clamp keeps products of steps out of (slow) denormal floats."""
    return torch.sigmoid(t.clamp(-15.0, 15.0))


def _gauss(t: Tensor) -> Tensor:
    """exp(-t^2), exactly 0 far out (no denormal floats)."""
    return torch.exp(-(t * t).clamp_(max=30.0)) * (t.abs() < 5.4)


def _band(v: Tensor, low: float, high: float, soft: float) -> Tensor:
    """Soft indicator of low < v < high, edges ``soft`` wide."""
    return _step((v - low) / soft) * _step((high - v) / soft)


def _anatomy(rng: np.random.Generator, gen: torch.Generator, arch: _Arch, height: int, width: int) -> Tensor:
    """The smooth, large structures (soft tissue, jaws, rami, palate, skull base) as
    X-ray density Tensor[H, W] float32, drawn at 1/4 resolution and upsampled."""
    hc, wc = max(8, round(height / _COARSE)), max(8, round(width / _COARSE))
    # Coarse pixel centres in full-resolution pixel coordinates (bilinear, align_corners=False).
    y = ((torch.arange(hc, dtype=torch.float32) + 0.5) * height / hc - 0.5)[:, None]
    x = ((torch.arange(wc, dtype=torch.float32) + 0.5) * width / wc - 0.5)[None, :]
    c, s = math.cos(arch.tilt), math.sin(arch.tilt)
    dx, dy = x - arch.cx, y - arch.cy
    xr, yr = c * dx + s * dy, -s * dx + c * dy  # arch frame, pixels
    A, L = arch.half_width, arch.tooth_length
    u = xr / A
    occlusal = -arch.smile * A * u * u

    def amp(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    # Soft tissue: a base level, a smooth gradient, darker corners, a brighter face.
    gx, gy = amp(-0.08, 0.08), amp(-0.06, 0.06)
    xn, yn = x / width - 0.5, y / height - 0.5
    density = amp(0.12, 0.22) + gx * xn + gy * yn - amp(0.05, 0.15) * (xn * xn + yn * yn) * 2
    density = density + amp(0.03, 0.07) * _band(u, -1.6, 1.6, 0.15) * _band(yr / L, -2.3, 2.4, 0.3)

    # Upper jaw (maxilla) around the upper roots; maxillary sinuses; hard palate line.
    rel = (yr - occlusal) / L
    maxilla = _band(u, -1.1, 1.1, 0.1) * _band(rel, -1.3, 0.0, 0.1)
    for side in (-1, 1):
        sinus = ((u - side * amp(0.45, 0.65)) / 0.3) ** 2 + ((yr / L + amp(1.35, 1.55)) / 0.28) ** 2
        maxilla = maxilla - 0.6 * _gauss(sinus)
    palate_y = -L * amp(1.15, 1.35) - 0.5 * arch.smile * A * u * u
    palate = _gauss((yr - palate_y) / (0.035 * L)) * _band(u, -1.0, 1.0, 0.1)

    # Lower jaw (mandible): body from the lower teeth to a U-shaped lower border with a
    # bright cortex, rising at the sides into the rami up to the condyles.
    border0, curve = amp(1.45, 1.75) * L, amp(0.06, 0.16) * A
    border = border0 - curve * u * u
    body = _band(u, -1.22, 1.22, 0.05) * _step((yr - occlusal) / (0.08 * L)) * _step((border - yr) / (0.03 * L))
    cortex = _gauss((yr - border) / (0.045 * L)) * _band(u, -1.22, 1.22, 0.04)
    rami = torch.zeros_like(xr)
    ramus_width = amp(0.18, 0.26) * A
    for side in (-1, 1):
        gu = side * amp(1.15, 1.25)
        gonion = (gu * A, border0 - curve * gu * gu)
        condyle = (side * amp(1.28, 1.4) * A, -amp(1.2, 1.5) * L)
        ex, ey = condyle[0] - gonion[0], condyle[1] - gonion[1]
        t = (((xr - gonion[0]) * ex + (yr - gonion[1]) * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        d = torch.hypot(xr - gonion[0] - t * ex, yr - gonion[1] - t * ey)
        rami = rami + _step((ramus_width / 2 - d) / (0.03 * A))
        cortex = cortex + 0.8 * _gauss((d - ramus_width / 2) / (0.03 * A))
        rami = rami + _gauss(torch.hypot(xr - condyle[0], yr - condyle[1]) / (0.1 * A))
    bone = maxilla.clamp_min(0) + body + rami.clamp(0, 1)
    texture = F.avg_pool2d(torch.randn(1, 1, hc, wc, generator=gen), 3, 1, 1, count_include_pad=False)[0, 0]
    density = density + bone * (amp(0.1, 0.18) + amp(0.04, 0.08) * texture) + amp(0.015, 0.03) * texture
    density = density + amp(0.08, 0.16) * palate + amp(0.12, 0.22) * cortex

    # Skull base: a wavy bright band above the upper jaw (often cut by the image top).
    base_y = -L * amp(1.8, 2.3) + 0.12 * L * torch.cos(2 * math.pi * u / amp(2.0, 3.0))
    density = density + amp(0.08, 0.16) * _band(yr, base_y - 0.5 * L, base_y, 0.04 * L)

    return F.interpolate(density[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def _spine(rng: np.random.Generator, density: Tensor, arch: _Arch, edge: float) -> None:
    """Cervical spine ghosts, in place: vertebrae columns (bright bodies, dark discs, sharp
    endplates) at one or both sides, and/or a blurred column at the centre bottom."""
    height, width = density.shape
    layout = int(rng.choice(4, p=[0.45, 0.2, 0.15, 0.2]))  # both sides, one side, centre, both + centre
    sides = {0: (-1, 1), 1: (int(rng.choice([-1, 1])),), 2: (), 3: (-1, 1)}[layout]
    y = torch.arange(height, dtype=torch.float32)
    period = float(rng.uniform(0.08, 0.12)) * height
    phase = ((y - float(rng.uniform(0, period))) / period).frac().abs_() * period
    disc = float(rng.uniform(0.18, 0.28)) * period
    soft = 1.5 * edge
    vertebrae = _band(phase, disc / 2, period - disc / 2, soft)
    for side in sides:
        centre = width / 2 + side * width * float(rng.uniform(0.38, 0.47))
        half = width * float(rng.uniform(0.025, 0.04))
        top = _step((y - float(rng.uniform(0.15, 0.35)) * height) / (0.01 * height))
        cols = slice(max(0, int(centre - half - 8 * soft)), min(width, int(centre + half + 8 * soft) + 1))
        if cols.start >= cols.stop:
            continue
        x = torch.arange(cols.start, cols.stop, dtype=torch.float32)
        profile = _band(x, centre - half, centre + half, soft) * (0.8 + 0.2 * ((x - centre) / half).abs().clamp(max=1))
        density[:, cols] += float(rng.uniform(0.1, 0.2)) * (vertebrae * top)[:, None] * profile[None, :]
    if layout >= 2:
        half, blur = 0.07 * width, 0.03 * width
        cols = slice(max(0, int(arch.cx - half - 6 * blur)), min(width, int(arch.cx + half + 6 * blur) + 1))
        x = torch.arange(cols.start, cols.stop, dtype=torch.float32)
        profile = _band(x, arch.cx - half, arch.cx + half, blur)
        rise = _step((y - arch.cy - 1.3 * arch.tooth_length) / (0.05 * height)) * (0.6 + 0.4 * vertebrae)
        density[:, cols] += float(rng.uniform(0.05, 0.1)) * rise[:, None] * profile[None, :]


class _ToothFrame(NamedTuple):
    """Pixel window around one tooth and its coordinates there (pixels)."""

    rows: slice
    cols: slice
    along: Tensor  # a: from the occlusal point towards the apex
    signed: Tensor  # b: across the axis
    across: Tensor  # |b|
    outline: Tensor  # the tooth's half-width at each a


def _tooth(arch: _Arch, i: int, edge: float, height: int, width: int) -> tuple[_ToothFrame, Tensor, Tensor]:
    """Frame, density patch (crown brighter than root, darker pulp) and soft mask of tooth ``i``."""
    frame = _tooth_frame(arch, i, edge, height, width)
    a, b = frame.along, frame.across
    half, length, crown = arch.width[i] / 2, arch.length[i], arch.crown[i]
    inside = _step((frame.outline - b) / edge) * _step(a / edge) * _step((length - a) / edge)
    if arch.position[i] >= 5:  # molars: two roots, split from a third of the way down
        start = crown + 0.3 * (length - crown)
        notch = 0.35 * half * ((a - start) / (length - start)).clamp(0, 1).sqrt()
        inside = inside * (1 - _step((notch - b) / edge) * (notch / edge).clamp(0, 1))
    is_crown = _step((crown - a) / edge)
    enamel = is_crown * _step((0.8 * crown - a) / edge) * _step((b - 0.7 * half) / edge)
    pulp_half = torch.where(a < crown, 0.3 * half, 0.15 * half * (1 - (a - crown) / (length - crown)).clamp_min(0).sqrt())
    pulp = _step((pulp_half - b) / edge) * _band(a, 0.45 * crown, 0.92 * length, edge)
    density = inside * (0.24 + 0.12 * is_crown + 0.1 * enamel - 0.12 * pulp)
    return frame, density, inside


def _restoration(rng: np.random.Generator, arch: _Arch, i: int, edge: float, frame: _ToothFrame) -> tuple[Tensor, float]:
    """Soft mask of a restoration on tooth ``i`` (a crown, a filling, or a crown over a
    root-canal filling), never outside the tooth's outline, and its exposed intensity
    (near saturation)."""
    a, b = frame.along, frame.across
    half, length, crown = arch.width[i] / 2, arch.length[i], arch.crown[i]
    sharp = 0.6 * edge
    within = _step((frame.outline - b) / sharp)
    kind = rng.choice(3, p=[0.55, 0.3, 0.15])
    if kind == 1:  # filling: an ellipse inside the crown
        a0, b0 = rng.uniform(0.15, 0.5) * crown, rng.uniform(-0.3, 0.3) * half
        ra, rb = rng.uniform(0.15, 0.35) * crown, rng.uniform(0.3, 0.55) * half
        da, db = (a - a0) / ra, (frame.signed - b0) / rb
        mask = _step((1 - da * da - db * db) * min(ra, rb) / (2 * sharp)) * within
    else:  # crown cap over the whole crown
        cap = float(rng.uniform(0.85, 1.05)) * crown
        mask = within * _band(a, 0.0, cap, sharp)
        if kind == 2:
            canal = _step((0.07 * half + 0.5 - b) / sharp) * _band(a, cap, 0.9 * length, sharp)
            mask = torch.maximum(mask, canal)
    return mask, float(rng.uniform(0.92, 1.0))


def _tooth_frame(arch: _Arch, i: int, edge: float, height: int, width: int) -> _ToothFrame:
    """The pixel window around tooth ``i`` and its coordinates and outline there."""
    lo, hi = _teeth_extent(arch.apex[i : i + 1], arch.axis[i : i + 1], arch.width[i : i + 1], arch.length[i : i + 1])
    pad = 3 * edge + 2
    cols = slice(max(0, int(lo[0] - pad)), min(width, int(math.ceil(hi[0] + pad)) + 1))
    rows = slice(max(0, int(lo[1] - pad)), min(height, int(math.ceil(hi[1] + pad)) + 1))
    ys = torch.arange(rows.start, rows.stop, dtype=torch.float32)[:, None] - float(arch.apex[i, 1])
    xs = torch.arange(cols.start, cols.stop, dtype=torch.float32)[None, :] - float(arch.apex[i, 0])
    dx, dy = (float(v) for v in arch.axis[i])
    along = xs * dx + ys * dy
    signed = ys * dx - xs * dy
    return _ToothFrame(rows, cols, along, signed, signed.abs(), _half_width(arch, i, along))


def _half_width(arch: _Arch, i: int, a: Tensor) -> Tensor:
    """Tooth outline: half-width along the axis; a rounded crown, a neck, a tapering root."""
    half, length, crown = arch.width[i] / 2, arch.length[i], arch.crown[i]
    corner = 0.35 * half
    da = (corner - a).clamp(0, corner)
    crown_half = half - corner + (corner * corner - da * da).clamp_min(0).sqrt()
    crown_half = torch.minimum(crown_half, half * (1 - 0.18 * ((a - 0.75 * crown) / (0.25 * crown)).clamp(0, 1)))
    t = ((a - crown) / (length - crown)).clamp(0, 1)
    return torch.where(a < crown, crown_half, half * (0.82 - 0.67 * t * t.sqrt()))


def _tight_box(inside: Tensor, row0: int, col0: int) -> list[float]:
    """xyxy box of the pixels where ``inside`` > 1/2 (or half its peak, for a tooth thinner
    than a pixel), in image pixels."""
    level = min(0.5, 0.5 * float(inside.max()))
    rows = torch.nonzero(inside.amax(1) > level)[:, 0]
    cols = torch.nonzero(inside.amax(0) > level)[:, 0]
    return [col0 + int(cols[0]), row0 + int(rows[0]), col0 + int(cols[-1]) + 1, row0 + int(rows[-1]) + 1]


def _expose(rng: np.random.Generator, density: Tensor, peak: float) -> Tensor:
    """Exposure: black level, gain and gamma; in place, returns intensities in [0, 1].

    The gain maps the densest tooth (``peak``) to 0.65-0.85 before the gamma, so enamel
    stays below the metal of restorations (0.92-1), as on a real radiograph.
    """
    black, white, gamma = rng.uniform(0.0, 0.1), rng.uniform(0.65, 0.85), rng.uniform(0.75, 1.35)
    gain = white / max(peak - black, 1e-3)
    return density.sub_(float(black)).mul_(float(gain)).clamp_(0, 1).pow_(float(gamma))


def _frame(rng: np.random.Generator, image: Tensor, roi: Tensor) -> None:
    """Collimator borders (dark or bright, random widths, never over the teeth) and a
    bright lead marker in a top corner; in place."""
    height, width = image.shape
    x1, y1, x2, y2 = roi.tolist()
    room = (x1, y1, width - x2, height - y2)  # left, top, right, bottom
    sizes = (width, height, width, height)
    level = border_level(rng)
    edges = []
    for side in range(4):
        wanted = int(rng.uniform(0.01, 0.07) * sizes[side]) if rng.random() < 0.65 else 0
        edges.append(max(0, min(wanted, int(room[side] - 0.01 * sizes[side]))))
    left, top, right, bottom = edges
    rows = torch.zeros(height, dtype=torch.bool)
    cols = torch.zeros(width, dtype=torch.bool)
    rows[:top] = True
    rows[height - bottom :] = True
    cols[:left] = True
    cols[width - right :] = True
    image.masked_fill_(rows[:, None] | cols[None, :], level)
    if rng.random() < 0.6:  # an "L"/"R" lead marker: two bright strokes
        size, stroke = max(4, int(0.05 * height)), max(2, int(0.008 * width))
        x0 = left + int(0.02 * width) if rng.random() < 0.5 else width - right - int(0.02 * width) - size
        y0 = top + int(0.02 * height)
        if x0 >= 0 and y0 + size <= height and (x0 + size <= x1 or x0 >= x2 or y0 + size <= y1):
            value = float(rng.uniform(0.9, 1.0))
            image[y0 : y0 + size, x0 : x0 + stroke] = value
            image[y0 + size - stroke : y0 + size, x0 : x0 + size * 2 // 3] = value


def _add_noise(rng: np.random.Generator, gen: torch.Generator, image: Tensor) -> None:
    """Gaussian read noise plus signal-dependent (Poisson-like) noise; in place, clamped to [0, 1]."""
    read, shot = noise_levels(rng)
    std = image.mul(shot * shot).add_(read * read).sqrt_()
    image.add_(std.mul_(torch.randn(image.shape, generator=gen))).clamp_(0, 1)


# ----------------------------------------------------------------------------- checks and files
