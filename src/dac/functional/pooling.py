"""Max–min pooling (paper eq. 5): the saliency map the crop search runs on."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import INTEGER_IMAGE_SCALE, DACInputError, check_image_batch, check_poolable

__all__ = ["max_min_pool", "MaxMinPool", "to_unit_range", "window_extremes"]


def to_unit_range(images: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Convert images to floating point in [0, 1].

    Integer images are divided by the largest value of their bit depth:
    ``uint8`` by 255, ``uint16`` by 65535, ``int16`` by 32767, ``int32`` by 2**31 - 1.
    Floating images are returned unchanged (cast to ``dtype`` if given); they are
    expected to lie in [0, 1] already.

    Args:
        images: Tensor of any shape, integer or floating dtype.
        dtype: floating dtype of the result for integer input (default:
            ``torch.get_default_dtype()``).

    Examples:
        >>> to_unit_range(torch.tensor([0, 51, 255], dtype=torch.uint8))
        tensor([0.0000, 0.2000, 1.0000])
    """
    if images.dtype.is_floating_point:
        return images if dtype is None else images.to(dtype)
    scale = INTEGER_IMAGE_SCALE.get(images.dtype)
    if scale is None:
        raise DACInputError(f"images: unsupported dtype {images.dtype}")
    # In place on the converted copy (always a new tensor here): the same values as
    # ``/ scale`` without a second temporary of the input's size (a fifth of a crop's time).
    return images.to(dtype or torch.get_default_dtype()).div_(scale)


def max_min_pool(images: Tensor, kernel_size: int = 10) -> Tensor:
    """Max–min pooling, ``maxPool(x) - minPool(x)`` over windows of ``kernel_size``.

    Window and stride are both ``kernel_size`` (paper eq. 5: 1480x800 -> 148x80 for
    k = 10). Rows and columns past the last whole window are dropped, so pooled pixel
    ``(i, j)`` covers input pixels ``[i*k, (i+1)*k) x [j*k, (j+1)*k)``. Colour images
    give the mean over channels of each channel's max–min range. Integer images are
    pooled in their own dtype and scaled to [0, 1] as in :func:`to_unit_range`, so
    ``uint8`` input gives the same map as the same image divided by 255.

    Differentiable for floating input: the gradient goes to the pixels that hold each
    window's maximum and minimum (ties share it: evenly among the tied columns of the
    window, then evenly among the tied rows within each of them).

    Args:
        images: Tensor[B, C, H, W], C = 1 or 3, floating or integer dtype.
        kernel_size: window size and stride k, at least 1.

    Returns:
        Tensor[B, 1, H // k, W // k], floating, >= 0: the images' dtype, float32 for
        float16 / bfloat16 images, the default dtype for integer images.

    Examples:
        >>> x = torch.zeros(1, 1, 20, 20); x[..., 5, 5] = 1.0
        >>> max_min_pool(x, 10)[0, 0]
        tensor([[1., 0.],
                [0., 0.]])
    """
    high, low = window_extremes(images, kernel_size)
    if images.dtype in (torch.float16, torch.bfloat16):
        spread = high.float() - low.float()  # max and min are exact; their difference is not
    elif images.dtype.is_floating_point:
        spread = high - low
    else:
        scale = INTEGER_IMAGE_SCALE[images.dtype]
        dtype = torch.get_default_dtype()
        spread = (high.to(dtype) - low.to(dtype)) / scale
    return spread.mean(dim=1, keepdim=True)


def window_extremes(images: Tensor, kernel_size: int = 10) -> tuple[Tensor, Tensor]:
    """Per channel, the maximum and the minimum of each ``kernel_size`` window (stride ``kernel_size``).

    Args:
        images: Tensor[B, C, H, W], floating or integer dtype.
        kernel_size: window size and stride k, at least 1.

    Returns:
        (high, low), each Tensor[B, C, H // k, W // k] in the images' dtype (``uint16``
        widened to ``int32``, losslessly: CPU has no max/min kernels for it);
        differentiable for floating input.

    Examples:
        >>> high, low = window_extremes(torch.arange(16.0).reshape(1, 1, 4, 4), 2)
        >>> high[0, 0].tolist(), low[0, 0].tolist()
        ([[5.0, 7.0], [13.0, 15.0]], [[0.0, 2.0], [8.0, 10.0]])
    """
    check_image_batch(images)
    k = _check_kernel(kernel_size)
    b, c = images.shape[:2]
    h, w = check_poolable(images, k)
    windows = images[:, :, : h * k, : w * k]
    if windows.dtype == torch.uint16:
        windows = windows.to(torch.int32)
    windows = windows.reshape(b, c, h, k, w, k)
    # The window's rows first: an elementwise max of k whole image rows (contiguous,
    # vectorised), then k neighbours in the k-times smaller result. Reducing the short
    # contiguous axis first took 4x as long (uint8 1536x2836 on 2 cores: 0.9 against
    # 3.4 ms per image; benchmarks/speed.py's pool column).
    return windows.amax(dim=3).amax(dim=4), windows.amin(dim=3).amin(dim=4)


def _check_kernel(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise DACInputError(f"kernel_size: expected an int >= 1, got {kernel_size!r}")
    return kernel_size


class MaxMinPool(nn.Module):
    """Module form of :func:`max_min_pool`.

    Examples:
        >>> MaxMinPool(10)(torch.rand(2, 1, 40, 60)).shape
        torch.Size([2, 1, 4, 6])
    """

    def __init__(self, kernel_size: int = 10) -> None:
        super().__init__()
        self.kernel_size = _check_kernel(kernel_size)

    def forward(self, images: Tensor) -> Tensor:
        return max_min_pool(images, self.kernel_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"
