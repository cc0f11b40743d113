"""Reading and writing image files: PNG, JPEG, TIFF, BMP through Pillow, DICOM through pydicom.

:func:`read_image` returns a ``Tensor[C, H, W]`` (C = 1 or 3) in the file's own numeric
type; :func:`to_unit_float` is *the* conversion to the floats in [0, 1] that
:class:`dac.DACrop` expects; :func:`to_gray8` is the paper's conversion of every archive
image (16, 24 and 32-bit files) to 8-bit grayscale; :func:`write_png` writes a PNG
atomically. A file that cannot be read raises :class:`ImageReadError` (an ``OSError``)
whose ``reason`` says why, so a caller can record it and go on to the next file.

DICOM needs the optional ``pydicom`` (>= 3.0) package; it is imported only when a DICOM
file is read. DICOM images are shown as a viewer shows them: the modality LUT (rescale)
and then the file's VOI LUT or window (centre / width) are applied by default
(``dicom="window"``); ``dicom="range"`` turns windowing off and ``dicom="percentiles"``
stretches each image between two percentiles. ``read_image(..., return_intensity=True)``
also says, in words, how the file's values became [0, 1].
"""
from __future__ import annotations

import contextlib
import errno
import io as _io
import os
import stat
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor

from .._checks import INTEGER_IMAGE_SCALE, DACInputError, check_bits, check_choice, check_percentiles, check_unit_range
from .._files import atomic_write
from ..functional.pooling import to_unit_range

__all__ = [
    "DICOM_INTENSITY",
    "FAINT_BELOW",
    "IMAGE_SUFFIXES",
    "INTEGER_BIT_DEPTHS",
    "ImageReadError",
    "READ_FORMAT",
    "looks_like_dicom",
    "probe_image",
    "read_file",
    "read_image",
    "read_input",
    "read_settings",
    "to_gray8",
    "to_unit_float",
    "write_overlay",
    "write_png",
]

#: Lower-case file suffixes :func:`read_image` accepts (for scanning folders).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})

_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")  #: where a DICOM file keeps its image

#: ITU-R BT.601 luma weights (R, G, B): Pillow's "L" conversion.
_LUMA = (0.299, 0.587, 0.114)
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
#: A 16-bit PNG/TIFF whose largest value is below this (under 1/8 of its range) is read
#: as stored, but its intensity text carries a warning (12-bit data stored raw, say).
FAINT_BELOW = 2**13
#: Bit depths a 32-bit integer image is scaled by: the smallest that holds its values.
INTEGER_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
#: Version of how :func:`read_input` turns a file into a tensor: part of every settings
#: key of ``dac crop`` and ``dac predict``, so a change here processes archives again.
READ_FORMAT = 1
#: How a monochrome DICOM image's values become [0, 1] (``read_image(dicom=...)``):
#: the file's VOI LUT or window (a viewer's default), the range its stored bits allow,
#: or a stretch between two percentiles of the image.
DICOM_INTENSITY = ("window", "range", "percentiles")


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """Whether a file that a folder search would pass over is DICOM: its name has no
    suffix or a numeric one (PACS exports: ``IM0001``, ``1.2.840.10008.5``) and it holds
    DICOM's ``b"DICM"`` marker at byte 128. Files named as another type (``.txt``,
    ``.json``) are not opened; others are opened as :func:`read_file` opens them (never
    waiting on a FIFO; only regular files read). A file that cannot be read is not taken
    for DICOM."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1]
    if suffix and not suffix[1:].isdigit():
        return False
    try:
        with _opened(path) as file:
            return file.read(132)[128:132] == b"DICM"
    except ImageReadError:
        return False


class ImageReadError(OSError):
    """A file that cannot be read as an image; the message is ``"<path>: <reason>"``.

    Attributes:
        path: the path as given to :func:`read_image` (``os.fspath`` of it).
        reason: a short human string, e.g. ``"empty file (0 bytes)"``,
            ``"not an image or unsupported format"``, ``"truncated or corrupt image
            data"``, ``"DICOM pixel data cannot be decoded: <why>"``.

    Examples:
        >>> err = ImageReadError("scan.png", "empty file (0 bytes)")
        >>> str(err), err.reason
        ('scan.png: empty file (0 bytes)', 'empty file (0 bytes)')
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep path and reason across processes (multiprocessing)
        return type(self), (self.path, self.reason)


