"""``DACropd``: DAC as an invertible MONAI dictionary transform (needs the optional ``monai``).

Axes: MONAI arrays are channel-first, ``[C, d1, d2]``. MONAI's readers (``LoadImage``
with the PyDICOM, ITK, PIL or NiBabel reader) put the image's x axis (columns,
left to right; for DICOM the row direction, along ``ImageOrientationPatient[:3]``) first:
``[C, X, Y]`` = ``[C, W, H]``, the transpose of torchvision's ``[C, H, W]``. ``DACropd``
therefore reads arrays as ``spatial_axes="xy"`` by default; pass ``"yx"`` for arrays
in ``[C, H, W]`` order (``LoadImage(reverse_indexing=False)``, arrays made with numpy
or torch). Either way ``output_size`` = (H_out, W_out) and boxes are in the image as
displayed (rows = y, columns = x), as everywhere in ``dac``: an ``"xy"`` crop has the
array shape ``[C, W_out, H_out]``.
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._checks import DACInputError, check_dtype, check_poolable, check_unit_range
from ..layer import DACrop
from .mapping import MODES, _resample, heatmap_to_original

try:
    from monai.config import KeysCollection
    from monai.data.meta_obj import get_track_meta
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms.inverse import InvertibleTransform, TraceableTransform
    from monai.transforms.transform import MapTransform
    from monai.utils import TraceKeys, convert_to_tensor, ensure_tuple_rep
except ImportError as error:  # monai is an optional extra
    _MONAI_ERROR: ImportError | None = error
else:
    _MONAI_ERROR = None

__all__ = ["DACropd"]

SPATIAL_AXES = ("xy", "yx")

if _MONAI_ERROR is None:

    class DACropd(MapTransform, InvertibleTransform):
        """Crop the images of a MONAI dictionary to the region DAC finds, invertibly.

        The box is found once per sample, by :meth:`dac.DACrop.locate` on
        ``data[source_key]``, and every key of ``keys`` is cropped with it and resized to
        ``output_size`` (aspect kept): ``"bilinear"`` keys with DAC's anti-aliased crop
        (:func:`dac.functional.crop_resize`; float out: the input's floating dtype, float32
        for integers, values not rescaled), ``"nearest"`` keys (labels) with the input
        pixel each output pixel's centre falls in (dtype and values kept). Each output
        is a ``MetaTensor`` whose affine maps its voxels to the same world points as the
        input's (``affine_out = affine_in @ A``, ``A`` the crop's scale and shift), and
        whose ``applied_operations`` records the box, so that :meth:`inverse`, MONAI's
        ``Compose.inverse`` and ``Invertd`` put data on the crop's grid (e.g. a
        segmentation predicted there) back on the original grid: shape and affine
        restored exactly, values resampled in the mode recorded (``Invertd`` with
        ``nearest_interp=True`` makes it ``"nearest"``), 0 outside the box.

        The search sees ``data[source_key]`` min–max scaled to [0, 1] (``scale_source``):
        MONAI loaders give stored values (DICOM pixel values, HU), not [0, 1]. It runs
        under ``torch.no_grad()``. The box is not rounded to whole pixels (the affine
        carries the fraction). 2D only: arrays ``[C, d1, d2]``; see the module docstring
        for which axis is which (``spatial_axes``).

        Convention: the box is xyxy in the displayed image's pixels (x = columns,
        pixel ``i`` covers ``[i, i + 1)``), whatever ``spatial_axes``.

        Args:
            keys: the keys to crop (MONAI's ``KeysCollection``).
            output_size: (H_out, W_out) of the crop in the displayed image (rows, columns).
            pool_size: DAC's pooling window k (paper: 10).
            source_key: the key whose image the box is found on (default: the first of ``keys``);
                Tensor[C, d1, d2] with C = 1 or 3.
            mode: ``"bilinear"`` or ``"nearest"``, one for all keys or one per key.
            spatial_axes: ``"xy"`` (MONAI's readers: ``[C, X, Y]``) or ``"yx"`` (``[C, H, W]``).
            scale_source: min–max scale the source image to [0, 1] for the search (default
                True); False: the source must be integer or floating in [0, 1], as for
                :class:`dac.DACrop`.
            box_key: the key that receives the box (Tensor[4] float64 xyxy in the source's
                displayed pixels); None: do not add it.
            saliency: optional learned saliency stage for :class:`dac.DACrop`.
            allow_missing_keys: do not raise for keys of ``keys`` missing from the data.
            **dac_options: further keyword arguments of :class:`dac.DACrop`.

        Raises:
            DACInputError: naming the key: a missing ``source_key``, an array that is not
                2D channel-first, a key whose spatial shape differs from the source's.

        Examples:
            >>> from monai.data import MetaTensor
            >>> t = DACropd(["image", "label"], (20, 37), 4, mode=("bilinear", "nearest"))
            >>> d = t({"image": MetaTensor(torch.rand(1, 160, 96)),
            ...        "label": MetaTensor(torch.zeros(1, 160, 96, dtype=torch.uint8))})
            >>> d["image"].shape, d["label"].shape, t.inverse(d)["label"].shape
            (torch.Size([1, 37, 20]), torch.Size([1, 37, 20]), torch.Size([1, 160, 96]))
        """

        backend = ["torch"]

        def __init__(
            self,
            keys: KeysCollection,
            output_size: Sequence[int] = (200, 370),
            pool_size: int = 10,
            *,
            source_key: Hashable | None = None,
            mode: str | Sequence[str] = "bilinear",
            spatial_axes: str = "xy",
            scale_source: bool = True,
            box_key: Hashable | None = "crop_box",
            saliency: nn.Module | None = None,
            allow_missing_keys: bool = False,
            **dac_options: Any,
        ) -> None:
            MapTransform.__init__(self, keys, allow_missing_keys)
            self.dac = DACrop(output_size, pool_size, saliency=saliency, **dac_options)
            self.output_size = self.dac.output_size
            self.source_key = self.keys[0] if source_key is None else source_key
            self.mode = ensure_tuple_rep(mode, len(self.keys))
            for m in self.mode:
                if m not in MODES:
                    raise DACInputError(f"mode: expected one of {MODES} (or one per key), got {mode!r}")
            if spatial_axes not in SPATIAL_AXES:
                raise DACInputError(f"spatial_axes: expected one of {SPATIAL_AXES}, got {spatial_axes!r}")
            self.spatial_axes = spatial_axes
            self.scale_source = bool(scale_source)
            self.box_key = box_key

        def __repr__(self) -> str:
            return (
                f"{type(self).__name__}(keys={self.keys}, output_size={self.output_size}, "
                f"pool_size={self.dac.pool_size}, source_key={self.source_key!r}, mode={self.mode}, "
                f"spatial_axes={self.spatial_axes!r}, scale_source={self.scale_source})"
            )

        def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
            """Crop ``data[key]`` for every key of ``keys`` with the box found on ``data[source_key]``.

            Args:
                data: a mapping of key -> Tensor/MetaTensor/ndarray [C, d1, d2].

            Returns:
                A new dict: the cropped keys as ``MetaTensor`` [C, d1', d2'] (plain tensors
                when MONAI's ``set_track_meta(False)``), and ``box_key`` -> the box.
            """
            d = dict(data)
            if self.source_key not in d:
                raise DACInputError(
                    f"[{self.source_key!r}]: source_key not in the data (keys: {sorted(map(str, d))})"
                )
            source = self._as_hw(d[self.source_key], self.source_key)
            box = self._locate(source, self.source_key)
            for key, mode in self.key_iterator(d, self.mode):
                d[key] = self._crop(d[key], key, box, mode, tuple(source.shape[-2:]))
            if self.box_key is not None:
                d[self.box_key] = box
            return d

        def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
            """Put every key of ``keys`` back on the grid it had before this transform.

            Args:
                data: a mapping whose ``keys`` are MetaTensors carrying this transform's
                    record last in ``applied_operations`` (``Invertd`` arranges that).

            Returns:
                A new dict: those keys on the original grid (shape and affine as before),
                resampled in the recorded mode, 0 outside the crop's box.
            """
            d = dict(data)
            for key in self.key_iterator(d):
                d[key] = self._invert(d[key], key)
            return d

        # ------------------------------------------------------------------ internal
        def _as_hw(self, image: Any, key: Hashable) -> Tensor:
            """A channel-first 2D array as a plain Tensor[C, H, W] (display orientation)."""
            image = convert_to_tensor(image, track_meta=False)
            if image.ndim != 3 or image.numel() == 0:
                raise DACInputError(
                    f"[{key!r}]: expected a channel-first 2D image [C, d1, d2], got shape {tuple(image.shape)} "
                    "(add EnsureChannelFirstd; 3D volumes are not supported)"
                )
            return image.transpose(-1, -2) if self.spatial_axes == "xy" else image

        def _locate(self, source: Tensor, key: Hashable) -> Tensor:
            name = f"[{key!r}]"  # the search's own checks below, naming the key rather than "images"
            if source.shape[0] not in (1, 3):
                raise DACInputError(f"{name}: the source image needs 1 or 3 channels, got shape {tuple(source.shape)}")
            check_poolable(source, self.dac.pool_size, name)
            image = source
            if not self.scale_source:
                check_dtype(source, name)
                check_unit_range(source, name)
            else:  # any real dtype: scaled as floats
                image = source.to(torch.float64 if source.dtype == torch.float64 else torch.float32)
                check_dtype(image, name)  # finite
                low, high = image.min(), image.max()
                image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
            with torch.no_grad():
                return self.dac.locate(image[None])[0].detach().to(torch.float64).cpu()

        def _crop(self, image: Any, key: Hashable, box: Tensor, mode: str, source_size: tuple[int, int]) -> Any:
            image = convert_to_tensor(image, track_meta=get_track_meta())
            hw = self._as_hw(image, key)
            if tuple(hw.shape[-2:]) != source_size:
                raise DACInputError(
                    f"[{key!r}]: image of (H, W) {tuple(hw.shape[-2:])}, but the source "
                    f"[{self.source_key!r}] is {source_size}: the box would land elsewhere"
                )
            out = _resample(hw[None], box[None].to(hw.device), self.output_size, mode, 0.0)[0]
            out = out.transpose(-1, -2) if self.spatial_axes == "xy" else out
            orig_size = tuple(int(s) for s in image.shape[1:])
            extra_info: dict[str, Any] = {"box": box.tolist(), "mode": mode, "output_size": list(self.output_size)}
            if isinstance(image, MetaTensor):
                # As MONAI's SpatialResample: the inverse restores this affine exactly.
                extra_info["src_affine"] = image.peek_pending_affine().to(torch.float64).clone()
            meta = TraceableTransform.track_transform_meta(
                image,
                sp_size=tuple(out.shape[1:]),
                affine=self._crop_affine(box),
                extra_info=extra_info,
                orig_size=orig_size,
                transform_info=self.get_transform_info(),
                lazy=False,
            )
            if isinstance(image, MetaTensor):
                out = MetaTensor(out).copy_meta_from(meta)
            return out

        def _crop_affine(self, box: Tensor) -> Tensor:
            """A (3, 3) float64: crop voxel index (d1, d2) -> source voxel index, homogeneous."""
            out_h, out_w = self.output_size
            sx, sy = (float(box[2]) - float(box[0])) / out_w, (float(box[3]) - float(box[1])) / out_h
            # Output pixel o's centre lies at x1 + (o + 0.5) sx in continuous coordinates,
            # i.e. at index x1 + (o + 0.5) sx - 0.5 (pixel i's centre is index i).
            tx, ty = float(box[0]) + 0.5 * sx - 0.5, float(box[1]) + 0.5 * sy - 0.5
            scale, shift = ((sx, sy), (tx, ty)) if self.spatial_axes == "xy" else ((sy, sx), (ty, tx))
            return torch.tensor(
                [[scale[0], 0.0, shift[0]], [0.0, scale[1], shift[1]], [0.0, 0.0, 1.0]], dtype=torch.float64
            )

        def _invert(self, image: Any, key: Hashable) -> Any:
            if not isinstance(image, MetaTensor):
                raise DACInputError(
                    f"[{key!r}]: inverse needs a MetaTensor carrying this transform's record (applied_operations)"
                )
            transform = self.pop_transform(image)
            info = transform[TraceKeys.EXTRA_INFO]
            box = torch.as_tensor(info["box"], dtype=torch.float64).reshape(4)
            orig_size = [int(s) for s in transform[TraceKeys.ORIG_SIZE]]
            image_size = (orig_size[1], orig_size[0]) if self.spatial_axes == "xy" else tuple(orig_size)
            hw = self._as_hw(image, key)
            out = heatmap_to_original(hw, box.to(hw.device), image_size, mode=str(info["mode"]))
            out = out.transpose(-1, -2) if self.spatial_axes == "xy" else out
            with self.trace_transform(False):
                meta = TraceableTransform.track_transform_meta(
                    image,
                    sp_size=orig_size,
                    affine=torch.linalg.inv(self._crop_affine(box)),
                    orig_size=tuple(image.shape[1:]),
                    transform_info=self.get_transform_info(),
                    lazy=False,
                )
            out = MetaTensor(out).copy_meta_from(meta)
            if "src_affine" in info:  # the same matrix up to rounding; restore it bit for bit
                out.affine = torch.as_tensor(info["src_affine"], dtype=torch.float64).reshape(out.affine.shape)
            return out

else:

    class DACropd:  # type: ignore[no-redef]
        """Stand-in for MONAI's ``DACropd`` when MONAI is not installed: raises on use."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(
                "dac.transforms.DACropd needs MONAI: pip install 'dac[monai]' (or pip install monai)"
            ) from _MONAI_ERROR
