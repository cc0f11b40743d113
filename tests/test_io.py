"""dac.data.io: reading every supported format, bad files, DICOM, the conversions, atomic PNG writes.

Every image is generated in ``tmp_path``; DICOM tests use only the files bundled inside the
pydicom package (never ``pydicom.data.get_testdata_file``, which may try the network).
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dac import DACInputError
from dac.functional import to_unit_range
from dac.data.io import IMAGE_SUFFIXES, ImageReadError, probe_image, read_image, to_gray8, to_unit_float, write_png

RNG = np.random.default_rng(7)


def save(tmp_path, name: str, image: Image.Image, **kwargs) -> str:
    path = os.path.join(tmp_path, name)
    image.save(path, **kwargs)
    return path


def rgb8(height: int = 24, width: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def chw(array: np.ndarray) -> torch.Tensor:
    """numpy [H, W] or [H, W, C] -> torch [C, H, W]."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def reason_of(path) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == f"{os.fspath(path)}: {info.value.reason}"
    assert info.value.path == os.fspath(path)
    return info.value.reason


class TestReadImage:
    def test_gray_png_8bit(self, tmp_path):
        gray = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
        image = read_image(save(tmp_path, "g.png", Image.fromarray(gray)))
        assert image.dtype == torch.uint8 and image.shape == (1, 20, 30)
        assert torch.equal(image, chw(gray))

    def test_rgb_png_8bit_and_gray(self, tmp_path):
        rgb = rgb8()
        path = save(tmp_path, "c.png", Image.fromarray(rgb))
        image = read_image(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 32)
        assert torch.equal(image, chw(rgb))
        gray = read_image(path, gray=True)
        assert gray.shape == (1, 24, 32) and gray.dtype == torch.uint8
        assert torch.equal(gray, chw(np.array(Image.fromarray(rgb).convert("L"))))

    def test_png_16bit_written_by_pillow(self, tmp_path):
        deep = RNG.integers(0, 65536, (17, 23), dtype=np.uint16)
        image = read_image(save(tmp_path, "d.png", Image.fromarray(deep)))
        assert image.dtype == torch.uint16 and image.shape == (1, 17, 23)
        assert np.array_equal(image[0].numpy(), deep)

    def test_jpeg_approximate(self, tmp_path):
        y, x = np.mgrid[0:48, 0:64]
        smooth = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
        path = save(tmp_path, "s.jpg", Image.fromarray(smooth), quality=95)
        image = read_image(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)
        assert (image.float() - chw(smooth).float()).abs().mean() < 3.0
        assert read_image(path, gray=True).shape == (1, 48, 64)

    @pytest.mark.parametrize("color", [False, True])
    def test_tiff_8bit(self, tmp_path, color):
        pixels = rgb8() if color else rgb8()[..., 0]
        image = read_image(save(tmp_path, "e.tif", Image.fromarray(pixels)))
        assert image.dtype == torch.uint8 and image.shape == ((3 if color else 1), 24, 32)
        assert torch.equal(image, chw(pixels))

    @pytest.mark.parametrize("mode", ["I;16", "I;16B"])
    def test_tiff_16bit_either_byte_order(self, tmp_path, mode):
        deep = RNG.integers(0, 65536, (9, 11), dtype=np.uint16)
        raw = deep.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        path = save(tmp_path, "d.tiff", Image.frombytes(mode, (11, 9), raw))
        image = read_image(path)
        assert image.dtype == torch.uint16 and image.shape == (1, 9, 11)
        assert np.array_equal(image[0].numpy(), deep)

    def test_tiff_float32_not_clipped(self, tmp_path):
        values = np.linspace(-0.5, 1.5, 6 * 7, dtype=np.float32).reshape(6, 7)
        image = read_image(save(tmp_path, "f.tif", Image.fromarray(values)))
        assert image.dtype == torch.float32 and image.shape == (1, 6, 7)
        assert np.array_equal(image[0].numpy(), values)

    def test_tiff_int32_scaled_by_the_bits_it_holds(self, tmp_path):
        # 12-bit data in a 32-bit TIFF: 4095 is white, not 4095 / (2**31 - 1).
        values = np.array([[0, 1000, 2048, 4095]], dtype=np.int32)
        path = save(tmp_path, "i.tif", Image.fromarray(values))
        image = read_image(path)
        assert image.dtype == torch.float32 and image.shape == (1, 1, 4)
        assert torch.allclose(image, torch.tensor([[[0, 1000, 2048, 4095]]]) / 4095)
        assert to_gray8(image).tolist() == [[[0, 62, 128, 255]]]
        assert torch.equal(to_gray8(read_image(path, gray=True)), to_gray8(image))

    @pytest.mark.parametrize(
        "values, scale",
        [
            ([0, 100, 255], 255),  # 8 bits
            ([0, 256, 700], 1023),  # 10 bits
            ([0, 5000, 16383], 16383),  # 14 bits
            ([0, 70000, 2**24 - 1], 2**24 - 1),  # 24 bits
            ([0, 2**31 - 1], 2**32 - 1),  # 32 bits
        ],
    )
    def test_tiff_int32_scale_rule(self, tmp_path, values, scale):
        array = np.array([values], dtype=np.int32)
        image = read_image(save(tmp_path, "i.tif", Image.fromarray(array)))
        assert torch.allclose(image[0].double(), torch.tensor([values], dtype=torch.float64) / scale)

    def test_tiff_int32_signed_with_negatives_uses_the_signed_range(self, tmp_path):
        values = np.array([[-2048, 0, 2047]], dtype=np.int32)  # signed 12-bit
        path = save(tmp_path, "s.tif", Image.fromarray(values))  # Pillow writes SampleFormat 2 (signed)
        image = read_image(path)[0, 0]
        assert torch.allclose(image, torch.tensor([0.0, 2048 / 4095, 1.0]))

    def test_tiff_uint32_above_int32_range(self, tmp_path):
        values = np.array([[0, 2**31, 2**32 - 1]], dtype=np.uint32)
        path = save(tmp_path, "u.tif", Image.fromarray(values.view(np.int32)))
        signed = b"\x53\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # tag 339 SampleFormat = 2, little-endian
        data = open(path, "rb").read()
        assert data.count(signed) == 1
        with open(path, "wb") as fh:
            fh.write(data.replace(signed, signed[:-2] + b"\x01\x00"))  # now unsigned
        image = read_image(path)[0, 0]
        assert torch.allclose(image.double(), torch.tensor([0, 2**31, 2**32 - 1], dtype=torch.float64) / (2**32 - 1))

    def test_palette_png_to_rgb(self, tmp_path):
        rgb = rgb8()
        palette = Image.fromarray(rgb).quantize(colors=16)
        path = save(tmp_path, "p.png", palette, transparency=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no Pillow transparency warning
            image = read_image(path)
            gray = read_image(path, gray=True)
        expected = np.array(palette.convert("RGB"))
        assert image.dtype == torch.uint8 and torch.equal(image, chw(expected))
        assert torch.equal(gray, chw(np.array(Image.fromarray(expected).convert("L"))))

    def test_alpha_dropped(self, tmp_path):
        rgba = np.concatenate([rgb8(), RNG.integers(0, 256, (24, 32, 1), dtype=np.uint8)], -1)
        image = read_image(save(tmp_path, "a.png", Image.fromarray(rgba)))
        assert image.shape == (3, 24, 32) and torch.equal(image, chw(rgba[..., :3]))
        la = Image.fromarray(rgba[..., :2].copy(), mode="LA")
        assert torch.equal(read_image(save(tmp_path, "la.png", la)), chw(rgba[..., 0]))

    def test_one_bit_and_cmyk_and_bmp(self, tmp_path):
        bits = Image.fromarray(rgb8()[..., 0] > 127)
        image = read_image(save(tmp_path, "b.png", bits))
        assert image.shape == (1, 24, 32) and set(image.unique().tolist()) <= {0, 255}
        cmyk = Image.fromarray(rgb8()).convert("CMYK")
        image = read_image(save(tmp_path, "k.tif", cmyk))
        assert image.shape == (3, 24, 32) and torch.equal(image, chw(np.array(cmyk.convert("RGB"))))
        rgb = rgb8()
        assert torch.equal(read_image(save(tmp_path, "m.bmp", Image.fromarray(rgb))), chw(rgb))

    def test_multipage_tiff_gives_first_page(self, tmp_path):
        pages = [Image.fromarray(np.full((5, 6), v, np.uint8)) for v in (10, 200)]
        path = save(tmp_path, "pages.tif", pages[0], save_all=True, append_images=pages[1:])
        assert read_image(path).unique().tolist() == [10]

    def test_paper_size_reads_under_default_limit(self, tmp_path):
        path = save(tmp_path, "big.png", Image.new("L", (2860, 1536), 7))
        assert read_image(path).shape == (1, 1536, 2860)

    def test_path_like_and_suffixes(self, tmp_path):
        path = tmp_path / "g.PNG"
        Image.new("L", (3, 2), 5).save(path, format="PNG")
        assert read_image(path).tolist() == [[[5, 5, 5], [5, 5, 5]]]
        expected = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
        assert IMAGE_SUFFIXES == expected and isinstance(IMAGE_SUFFIXES, frozenset)


class TestReadImageBadFiles:
    def test_missing_file(self, tmp_path):
        assert reason_of(tmp_path / "nope.png") == "file not found"

    def test_directory(self, tmp_path):
        assert reason_of(tmp_path).startswith("is a directory")

    def test_special_files_and_links(self, tmp_path):
        os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
        assert reason_of(tmp_path / "pipe.png").startswith("not a regular file")
        (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
        assert reason_of(tmp_path / "gone.png").startswith("dangling symbolic link")
        (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
        assert reason_of(tmp_path / "loop.png") == "symbolic link loop"

    def test_zero_bytes(self, tmp_path):
        (tmp_path / "zero.png").write_bytes(b"")
        assert reason_of(tmp_path / "zero.png") == "empty file (0 bytes)"

    def test_random_bytes_and_text(self, tmp_path):
        (tmp_path / "noise.png").write_bytes(RNG.integers(0, 256, 4000, dtype=np.uint8).tobytes())
        (tmp_path / "notes.txt").write_text("these are not pixels\n" * 20)
        assert reason_of(tmp_path / "noise.png") == "not an image or unsupported format"
        assert reason_of(tmp_path / "notes.txt") == "not an image or unsupported format"

    @pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "cut.tif"])
    def test_truncated(self, tmp_path, name):
        path = save(tmp_path, "whole" + os.path.splitext(name)[1], Image.fromarray(rgb8(64, 80)))
        data = open(path, "rb").read()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        assert reason_of(tmp_path / name) == "truncated or corrupt image data"

    def test_truncated_even_when_pillow_told_to_allow_it(self, tmp_path, monkeypatch):
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        data = open(save(tmp_path, "w.png", Image.fromarray(rgb8(64, 80))), "rb").read()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        assert reason_of(tmp_path / "cut.png") == "truncated or corrupt image data"
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored

    @pytest.mark.parametrize("limit", [100, 20])  # Pillow warns above the limit, fails above 2x
    def test_decompression_bomb(self, tmp_path, monkeypatch, limit):
        path = save(tmp_path, "bomb.png", Image.new("L", (15, 10)))
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        assert reason_of(path).startswith("image too large (possible decompression bomb)")

    def test_dicom_without_pydicom(self, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
        (tmp_path / "scan").write_bytes(bytes(128) + b"DICM" + bytes(64))
        assert reason_of(tmp_path / "scan") == "pydicom is not installed (pip install pydicom)"

    def test_error_is_oserror_and_pickles(self):
        err = ImageReadError("a/b.png", "empty file (0 bytes)")
        assert isinstance(err, OSError)
        back = pickle.loads(pickle.dumps(err))
        assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


try:
    import pydicom
except ImportError:  # an optional extra: the DICOM tests skip
    pydicom = None
DICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__ if pydicom else ""), "data", "test_files")


