"""``AutoCrop``: DAC as a torchvision v2 transform that moves every tv_tensor of a sample.

torchvision's rules apply (``torchvision/transforms/v2/_transform.py``): the sample is any
nest of tuples, lists and dicts; ``make_params`` runs once per sample (here: the DAC
search on the image) and ``transform`` once per leaf, by type. The image is a
``tv_tensors.Image``, a PIL image, or, when the sample has neither, its first plain
tensor (depth first); other plain tensors, strings and numbers pass through unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as F

from .._checks import INTEGER_IMAGE_SCALE, DACInputError, check_dense, check_dtype, check_poolable, check_unit_range
from ..functional.crop import crop_resize
from ..layer import DACrop

__all__ = ["AutoCrop"]

# Pillow's 16-bit gray modes (a 16-bit PNG opens as I;16) and their numpy dtypes (byte order).
_UINT16_MODES = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}
_PIL_MODES = ("L", "RGB", *_UINT16_MODES)

# Box formats whose boxes have a fixed orientation (torchvision's rotated formats are refused).
_AXIS_ALIGNED = (tv_tensors.BoundingBoxFormat.XYXY, tv_tensors.BoundingBoxFormat.XYWH, tv_tensors.BoundingBoxFormat.CXCYWH)


class AutoCrop(Transform):
    """Crop a sample to the region of interest DAC finds in its image, resized to ``output_size``.

    Per sample (``make_params``): :meth:`dac.DACrop.locate` finds the box on the image
    (aspect ``H_out / W_out``, so the resize keeps the aspect ratio); the box is rounded
    to whole pixels (each edge moves by at most 0.5 px) so that every tv_tensor follows it
    exactly. Per input (``transform``):

    * the image (``tv_tensors.Image``, PIL image, or plain tensor, torchvision's rule):
      cropped and resized by :func:`dac.functional.crop_resize` (anti-aliased triangle
      filter), dtype kept: ``uint8``/``uint16``/``int16`` in, the same out (rounded), PIL
      in, PIL out (modes L, RGB and 16-bit gray ``I;16``, as a 16-bit PNG opens, each
      returned in its own mode), floats in [0, 1] in, the same float dtype out;
    * ``BoundingBoxes``: torchvision's ``resized_crop`` kernel on the same box, format
      (XYXY, XYWH, CXCYWH) kept, clipped to the crop as the boxes' ``clamping_mode`` says
      (default ``"soft"``: clipped), ``canvas_size`` set to ``output_size``; boxes wholly
      outside the crop become empty (follow with ``v2.SanitizeBoundingBoxes``);
    * ``Mask``: torchvision's ``resized_crop`` kernel (nearest), labels unchanged;
    * ``KeyPoints``: moved and scaled the same way (points outside the crop stay outside);
    * anything else passes through.

    Against ``torchvision.transforms.v2.functional.resized_crop`` on the same box: boxes,
    masks and key points are identical (the same kernels); images agree to float
    rounding (1 level for integers) except in the outermost output rows and columns (one
    per side when shrinking; ``ceil((k - 1) / 2)`` when growing k-fold), where DAC's
    filter reads the image pixels just outside the box and torchvision's, which cuts the
    box out first, does not.

    The box comes back with the sample: when the sample is a dict, or a tuple
    ``(image, target)`` whose target is a dict (torchvision's detection convention),
    that dict gets ``crop_key`` -> ``{"box": Tensor[4] float32 xyxy in the original
    image's pixels, "image_size": Tensor[2] int64 (H, W) of the original}``, which
    :func:`dac.transforms.boxes_to_original` and friends take to map results back.

    Convention: boxes are xyxy in input pixels (pixel ``i`` covers ``[i, i + 1)``).

    Errors (:class:`dac.DACInputError`, naming the sample's key, e.g. ``['mask']``): no
    image in the sample; a video; an image that is not [C, H, W] with C = 1 or 3, or a
    float image outside [0, 1]; images, masks, boxes (``canvas_size``) or key points of
    another size than the image; rotated box formats; boxes that, read in their declared
    format, do not lie in the image (1 px slack) with x1 <= x2, y1 <= y2 (a wrong
    ``format``, caught where it shows); a sample that already holds ``crop_key``.

    Args:
        output_size: (H_out, W_out) of the crop (paper: 200 x 370).
        pool_size: DAC's pooling window k (paper: 10).
        saliency: optional learned saliency stage (an ``nn.Module`` as
            :class:`dac.DACrop` takes, e.g. :class:`dac.saliency.SaliencyNet`).
        crop_key: the key that receives the box in dict samples; None: do not add it.
        **dac_options: further keyword arguments of :class:`dac.DACrop` (``sharpness``,
            ``r_min_fraction``, ``antialias``, ...).

    Examples:
        >>> from torchvision import tv_tensors
        >>> sample = {"image": tv_tensors.Image(torch.rand(1, 96, 160)),
        ...           "mask": tv_tensors.Mask(torch.zeros(96, 160, dtype=torch.uint8))}
        >>> out = AutoCrop(output_size=(20, 37), pool_size=4)(sample)
        >>> out["image"].shape, out["mask"].shape, out["crop"]["box"].shape
        (torch.Size([1, 20, 37]), torch.Size([20, 37]), torch.Size([4]))
    """

    def __init__(
        self,
        output_size: Sequence[int] = (200, 370),
        pool_size: int = 10,
        *,
        saliency: nn.Module | None = None,
        crop_key: str | None = "crop",
        **dac_options: Any,
    ) -> None:
        super().__init__()
        self.dac = DACrop(output_size, pool_size, saliency=saliency, **dac_options)
        self.output_size = self.dac.output_size
        if crop_key is not None and not isinstance(crop_key, str):
            raise DACInputError(f"crop_key: expected a string or None, got {crop_key!r}")
        self.crop_key = crop_key

    # ----------------------------------------------------------------- torchvision hooks
    def forward(self, *inputs: Any) -> Any:
        """Transform a sample (any nest of tuples, lists, dicts); see the class docstring.

        torchvision's ``Transform.forward``, plus the leaves' names for error messages and
        the box added under ``crop_key``.
        """
        sample = inputs if len(inputs) > 1 else inputs[0]
        leaves, spec = tree_flatten_with_path(sample)
        flat = [leaf for _, leaf in leaves]
        names = [keystr(path) or "sample" for path, _ in leaves]
        needs = self._needs_transform_list(flat)
        params = self._make_params_named([(n, x) for n, x, need in zip(names, flat, needs) if need])
        out = [self.transform(x, params) if need else x for x, need in zip(flat, needs)]
        return self._add_box(tree_unflatten(out, spec), params)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Find the crop box on the image among ``flat_inputs`` (checked first).

        Args:
            flat_inputs: the sample's leaves that need transforming (torchvision's rule).

        Returns:
            dict with ``box`` (Tensor[4] float32 xyxy, whole pixels), ``top``, ``left``,
            ``height``, ``width`` (ints: the same box as torchvision's ``resized_crop``
            takes it) and ``image_size`` (H, W).

        Examples:
            >>> AutoCrop((20, 37), 4).make_params([torch.zeros(1, 96, 160)])["box"]
            tensor([ 10.,  10., 150.,  86.])
        """
        return self._make_params_named([(f"input {i}", x) for i, x in enumerate(flat_inputs)])

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Crop one input with the box of ``params`` (from :meth:`make_params`).

        Args:
            inpt: an image (tv_tensors.Image, PIL image or plain Tensor[C, H, W]), Mask,
                BoundingBoxes or KeyPoints; other types pass through.
            params: from :meth:`make_params`.

        Returns:
            The input cropped to ``params["box"]`` and resized to ``output_size``, its type
            (and for images its dtype) kept.

        Examples:
            >>> t = AutoCrop((20, 37), 4)
            >>> image = torch.rand(1, 96, 160)
            >>> t.transform(image, t.make_params([image])).shape
            torch.Size([1, 20, 37])
        """
        if isinstance(inpt, PIL.Image.Image):
            return _tensor_to_pil(self._crop_image(_pil_to_tensor(inpt), params), inpt.mode)
        if isinstance(inpt, (tv_tensors.BoundingBoxes, tv_tensors.Mask, tv_tensors.KeyPoints)):
            kwargs = {k: params[k] for k in ("top", "left", "height", "width")}
            return self._call_kernel(F.resized_crop, inpt, **kwargs, size=list(self.output_size))
        if isinstance(inpt, tv_tensors.Image):
            return tv_tensors.wrap(self._crop_image(inpt.as_subclass(Tensor), params), like=inpt)
        if _is_plain_tensor(inpt):
            return self._crop_image(inpt, params)
        return inpt

    # ------------------------------------------------------------------------- internal
    def _make_params_named(self, named: list[tuple[str, Any]]) -> dict[str, Any]:
        name, image = self._check_sample(named)
        with torch.no_grad():
            box = self.dac.locate(image[None].detach())[0]
        height, width = image.shape[-2:]
        # Whole pixels (edges rounded half up), inside the image, at least one pixel wide.
        x1, y1, x2, y2 = (math.floor(float(v) + 0.5) for v in box)
        x1, x2 = min(max(x1, 0), width - 1), min(max(x2, 1), width)
        y1, y2 = min(max(y1, 0), height - 1), min(max(y2, 1), height)
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        return {
            "box": torch.tensor([x1, y1, x2, y2], dtype=torch.float32),
            "top": y1, "left": x1, "height": y2 - y1, "width": x2 - x1,
            "image_size": (int(height), int(width)),
        }

    def _check_sample(self, named: list[tuple[str, Any]]) -> tuple[str, Tensor]:
        """The first image (its name and Tensor[C, H, W]) after checking every leaf against it."""
        images = []
        for name, x in named:
            if isinstance(x, tv_tensors.Video):
                raise DACInputError(f"{name}: AutoCrop does not crop videos (one box per frame is not defined); "
                                    "crop the frames one by one")
            if isinstance(x, PIL.Image.Image):
                if x.mode not in _PIL_MODES:
                    raise DACInputError(
                        f"{name}: PIL images must be mode L, RGB or 16-bit gray (I;16), got mode {x.mode!r}; "
                        "pass other images as tensors (integer, or floating in [0, 1])"
                    )
                images.append((name, _pil_to_tensor(x)))
            elif isinstance(x, tv_tensors.Image) or _is_plain_tensor(x):
                check_dense(x, name)
                images.append((name, x.as_subclass(Tensor)))
        if not images:
            raise DACInputError(
                "sample: no image found (a tv_tensors.Image, a PIL image, or a plain tensor when the sample has neither)"
            )
        name, image = images[0]
        size = tuple(image.shape[-2:])
        for other, x in images:
            if x.ndim != 3 or x.shape[0] not in (1, 3):
                raise DACInputError(f"{other}: expected an image [C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}")
            if tuple(x.shape[-2:]) != size:
                raise DACInputError(f"{other}: image of size {tuple(x.shape[-2:])}, but {name} is {size} (H, W)")
            check_dtype(x, other)
            check_unit_range(x, other)
        check_poolable(image, self.dac.pool_size, name)
        for other, x in named:
            if isinstance(x, tv_tensors.Mask) and tuple(x.shape[-2:]) != size:
                raise DACInputError(f"{other}: mask of size {tuple(x.shape[-2:])}, but the image {name} is {size} (H, W)")
            if isinstance(x, (tv_tensors.BoundingBoxes, tv_tensors.KeyPoints)) and tuple(x.canvas_size) != size:
                raise DACInputError(
                    f"{other}: canvas_size {tuple(x.canvas_size)}, but the image {name} is {size} (H, W)"
                )
            if isinstance(x, tv_tensors.BoundingBoxes):
                _check_box_values(x, other)
        return name, image

    def _crop_image(self, image: Tensor, params: dict[str, Any]) -> Tensor:
        """Tensor[C, H, W] -> Tensor[C, H_out, W_out] in the input's dtype."""
        box = params["box"].to(device=image.device)
        if image.dtype == torch.float64:
            box = box.double()
        crop = crop_resize(image[None], box[None], self.output_size, antialias=self.dac.antialias)[0]
        if image.dtype.is_floating_point:
            return crop
        scale = INTEGER_IMAGE_SCALE[image.dtype]
        info = torch.iinfo(image.dtype)
        return (crop * scale).round().clamp(info.min, info.max).to(image.dtype)

    def _add_box(self, sample: Any, params: dict[str, Any]) -> Any:
        if self.crop_key is None:
            return sample
        target = sample
        if isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], dict):
            target = sample[1]
        if not isinstance(target, dict):
            return sample
        if self.crop_key in target:
            raise DACInputError(
                f"[{self.crop_key!r}]: the sample already holds the key {self.crop_key!r} (cropped twice?); "
                "pass AutoCrop(crop_key=...) another name, or None"
            )
        target[self.crop_key] = {
            "box": params["box"].clone(),
            "image_size": torch.tensor(params["image_size"], dtype=torch.int64),
        }
        return sample


def _pil_to_tensor(image: PIL.Image.Image) -> Tensor:
    """Tensor[C, H, W] of a PIL image of ``_PIL_MODES``: uint8, or uint16 for the I;16 modes
    (torchvision's ``pil_to_tensor`` refuses big-endian I;16B)."""
    if image.mode in _UINT16_MODES:
        return torch.from_numpy(np.asarray(image).astype(np.uint16))[None]
    return F.pil_to_tensor(image)


def _tensor_to_pil(image: Tensor, mode: str) -> PIL.Image.Image:
    """The PIL image of mode ``mode`` holding Tensor[C, H, W] (uint8, or uint16 for I;16 modes)."""
    if mode in _UINT16_MODES:
        height, width = image.shape[-2:]
        return PIL.Image.frombytes(mode, (width, height), image[0].numpy().astype(_UINT16_MODES[mode]).tobytes())
    return F.to_pil_image(image)


def _is_plain_tensor(x: Any) -> bool:
    return isinstance(x, Tensor) and not isinstance(x, tv_tensors.TVTensor)


def _check_box_values(boxes: tv_tensors.BoundingBoxes, name: str) -> None:
    """Boxes read in their declared format must lie in the canvas with x1 <= x2, y1 <= y2."""
    if boxes.format not in _AXIS_ALIGNED:
        raise DACInputError(f"{name}: box format {boxes.format.name} is not supported (rotated); use XYXY, XYWH or CXCYWH")
    if boxes.shape[-1] != 4:
        raise DACInputError(f"{name}: expected boxes [..., 4], got shape {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    values = boxes.as_subclass(Tensor).double()
    if not torch.isfinite(values).all():
        raise DACInputError(f"{name}: boxes contain NaN or Inf values")
    xyxy = F.convert_bounding_box_format(
        values, old_format=boxes.format, new_format=tv_tensors.BoundingBoxFormat.XYXY
    ).reshape(-1, 4)
    height, width = boxes.canvas_size
    slack = 1.0
    bad = (
        (xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1])
        | (xyxy[:, 0] < -slack) | (xyxy[:, 1] < -slack)
        | (xyxy[:, 2] > width + slack) | (xyxy[:, 3] > height + slack)
    )
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise DACInputError(
            f"{name}: box {i} = {values.reshape(-1, 4)[i].tolist()} read as {boxes.format.name} is "
            f"{[round(v, 3) for v in xyxy[i].tolist()]} in xyxy, not inside the {height}x{width} image with "
            "x1 <= x2 and y1 <= y2; is the format the one declared?"
        )