def read_image(
    path: str | os.PathLike,
    *,
    data: bytes | None = None,
    gray: bool = False,
    dicom: str = "window",
    percentiles: tuple[float, float] = (1.0, 99.0),
    return_intensity: bool = False,
) -> Tensor | tuple[Tensor, str]:
    """Read one image file into a Tensor[C, H, W] in the file's own numeric type.

    What comes back, by file:

    * 8-bit files (gray, RGB, palette, with alpha, CMYK, 1-bit): ``torch.uint8``, C = 1
      for gray and 1-bit files, C = 3 otherwise (palettes expand to RGB, alpha is
      dropped without compositing, CMYK and YCbCr are converted to RGB by Pillow).
    * 16-bit gray PNG/TIFF: ``torch.uint16``, C = 1, values as stored, so that they
      are scaled by 65535 downstream, as the PNG standard asks writers to fill the
      range. One rule for 12-bit data in 16-bit containers: a 16-bit image whose
      largest value is above 0 and below :data:`FAINT_BELOW` (2**13: it uses under 1/8
      of its range, as 12-bit data stored raw does, values up to 4095) is read the same
      way, and its intensity text says ``"16-bit; warning: values up to 4095 only,
      ..."`` (``dac crop`` and ``dac predict`` list such files): it reaches the search
      16 times darker than its 8-bit export, and the DAC cost depends on the intensity
      scale. Guessing the bits from each file's largest value was tried and dropped:
      it stretched every dark 16-bit image, dac's own 16-bit crops among them. DICOM
      says its bits (``BitsStored``) and is scaled by them (below); a 32-bit container
      is never filled, so its bits are detected. Pillow reads 16-bit-per-channel
      *colour* PNG/TIFF as 8-bit RGB, so those come back as ``torch.uint8``.
    * 32-bit integer TIFF (Pillow mode ``"I"``): ``torch.float32`` in [0, 1], C = 1,
      scaled by the bits the image holds: values are divided by ``2**n - 1`` where ``n``
      is the smallest of :data:`INTEGER_BIT_DEPTHS` (8, 10, 12, 14, 16, 24, 32) that
      holds the image's largest value, so 12-bit data stored in 32 bits (values up to
      4095) spans [0, 1] instead of turning black at 4095 / (2**31 - 1). An image with
      negative values (signed TIFF, ``SampleFormat`` 2) maps the signed range of ``n``
      bits, ``[-2**(n-1), 2**(n-1) - 1]``, to [0, 1], as DICOM does for signed pixels.
      Unsigned TIFFs (``SampleFormat`` 1 or absent) are read as unsigned, up to
      ``2**32 - 1``. The rule rounds up to a common bit depth rather than stretching
      each image to its own maximum, so images of one scanner keep one scale unless
      their brightest pixel falls below half of it.
    * 32-bit float TIFF (mode ``"F"``): ``torch.float32``, C = 1, values as stored (not
      clipped; expected in [0, 1], :func:`to_unit_float` clips).
    * DICOM (suffix ``.dcm``/``.dicom``, or ``b"DICM"`` at byte 128): ``torch.float32``
      in [0, 1], C = 1 or 3, read with pydicom. Monochrome images go through the
      modality LUT (rescale slope and intercept, or a Modality LUT Sequence), then, by
      ``dicom``:

      - ``"window"`` (default, what a viewer shows): the file's VOI LUT Sequence if it
        has one (its table read by pydicom), else its first window (Window Center /
        Width, with its VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID) through
        pydicom's ``apply_voi_lut``; the output range of the LUT or window is [0, 1]. A file
        without a VOI LUT or window, or with one pydicom refuses (a width below 1),
        is scaled as ``"range"``, and the intensity text says so.
      - ``"range"`` (no windowing): scaled by the range the stored bits allow
        (``BitsStored``, ``PixelRepresentation``) mapped through the rescale, so a
        12-bit scan is not stretched image by image (values outside that range, from
        a header that understates it, widen it); a negative slope flips it. Where that
        range is unknown (a Modality LUT Sequence, float pixel data) the image's own
        min and max are used.
      - ``"percentiles"``: the ``percentiles[0]`` and ``percentiles[1]`` percentiles
        of the image (after the modality LUT) become 0 and 1, values beyond them are
        clipped (a constant image falls back to ``"range"``).

      MONOCHROME1 is inverted afterwards so that higher is brighter. Colour images
      (YBR converted to RGB, PALETTE COLOR expanded to RGB) are scaled by their bits
      and never windowed. Only the first frame of a multi-frame file is read.

    Multi-page TIFFs and animations give their first frame. An EXIF Orientation
    (JPEG, PNG, TIFF; values 2 to 8) is applied, so the image comes back as a viewer
    shows it and boxes refer to that grid; the intensity text then ends in ``", EXIF
    orientation 6 applied"``.

    Every file is fully decoded here, with Pillow's ``LOAD_TRUNCATED_IMAGES`` treated as
    ``False`` and its decompression-bomb warning treated as an error, so a truncated or
    oversized file fails in this call (Pillow's ``Image.MAX_IMAGE_PIXELS``, about 89
    million pixels by default, is left as it is).

    Args:
        path: the image file (with ``data``: its name, for the suffix and messages).
        data: the file's bytes, read by the caller (:func:`read_file`) to decode exactly
            what it hashed; None (default): read here.
        gray: return one channel: RGB is reduced to ITU-R 601 luma (Pillow's ``"L"``
            conversion for 8-bit files; the same weights in float for DICOM).
        dicom: one of :data:`DICOM_INTENSITY`: how monochrome DICOM values become
            [0, 1] (other files are not affected).
        percentiles: (low, high), 0 <= low < high <= 100, for ``dicom="percentiles"``.
        return_intensity: also return a short text saying how the values were
            scaled, e.g. ``"8-bit"``, ``"32-bit integer as 12 bits"``, ``"DICOM window
            600/1600 (center/width, LINEAR)"``, ``"DICOM stored range -2048..2047 (no
            window in file)"``, ``"DICOM percentiles 1-99: 12..3400"``.

    Returns:
        Tensor[C, H, W] with C = 1 or 3, dtype as listed above; with
        ``return_intensity``, ``(image, intensity)``.

    Raises:
        DACInputError: ``dicom`` or ``percentiles`` is not one of the values above.
        ImageReadError: the file is missing, empty, not an image, truncated, too large,
            not a regular file (a directory, FIFO, socket or device: never opened for
            reading, so a FIFO cannot make the call wait), a dangling symbolic link or
            a symbolic link loop, or (DICOM) has no pixel data that can be decoded;
            ``.reason`` says which.

    Examples:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "ramp.png")
        ...     write_png(path, torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4))
        ...     read_image(path).shape, read_image(path).dtype
        (torch.Size([1, 3, 4]), torch.uint8)
    """
    check_choice(dicom, DICOM_INTENSITY, "dicom")
    percentiles = check_percentiles(percentiles)
    image, intensity = _read_any(os.fspath(path), data, gray, dicom, percentiles)
    return (image, intensity) if return_intensity else image