def bundled(name: str) -> str:
    path = os.path.join(DICOM_FILES, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


@pytest.mark.skipif(pydicom is None, reason="pydicom (the optional DICOM extra) is not installed")
class TestReadDicom:
    def test_ct_rescale_and_stored_range(self):
        path = bundled("CT_small.dcm")  # int16, BitsStored 16, slope 1, intercept -1024
        ds = pydicom.dcmread(path)
        image = read_image(path)
        assert image.dtype == torch.float32 and image.shape == (1, 128, 128)
        # range of 16 signed stored bits through the rescale: [-32768 - 1024, 32767 - 1024]
        hu = ds.pixel_array.astype(np.float64) + float(ds.RescaleIntercept)
        expected = (hu - (-32768 - 1024)) / 65535
        assert np.allclose(image[0].numpy(), expected, atol=1e-6)

    def test_negative_slope_and_narrow_bits(self, tmp_path):
        ds = pydicom.dcmread(bundled("CT_small.dcm"))
        ds.RescaleSlope, ds.RescaleIntercept, ds.BitsStored = -2, 100, 12
        ds.save_as(tmp_path / "neg.dcm")
        stored = ds.pixel_array.astype(np.float64)  # 128..2191: within 12 signed bits
        expected = 1.0 - (stored + 2048) / 4095  # slope < 0 flips the range
        assert np.allclose(read_image(tmp_path / "neg.dcm")[0].numpy(), expected, atol=1e-6)

    def test_monochrome1_inverted(self, tmp_path):
        path = bundled("CT_small.dcm")
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(tmp_path / "mono1.dcm")
        assert torch.allclose(read_image(tmp_path / "mono1.dcm"), 1.0 - read_image(path), atol=1e-6)

    def test_mr_and_dicm_marker_without_suffix(self, tmp_path):
        path = bundled("MR_small.dcm")
        shutil.copy(path, tmp_path / "scan.img")
        image = read_image(tmp_path / "scan.img")
        assert image.shape == (1, 64, 64) and torch.equal(image, read_image(path))
        assert 0.0 <= image.min() and image.max() <= 1.0

    def test_rgb_and_gray(self):
        path = bundled("SC_rgb_small_odd.dcm")  # 3x3, 8-bit RGB
        rgb = pydicom.dcmread(path).pixel_array
        image = read_image(path)
        assert image.dtype == torch.float32 and image.shape == (3, 3, 3)
        assert np.allclose(image.numpy(), rgb.transpose(2, 0, 1) / 255.0, atol=1e-6)
        gray = read_image(path, gray=True)
        luma = rgb @ np.array([0.299, 0.587, 0.114]) / 255.0
        assert gray.shape == (1, 3, 3) and np.allclose(gray[0].numpy(), luma, atol=1e-6)

    def test_multiframe_gives_first_frame(self):
        path = bundled("SC_rgb_rle_2frame.dcm")
        first = pydicom.dcmread(path).pixel_array[0]
        image = read_image(path)
        assert image.shape == (3, 100, 100)
        assert np.allclose(image.numpy(), first.transpose(2, 0, 1) / 255.0, atol=1e-6)

    def test_palette_color_to_rgb(self):
        path = bundled("examples_palette.dcm")
        image = read_image(path)
        assert image.shape == (3, 350, 800) and 0.0 <= image.min() and image.max() <= 1.0
        assert image.max() > 0.9

    def test_truncated_pixel_data(self):
        reason = reason_of(bundled("MR_truncated.dcm"))
        assert reason.startswith("DICOM pixel data cannot be decoded: ")
        assert "\n" not in reason

    def test_undecodable_compression(self):
        from pydicom.pixels import pixel_array

        for name in ("JPEG-lossy.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm"):
            path = os.path.join(DICOM_FILES, name)
            if not os.path.exists(path):
                continue
            try:
                pixel_array(pydicom.dcmread(path), index=0)
            except Exception:
                break
        else:
            pytest.skip("every bundled compressed file decodes here (decoder plugins installed)")
        assert reason_of(path).startswith("DICOM pixel data cannot be decoded: ")

    def test_no_pixel_data(self):
        assert reason_of(bundled("rtplan.dcm")) == "DICOM file has no pixel data"

    def test_not_dicom_with_dcm_suffix(self, tmp_path):
        (tmp_path / "fake.dcm").write_bytes(b"not a dicom file at all" * 10)
        assert reason_of(tmp_path / "fake.dcm").startswith("not a DICOM file")



def linear_window(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), written out: output in [0, 1]."""
    x = x.astype(np.float64)
    low, high = centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    inside = ((x - (centre - 0.5)) / (width - 1) + 0.5)
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, inside))


@pytest.mark.skipif(pydicom is None, reason="pydicom (the optional DICOM extra) is not installed")
class TestDicomIntensity:
    """DICOM as a viewer shows it: the file's VOI LUT / window by default, or no window, or percentiles."""

    def test_window_of_pydicoms_own_file(self):
        path = bundled("MR_small.dcm")  # signed 16 bits, Window 600/1600, no rescale
        ds = pydicom.dcmread(path)
        image, intensity = read_image(path, return_intensity=True)
        expected = linear_window(ds.pixel_array, 600, 1600)
        assert np.allclose(image[0].numpy(), expected, atol=1e-6)
        assert intensity == "DICOM window 600/1600 (center/width, LINEAR)"
        # windowing off: the stored range, as before
        plain, how = read_image(path, dicom="range", return_intensity=True)
        stored = ds.pixel_array.astype(np.float64)
        assert np.allclose(plain[0].numpy(), (stored + 32768) / 65535, atol=1e-6)
        assert how == "DICOM stored range -32768..32767"
        assert float(image.std()) > 10 * float(plain.std())  # the window is what makes it visible

    def test_built_file_with_and_without_window(self, tmp_path):
        ds = pydicom.dcmread(bundled("CT_small.dcm"))  # int16, intercept -1024: values in HU
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert "WindowCenter" not in ds
        ds.save_as(tmp_path / "plain.dcm")
        image, how = read_image(tmp_path / "plain.dcm", return_intensity=True)
        assert how == "DICOM stored range -33792..31743 (no window in file)"
        assert np.allclose(image[0].numpy(), (hu + 33792) / 65535, atol=1e-6)

        ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window
        ds.save_as(tmp_path / "window.dcm")
        image, how = read_image(tmp_path / "window.dcm", return_intensity=True)
        assert how == "DICOM window 40/400 (center/width, LINEAR)"
        assert np.allclose(image[0].numpy(), linear_window(hu, 40, 400), atol=1e-6)
        assert image.min() == 0 and image.max() == 1 and ((image > 0) & (image < 1)).float().mean() > 0.3

        ds.VOILUTFunction = "SIGMOID"
        ds.save_as(tmp_path / "sigmoid.dcm")
        image, how = read_image(tmp_path / "sigmoid.dcm", return_intensity=True)
        assert "SIGMOID" in how
        assert np.allclose(image[0].numpy(), 1 / (1 + np.exp(-4 * (hu - 40) / 400)), atol=1e-6)

        ds.PhotometricInterpretation = "MONOCHROME1"
        del ds.VOILUTFunction
        ds.save_as(tmp_path / "mono1.dcm")
        image, how = read_image(tmp_path / "mono1.dcm", return_intensity=True)
        assert np.allclose(image[0].numpy(), 1 - linear_window(hu, 40, 400), atol=1e-6)
        assert how.endswith("MONOCHROME1 inverted")

    def test_voi_lut_sequence(self, tmp_path):
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        ds = pydicom.dcmread(bundled("CT_small.dcm"))
        hu = ds.pixel_array.astype(np.int64) - 1024  # slope 1, intercept -1024
        first, entries = -200, 400
        lut = np.clip(np.arange(entries) * 2, 0, 255).astype(np.uint16)  # 0, 2, ..., 255, 255...
        item = Dataset()
        item.add_new(0x00283002, "SS", [entries, first, 8])  # LUT Descriptor (first value mapped < 0)
        item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
        ds.VOILUTSequence = Sequence([item])
        ds.WindowCenter, ds.WindowWidth = 40, 400  # the LUT wins, as in a viewer
        ds.save_as(tmp_path / "lut.dcm")
        image, how = read_image(tmp_path / "lut.dcm", return_intensity=True)
        assert how == "DICOM VOI LUT"
        expected = lut[np.clip(hu - first, 0, entries - 1)] / 255.0
        assert np.allclose(image[0].numpy(), expected, atol=1e-6)

    def test_percentiles(self):
        path = bundled("CT_small.dcm")
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) - 1024
        image, how = read_image(path, dicom="percentiles", percentiles=(2, 98), return_intensity=True)
        low, high = np.percentile(hu, [2, 98])
        assert np.allclose(image[0].numpy(), np.clip((hu - low) / (high - low), 0, 1), atol=1e-6)
        assert how == f"DICOM percentiles 2-98: {low:g}..{high:g}"
        assert image.min() == 0 and image.max() == 1

    def test_unusable_window_falls_back_to_the_stored_range(self, tmp_path):
        ds = pydicom.dcmread(bundled("CT_small.dcm"))
        ds.WindowCenter, ds.WindowWidth = 40, 0  # LINEAR needs a width >= 1
        ds.save_as(tmp_path / "zero.dcm")
        image, how = read_image(tmp_path / "zero.dcm", return_intensity=True)
        assert how.startswith("DICOM stored range -33792..31743 (window in file not usable: ")
        assert torch.equal(image, read_image(tmp_path / "zero.dcm", dicom="range"))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_float_pixels_that_are_not_finite_fail_the_file(self, tmp_path, bad):
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        values = np.linspace(0, 100, 64, dtype=np.float32).reshape(8, 8)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 8, 8, 1, "MONOCHROME2", 32
        ds.FloatPixelData = values.tobytes()
        ds.save_as(tmp_path / "good.dcm", enforce_file_format=True)
        image = read_image(tmp_path / "good.dcm", dicom="range")
        assert torch.isfinite(image).all() and image.max() == 1.0
        values[3, 4] = bad  # one pixel made every other one NaN (scaled by a NaN range)
        ds.FloatPixelData = values.tobytes()
        ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
        for mode in ("window", "range", "percentiles"):
            with pytest.raises(ImageReadError, match="1 NaN or infinite"):
                read_image(tmp_path / "bad.dcm", dicom=mode)

    def test_constant_image_percentiles_fall_back(self, tmp_path):
        ds = pydicom.dcmread(bundled("CT_small.dcm"))
        arr = np.full(ds.pixel_array.shape, 500, dtype=np.int16)
        ds.PixelData = arr.tobytes()
        ds.save_as(tmp_path / "flat.dcm")
        image, how = read_image(tmp_path / "flat.dcm", dicom="percentiles", return_intensity=True)
        assert torch.isfinite(image).all() and "percentiles 1-99 equal" in how

    def test_other_files_say_their_bits(self, tmp_path):
        write_png(tmp_path / "a.png", torch.zeros(1, 4, 4, dtype=torch.uint16), bits=16)
        assert read_image(tmp_path / "a.png", return_intensity=True)[1] == "16-bit"
        assert read_image(bundled("SC_rgb_small_odd.dcm"), return_intensity=True)[1] == "DICOM colour 8-bit"

    @pytest.mark.parametrize("kwargs, match", [({"dicom": "voi"}, "dicom"), ({"percentiles": (50, 10)}, "percentiles"),
                                               ({"percentiles": (1,)}, "percentiles")])
    def test_bad_options(self, tmp_path, kwargs, match):
        with pytest.raises(DACInputError, match=match):
            read_image(bundled("CT_small.dcm"), **kwargs)



