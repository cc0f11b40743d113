"""dac.transforms.DACropd: MONAI's LoadImaged on a DICOM written here, Compose, Invertd.

Skipped as a whole when MONAI (the optional ``dac[monai]`` extra) or pydicom is absent.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

monai = pytest.importorskip("monai", reason="MONAI (the optional dac[monai] extra) is not installed")
pydicom = pytest.importorskip("pydicom", reason="pydicom (the optional dac[dicom] extra) is not installed")

from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Compose, Invertd, LoadImaged  # noqa: E402

from dac import DACInputError, DACrop  # noqa: E402
from dac.functional import crop_resize  # noqa: E402
from dac.transforms import DACropd, heatmap_to_crop, points_to_crop  # noqa: E402

# MONAI's DICOM reader notes, once per load, that the optional nvImageCodec is absent.
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")

H, W = 96, 160  # rows, columns of the DICOM image
OUT = (60, 111)  # (H_out, W_out): the crop is finer than the box (nearest round trips are exact)
FAST = {"steps_per_stage": 10, "polish_steps": 5}
ROW_SPACING, COL_SPACING = 0.5, 0.25  # mm; different so that a swapped axis shows


def pixels(seed: int = 3) -> np.ndarray:
    """uint16 [H, W]: a flat background and a textured region off-centre, stored values up to ~3000."""
    rng = np.random.default_rng(seed)
    image = np.full((H, W), 200, np.uint16)
    image[30:75, 50:140] += rng.integers(0, 3000, (45, 90)).astype(np.uint16)
    return image


def labels() -> np.ndarray:
    out = np.zeros((H, W), np.uint16)
    out[40:60, 70:100], out[45:50, 75:85] = 1, 2
    return out


def write_dicom(path, values: np.ndarray) -> str:
    """A minimal secondary-capture DICOM (MONOCHROME2, 16 bit) with position, orientation and spacing."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "OT", "Phantom^DAC"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [ROW_SPACING, COL_SPACING]  # (between rows, between columns)
    ds.ImagePositionPatient = [10.0, 20.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelData = values.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


@pytest.fixture
def files(tmp_path) -> dict:
    return {"image": write_dicom(tmp_path / "image.dcm", pixels()), "label": write_dicom(tmp_path / "label.dcm", labels())}


def load() -> LoadImaged:
    return LoadImaged(["image", "label"], reader="PydicomReader", ensure_channel_first=True, image_only=True)


def loaded(files: dict) -> dict:
    return load()(dict(files))


def crop(**kwargs) -> DACropd:
    return DACropd(["image", "label"], OUT, 4, mode=("bilinear", "nearest"), **(FAST | kwargs))


def world(affine: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Voxel indices [N, 2] (d1, d2) -> world points [N, 3] through a 4 x 4 affine."""
    homogeneous = torch.cat((index.double(), torch.zeros(len(index), 1), torch.ones(len(index), 1)), 1)
    return (affine.double() @ homogeneous.T).T[:, :3]


class TestDACropdWithMonai:
    def test_load_dicom_axes_as_documented(self, files):
        d = loaded(files)
        image = d["image"]
        # MONAI's readers: [C, X, Y] = [C, columns, rows]; spacing (columns, rows).
        assert image.shape == (1, W, H)
        assert torch.equal(image[0].T, torch.as_tensor(pixels(), dtype=image.dtype))
        assert abs(image.affine[0, 0]) == COL_SPACING and abs(image.affine[1, 1]) == ROW_SPACING

    def test_box_and_crop_are_dacrops(self, files):
        d = loaded(files)
        out = crop()(d)
        source = d["image"][0].T.as_tensor()  # [H, W] as displayed
        scaled = ((source - source.min()) / (source.max() - source.min()))[None, None]
        with torch.no_grad():
            expected = DACrop(OUT, 4, **FAST).locate(scaled)[0].double()
        assert torch.allclose(out["crop_box"], expected, atol=1e-5)
        assert out["crop_box"][0] > 30  # the textured region is off-centre: the box moved
        # Image: DAC's crop of the stored values, transposed back to [C, X, Y].
        assert out["image"].shape == (1, OUT[1], OUT[0]) and out["image"].dtype == torch.float32
        ref = crop_resize(source[None, None], expected[None].float(), OUT)[0, 0]
        assert (out["image"][0].T.as_tensor() - ref).abs().max() < 1e-2 * float(source.max())
        # Label: nearest, values kept.
        ref_labels = heatmap_to_crop(torch.as_tensor(labels().astype(np.int64))[None], expected, OUT, mode="nearest")
        assert torch.equal(out["label"][0].T.as_tensor().long(), ref_labels[0])

    def test_affine_maps_crop_voxels_to_the_same_world_points(self, files):
        d = loaded(files)
        before = d["image"].affine.clone()
        out = crop()(d)
        box = out["crop_box"]
        # A crop voxel (x, y index) sits where its centre came from in the original.
        crop_index = torch.tensor([[0, 0], [OUT[1] - 1, OUT[0] - 1], [17, 42]], dtype=torch.float64)
        centres = crop_index + 0.5  # continuous (x, y) in crop pixels
        orig_continuous = box[:2] + centres * (box[2:] - box[:2]) / torch.tensor([OUT[1], OUT[0]], dtype=torch.float64)
        orig_index = orig_continuous - 0.5
        assert torch.allclose(world(out["image"].affine, crop_index), world(before, orig_index), atol=1e-9)
        assert torch.equal(out["image"].affine, out["label"].affine)
        assert torch.equal(d["image"].affine, before)  # the input was not modified

    def test_invertd_restores_a_segmentation_exactly(self, files):
        pre = Compose([load(), crop()])
        d = pre(dict(files))
        original = loaded(files)
        box = d["crop_box"]
        d["pred"] = MetaTensor(d["label"].as_tensor().clone())  # a "segmentation made on the crop"
        out = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(d)
        pred = out["pred"]
        assert pred.shape == original["label"].shape == (1, W, H)
        assert torch.equal(pred.affine, original["label"].affine)  # exactly, not approximately
        assert pred.applied_operations == original["image"].applied_operations
        # Values: the original labels wherever a pixel's centre lies in the box, 0 outside.
        cols = torch.arange(W, dtype=torch.float64) + 0.5
        rows = torch.arange(H, dtype=torch.float64) + 0.5
        inside = ((cols >= box[0]) & (cols < box[2]))[:, None] & ((rows >= box[1]) & (rows < box[3]))[None, :]
        truth = original["label"][0].as_tensor()
        assert torch.equal(pred[0].as_tensor()[inside], truth[inside])
        assert pred[0].as_tensor()[~inside].abs().max() == 0

    def test_compose_inverse_restores_every_key(self, files):
        pre = Compose([load(), crop()])
        d = pre(dict(files))
        back = pre.inverse(d)
        original = loaded(files)
        for key in ("image", "label"):
            assert back[key].shape == original[key].shape
            assert torch.equal(back[key].affine, original[key].affine)
            assert back[key].applied_operations == original[key].applied_operations
        # The bilinear image back on its grid: close to the original inside the box (a
        # 1.4x finer crop resampled back), 0 outside.
        box = d["crop_box"]
        x1, y1, x2, y2 = (int(v) for v in (box[0].ceil() + 1, box[1].ceil() + 1, box[2].floor() - 1, box[3].floor() - 1))
        diff = (back["image"][0, x1:x2, y1:y2] - original["image"][0, x1:x2, y1:y2]).abs()
        assert diff.mean() < 0.15 * float(original["image"].max())

    def test_a_marker_keeps_its_world_position(self, files, tmp_path):
        values = np.full((H, W), 100, np.uint16)
        values[30:75, 50:140] += np.random.default_rng(0).integers(0, 1500, (45, 90)).astype(np.uint16)
        values[50:53, 90:93] = 6000  # centre (x, y) = (91.5, 51.5) in continuous pixels
        path = write_dicom(tmp_path / "marker.dcm", values)
        d = LoadImaged("image", reader="PydicomReader", ensure_channel_first=True, image_only=True)({"image": path})
        before = d["image"].affine.clone()
        out = DACropd("image", OUT, 4, **FAST)(d)
        image = out["image"][0].as_tensor().double()
        weights = (image - 1700).clamp_min(0)  # the marker only (the texture stays below)
        index = torch.stack(torch.meshgrid(torch.arange(OUT[1]), torch.arange(OUT[0]), indexing="ij"), -1).double()
        centroid = (weights[..., None] * index).sum((0, 1)) / weights.sum()  # voxel index (x, y)
        expected = points_to_crop(torch.tensor([[91.5, 51.5]]), out["crop_box"], OUT)[0] - 0.5
        assert (centroid - expected).abs().max() < 0.25
        marker_world = world(before, torch.tensor([[91.0, 51.0]]))
        assert torch.allclose(world(out["image"].affine, centroid[None]), marker_world, atol=0.25 * ROW_SPACING)

    def test_yx_arrays_give_the_transposed_result(self, files):
        d = loaded(files)
        xy = crop()(d)
        yx_input = {k: MetaTensor(d[k].as_tensor().transpose(-1, -2).clone()) for k in ("image", "label")}
        yx = crop(spatial_axes="yx")(yx_input)
        assert torch.allclose(xy["crop_box"], yx["crop_box"])
        assert yx["image"].shape == (1, *OUT)
        assert torch.allclose(yx["image"].as_tensor(), xy["image"].as_tensor().transpose(-1, -2))
        assert torch.equal(yx["label"].as_tensor(), xy["label"].as_tensor().transpose(-1, -2))

    def test_keys_and_missing_keys(self, files):
        d = loaded(files)
        only_image = {"image": d["image"]}
        with pytest.raises(KeyError):
            crop()(only_image)
        out = crop(allow_missing_keys=True)(only_image)
        assert "label" not in out and out["image"].shape == (1, OUT[1], OUT[0])
        out = DACropd("label", OUT, 4, source_key="image", mode="nearest", box_key=None, **FAST)(d)
        assert out["image"] is d["image"] and out["label"].shape == (1, OUT[1], OUT[0]) and "crop_box" not in out

    def test_plain_inputs_and_track_meta_off(self, files):
        d = loaded(files)
        plain = {"image": d["image"].numpy(), "label": d["label"].as_tensor()}
        out = crop()(plain)
        assert isinstance(out["image"], MetaTensor) and out["image"].shape == (1, OUT[1], OUT[0])
        from monai.data import set_track_meta

        set_track_meta(False)
        try:
            out = crop()(dict(d))
            assert type(out["image"]) is torch.Tensor
        finally:
            set_track_meta(True)

    def test_bad_input_names_the_key(self, files):
        d = loaded(files)
        with pytest.raises(DACInputError, match=r"\['image'\].*source_key"):
            crop(source_key="image")({"label": d["label"]})
        wrong = dict(d, label=MetaTensor(torch.zeros(1, W, H - 2)))
        with pytest.raises(DACInputError, match=r"\['label'\].*\(94, 160\)"):
            crop()(wrong)
        with pytest.raises(DACInputError, match=r"\['image'\].*3D volumes"):
            crop()({"image": MetaTensor(torch.rand(1, W, H, 4)), "label": d["label"]})
        with pytest.raises(DACInputError, match="mode"):
            DACropd("image", OUT, 4, mode="cubic")
        with pytest.raises(DACInputError, match="spatial_axes"):
            DACropd("image", OUT, 4, spatial_axes="hw")
        with pytest.raises(DACInputError, match=r"\['image'\].*MetaTensor"):
            crop(allow_missing_keys=True).inverse({"image": torch.zeros(1, 3, 3)})

    def test_a_source_the_search_cannot_take_names_the_key(self, files):
        d = loaded(files)
        for image, scale, what in (
            (torch.full((1, W, H), float("nan")), True, "NaN"),
            (torch.rand(1, 6, 6), True, "too small"),
            (torch.rand(1, W, H) * 2000 - 1000, False, r"\[0, 1\]"),
            ((torch.rand(1, W, H) * 4000).long(), False, "dtype"),
        ):
            with pytest.raises(DACInputError, match=r"^\['image'\]: .*" + what):
                crop(scale_source=scale)({"image": MetaTensor(image), "label": d["label"]})
        scaled = crop()({"image": MetaTensor((torch.rand(1, W, H) * 4000).long()), "label": d["label"]})
        assert scaled["image"].shape == (1, OUT[1], OUT[0])  # any integer dtype is scaled to [0, 1] first

    def test_batched_dataloader_then_decollate_and_invertd(self, tmp_path):
        # MONAI's inference pattern: workers, collate, a prediction per batch, decollate, Invertd.
        from monai.data import DataLoader, Dataset, decollate_batch

        files = [
            {"image": write_dicom(tmp_path / f"image{i}.dcm", pixels(seed=i)), "label": write_dicom(tmp_path / f"label{i}.dcm", labels())}
            for i in range(2)
        ]
        pre = Compose([load(), crop()])
        post = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)
        batch = next(iter(DataLoader(Dataset(files, pre), batch_size=2, num_workers=2)))
        assert batch["image"].shape == (2, 1, OUT[1], OUT[0]) and batch["crop_box"].shape == (2, 4)
        batch["pred"] = batch["label"].clone()
        for item, source in zip(decollate_batch(batch), files):
            pred = post(item)["pred"]
            original = loaded(source)
            assert pred.shape == original["label"].shape and torch.equal(pred.affine, original["label"].affine)


def test_docs_monai_example_runs(tmp_path, monkeypatch, capsys):
    from test_transforms import docs_blocks

    monkeypatch.chdir(tmp_path)
    (code,) = docs_blocks(with_monai=True)
    exec(compile(code, "docs/transforms.md", "exec"), {})
    assert "torch.Size([1, 370, 200]) torch.Size([1, 709, 384])" in capsys.readouterr().out