def read_input(path: str, data: bytes | None = None, *, gray: bool = False, gray8: bool = False, dicom: str = "window",
               percentiles: Sequence[float] = (1.0, 99.0)) -> tuple[Tensor, str]:
    """Read one input file as the commands (``dac crop``, ``dac predict``,
    ``dac fit-saliency --data``) do: ``(image, intensity)``.

    ``data``: the file's bytes where the caller read them (:func:`read_file`), so that
    they are decoded as they were hashed; None: read here.

    Integer images stay integer (a quarter of the memory of floats); floating ones
    (float TIFF) must lie in [0, 1], the range ``DACrop`` expects, within the layer's
    slack of 0.05, and are clipped to it: NaN, or values in 0..255 from a missing
    ``/ 255``, fail the file (clipped, they would crop a white image without a word);
    with ``gray8`` every image becomes 8-bit gray (:func:`to_gray8`).

    Raises:
        ImageReadError: the file cannot be read, or its values cannot be taken as they are.
    """
    image, intensity = read_image(path, data=data, gray=gray, dicom=dicom, percentiles=tuple(percentiles),
                                  return_intensity=True)
    try:
        if image.dtype.is_floating_point:
            check_unit_range(image, "image")  # NaN passes here; to_unit_float / to_gray8 refuse it
        if gray8:
            return to_gray8(image), intensity
        return (to_unit_float(image) if image.dtype.is_floating_point else image), intensity
    except DACInputError as exc:  # values that cannot be taken as they are: the file's reason
        raise ImageReadError(path, str(exc).removeprefix("image: ")) from None


def read_settings(*, gray: bool = False, gray8: bool = False, dicom: str = "window",
                  percentiles: Sequence[float] = (1.0, 99.0)) -> dict:
    """Every option of :func:`read_input` that changes what it returns, checked, as JSON
    (part of the settings key of ``dac crop`` and ``dac predict``, with :data:`READ_FORMAT`).

    Raises:
        DACInputError: ``dicom`` or ``percentiles`` is not one of the values :func:`read_image` takes.

    Examples:
        >>> read_settings(dicom="percentiles", percentiles=(5, 95))["percentiles"]
        [5.0, 95.0]
    """
    check_choice(dicom, DICOM_INTENSITY, "dicom")
    low, high = check_percentiles(percentiles)
    return ({"format": READ_FORMAT, "gray": bool(gray), "gray8": bool(gray8), "intensity": dicom}
            | ({"percentiles": [low, high]} if dicom == "percentiles" else {}))


def read_file(path: str | os.PathLike) -> bytes:
    """Every byte of one image file, read once: decode these bytes and hash these bytes,
    and the hash names what was decoded, whatever writes to the file meanwhile.

    Args:
        path: the file.

    Returns:
        Its contents.

    Raises:
        ImageReadError: the file is missing, empty, not a regular file (a directory,
            FIFO, socket or device: never opened for reading, so a FIFO cannot make the
            call wait), a dangling symbolic link, a link loop, or unreadable.

    Examples:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".png") as file:
        ...     _ = file.write(b"PNG"); file.flush()
        ...     read_file(file.name)
        b'PNG'
    """
    path = os.fspath(path)
    with _opened(path) as file:
        data = file.read()
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    return data


