"""Input checks shared by every public entry point.

Public functions call these at their top; inner code trusts what they return.
Every failure raises :class:`DACInputError`, a ``ValueError`` whose message names
the argument, what was seen and what was expected.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Sequence

import torch

__all__ = ["DACInputError"]

#: Integer dtypes accepted as images, with the value that maps to 1.0.
INTEGER_IMAGE_SCALE = {
    torch.uint8: 255.0,
    torch.int16: 32767.0,
    torch.uint16: 65535.0,
    torch.int32: 2147483647.0,
}


class DACInputError(ValueError):
    """Bad input to a ``dac`` function: the message names the argument."""


def check_image_batch(images: torch.Tensor, name: str = "images") -> None:
    """Check ``images`` is a Tensor[B, C, H, W] with C in (1, 3) and B >= 1."""
    if not isinstance(images, torch.Tensor):
        raise DACInputError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    check_dense(images, name)
    if images.ndim != 4:
        raise DACInputError(
            f"{name}: expected shape [B, C, H, W] (4 dims), got {tuple(images.shape)}"
        )
    b, c, h, w = images.shape
    if c not in (1, 3):
        raise DACInputError(
            f"{name}: expected 1 or 3 channels (shape [B, C, H, W]), got C={c} "
            f"in shape {tuple(images.shape)}"
        )
    if b == 0 or h == 0 or w == 0:
        raise DACInputError(f"{name}: empty tensor of shape {tuple(images.shape)}")
    check_dtype(images, name)


def check_dtype(images: torch.Tensor, name: str) -> None:
    """Accept floating dtypes and the integer dtypes of ``INTEGER_IMAGE_SCALE``."""
    if images.dtype.is_floating_point:
        if not torch.isfinite(images).all():
            raise DACInputError(f"{name}: contains NaN or Inf values")
        return
    if images.dtype not in INTEGER_IMAGE_SCALE:
        raise DACInputError(
            f"{name}: unsupported dtype {images.dtype}; expected a floating dtype "
            f"or one of {sorted(str(d) for d in INTEGER_IMAGE_SCALE)}"
        )


def check_dense(tensor: torch.Tensor, name: str) -> None:
    """Refuse sparse tensors: every pixel counts (the search, the pooling and the crop read a
    dense grid; torch's sparse kernels lack most of their operations)."""
    if tensor.layout != torch.strided:
        raise DACInputError(f"{name}: a sparse tensor ({tensor.layout}); pass a dense one (.to_dense())")


def check_saliency(saliency: torch.Tensor, name: str = "saliency") -> torch.Tensor:
    """Return ``saliency`` as Tensor[B, h, w]; accepts [B, 1, h, w] or [B, h, w]."""
    if not isinstance(saliency, torch.Tensor):
        raise DACInputError(f"{name}: expected a torch.Tensor, got {type(saliency).__name__}")
    check_dense(saliency, name)
    if saliency.ndim == 4 and saliency.shape[1] == 1:
        saliency = saliency[:, 0]
    if saliency.ndim != 3:
        raise DACInputError(
            f"{name}: expected shape [B, 1, h, w] or [B, h, w], got {tuple(saliency.shape)}"
        )
    if not saliency.dtype.is_floating_point:
        raise DACInputError(f"{name}: expected a floating dtype, got {saliency.dtype}")
    if saliency.shape[0] == 0 or saliency.shape[1] < 2 or saliency.shape[2] < 2:
        raise DACInputError(
            f"{name}: needs at least 2x2 pooled pixels per image, got {tuple(saliency.shape)}"
        )
    if not torch.isfinite(saliency).all():
        raise DACInputError(f"{name}: contains NaN or Inf values")
    return saliency


def check_theta(theta: torch.Tensor, batch: int | None = None, name: str = "theta") -> None:
    """Check ``theta`` is a finite floating Tensor[B, 3] = (x_c, y_c, r)."""
    ok = isinstance(theta, torch.Tensor) and theta.ndim == 2 and theta.shape[1] == 3
    if not ok or (batch is not None and theta.shape[0] != batch):
        shape = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        expected = "B" if batch is None else str(batch)
        raise DACInputError(f"{name}: expected shape [{expected}, 3] = (x_c, y_c, r), got {shape}")
    if not theta.dtype.is_floating_point:
        raise DACInputError(f"{name}: expected a floating dtype, got {theta.dtype}")
    if not torch.isfinite(theta).all():
        raise DACInputError(f"{name}: contains NaN or Inf values")


def check_boxes(boxes: torch.Tensor, batch: int, name: str = "boxes") -> None:
    """Check ``boxes`` is a finite Tensor[B, 4] xyxy with x2 > x1 and y2 > y1."""
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape != (batch, 4):
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise DACInputError(f"{name}: expected shape [{batch}, 4] (x1, y1, x2, y2), got {shape}")
    if not torch.isfinite(boxes).all():
        raise DACInputError(f"{name}: contains NaN or Inf values")
    if not ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all():
        raise DACInputError(f"{name}: every box needs x2 > x1 and y2 > y1 (xyxy convention)")


def check_positive(value: float, name: str) -> float:
    """Check a scalar is a finite number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DACInputError(f"{name}: expected a positive number, got {value!r}") from None
    if not (v > 0 and v < float("inf")):
        raise DACInputError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def check_size(size: Sequence[int], name: str = "size") -> tuple[int, int]:
    """Check an (H, W) output size of two positive ints (not bools, not floats)."""
    try:
        h, w = size
    except (TypeError, ValueError):
        raise DACInputError(f"{name}: expected (height, width), got {size!r}") from None
    try:
        if isinstance(h, bool) or isinstance(w, bool):
            raise TypeError
        h, w = operator.index(h), operator.index(w)
    except TypeError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise DACInputError(f"{name}: expected two positive integers (height, width), got {size!r}")
    return h, w


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """An int (numpy ints too, not bool) in [low, high]."""
    expected = f">= {low}" if high is None else f"in [{low}, {high}]"
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise DACInputError(f"{name}: expected an int {expected}, got {value!r}") from None
    if v < low or (high is not None and v > high):
        raise DACInputError(f"{name}: expected an int {expected}, got {v}")
    return v


def check_bool(value: Any, name: str) -> bool:
    """A bool (``True``/``False`` in Python, ``true``/``false`` in YAML), nothing else truthy."""
    if not isinstance(value, bool):
        raise DACInputError(f"{name}: expected True or False (true or false in YAML), got {value!r}")
    return value


def check_real(
    value: Any, name: str, low: float = float("-inf"), high: float = float("inf"), *,
    low_open: bool = False, high_open: bool = False, what: str = "a number",
) -> float:
    """A real number (int, float or a numpy scalar; not a bool, not a string) in a range.

    ``low_open`` / ``high_open`` exclude the bound itself. NaN is refused; an infinite
    bound admits infinite values only where the range is closed there.

    Examples:
        >>> check_real(0.1, "train.holdout", 0.0, 1.0, high_open=True)
        0.1
    """
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    expected = f"{what} in {left}{low:g}, {high:g}{right}"
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise DACInputError(f"{name}: expected {expected}, got {value!r}")
    v = float(value)
    inside = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if math.isnan(v) or not inside:
        raise DACInputError(f"{name}: expected {expected}, got {value!r}")
    return v


def check_angle(value: Any, name: str) -> float:
    """An angle in degrees in [0, 90) (a rotation limit)."""
    return check_real(value, name, 0.0, 90.0, high_open=True)


def check_device(value: Any, name: str = "device") -> torch.device:
    """A torch device that exists on this machine (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Raises:
        DACInputError: not a device name, or a CUDA/MPS device this machine lacks.
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise DACInputError(f"{name}: expected a torch device such as cpu, cuda or cuda:0, got {value!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DACInputError(f"{name}: {value!r} asked for, but no CUDA device is available on this machine")
        if device.index is not None and device.index >= count:
            raise DACInputError(f"{name}: {value!r} asked for, but this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DACInputError(f"{name}: {value!r} asked for, but MPS is not available on this machine")
    return device


def check_poolable(images: torch.Tensor, kernel_size: int, name: str = "images") -> tuple[int, int]:
    """The pooled size (H // k, W // k) of ``images``; at least two windows per side."""
    height, width = images.shape[-2:]
    h, w = height // kernel_size, width // kernel_size
    if h < 2 or w < 2:
        raise DACInputError(
            f"{name}: an image of {height}x{width} pixels is too small for pooling windows "
            f"of {kernel_size}x{kernel_size}; need at least {2 * kernel_size}x{2 * kernel_size} (two windows per side)"
        )
    return h, w


def check_unit_range(images: torch.Tensor, name: str = "images", slack: float = 0.05) -> None:
    """Floating images must lie in [0, 1] (within ``slack``, e.g. an interpolation's overshoot)."""
    if not images.dtype.is_floating_point or images.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if low < -slack or high > 1 + slack:
        raise DACInputError(
            f"{name}: floating images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "divide 8-bit intensities by 255 (or pass the integer tensor: uint8, uint16 and int16 "
            "are scaled automatically)"
        )


# ------------------------------------------------ options of the archive commands (dac crop, dac predict)
def check_choice(value: Any, choices: Sequence[str], name: str) -> str:
    """One of ``choices`` (a string).

    Examples:
        >>> check_choice("range", ("window", "range"), "dicom")
        'range'
    """
    if not isinstance(value, str) or value not in choices:
        raise DACInputError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_bits(bits: Any, name: str = "bits") -> int:
    """A PNG bit depth: 8 or 16 (not a bool).

    Examples:
        >>> check_bits(16)
        16
    """
    if isinstance(bits, bool) or bits not in (8, 16):
        raise DACInputError(f"{name}: expected 8 or 16, got {bits!r}")
    return int(bits)


def check_percentiles(percentiles: Any, name: str = "percentiles") -> tuple[float, float]:
    """``(low, high)`` as floats with 0 <= low < high <= 100.

    Examples:
        >>> check_percentiles([1, 99])
        (1.0, 99.0)
    """
    try:
        low, high = (float(v) for v in percentiles)
    except (TypeError, ValueError):
        raise DACInputError(f"{name}: expected two numbers (low, high), got {percentiles!r}") from None
    if not (0.0 <= low < high <= 100.0):
        raise DACInputError(f"{name}: expected 0 <= low < high <= 100, got {percentiles!r}")
    return low, high


def check_shard(shard: Any, name: str = "shard") -> tuple[int, int]:
    """``(index, count)`` from a pair or a text ``"i/n"``, with 0 <= index < count.

    Examples:
        >>> check_shard("1/4"), check_shard((0, 1))
        ((1, 4), (0, 1))
    """
    if isinstance(shard, str):
        parts = shard.split("/")
        try:
            shard = tuple(int(p) for p in parts) if len(parts) == 2 else None
        except ValueError:
            shard = None
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)):
        raise DACInputError(f"{name}: expected i/n (this process's share i of n, 0 <= i < n), got {shard!r}")
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise DACInputError(f"{name}: expected i/n with 0 <= i < n, got {index}/{count}")
    return index, count


def check_pool_size(model: Any, pool_size: int, name: str) -> None:
    """Raise :class:`DACInputError` if ``model`` (a saliency stage, a box regressor) works on
    windows of another ``pool_size`` than the layer it is used with (a model without
    one fits any)."""
    own = getattr(model, "pool_size", pool_size)
    if own != pool_size:
        raise DACInputError(f"{name}: works on windows of pool_size {own}, the layer on {pool_size}")
