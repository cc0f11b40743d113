"""dac.transforms: AutoCrop (torchvision v2) against torchvision's own resized_crop, and the
maps between crop and original pixels (round trips, and a marker through the real crop).

Scenes are small (96 x 160, pool_size 4) so that every search takes a few milliseconds.
"""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from conftest import textured_scene
from dac import DACInputError, DACrop
from dac.saliency import SaliencyNet
from dac.transforms import (
    AutoCrop,
    boxes_to_crop,
    boxes_to_original,
    heatmap_to_crop,
    heatmap_to_original,
    points_to_crop,
    points_to_original,
)

H, W = 96, 160
OUT = (40, 74)
#: A short search (the tests check where things go, not how well the box is found).
FAST = {"steps_per_stage": 10, "polish_steps": 5}


def scene(seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Tensor[1, 96, 160] in [0, 1]: dark noise, a bright textured region off-centre."""
    return textured_scene(1, H, W, region=(0.55, 0.5), offset=(0.3, 0.3), dtype=dtype, seed=seed)[0]


def transform(**kwargs) -> AutoCrop:
    return AutoCrop(OUT, 4, **(FAST | kwargs))


def params_of(t: AutoCrop, image: torch.Tensor) -> dict:
    return t.make_params([image])


def window(params: dict) -> dict:
    return {k: params[k] for k in ("top", "left", "height", "width")}


# ----------------------------------------------------------------------------- AutoCrop
class TestAutoCropMatchesTorchvision:
    """The same box through torchvision's resized_crop: boxes, masks, key points identical,
    images equal away from the crop's outermost rows and columns."""

    def test_box_is_dacrops_box_rounded(self):
        image = scene()
        t = transform()
        p = params_of(t, image)
        found = DACrop(OUT, 4, **FAST).locate(image[None])[0]
        assert (p["box"] - found).abs().max() <= 0.5 + 1e-6
        assert torch.equal(p["box"], p["box"].round())
        assert (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]) == tuple(int(v) for v in p["box"])
        assert p["box"][0] > 20  # off-centre region: the search moved the box
        assert p["image_size"] == (H, W)

    @pytest.mark.parametrize("size", [OUT, (80, 148)], ids=["shrink", "grow"])
    def test_float_image_equals_torchvision_inside(self, size):
        # DAC's crop reads the image pixels just outside the box for its outermost output
        # rows/columns (its filter samples the original image; torchvision cuts the box out
        # first and renormalises at the cut): shrinking, the first row/column per side;
        # growing k-fold, the first ceil((k - 1) / 2). Here k <= 1.7: one per side.
        image = scene()
        t = AutoCrop(size, 4, **FAST)
        p = params_of(t, image)
        ours = t.transform(tv_tensors.Image(image), p)
        theirs = F.resized_crop(image, **window(p), size=list(size))
        assert isinstance(ours, tv_tensors.Image) and ours.dtype == torch.float32 and ours.shape == theirs.shape
        assert (ours - theirs)[:, 1:-1, 1:-1].abs().max() < 1e-5
        assert (ours - theirs).abs().max() > 1e-3  # the border does differ, as stated

    def test_whole_image_box_equals_torchvision_everywhere(self):
        image = scene()
        t = transform()
        p = {"box": torch.tensor([0.0, 0.0, W, H]), "top": 0, "left": 0, "height": H, "width": W}
        ours = t.transform(image, p)
        assert (ours - F.resized_crop(image, 0, 0, H, W, list(OUT))).abs().max() < 1e-5

    def test_uint8_in_uint8_out_within_one_level(self):
        image = (scene() * 255).round().to(torch.uint8)
        t = transform()
        p = params_of(t, image)
        ours = t.transform(image, p)
        theirs = F.resized_crop(image, **window(p), size=list(OUT))
        assert ours.dtype == theirs.dtype == torch.uint8
        assert (ours.int() - theirs.int())[:, 1:-1, 1:-1].abs().max() <= 1

    @pytest.mark.parametrize("fmt", ["XYXY", "XYWH", "CXCYWH"])
    def test_boxes_exact_format_kept_and_clipped(self, fmt):
        image = scene()
        xyxy = torch.tensor([[50.0, 30.0, 90.0, 60.0], [0.0, 0.0, 20.0, 15.0], [30.0, 10.0, 159.0, 95.0]])
        boxes = tv_tensors.BoundingBoxes(
            F.convert_bounding_box_format(xyxy, old_format="XYXY", new_format=fmt), format=fmt, canvas_size=(H, W)
        )
        out = transform()({"image": tv_tensors.Image(image), "boxes": boxes})
        p = params_of(transform(), image)
        theirs = F.resized_crop(boxes, **window(p), size=list(OUT))
        got = out["boxes"]
        assert isinstance(got, tv_tensors.BoundingBoxes) and got.format.name == fmt
        assert got.canvas_size == OUT and torch.equal(got, theirs)
        # Clipped to the crop; and the first box moved exactly as the crop does.
        back = F.convert_bounding_box_format(got.as_subclass(torch.Tensor), old_format=fmt, new_format="XYXY")
        assert back[:, 0::2].min() >= 0 and back[:, 0::2].max() <= OUT[1]
        assert back[:, 1::2].min() >= 0 and back[:, 1::2].max() <= OUT[0]
        expected = boxes_to_crop(xyxy, p["box"], OUT)
        limit = torch.tensor([OUT[1], OUT[0], OUT[1], OUT[0]], dtype=expected.dtype)
        assert torch.allclose(back, torch.minimum(expected.clamp_min(0), limit), atol=1e-4)

    def test_masks_identical_to_torchvision(self):
        image = scene()
        labels = torch.zeros(H, W, dtype=torch.uint8)
        labels[30:60, 50:90], labels[40:50, 60:70] = 1, 3
        out = transform()({"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(labels)})
        p = params_of(transform(), image)
        assert isinstance(out["mask"], tv_tensors.Mask)
        assert torch.equal(out["mask"], F.resized_crop(tv_tensors.Mask(labels), **window(p), size=list(OUT)))
        assert set(out["mask"].unique().tolist()) == {0, 1, 3}

    def test_mask_follows_the_image(self):
        # Not the same kernel: a bright square in the image and its mask land together.
        image = scene() * 0.5
        image[:, 36:58, 60:100] = 1.0
        mask = (image[0] == 1.0).to(torch.uint8)
        out = transform()({"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)})
        bright = out["image"][0] > 0.75
        inter = (bright & out["mask"].bool()).sum()
        union = (bright | out["mask"].bool()).sum()
        assert inter / union > 0.85

    def test_keypoints_moved_like_torchvision_and_the_map(self):
        image = scene()
        points = torch.tensor([[70.5, 40.5], [10.0, 90.0]])
        out = transform()({"image": tv_tensors.Image(image), "points": tv_tensors.KeyPoints(points, canvas_size=(H, W))})
        p = params_of(transform(), image)
        assert out["points"].canvas_size == OUT
        assert torch.equal(out["points"], F.resized_crop(tv_tensors.KeyPoints(points, canvas_size=(H, W)), **window(p), size=list(OUT)))
        assert torch.allclose(out["points"].as_subclass(torch.Tensor), points_to_crop(points, p["box"], OUT), atol=1e-4)


class TestAutoCropSample:
    def test_box_returned_in_dict_and_target(self):
        image = scene()
        box = params_of(transform(), image)["box"]
        out = transform()({"image": image, "label": 3})
        assert torch.equal(out["crop"]["box"], box) and out["crop"]["image_size"].tolist() == [H, W]
        assert out["label"] == 3
        img, target = transform()(tv_tensors.Image(image), {"boxes": tv_tensors.BoundingBoxes([[50, 30, 90, 60]], format="XYXY", canvas_size=(H, W))})
        assert img.shape == (1, *OUT) and torch.equal(target["crop"]["box"], box)
        assert target["boxes"].canvas_size == OUT
        assert "crop" not in transform(crop_key=None)({"image": image})
        assert transform(crop_key="roi")({"image": image})["roi"]["box"].shape == (4,)

    def test_plain_tensor_rules_follow_torchvision(self):
        image, other = scene(), torch.rand(1, H, W)
        a, b = transform()(image, other)  # no tv Image: the first plain tensor is the image
        assert a.shape == (1, *OUT) and b is other
        c, d = transform()(tv_tensors.Image(image), other)  # with one: plain tensors pass through
        assert c.shape == (1, *OUT) and d is other
        assert transform()(image).shape == (1, *OUT)

    def test_pil_in_pil_out(self):
        gray = F.to_pil_image((scene() * 255).round().to(torch.uint8))
        rgb = gray.convert("RGB")
        for image in (gray, rgb):
            out = transform()(image)
            assert isinstance(out, PIL.Image.Image) and out.mode == image.mode and out.size == (OUT[1], OUT[0])
        tensor = F.pil_to_tensor(gray)
        assert torch.equal(F.pil_to_tensor(transform()(gray)), transform()(tensor))

    def test_pil_16_bit_gray_in_pil_out(self, tmp_path):
        """A 16-bit PNG opens in Pillow as mode I;16 (a radiograph's usual file): cropped as
        its uint16 tensor, returned in its own mode, big-endian I;16B included."""
        values = (scene() * 65535).round().to(torch.int32)[0].numpy().astype("uint16")
        PIL.Image.fromarray(values).save(tmp_path / "scan.png")
        png = PIL.Image.open(tmp_path / "scan.png")
        assert png.mode == "I;16"
        expected = transform()(torch.from_numpy(values)[None])
        big = PIL.Image.frombytes("I;16B", (W, H), values.astype(">u2").tobytes())
        for image in (png, big):
            out = transform()({"image": image})
            assert isinstance(out["image"], PIL.Image.Image) and out["image"].mode == image.mode
            assert out["image"].size == (OUT[1], OUT[0])
            assert torch.equal(torch.from_numpy(np.asarray(out["image"]).astype("uint16")).to(torch.int32),
                               expected[0].to(torch.int32))

    def test_dtypes_kept(self):
        base = scene(dtype=torch.float64)
        assert transform()(base).dtype == torch.float64
        assert transform()((base * 65535).round().to(torch.uint16)).dtype == torch.uint16
        assert transform()(tv_tensors.Image(base.float().expand(3, H, W).clone())).shape == (3, *OUT)

    def test_in_compose_with_torchvision_transforms(self):
        image = tv_tensors.Image((scene() * 255).round().to(torch.uint8))
        boxes = tv_tensors.BoundingBoxes([[50.0, 30.0, 90.0, 60.0]], format="XYXY", canvas_size=(H, W))
        pipeline = v2.Compose([transform(), v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)])
        out = pipeline({"image": image, "boxes": boxes})
        assert out["image"].dtype == torch.float32 and out["image"].shape == (1, *OUT)
        alone = transform()({"image": image, "boxes": boxes})
        assert torch.equal(out["boxes"], F.horizontal_flip(alone["boxes"]))
        assert torch.equal(out["crop"]["box"], alone["crop"]["box"])  # the box passes through later transforms

    def test_dataloader_with_two_workers(self):
        t = transform()
        loader = DataLoader(_Scenes(t), batch_size=2, num_workers=2, collate_fn=list)
        got = [s for batch in loader for s in batch]
        for i, sample in enumerate(got):
            ref = t(_Scenes()[i])
            assert torch.equal(sample["image"], ref["image"]) and torch.equal(sample["mask"], ref["mask"])
            assert torch.equal(sample["boxes"], ref["boxes"]) and torch.equal(sample["crop"]["box"], ref["crop"]["box"])

    def test_learned_saliency_is_used(self):
        torch.manual_seed(0)
        net = SaliencyNet(4, width=4, dilations=(1, 2))
        torch.nn.init.normal_(net.gate.weight, std=3.0)  # move it away from the max-min map
        image = scene()
        t = transform(saliency=net)
        with torch.no_grad():
            expected = DACrop(OUT, 4, saliency=net, **FAST).locate(image[None])[0]
        assert (params_of(t, image)["box"] - expected).abs().max() <= 0.5 + 1e-6
        assert t.dac.saliency is net and any(n.startswith("dac.saliency") for n, _ in t.named_parameters())

    def test_pickle_deepcopy_and_repr(self):
        image = scene()
        t = transform(sharpness=0.05)
        for clone in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t)):
            assert torch.equal(clone(image), t(image))
        assert "output_size=(40, 74)" in repr(t) and "sharpness=0.05" in repr(t)


class _Scenes(Dataset):
    """Four samples (image, mask, boxes); with a transform, transformed in __getitem__ (in the workers)."""

    def __init__(self, transform: AutoCrop | None = None) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        image = scene(seed=i)
        mask = (image[0] > 0.3).to(torch.uint8)
        boxes = tv_tensors.BoundingBoxes([[40.0, 25.0, 100.0, 70.0]], format="XYXY", canvas_size=(H, W))
        sample = {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "boxes": boxes}
        return self.transform(sample) if self.transform is not None else sample


class TestAutoCropBadInput:
    def raises(self, sample, *words):
        with pytest.raises(DACInputError) as info:
            transform()(sample)
        for word in words:
            assert word in str(info.value), str(info.value)

    def test_no_image(self):
        self.raises({"mask": tv_tensors.Mask(torch.zeros(H, W))}, "no image")

    def test_other_sizes_named(self):
        image = tv_tensors.Image(scene())
        self.raises({"image": image, "mask": tv_tensors.Mask(torch.zeros(H, W - 1))}, "['mask']", "(96, 159)")
        boxes = tv_tensors.BoundingBoxes([[1, 1, 5, 5]], format="XYXY", canvas_size=(H + 1, W))
        self.raises({"image": image, "target": {"boxes": boxes}}, "['target']['boxes']", "canvas_size")
        points = tv_tensors.KeyPoints([[1.0, 1.0]], canvas_size=(W, H))
        self.raises({"image": image, "kp": points}, "['kp']", "canvas_size")
        self.raises({"image": image, "second": tv_tensors.Image(torch.rand(1, H, W + 4))}, "['second']")

    def test_boxes_in_another_format_than_declared(self):
        image = tv_tensors.Image(scene())
        xywh_as_xyxy = tv_tensors.BoundingBoxes([[50, 30, 40, 30]], format="XYXY", canvas_size=(H, W))
        self.raises({"image": image, "boxes": xywh_as_xyxy}, "['boxes']", "box 0", "format")
        xyxy_as_xywh = tv_tensors.BoundingBoxes([[50, 30, 140, 80]], format="XYWH", canvas_size=(H, W))
        self.raises({"image": image, "boxes": xyxy_as_xywh}, "['boxes']", "XYWH")
        rotated = tv_tensors.BoundingBoxes([[50.0, 30.0, 40.0, 30.0, 10.0]], format="XYWHR", canvas_size=(H, W))
        self.raises({"image": image, "boxes": rotated}, "['boxes']", "rotated")

    def test_images_it_cannot_crop(self):
        self.raises({"image": torch.rand(1, H, W) * 255}, "['image']", "[0, 1]")
        self.raises({"image": tv_tensors.Image(torch.rand(4, H, W))}, "['image']", "C = 1 or 3")
        self.raises({"image": tv_tensors.Image(torch.rand(1, 6, 160))}, "['image']", "too small")
        self.raises({"video": tv_tensors.Video(torch.rand(2, 1, H, W))}, "['video']", "videos")
        self.raises({"image": PIL.Image.new("RGBA", (W, H))}, "['image']", "mode")
        self.raises({"image": PIL.Image.new("F", (W, H))}, "['image']", "I;16")
        self.raises({"image": torch.rand(1, H, W).to_sparse()}, "['image']", "sparse")

    def test_key_already_present(self):
        self.raises({"image": scene(), "crop": 1}, "crop")


# ----------------------------------------------------------------------------- maps
class TestMaps:
    crop_box = torch.tensor([[13.25, 7.5, 121.0, 65.75], [0.0, 0.0, 160.0, 86.0]], dtype=torch.float64)

    def test_boxes_round_trip_within_half_pixel(self):
        gen = torch.Generator().manual_seed(0)
        corners = torch.rand(2, 5, 2, 2, generator=gen, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
        boxes = torch.cat((corners.min(2).values, corners.max(2).values), -1)  # [2, 5, 4] xyxy
        there = boxes_to_crop(boxes, self.crop_box, OUT)
        back = boxes_to_original(there, self.crop_box, OUT)
        assert (back - boxes).abs().max() < 0.5 and torch.allclose(back, boxes, atol=1e-9)
        assert torch.allclose(boxes_to_crop(boxes_to_original(there, self.crop_box, OUT), self.crop_box, OUT), there)
        # The crop box itself is the whole crop.
        whole = boxes_to_crop(self.crop_box[:, None], self.crop_box, OUT)[:, 0]
        assert torch.allclose(whole, torch.tensor([0.0, 0.0, OUT[1], OUT[0]], dtype=torch.float64).expand(2, 4))

    def test_points_round_trip_within_half_pixel(self):
        points = torch.rand(2, 7, 2, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
        back = points_to_original(points_to_crop(points, self.crop_box, OUT), self.crop_box, OUT)
        assert (back - points).abs().max() < 0.5 and torch.allclose(back, points, atol=1e-9)
        one = points_to_original(points[0], self.crop_box[0], OUT)  # one box for all points
        assert torch.allclose(one, points_to_original(points, self.crop_box, OUT)[0])

    def test_float32_and_integer_inputs(self):
        box = torch.tensor([8, 4, 82, 44])
        out = boxes_to_original(torch.tensor([[0, 0, 37, 20]]), box, (20, 37))
        assert out.dtype == torch.float32 and out.tolist() == [[8.0, 4.0, 82.0, 44.0]]

    def test_marker_through_the_crop_lands_where_it_was(self):
        # A bright marker in a flat hole of the textured region: through AutoCrop, found in
        # the crop (centroid), mapped back, it is where it was.
        image = scene()
        image[:, 36:50, 72:92] = 0.3
        image[:, 42:45, 80:83] = 1.0  # pixels 80..82 x 42..44: centre (81.5, 43.5)
        out = transform()({"image": image})
        crop, box = out["image"][0].double(), out["crop"]["box"]
        peak = divmod(int(crop.argmax()), OUT[1])
        r0, c0 = peak[0] - 3, peak[1] - 3
        patch = (crop[r0 : r0 + 7, c0 : c0 + 7] - 0.3).clamp_min(0)
        rows, cols = torch.meshgrid(torch.arange(7.0) + r0 + 0.5, torch.arange(7.0) + c0 + 0.5, indexing="ij")
        found = torch.stack(((patch * cols).sum(), (patch * rows).sum())) / patch.sum()
        back = points_to_original(found[None], box, OUT)[0]
        assert (back - torch.tensor([81.5, 43.5], dtype=back.dtype)).abs().max() < 0.25
        # The crop as a heat map, put back on the original grid: its peak is the marker.
        heat = heatmap_to_original(out["image"], box, (H, W))
        assert heat.shape == (1, H, W)
        r, c = divmod(int(heat[0].argmax()), W)
        assert (r, c) == (43, 81)
        assert heat[:, :, : int(box[0])].abs().max() == 0 and heat[:, : int(box[1])].abs().max() == 0

    def test_heatmap_round_trip_and_label_nearest(self):
        box = torch.tensor([30.0, 12.0, 104.0, 52.0])  # 74 x 40 px -> OUT: one crop pixel per pixel
        labels = torch.randint(0, 5, (2, H, W))
        crop = heatmap_to_crop(labels, box, OUT, mode="nearest")
        assert crop.dtype == labels.dtype and torch.equal(crop, labels[:, 12:52, 30:104])
        back = heatmap_to_original(crop, box, (H, W), mode="nearest")
        assert torch.equal(back[:, 12:52, 30:104], labels[:, 12:52, 30:104])
        assert back.sum() == back[:, 12:52, 30:104].sum()
        smooth = torch.linspace(0, 1, W).expand(3, H, W).clone()
        grown = heatmap_to_crop(smooth, box, (80, 148))  # 2x finer than the original
        again = heatmap_to_original(grown, box, (H, W))
        assert (again - smooth)[:, 13:51, 31:103].abs().max() < 1e-5

    def test_bad_arguments(self):
        with pytest.raises(DACInputError, match="crop_box"):
            boxes_to_original(torch.zeros(1, 4), torch.tensor([5.0, 5.0, 1.0, 9.0]), OUT)
        with pytest.raises(DACInputError, match="points"):
            points_to_original(torch.zeros(3, 4), self.crop_box[0], OUT)
        with pytest.raises(DACInputError, match=r"Tensor\[2, N, 4\]"):
            boxes_to_original(torch.zeros(3, 4), self.crop_box, OUT)
        with pytest.raises(DACInputError, match="crop_size"):
            boxes_to_original(torch.zeros(3, 4), self.crop_box[0], (0, 5))
        with pytest.raises(DACInputError, match="mode"):
            heatmap_to_crop(torch.zeros(1, H, W), self.crop_box[0], OUT, mode="cubic")
        with pytest.raises(DACInputError, match="one box per map"):
            heatmap_to_original(torch.zeros(1, *OUT), self.crop_box, (H, W))


def test_import_dac_transforms_needs_no_monai():
    code = (
        "import sys; sys.modules['monai'] = None\n"
        "import dac, dac.transforms\n"
        "from dac.transforms import AutoCrop, DACropd\n"
        "try:\n    DACropd('image')\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'dac[monai]'" in done.stdout


def docs_blocks(with_monai: bool) -> list[str]:
    """The Python blocks of docs/transforms.md that do (or do not) use MONAI."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "transforms.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return [b for b in blocks if ("monai" in b) == with_monai]


def test_docs_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = docs_blocks(with_monai=False)
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "docs/transforms.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "torch.Size([1, 200, 370])" in printed and "torch.Size([1, 1536, 2836])" in printed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_sample_matches_cpu():
    image = (scene() * 255).round().to(torch.uint8)
    sample = {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask((image[0] > 100).to(torch.uint8))}
    t = transform()
    on_cpu = t(sample)
    on_gpu = t({k: v.cuda() for k, v in sample.items()})
    assert on_gpu["image"].device.type == "cuda" and on_gpu["image"].dtype == torch.uint8
    assert on_gpu["mask"].device.type == "cuda"
    assert (on_gpu["crop"]["box"] - on_cpu["crop"]["box"]).abs().max() <= 1  # float32 search on another device
    p = params_of(t, image)  # the same box on both devices: the same crop
    assert (t.transform(image.cuda(), p).cpu().int() - t.transform(image, p).int()).abs().max() <= 1
    heat = heatmap_to_original(on_gpu["image"].float(), on_gpu["crop"]["box"], (H, W))
    assert heat.device.type == "cuda" and heat.shape == (1, H, W)