@contextlib.contextmanager
def _opened(path: str) -> Iterator:
    """A regular file opened for binary reading; every way that fails is an ImageReadError
    (see :func:`read_file`), OSErrors raised inside the block included."""
    try:
        # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(descriptor, "rb") as file:
            info = os.fstat(file.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise ImageReadError(path, "is a directory, not a file")
            if not stat.S_ISREG(info.st_mode):
                raise ImageReadError(path, "not a regular file (a FIFO, socket or device)")
            yield file
    except ImageReadError:
        raise
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageReadError(path, f"dangling symbolic link (to {os.readlink(path)!r}, which does not exist)") from None
        raise ImageReadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not a file") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except OSError as err:  # e.g. an I/O error from the disk
        if err.errno == errno.ELOOP:
            raise ImageReadError(path, "symbolic link loop") from None
        raise ImageReadError(path, f"cannot read file: {err.strerror or err}") from err


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file as :func:`read_image` returns it (EXIF
    orientation applied), from its header alone: no pixel is decoded, so an archive of
    thousands of files is checked in seconds before hours of work. (A PNG whose EXIF
    comes after its pixel data, which writers do not do, is given as stored.)

    Raises:
        ImageReadError: the file cannot be opened as :func:`read_file` says, is empty,
            is not an image Pillow or pydicom can open, or (DICOM) names no size. A
            file whose header is sound but whose pixel data are broken passes here and
            fails when read.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_png(os.path.join(folder, "a.png"), torch.zeros(1, 4, 6, dtype=torch.uint8))
        ...     probe_image(os.path.join(folder, "a.png"))
        (4, 6)
    """
    path = os.fspath(path)
    with _opened(path) as file:
        head = file.read(132)
        if not head:
            raise ImageReadError(path, "empty file (0 bytes)")
        file.seek(0)
        if os.path.splitext(path)[1].lower() in _DICOM_SUFFIXES or head[128:132] == b"DICM":
            return _probe_dicom(path, file)
        with _pillow_errors(path), Image.open(file) as image:
            width, height = image.size
            # Pillow decodes a PNG to look for an eXIf chunk after its pixels; one before
            # them (where writers put it) is read with the header.
            late = image.format == "PNG" and "exif" not in image.info
            orientation = 1 if late else _orientation(image)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)  # 5-8 turn the image a quarter


def _probe_dicom(path: str, file) -> tuple[int, int]:
    """(Rows, Columns) of a DICOM file's header (its pixel data not read)."""
    ds = _dcmread(path, file, defer_size=1024)  # large values (the pixels) skipped, not read
    if not any(k in ds for k in _PIXEL_TAGS):
        raise ImageReadError(path, "DICOM file has no pixel data")
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is not None and "PixelData" in ds:  # compressed pixels need a decoder plugin
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(syntax)
            available, missing = decoder.is_available, decoder.missing_dependencies
        except Exception as err:  # noqa: BLE001 - a transfer syntax pydicom has no decoder for
            available, missing = False, [_one_line(err)]
        if not available:
            raise ImageReadError(path, f"DICOM pixel data cannot be decoded: no decoder for {syntax.name} here "
                                       f"({'; '.join(missing)})")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise ImageReadError(path, "DICOM file names no image size (Rows, Columns)")
    return int(rows), int(columns)


def _read_any(path: str, data: bytes | None, gray: bool, dicom: str, percentiles: tuple[float, float]) -> tuple[Tensor, str]:
    """Decode ``data`` (the bytes of ``path``; read here when None)."""
    if data is None:
        data = read_file(path)
    elif not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    if os.path.splitext(path)[1].lower() in _DICOM_SUFFIXES or data[128:132] == b"DICM":
        return _read_dicom(path, data, gray, dicom, percentiles)
    return _read_pillow(path, _io.BytesIO(data), gray)


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Refuse truncated files and decompression bombs for the duration of one read.

    ``LOAD_TRUNCATED_IMAGES`` is a Pillow module global: it is switched off only when
    someone switched it on, and restored afterwards.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if previous:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            if previous:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous


@contextlib.contextmanager
def _pillow_errors(path: str) -> Iterator[None]:
    """Pillow strict (:func:`_strict_pillow`) for the block, and its failures as ImageReadErrors."""
    try:
        with _strict_pillow():
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(path, f"image too large (possible decompression bomb): {err}") from err
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image or unsupported format") from None
    except MemoryError:
        raise
    except Exception as err:  # Pillow reports broken data as OSError, SyntaxError, ValueError...
        raise ImageReadError(path, "truncated or corrupt image data") from err


def _read_pillow(path: str, file, gray: bool) -> tuple[Tensor, str]:
    with _pillow_errors(path):
        image = Image.open(file)
        image.load()  # decode everything now: a truncated file fails here
    unsigned = _is_unsigned_tiff(image)  # read from the TIFF's tags, which a transposed copy has not
    orientation = _orientation(image)
    try:
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        image = _normalise_mode(image, gray)
    except (ValueError, OSError) as err:
        raise ImageReadError(path, f"unsupported pixel mode {image.mode!r}") from err

    pixels = np.array(image)  # a writable copy, native byte order below
    intensity, warning = "8-bit", ""
    if image.mode in _UINT16_MODES:
        pixels, intensity = pixels.astype(np.uint16), "16-bit"
        largest = int(pixels.max()) if pixels.size else 0
        if 0 < largest < FAINT_BELOW:
            warning = (f"; warning: values up to {largest} only, under 1/8 of the 16-bit range (12-bit data?), "
                       "scaled by 65535 all the same")
    elif image.mode == "I":
        pixels, bits = _int32_to_unit(pixels.astype(np.int32), unsigned=unsigned)
        intensity = f"32-bit integer as {bits} bits"
    elif image.mode == "F":
        pixels, intensity = pixels.astype(np.float32), "float as stored"
    if orientation != 1:
        intensity += f", EXIF orientation {orientation} applied"
    tensor = torch.from_numpy(pixels)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()
    return tensor, intensity + warning


def _orientation(image: Image.Image) -> int:
    """The EXIF Orientation of ``image`` (1 to 8; 1, as stored, where absent or invalid)."""
    try:
        orientation = int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: pixels as stored
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _normalise_mode(image: Image.Image, gray: bool) -> Image.Image:
    """Pillow image in one of the modes ``L``, ``RGB``, ``I;16*``, ``I``, ``F``."""
    mode = image.mode
    if mode in _UINT16_MODES or mode in ("I", "F", "L"):
        return image
    if mode in ("P", "PA"):  # via RGBA: palettes with transparency warn when going to RGB
        image = image.convert("RGBA")
    target = "L" if gray or mode in _GRAY_MODES else "RGB"
    if gray and image.mode not in _GRAY_MODES and image.mode != "RGB":
        image = image.convert("RGB")  # CMYK, RGBA...: to RGB first, then luma
    return image.convert(target)


def _int32_to_unit(pixels: np.ndarray, unsigned: bool) -> tuple[np.ndarray, int]:
    """32-bit integer pixels to float32 in [0, 1] by the bits they hold (see read_image), and those bits."""
    values = (pixels.view(np.uint32) if unsigned else pixels).astype(np.float64)
    if not values.size:
        return values.astype(np.float32), 32
    smallest, largest = float(values.min()), float(values.max())
    if smallest >= 0:
        bits = next(b for b in INTEGER_BIT_DEPTHS if largest <= 2**b - 1)
        low, high = 0.0, float(2**bits - 1)
    else:
        bits = next(b for b in INTEGER_BIT_DEPTHS if -(2 ** (b - 1)) <= smallest and largest <= 2 ** (b - 1) - 1)
        low, high = -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    return ((values - low) / (high - low)).astype(np.float32), bits


def _is_unsigned_tiff(image: Image.Image) -> bool:
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return False
    sample_format = tags.get(339, 1)  # TIFF SampleFormat: 1 = unsigned, 2 = signed
    if isinstance(sample_format, tuple):
        sample_format = sample_format[0]
    return sample_format == 1


def _dcmread(path: str, file, **options: Any):
    """``pydicom.dcmread`` of an open file, its failures (pydicom missing included) as ImageReadErrors."""
    try:
        import pydicom
    except ImportError:
        raise ImageReadError(path, "pydicom is not installed (pip install pydicom)") from None
    try:
        return pydicom.dcmread(file, **options)
    except pydicom.errors.InvalidDicomError:
        raise ImageReadError(path, "not a DICOM file (no 'DICM' file meta header)") from None
    except MemoryError:
        raise
    except Exception as err:
        raise ImageReadError(path, f"unreadable DICOM file: {_one_line(err)}") from err


def _read_dicom(path: str, data: bytes, gray: bool, mode: str, percentiles: tuple[float, float]) -> tuple[Tensor, str]:
    try:
        import pydicom
    except ImportError:
        raise ImageReadError(path, "pydicom is not installed (pip install pydicom)") from None
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
    except ImportError:
        raise ImageReadError(
            path, f"pydicom >= 3.0 is needed to read DICOM (found {pydicom.__version__})"
        ) from None

    ds = _dcmread(path, _io.BytesIO(data))
    if not any(k in ds for k in _PIXEL_TAGS):
        raise ImageReadError(path, "DICOM file has no pixel data")

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        stored = pixel_array(ds, index=0)  # first frame only; YBR -> RGB
        if photometric == "PALETTE COLOR":
            stored = apply_color_lut(stored, ds)
    except MemoryError:
        raise
    except Exception as err:  # no decoder plugin, truncated pixel data, bad LUT...
        raise ImageReadError(path, f"DICOM pixel data cannot be decoded: {_one_line(err)}") from err

    if stored.ndim == 3:  # RGB (or palette expanded to RGB): unsigned samples
        if photometric == "PALETTE COLOR":  # LUT entries: 8 or 16 bits (descriptor[2])
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        else:
            bits = int(ds.get("BitsStored") or 8 * stored.dtype.itemsize)
        unit = stored.astype(np.float64) / float(2**bits - 1)
        intensity = f"DICOM colour {bits}-bit"
    else:
        try:
            values = apply_modality_lut(stored, ds)
        except MemoryError:
            raise
        except Exception as err:  # a broken Modality LUT Sequence
            raise ImageReadError(path, f"DICOM modality LUT cannot be applied: {_one_line(err)}") from err
        finite = np.isfinite(values)
        if not finite.all():  # float pixel data: one NaN would make every scaled pixel NaN
            raise ImageReadError(path, f"DICOM pixel data holds {int((~finite).sum())} NaN or infinite values")
        unit, intensity = None, ""
        if mode == "window":
            unit, intensity = _dicom_window(values, ds)
        elif mode == "percentiles":
            unit, intensity = _dicom_percentiles(values, percentiles)
        if unit is None:
            unit, scaled = _dicom_gray_to_unit(np.asarray(values, dtype=np.float64), stored, ds)
            intensity = f"DICOM {scaled}" + (f" ({intensity})" if intensity else "")
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
            intensity += ", MONOCHROME1 inverted"
    image = torch.from_numpy(np.clip(unit, 0.0, 1.0).astype(np.float32))
    image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1).contiguous()
    return (_luma(image) if gray and image.shape[0] == 3 else image), intensity


