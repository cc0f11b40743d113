"""dac.data.phantoms and dac.data.datasets: phantoms (determinism, classes, ground-truth box, saliency), datasets, collation."""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from dac import DACInputError, DACrop
from dac.data.datasets import ImageFolderDataset, ImageLabelDataset, PhantomDataset, collate_images
from dac.data.phantoms import CLASS_EDGES, CLASS_NAMES, make_phantom, restoration_class
from dac.functional import max_min_pool

SMALL = (384, 709)  # the paper's 1536 x 2836, divided by 4


def pil_reader(path: str) -> torch.Tensor:
    """A tiny reader so these tests do not depend on dac.data.io: gray Tensor[1, H, W] uint8."""
    return torch.from_numpy(np.array(Image.open(path).convert("L")))[None]


def write_png(path, value: int, size=(6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


def roi_mask(roi: torch.Tensor, shape: tuple[int, int], k: int) -> torch.Tensor:
    """Pooled pixels (window k) whose centre lies in the xyxy box ``roi``."""
    ys = (torch.arange(shape[0]) + 0.5) * k
    xs = (torch.arange(shape[1]) + 0.5) * k
    x1, y1, x2, y2 = roi.tolist()
    return ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]


class TestRestorationClass:
    def test_boundaries(self):
        expected = {0: 0, 1: 1, 3: 1, 4: 2, 6: 2, 7: 3, 11: 3, 12: 4, 32: 4}
        assert {n: restoration_class(n) for n in expected} == expected
        assert [restoration_class(CLASS_EDGES[c]) for c in range(5)] == [0, 1, 2, 3, 4]
        assert restoration_class(np.int64(5)) == 2
        assert CLASS_NAMES == ("0", "1-3", "4-6", "7-11", "12-32")

    @pytest.mark.parametrize("count", [33, -1, 2.0, True, "3", None])
    def test_bad_count_raises(self, count):
        with pytest.raises(DACInputError, match="count"):
            restoration_class(count)


class TestMakePhantom:
    def test_deterministic(self):
        a, b, c = make_phantom(11, *SMALL), make_phantom(11, *SMALL), make_phantom(12, *SMALL)
        assert torch.equal(a.image, b.image) and torch.equal(a.roi, b.roi)
        assert (a.label, a.restorations, a.seed) == (b.label, b.restorations, 11)
        assert not torch.equal(a.image, c.image)
        assert not torch.equal(a.roi, c.roi)

    def test_leaves_global_rng_alone(self):
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
        make_phantom(1, *SMALL)
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()

    def test_shapes_and_dtypes(self):
        p8, p16 = make_phantom(3, *SMALL), make_phantom(3, *SMALL, bits=16)
        assert p8.image.shape == (1, *SMALL) and p8.image.dtype == torch.uint8
        assert p16.image.shape == (1, *SMALL) and p16.image.dtype == torch.uint16
        assert p8.roi.shape == (4,) and p8.roi.dtype == torch.float32
        # The same phantom at two bit depths: 16-bit is 8-bit's finer quantisation.
        diff = p16.image.to(torch.int32).float() / 257 - p8.image.float()
        assert diff.abs().max() <= 0.5 + 1e-3
        assert p8.image.max() > 200 and p8.image.min() < 60  # uses the range

    @pytest.mark.parametrize("label", range(5))
    def test_label_sets_restoration_count(self, label):
        for seed in (0, 1, 2):
            p = make_phantom(seed, 96, 177, label=label)
            assert p.label == label
            assert CLASS_EDGES[label] <= p.restorations < CLASS_EDGES[label + 1]
            assert restoration_class(p.restorations) == label

    def test_unlabelled_draws_its_own_class(self):
        for seed in range(4):
            p = make_phantom(seed, 96, 177)
            assert p.label == restoration_class(p.restorations)
            # The label only overrides the class drawn: passing the drawn one changes nothing.
            assert torch.equal(make_phantom(seed, 96, 177, label=p.label).image, p.image)

    def test_roi_inside_image_and_around_every_tooth(self):
        for seed in range(3):
            p = make_phantom(seed, *SMALL)
            x1, y1, x2, y2 = p.roi.tolist()
            assert 0 <= x1 < x2 <= SMALL[1] and 0 <= y1 < y2 <= SMALL[0]
            assert 28 - 4 <= len(p.teeth) <= 32
            torch.testing.assert_close(p.roi[:2], p.teeth[:, :2].amin(0))
            torch.testing.assert_close(p.roi[2:], p.teeth[:, 2:].amax(0))

    def test_restorations_lie_inside_roi(self):
        # One seed is one "patient": with another label only the dental work changes, so
        # the pixels that differ strongly are the restorations, and they lie in the box.
        for seed in range(3):
            bare, restored = make_phantom(seed, *SMALL, label=0), make_phantom(seed, *SMALL, label=4)
            assert torch.equal(bare.roi, restored.roi) and restored.restorations >= 12
            changed = (restored.image.int() - bare.image.int())[0] > 40
            ys, xs = torch.nonzero(changed, as_tuple=True)
            assert len(ys) > 200
            x1, y1, x2, y2 = restored.roi.tolist()  # allow the 1-px anti-aliased rim of metal edges
            assert xs.min() >= x1 - 1 and xs.max() < x2 + 1 and ys.min() >= y1 - 1 and ys.max() < y2 + 1
            inner = changed[int(y1) : int(y2), int(x1) : int(x2)].sum()
            assert inner >= 0.99 * changed.sum()
            # Restorations are near saturation, brighter than any unrestored tooth.
            assert restored.image[0][changed].float().median() > 225

    def test_roi_varies_in_position_and_scale(self):
        rois = torch.stack([make_phantom(seed, *SMALL).roi for seed in range(8)])
        centre_x = (rois[:, 0] + rois[:, 2]) / 2 / SMALL[1]
        centre_y = (rois[:, 1] + rois[:, 3]) / 2 / SMALL[0]
        width = (rois[:, 2] - rois[:, 0]) / SMALL[1]
        assert centre_x.max() - centre_x.min() > 0.05
        assert centre_y.max() - centre_y.min() > 0.05
        assert width.max() - width.min() > 0.1
        assert width.min() > 0.35 and width.max() < 0.8  # arch: 0.45-0.7 of the width, tilted

    def test_saliency_peaks_on_teeth_but_distractors_light_up(self):
        # What DAC relies on: the max-min pooled map is higher inside the box on average;
        # what makes it hard: outside (spine, rami, collimator, marker, noise) is not dark.
        # Measured on seeds 0-39 at this size: inside/outside mean 1.28-3.25, outside
        # 95th percentile / inside mean 0.55-1.28.
        k = 5
        for seed in range(4):
            p = make_phantom(seed, *SMALL)
            saliency = max_min_pool(p.image[None], k)[0, 0]
            inside = roi_mask(p.roi, saliency.shape, k)
            mean_in, outside = saliency[inside].mean(), saliency[~inside]
            assert mean_in > 1.15 * outside.mean()
            assert torch.quantile(outside, 0.95) > 0.4 * mean_in

    @pytest.mark.parametrize("size", [(64, 64), (200, 1400), (900, 500)])
    def test_other_sizes(self, size):
        p = make_phantom(5, *size)
        x1, y1, x2, y2 = p.roi.tolist()
        assert p.image.shape == (1, *size)
        assert 0 <= x1 < x2 <= size[1] and 0 <= y1 < y2 <= size[0]

    def test_paper_size(self):
        p = make_phantom(2024, 1536, 2836)
        assert p.image.shape == (1, 1536, 2836) and p.image.dtype == torch.uint8
        x1, y1, x2, y2 = p.roi.tolist()
        assert 0 <= x1 < x2 <= 2836 and 0 <= y1 < y2 <= 1536
        assert 0.35 < (x2 - x1) / 2836 < 0.8
        saliency = max_min_pool(p.image[None], 10)[0, 0]  # the paper's 10 x 10 windows
        inside = roi_mask(p.roi, saliency.shape, 10)
        assert saliency[inside].mean() > 1.15 * saliency[~inside].mean()

    @pytest.mark.parametrize(
        "kwargs, name",
        [
            (dict(seed=-1), "seed"),
            (dict(seed=1.5), "seed"),
            (dict(seed=1, height=32), "height"),
            (dict(seed=1, width=True), "width"),
            (dict(seed=1, label=5), "label"),
            (dict(seed=1, label="1-3"), "label"),
            (dict(seed=1, bits=12), "bits"),
        ],
    )
    def test_bad_arguments_raise(self, kwargs, name):
        kwargs = dict(height=96, width=177) | kwargs
        with pytest.raises(DACInputError, match=name):
            make_phantom(**kwargs)


class TestPhantomDataset:
    def test_items_are_the_seeded_phantoms(self):
        ds = PhantomDataset(7, seed=3, sizes=((96, 177), (100, 160)))
        assert len(ds) == 7 and ds.labels == [0, 1, 2, 3, 4, 0, 1]
        item = ds[6]
        assert set(item) == {"image", "label", "roi", "restorations", "index"}
        expected = make_phantom(3 * 1_000_003 + 6, 96, 177, label=1)
        assert torch.equal(item["image"], expected.image) and torch.equal(item["roi"], expected.roi)
        assert (item["label"], item["restorations"], item["index"]) == (1, expected.restorations, 6)
        assert ds[5]["image"].shape == (1, 100, 160)
        assert torch.equal(ds[-1]["image"], item["image"])
        with pytest.raises(IndexError):
            ds[7]

    def test_unbalanced_labels_without_drawing_images(self):
        ds = PhantomDataset(400, seed=1, sizes=((96, 177),), balanced=False)
        counts = np.bincount(ds.labels, minlength=5)
        assert counts.sum() == 400 and counts.min() > 50  # uniform classes: ~80 each
        for i in (0, 1, 2):
            assert ds[i]["label"] == ds.labels[i]

    def test_bits_and_transform(self):
        ds = PhantomDataset(2, sizes=((96, 177),), bits=16, transform=lambda x: x.to(torch.int32).float() / 65535)
        image = ds[0]["image"]
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1

    @pytest.mark.parametrize(
        "kwargs, name",
        [(dict(length=-1), "length"), (dict(length=2, sizes=()), "sizes"), (dict(length=2, sizes=((10, 100),)), "sizes"),
         (dict(length=2, bits=32), "bits"), (dict(length=2, transform=3), "transform")],
    )
    def test_bad_arguments_raise(self, kwargs, name):
        with pytest.raises(DACInputError, match=name):
            PhantomDataset(**kwargs)


class TestImageFolderDataset:
    def test_class_folders(self, tmp_path):
        write_png(tmp_path / "cats" / "b.png", 10)
        write_png(tmp_path / "cats" / "deep" / "a.PNG", 20)
        write_png(tmp_path / "ants" / "z.png", 30, size=(4, 7))
        (tmp_path / "ants" / "notes.txt").write_text("not an image")
        ds = ImageFolderDataset(tmp_path, reader=pil_reader, transform=lambda x: x.float())
        assert ds.classes == ["ants", "cats"]
        assert [(p.replace(str(tmp_path), ""), label) for p, label in ds.samples] == [
            ("/ants/z.png", 0), ("/cats/b.png", 1), ("/cats/deep/a.PNG", 1)]
        assert ds.labels == [0, 1, 1] and len(ds) == 3
        item = ds[0]
        assert item["label"] == 0 and item["path"].endswith("z.png")
        assert item["image"].shape == (1, 4, 7) and item["image"].dtype == torch.float32
        assert item["image"].max() == 30

    def test_paper_class_names_keep_the_paper_order(self, tmp_path):
        for value, name in enumerate(("12-32", "0", "4-6")):
            write_png(tmp_path / name / "x.png", value)
        ds = ImageFolderDataset(tmp_path, reader=pil_reader)
        assert ds.classes == list(CLASS_NAMES)  # not string order, where "12-32" < "4-6"
        assert sorted(ds.labels) == [0, 2, 4]

    def test_csv_with_names_header_and_relative_paths(self, tmp_path):
        write_png(tmp_path / "img" / "a.png", 1)
        write_png(tmp_path / "img" / "b.jpg", 2)
        elsewhere = tmp_path / "other" / "c.png"
        write_png(elsewhere, 3)
        csv_file = tmp_path / "meta" / "list.csv"
        csv_file.parent.mkdir()
        csv_file.write_text(f"path,label\n../img/a.png,dog\n../img/b.jpg, cat\n\n{elsewhere},dog\n")
        ds = ImageFolderDataset(csv_file, reader=pil_reader)
        assert ds.classes == ["cat", "dog"] and ds.labels == [1, 0, 1]
        assert ds.samples[0][0] == str(csv_file.parent / "../img/a.png")
        assert ds[2]["image"].max() == 3

    def test_csv_with_int_labels_no_header(self, tmp_path):
        write_png(tmp_path / "a.png", 1)
        write_png(tmp_path / "b.png", 2)
        (tmp_path / "list.csv").write_text("a.png,3\nb.png,0\n")
        ds = ImageFolderDataset(str(tmp_path / "list.csv"), reader=pil_reader)
        assert ds.labels == [3, 0] and ds.classes == ["0", "1", "2", "3"]

    def test_csv_in_latin1_names_its_files_by_their_bytes(self, tmp_path):
        # a Latin-1 CSV (what `printf 'caf\xe9.png,...'` writes) names the file whose name holds those bytes
        name = os.fsdecode(b"caf\xe9.png")
        write_png(tmp_path / name, 1)
        write_png(tmp_path / "b.png", 2)
        (tmp_path / "list.csv").write_bytes(b"caf\xe9.png,a\nb.png,b\n")
        ds = ImageFolderDataset(tmp_path / "list.csv", reader=pil_reader)
        assert ds.labels == [0, 1] and ds[0]["image"].max() == 1
        (tmp_path / "gone.csv").write_bytes(b"caf\xe8.png,a\n")  # another byte: no such file, said in one line
        with pytest.raises(DACInputError, match=r"line 1.*caf\\xe8\.png"):
            ImageFolderDataset(tmp_path / "gone.csv")

    def test_errors_name_the_file_and_line(self, tmp_path):
        with pytest.raises(DACInputError, match="no class sub-folders"):
            ImageFolderDataset(tmp_path)
        (tmp_path / "empty_class").mkdir()
        (tmp_path / "empty_class" / "readme.txt").write_text("x")
        with pytest.raises(DACInputError, match="empty_class.*no images"):
            ImageFolderDataset(tmp_path)
        write_png(tmp_path / "a.png", 1)
        bad = tmp_path / "bad.csv"
        bad.write_text("path,label\na.png,1\na.png\n")
        with pytest.raises(DACInputError, match=r"bad\.csv.*line 3"):
            ImageFolderDataset(bad)
        bad.write_text("a.png,1\nmissing.png,1\n")
        with pytest.raises(DACInputError, match=r"line 2.*missing\.png"):
            ImageFolderDataset(bad)
        bad.write_text("path,label\n")
        with pytest.raises(DACInputError, match="lists no images"):
            ImageFolderDataset(bad)
        # One image twice (with its label or another, by another path to it): a fold would
        # train and test on it, or it would hold two labels.
        (tmp_path / "sub").mkdir()
        for rows in ("a.png,1\nsub/../a.png,1\n", "path,label\na.png,0\na.png,1\n"):
            bad.write_text(rows)
            with pytest.raises(DACInputError, match=r"bad\.csv.* lines [12] and [23]: .*a\.png.*twice"):
                ImageFolderDataset(bad)
        # The same file in two class folders (a link): in two classes, and in two folds.
        linked = tmp_path / "linked"
        write_png(linked / "cat" / "x.png", 1)
        write_png(linked / "cat" / "y.png", 2)
        (linked / "dog").mkdir()
        (linked / "dog" / "x.png").symlink_to(linked / "cat" / "x.png")
        write_png(linked / "dog" / "z.png", 3)
        with pytest.raises(DACInputError, match=r"root_or_csv: .*cat/x\.png.* and .*dog/x\.png.* same file"):
            ImageFolderDataset(linked)
        # One image saved twice under two names (no link): the same leak, by folder or by CSV.
        copied = tmp_path / "copied"
        write_png(copied / "cat" / "x.png", 1)
        write_png(copied / "cat" / "y.png", 2)
        write_png(copied / "dog" / "z.png", 3)
        assert len(ImageFolderDataset(copied)) == 3  # same size, other bytes: fine
        shutil.copy(copied / "cat" / "x.png", copied / "dog" / "x copy.png")
        with pytest.raises(DACInputError, match=r"root_or_csv: .*cat/x\.png.* and .*dog/x copy\.png.* same bytes"):
            ImageFolderDataset(copied)
        listing = copied / "list.csv"
        listing.write_text("path,label\ncat/x.png,cat\ndog/x copy.png,cat\ndog/z.png,dog\n")
        with pytest.raises(DACInputError, match=r"same bytes"):
            ImageFolderDataset(listing)
        with pytest.raises(DACInputError, match="does not exist"):
            ImageFolderDataset(tmp_path / "nowhere")
        with pytest.raises(DACInputError, match="directory or a .csv"):
            ImageFolderDataset(tmp_path / "a.png")


    def test_regions_table_gives_each_item_its_roi(self, tmp_path):
        write_png(tmp_path / "a" / "x.png", 1, size=(40, 60))
        write_png(tmp_path / "b" / "y.png", 2, size=(30, 50))
        boxes = tmp_path / "boxes.csv"
        boxes.write_text("path,x1,y1,x2,y2\nb/y.png,5,6,45,28\nother.png,0,0,1,1\na/x.png, 1, 2, 60, 40\n")
        ds = ImageFolderDataset(tmp_path, reader=pil_reader)  # no table: no roi
        assert "roi" not in ds[0] and ds.boxes is None
        ds = ImageFolderDataset(tmp_path, reader=pil_reader, regions=boxes)  # rows matched by file, extra rows ignored
        assert ds[0]["roi"].tolist() == [1.0, 2.0, 60.0, 40.0] and ds[0]["roi"].dtype == torch.float32
        assert ds[1]["roi"].tolist() == [5.0, 6.0, 45.0, 28.0]
        assert ImageLabelDataset(ds, ds.classes)[1]["roi"].tolist() == [5.0, 6.0, 45.0, 28.0]

    def test_regions_errors_name_the_table_and_the_file(self, tmp_path):
        write_png(tmp_path / "a" / "x.png", 1, size=(40, 60))
        write_png(tmp_path / "b" / "y.png", 2, size=(30, 50))
        boxes = tmp_path / "boxes.csv"
        cases = {
            "b/y.png,5,6,45,28\n": r"boxes\.csv.*no box for '.*x\.png'",
            "a/x.png,1,2,60,40\na/x.png,1,2,60,41\nb/y.png,5,6,45,28\n": r"line 2.*second, different box.*x\.png",
            "path,x,y,w,h\na/x.png,1,2,3,4\n": "names other columns",
            "a/x.png,1,2,60\n": r"line 1.*expected path,x1,y1,x2,y2",
            "a/x.png,1,2,sixty,40\n": "not four numbers",
            "a/x.png,10,2,5,40\n": "not xyxy",
            "a/x.png,nan,2,5,40\n": "not xyxy",
            "path,x1,y1,x2,y2\n": "lists no images",
        }
        for text, pattern in cases.items():
            boxes.write_text(text)
            with pytest.raises(DACInputError, match="regions: .*" + pattern):
                ImageFolderDataset(tmp_path, reader=pil_reader, regions=boxes)
        with pytest.raises(DACInputError, match="regions: .*not a file"):
            ImageFolderDataset(tmp_path, reader=pil_reader, regions=tmp_path / "nowhere.csv")
        boxes.write_text("a/x.png,1,2,61,40\nb/y.png,5,6,45,28\n")  # one pixel wider than the image: said when read
        ds = ImageFolderDataset(tmp_path, reader=pil_reader, regions=boxes)
        assert ds[1]["roi"].tolist() == [5.0, 6.0, 45.0, 28.0]
        with pytest.raises(DACInputError, match=r"regions: the box .*x\.png.*not inside its 60x40 image"):
            ds[0]


class TestCollate:
    def test_equal_sizes_stack(self):
        ds = PhantomDataset(3, sizes=((96, 177),))
        batch = collate_images([ds[i] for i in range(3)])
        assert batch["image"].shape == (3, 1, 96, 177) and batch["image"].dtype == torch.uint8
        assert batch["label"].tolist() == [0, 1, 2] and batch["label"].dtype == torch.int64
        assert batch["roi"].shape == (3, 4) and batch["index"].tolist() == [0, 1, 2]

    def test_mixed_sizes_stay_a_list(self):
        ds = PhantomDataset(2, sizes=((96, 177), (100, 160)))
        batch = collate_images([ds[0], ds[1]])
        assert isinstance(batch["image"], list) and [tuple(x.shape) for x in batch["image"]] == [(1, 96, 177), (1, 100, 160)]
        assert batch["roi"].shape == (2, 4)
        paths = collate_images([{"image": torch.zeros(1, 2, 2), "path": "a"}, {"image": torch.zeros(1, 2, 2), "path": "b"}])
        assert paths["path"] == ["a", "b"]

    def test_bad_batches_raise(self):
        with pytest.raises(DACInputError, match="batch"):
            collate_images([])
        with pytest.raises(DACInputError, match="item 1"):
            collate_images([{"image": torch.zeros(1, 2, 2)}, {"label": 1}])


def test_dacrop_runs_on_phantoms():
    """Sanity, not a benchmark: the crop layer finds boxes that overlap the true region."""
    ds = PhantomDataset(2, seed=5, sizes=(SMALL,))
    batch = collate_images([ds[0], ds[1]])
    boxes = DACrop(output_size=(40, 74), pool_size=5).locate(batch["image"])
    iou = box_iou(boxes, batch["roi"]).diag()
    assert torch.isfinite(iou).all() and (iou > 0).all()
    assert all(math.isfinite(v) for v in boxes.flatten().tolist())