class TestOrientationAndDepth:
    """EXIF orientation is applied; 12-bit data in a 16-bit file is said (issue 26 items 4, 5)."""

    @pytest.mark.parametrize("name", ["portrait.jpg", "portrait.png"])
    def test_exif_orientation_is_applied_and_said(self, tmp_path, name):
        # a landscape picture stored portrait with Orientation = 6, as cameras and scanners do
        stored = np.zeros((60, 40), dtype=np.uint8)
        stored[:10] = 255  # the top of the stored pixels: the right side once turned upright
        exif = Image.Exif()
        exif[0x0112] = 6
        path = save(tmp_path, name, Image.fromarray(stored), exif=exif, **({"quality": 95} if name.endswith("jpg") else {}))
        image, how = read_image(path, return_intensity=True)
        assert image.shape == (1, 40, 60)  # as a viewer shows it
        assert image[0, :, -10:].float().mean() > 200 and image[0, :, :10].float().mean() < 50
        assert how == "8-bit, EXIF orientation 6 applied"
        upright = save(tmp_path, "upright.png", Image.fromarray(stored))
        assert read_image(upright, return_intensity=True)[1] == "8-bit"

    @pytest.mark.parametrize("suffix", [".png", ".tif"])
    def test_12_bit_data_in_a_16_bit_file_is_said(self, tmp_path, suffix):
        values = RNG.integers(0, 4096, (30, 40)).astype(np.uint16)
        values[0, 0] = 4095
        path = save(tmp_path, "twelve" + suffix, Image.fromarray(values))
        image, how = read_image(path, return_intensity=True)
        assert image.dtype == torch.uint16 and int(image.to(torch.int32).max()) == 4095  # read as stored: one rule for every file
        assert how.startswith("16-bit; warning: ") and "4095" in how and "1/8" in how
        full = save(tmp_path, "full" + suffix, Image.fromarray(values * 16))
        assert read_image(full, return_intensity=True)[1] == "16-bit"