def _dicom_window(values: np.ndarray, ds) -> tuple[np.ndarray | None, str]:
    """The file's VOI LUT or first window applied (pydicom), to [0, 1]; (None, why) if it has none."""
    from pydicom.pixels import apply_voi, apply_voi_lut

    lut = ds.get("VOILUTSequence")
    has_lut = bool(lut) and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return None, "no window in file"
    try:
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            if has_lut:  # the LUT wins over a window, as in pydicom's apply_voi_lut and viewers
                entries, first, bits = (int(v) for v in lut[0].LUTDescriptor)
                entries = entries or 2**16
                # pydicom 3.0 indexes an 8-bit LUT through uint8, which wraps past 256
                # entries: read the table as 16-bit entries, then look values up here.
                lut[0].LUTDescriptor = [entries if entries < 2**16 else 0, first, 16]
                table = np.asarray(apply_voi(np.arange(first, first + entries), ds), dtype=np.float64)
                lut[0].LUTDescriptor = [entries if entries < 2**16 else 0, first, bits]
                index = np.clip(np.floor(values).astype(np.int64) - first, 0, entries - 1)
                shown = table[index]
                low, high = float(table.min()), float(table.max())
                what = "VOI LUT"
            else:
                shown = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
                # the window's output range: what -inf and +inf map to
                low, high = (float(v) for v in apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0))
                centre, width = (_first(ds.WindowCenter), _first(ds.WindowWidth))
                function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
                what = f"window {centre:g}/{width:g} (center/width, {function})"
    except MemoryError:
        raise
    except Exception as err:  # a width below 1, an unknown VOI LUT Function, a broken LUT
        return None, f"window in file not usable: {_one_line(err)}"
    if high == low or not np.isfinite([low, high]).all():
        return None, "window in file has an empty output range"
    return (shown - low) / (high - low), f"DICOM {what}"


def _first(value) -> float:
    """The first of a multi-valued DICOM number (Window Center may hold several)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _dicom_percentiles(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.ndarray | None, str]:
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return None, "empty image"
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if high <= low:
        return None, f"percentiles {percentiles[0]:g}-{percentiles[1]:g} equal: {low:g}"
    return (values - low) / (high - low), f"DICOM percentiles {percentiles[0]:g}-{percentiles[1]:g}: {low:g}..{high:g}"


def _dicom_gray_to_unit(values: np.ndarray, stored: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """Monochrome values (after the modality LUT) scaled to [0, 1] by the stored range (float64)."""
    bits = ds.get("BitsStored")
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    known = (
        np.issubdtype(stored.dtype, np.integer)
        and "ModalityLUTSequence" not in ds
        and bits
        and slope != 0.0
    )
    if known:
        bits = int(bits)
        if ds.get("PixelRepresentation") == 1:  # two's complement
            low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            low, high = 0, 2**bits - 1
        low, high = sorted((low * slope + intercept, high * slope + intercept))
        if values.size:  # a header that understates the range: widen, never clip data
            low, high = min(low, float(values.min())), max(high, float(values.max()))
        what = f"stored range {low:g}..{high:g}"
    else:  # range unknown: the image's own min and max
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        what = f"image range {low:g}..{high:g}"
    if high <= low:
        return np.zeros_like(values), what
    return (values - low) / (high - low), what


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _luma(image: Tensor) -> Tensor:
    """ITU-R 601 luma of a floating Tensor[3, H, W] -> Tensor[1, H, W]."""
    weights = torch.tensor(_LUMA, dtype=image.dtype).view(3, 1, 1)
    return (image * weights).sum(dim=0, keepdim=True)


def to_unit_float(image: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Convert an image to floats in [0, 1]: the one conversion to what ``DACrop`` expects.

    Integer images are divided by the largest value of their type, as in
    :func:`dac.functional.to_unit_range` (``uint8`` by 255, ``uint16`` by 65535,
    ``int16`` by 32767, ``int32`` by 2**31 - 1); floating images are taken as they are.
    (A tensor does not say how many bits its values use; files do, so
    :func:`read_image` returns 32-bit integer files already scaled to [0, 1].)
    The result is then clipped to [0, 1] (negative values of signed types, or floats
    slightly out of range after resampling, go to the nearest bound).

    Args:
        image: Tensor of any shape, e.g. Tensor[C, H, W] from :func:`read_image`.
        dtype: floating dtype of the result.

    Returns:
        Tensor of the same shape and of dtype ``dtype``, values in [0, 1].

    Raises:
        DACInputError: ``image`` holds NaN or Inf, or has an unsupported dtype;
            ``dtype`` is not floating.

    Examples:
        >>> to_unit_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
        tensor([0.0000, 0.2000, 1.0000])
    """
    if not isinstance(image, Tensor):
        raise DACInputError(f"image: expected a torch.Tensor, got {type(image).__name__}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DACInputError(f"dtype: expected a floating torch dtype, got {dtype!r}")
    if image.dtype.is_floating_point:
        if not torch.isfinite(image).all():
            raise DACInputError("image: contains NaN or Inf values")
    elif image.dtype not in INTEGER_IMAGE_SCALE:
        raise DACInputError(
            f"image: unsupported dtype {image.dtype}; expected a floating dtype "
            f"or one of {sorted(str(d) for d in INTEGER_IMAGE_SCALE)}"
        )
    return to_unit_range(image, dtype).to(dtype).clamp(0.0, 1.0)


def to_gray8(image: Tensor) -> Tensor:
    """Convert any image to 8-bit grayscale, the paper's preprocessing of its archive.

    The paper converted its 16, 24 and 32-bit files to 8-bit grayscale before cropping;
    this is that conversion. RGB becomes ITU-R 601 luma (for ``uint8`` exactly Pillow's
    ``"L"`` conversion). Deeper integer and floating images are scaled by the range of
    their *type* (as :func:`to_unit_float`: ``uint16`` 65535 -> 255, float 1.0 -> 255),
    not stretched image by image, so that one intensity means the same in every image
    and the saliency and step sizes of ``DACrop`` (tuned on 8-bit intensities) keep
    their meaning.

    An image whose values differ but which would come out as one flat gray level (a
    16-bit file holding only values below 129, floats all above 1 from a forgotten
    ``/ 255``) raises instead of turning blank without a word.

    Args:
        image: Tensor[C, H, W], C = 1 or 3, ``uint8``, ``uint16``, ``int16``, ``int32`` or
            floating (in [0, 1]; clipped).

    Returns:
        Tensor[1, H, W], ``torch.uint8``.

    Raises:
        DACInputError: bad shape or dtype, NaN or Inf, or a non-constant image that
            would become constant.

    Examples:
        >>> to_gray8(torch.tensor([[[0, 65535]]], dtype=torch.uint16))
        tensor([[[  0, 255]]], dtype=torch.uint8)
    """
    _check_chw(image, "image")
    if image.dtype == torch.uint8:
        if image.shape[0] == 1:
            return image.clone()
        # Pillow's fixed-point luma: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
        rgb = image.to(torch.int32)
        luma = (rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16
        return luma.unsqueeze(0).to(torch.uint8)
    unit = to_unit_float(image, dtype=torch.float64)
    if unit.shape[0] == 3:
        unit = _luma(unit)
    gray = (unit * 255.0).round().clamp(0, 255).to(torch.uint8)
    raw = image.to(torch.float64)  # before clipping: floats all above 1 are not blank
    low, high = torch.aminmax(_luma(raw) if raw.shape[0] == 3 else raw)
    if low < high and gray.amin() == gray.amax():
        raise DACInputError(
            f"image: values from {low.item():g} to {high.item():g} ({image.dtype}) all become {gray.flatten()[0].item()} "
            "in 8 bits; the image would turn blank (integer images are scaled by the range of "
            "their dtype, floating ones are expected in [0, 1])"
        )
    return gray


def write_png(path: str | os.PathLike, image: Tensor, *, bits: int = 8) -> None:
    """Write a Tensor[C, H, W] as an 8 or 16-bit PNG, atomically.

    The PNG is written to a temporary file in the same directory, flushed to disk, then
    renamed over ``path`` with ``os.replace``: a crash or an error never leaves a
    half-written PNG under ``path`` (an existing file stays as it was), and the
    temporary file is removed on error.

    Values: an image whose dtype matches ``bits`` (``uint8`` for 8, ``uint16`` for 16)
    is written as it is; ``uint8`` -> 16 bits multiplies by 257 (exact); anything else
    goes through :func:`to_unit_float` (clipped to [0, 1]) and is rounded to
    ``2**bits - 1`` levels.

    Args:
        path: the PNG file to write (its folder is created if missing).
        image: Tensor[C, H, W], C = 1 or 3, ``uint8``, ``uint16`` or floating in [0, 1].
        bits: 8 or 16. Pillow cannot write 16-bit colour PNG, so ``bits=16`` needs C = 1.

    Raises:
        DACInputError: bad ``image`` (shape, NaN) or ``bits``, or ``bits=16`` with C = 3.
        OSError: the file cannot be written.

    Examples:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "deep.png")
        ...     write_png(path, torch.tensor([[[0, 1000, 65535]]], dtype=torch.uint16), bits=16)
        ...     read_image(path).tolist()
        [[[0, 1000, 65535]]]
    """
    _check_chw(image, "image")
    check_bits(bits)
    if bits == 16 and image.shape[0] == 3:
        raise DACInputError(
            f"bits: 16-bit PNG needs a 1-channel image, got C=3 in shape {tuple(image.shape)} "
            "(Pillow cannot write 16-bit colour PNG; write bits=8 or one channel)"
        )
    pixels = _quantise(image.detach().cpu(), bits)
    array = pixels.permute(1, 2, 0).numpy() if pixels.shape[0] == 3 else pixels[0].numpy()
    png = Image.fromarray(np.ascontiguousarray(array))

    atomic_write(os.path.abspath(os.fspath(path)), lambda file: png.save(file, format="PNG"))


def write_overlay(path: str | os.PathLike, image: Tensor, box: Tensor, text: str = "") -> None:
    """Write the image with its box drawn in red, ``text`` written above the box and a
    caption below the image saying what the box is: an 8-bit RGB PNG, written atomically.

    The image is scaled to 640..1024 pixels wide (small images up, at most 4x; large
    ones down), so a 354 x 192 phantom is not a thumbnail. The caption reads ``red:
    <text or "the box DAC found"> x1,y1,x2,y2 (xyxy, input pixels of a W x H image)``.

    Convention: ``box`` is xyxy in input pixels (torchvision's).

    Args:
        path: the PNG file.
        image: Tensor[C, H, W], as :func:`to_gray8` takes it.
        box: Tensor[4], the box.
        text: a label drawn above the box ("" for none).
    """
    from PIL import ImageDraw

    gray = to_gray8(image)[0].numpy()
    pil = Image.fromarray(gray).convert("RGB")
    width, height = pil.size
    scale = min(1024 / width, max(1.0, min(4.0, 640 / width)))
    if scale != 1:
        pil = pil.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(pil)
    x1, y1, x2, y2 = (v * scale for v in box.tolist())
    draw.rectangle([x1, y1, x2, y2], outline=(255, 0, 0), width=3)
    if text:
        left, top, right, bottom = draw.textbbox((0, 0), text)
        y = y1 - (bottom - top) - 6 if y1 >= (bottom - top) + 6 else y2 + 2
        draw.rectangle([x1, y, x1 + right - left + 6, y + bottom - top + 4], fill=(255, 0, 0))
        draw.text((x1 + 3 - left, y + 2 - top), text, fill=(255, 255, 255))
    corners = ",".join(f"{v:.0f}" for v in box.tolist())
    caption = f"red: {text or 'the box DAC found'} {corners} (xyxy, input pixels of a {width}x{height} image)"
    left, top, right, bottom = draw.textbbox((0, 0), caption)
    framed = Image.new("RGB", (pil.width, pil.height + bottom - top + 8), (0, 0, 0))
    framed.paste(pil, (0, 0))
    ImageDraw.Draw(framed).text((4 - left, pil.height + 4 - top), caption, fill=(255, 255, 255))
    tensor = torch.from_numpy(np.array(framed)).permute(2, 0, 1).contiguous()
    write_png(path, tensor, bits=8)


def _quantise(image: Tensor, bits: int) -> Tensor:
    """Tensor[C, H, W] as ``uint8`` (bits=8) or ``uint16`` (bits=16)."""
    target = torch.uint8 if bits == 8 else torch.uint16
    if image.dtype == target:
        return image.contiguous()
    if image.dtype == torch.uint8:  # to 16 bits: 255 * 257 = 65535, exact
        return (image.to(torch.int32) * 257).to(torch.uint16)
    unit = to_unit_float(image, dtype=torch.float64)
    return (unit * float(2**bits - 1)).round().to(target)




def _check_chw(image: Tensor, name: str) -> None:
    if not isinstance(image, Tensor):
        raise DACInputError(f"{name}: expected a torch.Tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise DACInputError(
            f"{name}: expected shape [C, H, W] with C = 1 or 3, got {tuple(image.shape)}"
        )
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise DACInputError(f"{name}: empty image of shape {tuple(image.shape)}")