class TestToUnitFloat:
    @pytest.mark.parametrize(
        "dtype, scale", [(torch.uint8, 255), (torch.uint16, 65535), (torch.int16, 32767)]
    )
    def test_integer_scaled_by_type(self, dtype, scale):
        x = torch.tensor([0, 1, scale // 2, scale]).to(dtype)
        out = to_unit_float(x)
        assert out.dtype == torch.float32
        assert torch.allclose(out, torch.tensor([0, 1, scale // 2, scale]) / scale)
        assert torch.equal(out, to_unit_range(x, torch.float32))

    def test_float_clipped_and_dtype(self):
        x = torch.tensor([-0.5, 0.25, 1.5], dtype=torch.float32)
        out = to_unit_float(x, dtype=torch.float64)
        assert out.dtype == torch.float64 and out.tolist() == [0.0, 0.25, 1.0]
        assert to_unit_float(torch.tensor([-3], dtype=torch.int16)).tolist() == [0.0]

    def test_reads_into_unit_range(self, tmp_path):
        deep = torch.tensor([[[0, 65535, 257]]], dtype=torch.uint16)
        write_png(tmp_path / "d.png", deep, bits=16)
        out = to_unit_float(read_image(tmp_path / "d.png"))
        assert torch.allclose(out, torch.tensor([[[0.0, 1.0, 1 / 255]]]))

    @pytest.mark.parametrize(
        "image, kwargs, match",
        [
            (torch.tensor([0.5, float("nan")]), {}, "image: contains NaN"),
            (torch.tensor([float("inf")]), {}, "image: contains NaN"),
            (torch.tensor([True]), {}, "image: unsupported dtype"),
            (torch.tensor([1], dtype=torch.uint8), {"dtype": torch.int32}, "dtype"),
            ([0.5], {}, "image: expected a torch.Tensor"),
        ],
    )
    def test_bad_input(self, image, kwargs, match):
        with pytest.raises(DACInputError, match=match):
            to_unit_float(image, **kwargs)


class TestToGray8:
    def test_uint8_rgb_matches_pillow_luma(self):
        rgb = rgb8(40, 50)
        expected = chw(np.array(Image.fromarray(rgb).convert("L")))
        out = to_gray8(chw(rgb))
        assert out.dtype == torch.uint8 and out.shape == (1, 40, 50)
        assert torch.equal(out, expected)

    def test_uint16_scaled_by_type_not_stretched(self):
        x = torch.tensor([[[0, 257, 1000, 2000, 65535]]], dtype=torch.uint16)
        assert to_gray8(x).tolist() == [[[0, 1, 4, 8, 255]]]  # round(v / 257): 2000 stays dark

    def test_float_gray_and_rgb(self):
        assert to_gray8(torch.tensor([[[0.0, 0.5, 1.0, 1.2]]])).tolist() == [[[0, 128, 255, 255]]]
        rgb = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red: luma 0.299
        assert to_gray8(rgb).tolist() == [[[76]]]

    def test_gray_uint8_unchanged_and_16bit_rgb(self):
        rgb = chw(rgb8())
        assert torch.equal(to_gray8(rgb[:1]), rgb[:1])
        rgb16 = (rgb.to(torch.int32) * 257).to(torch.uint16)  # the same picture at 16 bits
        gray16 = to_gray8(rgb16)
        assert gray16.dtype == torch.uint8 and gray16.shape == (1, 24, 32)
        assert (gray16.int() - to_gray8(rgb).int()).abs().max() <= 1  # float vs fixed-point luma

    def test_non_blank_image_never_turns_blank(self):
        faint = torch.tensor([[[0, 40, 100]]], dtype=torch.uint16)  # all round to 0 of 255
        with pytest.raises(DACInputError, match="blank"):
            to_gray8(faint)
        assert to_gray8(torch.zeros(1, 2, 2, dtype=torch.uint16)).tolist() == [[[0, 0], [0, 0]]]
        assert to_gray8(torch.full((1, 2, 2), 0.5)).tolist() == [[[128, 128], [128, 128]]]

    @pytest.mark.parametrize(
        "image, match",
        [
            (torch.zeros(2, 4, 4), r"expected shape \[C, H, W\] with C = 1 or 3, got \(2, 4, 4\)"),
            (torch.zeros(4, 4), r"got \(4, 4\)"),
            (torch.zeros(1, 0, 4), "empty image"),
            (torch.full((1, 2, 2), float("nan")), "image: contains NaN"),
        ],
    )
    def test_bad_input(self, image, match):
        with pytest.raises(DACInputError, match=match):
            to_gray8(image)


class TestWritePng:
    @pytest.mark.parametrize("channels", [1, 3])
    def test_uint8_round_trip(self, tmp_path, channels):
        image = chw(rgb8())[:channels].contiguous()
        write_png(tmp_path / "o.png", image)
        back = read_image(tmp_path / "o.png")
        assert back.dtype == torch.uint8 and torch.equal(back, image)

    def test_dark_16bit_image_reads_back_as_written(self, tmp_path):
        # 16-bit files are scaled by their type: a dark crop written at 16 bits is not
        # stretched when read again (guessing the bits from the largest value would).
        dark = torch.tensor([[[0, 1000, 4000]]], dtype=torch.uint16)
        write_png(tmp_path / "d.png", dark, bits=16)
        assert torch.equal(read_image(tmp_path / "d.png"), dark)

    def test_uint16_round_trip_exact(self, tmp_path):
        image = torch.from_numpy(RNG.integers(0, 65536, (1, 31, 45), dtype=np.uint16))
        write_png(tmp_path / "d.png", image, bits=16)
        back = read_image(tmp_path / "d.png")
        assert back.dtype == torch.uint16 and torch.equal(back, image)

    def test_conversions(self, tmp_path):
        write_png(tmp_path / "f.png", torch.tensor([[[0.0, 0.5, 1.0, -1.0, 2.0]]]))
        assert read_image(tmp_path / "f.png").tolist() == [[[0, 128, 255, 0, 255]]]
        write_png(tmp_path / "e.png", torch.tensor([[[0, 1, 255]]], dtype=torch.uint8), bits=16)
        assert read_image(tmp_path / "e.png").tolist() == [[[0, 257, 65535]]]
        write_png(tmp_path / "g.png", torch.tensor([[[0, 257, 65535]]], dtype=torch.uint16))
        assert read_image(tmp_path / "g.png").tolist() == [[[0, 1, 255]]]

    def test_overwrites_and_leaves_no_temporary(self, tmp_path):
        write_png(tmp_path / "o.png", torch.zeros(1, 2, 2, dtype=torch.uint8))
        write_png(tmp_path / "o.png", torch.ones(1, 2, 2, dtype=torch.uint8))
        assert read_image(tmp_path / "o.png").tolist() == [[[1, 1], [1, 1]]]
        assert os.listdir(tmp_path) == ["o.png"]

    def test_permissions_follow_umask(self, tmp_path):
        umask = os.umask(0)
        os.umask(umask)
        write_png(tmp_path / "o.png", torch.zeros(1, 2, 2))
        assert os.stat(tmp_path / "o.png").st_mode & 0o777 == 0o666 & ~umask

    def test_failed_rename_leaves_nothing(self, tmp_path, monkeypatch):
        def broken_replace(src, dst):
            raise OSError("disk on fire")

        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError, match="disk on fire"):
            write_png(tmp_path / "o.png", torch.zeros(1, 4, 4))
        assert os.listdir(tmp_path) == []

    def test_failed_rewrite_keeps_old_file(self, tmp_path, monkeypatch):
        write_png(tmp_path / "o.png", torch.full((1, 2, 2), 9, dtype=torch.uint8))
        before = (tmp_path / "o.png").read_bytes()

        def broken_save(self, fp, *args, **kwargs):
            fp.write(b"\x89PNG half")  # some bytes reach the temporary file, then a crash
            raise OSError("no space left")

        monkeypatch.setattr(Image.Image, "save", broken_save)
        with pytest.raises(OSError, match="no space left"):
            write_png(tmp_path / "o.png", torch.zeros(1, 2, 2))
        assert (tmp_path / "o.png").read_bytes() == before
        assert os.listdir(tmp_path) == ["o.png"]

    @pytest.mark.parametrize(
        "image, bits, match",
        [
            (torch.zeros(3, 2, 2), 16, "bits: 16-bit PNG needs a 1-channel image"),
            (torch.zeros(1, 2, 2), 12, "bits: expected 8 or 16"),
            (torch.zeros(1, 2, 2), True, "bits: expected 8 or 16"),
            (torch.zeros(2, 2), 8, r"image: expected shape \[C, H, W\]"),
            (torch.tensor([[[float("nan")]]]), 8, "image: contains NaN"),
        ],
    )
    def test_bad_input(self, tmp_path, image, bits, match):
        with pytest.raises(DACInputError, match=match):
            write_png(tmp_path / "o.png", image, bits=bits)
        assert os.listdir(tmp_path) == []


class TestWriteOverlay:
    def test_a_small_image_is_scaled_up_and_captioned(self, tmp_path):
        from dac.data.io import write_overlay

        image = torch.zeros(1, 192, 354, dtype=torch.uint8)
        write_overlay(tmp_path / "o.png", image, torch.tensor([40.0, 30.0, 300.0, 170.0]))
        shown = np.asarray(Image.open(tmp_path / "o.png"))
        scale = 640 / 354  # was left at 354 px wide, a thumbnail with a bare box
        assert shown.shape[1] == 640 and shown.shape[0] > round(192 * scale)  # a caption strip below the image
        strip = shown[round(192 * scale) + 2:]
        assert strip.max() > 200  # the caption is written (white on black)
        red = (shown[..., 0] > 200) & (shown[..., 1] < 60)
        ys, xs = np.nonzero(red[: round(192 * scale)])
        assert abs(xs.min() - 40 * scale) <= 3 and abs(xs.max() - 300 * scale) <= 3  # the box where it is, scaled

    def test_a_large_image_is_scaled_down(self, tmp_path):
        from dac.data.io import write_overlay

        write_overlay(tmp_path / "o.png", torch.zeros(1, 1536, 2836, dtype=torch.uint8), torch.tensor([0.0, 0, 100, 100]), text="x")
        assert Image.open(tmp_path / "o.png").width == 1024


class TestProbeImage:
    """probe_image: the size read_image gives, from the header alone; the same reasons where it cannot."""

    def test_sizes_are_read_images(self, tmp_path):
        exif = Image.Exif()
        exif[0x0112] = 6
        paths = [
            save(tmp_path, "a.png", Image.fromarray(rgb8(24, 32))),
            save(tmp_path, "b.png", Image.fromarray(RNG.integers(0, 65535, (30, 20), dtype=np.uint16))),
            save(tmp_path, "c.jpg", Image.fromarray(rgb8(40, 70)), exif=exif),  # turned a quarter
            save(tmp_path, "d.tif", Image.fromarray(RNG.random((9, 13), dtype=np.float32))),
            save(tmp_path, "e.bmp", Image.fromarray(rgb8(5, 7))),
        ]
        if pydicom is not None and os.path.exists(os.path.join(DICOM_FILES, "MR_small.dcm")):
            paths.append(os.path.join(DICOM_FILES, "CT_small.dcm"))
            shutil.copy(os.path.join(DICOM_FILES, "MR_small.dcm"), tmp_path / "IM0001")
            paths.append(str(tmp_path / "IM0001"))
        for path in paths:
            assert probe_image(path) == tuple(read_image(path).shape[-2:]), path
        assert probe_image(paths[2]) == (70, 40)

    def test_the_same_reasons_as_read_image(self, tmp_path):
        os.mkfifo(tmp_path / "pipe.png")
        (tmp_path / "zero.png").write_bytes(b"")
        (tmp_path / "noise.png").write_bytes(RNG.integers(0, 256, 4000, dtype=np.uint8).tobytes())
        (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
        (tmp_path / "fake.dcm").write_bytes(b"not dicom at all" * 20)
        for name in ("pipe.png", "zero.png", "noise.png", "gone.png", "fake.dcm", "missing.png"):
            with pytest.raises(ImageReadError) as info:
                probe_image(tmp_path / name)
            assert info.value.reason == reason_of(tmp_path / name), name
        assert reason_of(tmp_path).startswith("is a directory")
        with pytest.raises(ImageReadError, match="is a directory"):
            probe_image(tmp_path)

    def test_dicom_without_pixels_or_a_decoder(self, monkeypatch):
        if pydicom is None:
            pytest.skip("pydicom is not installed")
        assert TestProbeImage._reason(bundled("rtplan.dcm")) == reason_of(bundled("rtplan.dcm"))

        class Missing:
            is_available, missing_dependencies = False, ["pylibjpeg - requires pylibjpeg>=2.0"]

        monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Missing())
        reason = TestProbeImage._reason(bundled("CT_small.dcm"))
        assert reason.startswith("DICOM pixel data cannot be decoded: no decoder for ") and "pylibjpeg" in reason

    @staticmethod
    def _reason(path) -> str:
        with pytest.raises(ImageReadError) as info:
            probe_image(path)
        return info.value.reason

    def test_a_sound_header_over_broken_pixels_passes(self, tmp_path):
        data = open(save(tmp_path, "whole.png", Image.fromarray(rgb8(64, 80))), "rb").read()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        assert probe_image(tmp_path / "cut.png") == (64, 80)  # read_image names it when it reads it
        assert reason_of(tmp_path / "cut.png") == "truncated or corrupt image data"

    def test_no_pixel_is_decoded(self, tmp_path, monkeypatch):
        # Pillow's getexif() decoded a whole PNG without EXIF to look for a late eXIf
        # chunk: the probe of a paper-size PNG took as long as reading it
        exif = Image.Exif()
        exif[0x0112] = 6
        plain = save(tmp_path, "plain.png", Image.fromarray(rgb8(24, 32)))
        turned = save(tmp_path, "turned.png", Image.fromarray(rgb8(24, 32)), exif=exif)
        photo = save(tmp_path, "photo.jpg", Image.fromarray(rgb8(24, 32)), exif=exif)

        decoded = []
        real = ImageFile.ImageFile.load
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.format) or real(self))
        assert [probe_image(p) for p in (plain, turned, photo)] == [(24, 32), (32, 24), (32, 24)]
        assert decoded == []
