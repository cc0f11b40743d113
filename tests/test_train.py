"""dac.train: config, models, augmentation, pipelines, metrics vs scikit-learn, training,
checkpoints and resume, k-fold runs and their results folder, the CLI, and DDP on 2 processes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dac import DACInputError
from dac.cli import main
from dac.data.phantoms import make_phantom
from dac.functional import crop_resize
from dac.train import (
    BatchAugment,
    DACFront,
    PipelineConfig,
    ResizeFront,
    SpatialTransformerCrop,
    augmentation,
    build_pipeline,
    classification_metrics,
    config_from_dict,
    Engine,
    init_runtime,
    load_checkpoint,
    load_config,
    load_pipeline,
    max_inside_rotation,
    resnet,
    roc_curve,
    roi_rotation_crop,
    run_cv,
    save_checkpoint,
    summarize_folds,
)
from dac.train.augment import PAPER_DAC_RANGES
from dac.data.datasets import MemoryDataset
from dac.train.folds import stratified_folds
from dac.train.metrics import mean_std
from dac.saliency import SaliencyNet

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("resize", "dac", "dac_e2e", "stn")

# Tiny everything: 96 x 177 phantoms (the paper's 1536 x 2836 / 16), crops of 20 x 37.
TINY = {
    "seed": 0,
    "data": {"source": "phantom", "length": 20, "sizes": [[96, 177]], "cache_images": True},
    "model": {"arch": "resnet18", "width": 4},
    "train": {"batch_size": 6, "folds": 2, "device": "cpu", "eval_batch_size": 10, "holdout": 0.25},
    "pipelines": {
        "resize": {"epochs": 1, "input_size": [24, 24]},
        "dac": {"epochs": 2, "input_size": [20, 37], "pool_size": 3},
        "dac_e2e": {"epochs": 1, "input_size": [20, 37], "pool_size": 3},
        "stn": {"epochs": 1, "input_size": [20, 37], "localization_size": [32, 59]},
    },
}


def tiny_config(**pipelines):
    raw = json.loads(json.dumps(TINY))
    if pipelines:
        raw["pipelines"] = {k: v for k, v in pipelines.items()}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def phantoms() -> MemoryDataset:
    """12 uint8 phantoms of 96 x 177, labels 0..4 cycling."""
    items = [make_phantom(i, 96, 177, label=i % 5) for i in range(12)]
    return MemoryDataset([p.image for p in items], [p.label for p in items], [str(c) for c in range(5)])


def tiny_pipeline(kind: str, **kw):
    sizes = {"resize": (24, 24)}
    cfg = PipelineConfig(kind=kind, input_size=sizes.get(kind, (20, 37)), pool_size=3, localization_size=(32, 59), **kw)
    torch.manual_seed(0)
    return build_pipeline(cfg, arch="resnet18", width=4)


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- config


class TestConfig:
    def test_defaults_are_the_papers(self):
        cfg = config_from_dict({})
        assert (cfg.model.arch, cfg.train.lr, cfg.train.batch_size, cfg.train.folds) == ("resnet101", 1e-3, 24, 10)
        assert cfg.pipelines["resize"].input_size == (224, 224) and cfg.pipelines["resize"].epochs == 96
        assert cfg.pipelines["dac"].input_size == (200, 370) and cfg.pipelines["dac"].epochs == 144
        assert list(cfg.pipelines) == list(KINDS)

    @pytest.mark.parametrize(
        "raw, key",
        [
            ({"train": {"lrr": 1}}, "train"),
            ({"train": {"lr": -1}}, "train.lr"),
            ({"train": {"folds": 1}}, "train.folds"),
            ({"model": {"arch": "vgg16"}}, "model.arch"),
            ({"pipelines": {"dac": {"epochs": 0}}}, "pipelines.dac.epochs"),
            ({"pipelines": {"dac": {"augment": "heavy"}}}, "pipelines.dac.augment"),
            ({"pipelines": {"fast": {"epochs": 2}}}, "pipelines.fast.kind"),
            ({"pipelines": {"stn": {"roi_rotate_degrees": 5}}}, "pipelines.stn.roi_rotate_degrees"),
            ({"data": {"sizes": [[10, 20]]}}, r"data.sizes\[0\]"),
            ({"bogus": 1}, "config"),
            # wrong YAML types: one line naming the key, never a ValueError or TypeError from inside
            ({"train": {"holdout": "abc"}}, "train.holdout"),
            ({"train": {"holdout": "0.1"}}, "train.holdout"),  # a quoted number is a string, as everywhere else
            ({"train": {"holdout": [1]}}, "train.holdout"),
            ({"pipelines": {"dac": {"roi_rotate_degrees": "abc"}}}, "pipelines.dac.roi_rotate_degrees"),
            ({"pipelines": {"dac": [1, 2]}}, "pipelines.dac"),
            ({"pipelines": {"dac": "abc"}}, "pipelines.dac"),
            ({"train": {"lr": True}}, "train.lr"),
            ({"data": {"source": 5}}, "data.source"),
        ],
    )
    def test_bad_key_or_value_raises_naming_it(self, raw, key):
        with pytest.raises(DACInputError, match=key):
            config_from_dict(raw)

    def test_numpy_ints_are_ints(self):
        cfg = config_from_dict({"seed": np.int64(3), "data": {"length": np.int32(40)}})
        assert (cfg.seed, cfg.data.length) == (3, 40) and type(cfg.data.length) is int

    @pytest.mark.parametrize("labels, holdout", [([0, 1, 2, 3, 4] * 2, 0.2), ([0, 0, 1, 1, 2, 3, 3], 0.3)])
    def test_a_holdout_that_cannot_hold_every_class_is_one_line(self, labels, holdout):
        from dac.train.folds import holdout_split

        with pytest.raises(DACInputError, match="train.holdout"):
            holdout_split(labels, holdout)

    def test_shipped_configs_load(self):
        quick = load_config(ROOT / "configs" / "quick.yaml")
        paper = load_config(ROOT / "configs" / "paper.yaml")
        assert list(quick.pipelines) == list(paper.pipelines) == list(KINDS)
        assert paper.model.arch == "resnet101" and paper.train.folds == 10
        assert (paper.pipelines["dac"].epochs, paper.pipelines["resize"].epochs) == (144, 96)
        for path in sorted((ROOT / "configs").glob("*.yaml")):  # every config a page quotes loads
            assert load_config(path).pipelines, path.name
        searches = load_config(ROOT / "configs" / "searches.yaml").pipelines
        assert [(searches[n].kind, searches[n].search) for n in searches] == [
            ("dac", "paper"), ("dac", "global"), ("dac_e2e", "paper"), ("dac_e2e", "global")]

    def test_overrides_and_missing_files(self, tmp_path):
        cfg = load_config(ROOT / "configs" / "quick.yaml", data=str(tmp_path), device="cpu")
        assert cfg.data.source == str(tmp_path)
        with pytest.raises(DACInputError, match="--data"):
            load_config(None, data=str(tmp_path / "nope"))
        with pytest.raises(DACInputError, match="config"):
            load_config(tmp_path / "nope.yaml")
        (tmp_path / "bad.yaml").write_text("train: [1, 2")
        with pytest.raises(DACInputError, match="not valid YAML"):
            load_config(tmp_path / "bad.yaml")

    def test_fingerprint_ignores_device_only(self):
        a, b, c = tiny_config(), tiny_config(), tiny_config()
        b.train.device = "cuda"
        c.train.lr = 2e-3
        assert a.fingerprint() == b.fingerprint() != c.fingerprint()

    def test_search_is_a_pipeline_setting_for_dac_fronts(self):
        config = config_from_dict({"pipelines": {"dac": {"search": "global"}, "dac_e2e": {}}})
        assert config.pipelines["dac"].search == "global" and config.pipelines["dac_e2e"].search == "paper"
        front = build_pipeline(PipelineConfig(kind="dac", input_size=(20, 37), pool_size=3, search="global"), width=4).front
        assert front.crop.search_method == "global"
        with pytest.raises(DACInputError, match="search"):
            config_from_dict({"pipelines": {"dac": {"search": "grid"}}})
        # left at its default, older results folders keep their fingerprints; set, it is another experiment
        assert config_from_dict({"pipelines": {"dac": {"search": "paper"}}}).fingerprint() == config_from_dict({"pipelines": {"dac": {}}}).fingerprint()
        assert config.fingerprint() != config_from_dict({"pipelines": {"dac": {}, "dac_e2e": {}}}).fingerprint()


# ----------------------------------------------------------------------------- models


class TestResNet:
    @pytest.mark.parametrize("arch, reference", [("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)])
    def test_width_64_is_torchvisions_network(self, arch, reference):
        ours = resnet(arch, num_classes=5, in_channels=3, width=64)
        theirs = reference(weights=None, num_classes=5)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}

    def test_one_channel_stem_and_shapes(self):
        net = resnet("resnet18", 5, width=8)
        assert net.conv1.in_channels == 1
        assert net(torch.rand(3, 1, 48, 88)).shape == (3, 5)

    @pytest.mark.parametrize("kw, name", [({"arch": "resnet7"}, "arch"), ({"width": 0}, "width"), ({"num_classes": 1}, "num_classes")])
    def test_bad_input_raises(self, kw, name):
        with pytest.raises(DACInputError, match=name):
            resnet(**kw)


# ----------------------------------------------------------------------------- augmentation


class TestAugmentation:
    def test_paper_ranges(self):
        ranges = augmentation("paper")
        assert ranges.degrees == 7.0 and ranges.scale == (0.97, 1.03) and ranges.shear == (0.0, 2.0) and ranges.flip
        assert ranges.translate == PAPER_DAC_RANGES.translate
        assert round(ranges.translate[0] * 370) == 26 and round(ranges.translate[1] * 200) == 14
        assert augmentation("paper", rotate=False).degrees == 0.0
        assert augmentation("none") is None
        with pytest.raises(DACInputError, match="preset"):
            augmentation("heavy")

    def test_each_image_draws_its_own_and_eval_is_identity(self):
        aug = BatchAugment(augmentation("strong"))
        x = torch.rand(1, 1, 20, 37).repeat(4, 1, 1, 1)
        torch.manual_seed(0)
        y = aug.train()(x)
        assert y.shape == x.shape and not torch.equal(y[0], y[1])
        assert torch.equal(aug.eval()(x), x)
        noise = torch.rand(4, 6)
        noise[1] = noise[0]
        z = aug.train()(x, noise)  # the same numbers give the same transform, whatever the rest of the batch
        assert torch.equal(z[0], z[1]) and torch.equal(z[0], aug(x[:1], noise[:1])[0])

    @pytest.mark.parametrize("preset", ["paper", "strong"])
    def test_is_torchvisions_affine(self, preset):
        from torchvision.transforms.v2 import functional as TF

        from dac.train.augment import affine_parameters, affine_theta

        x = torch.nn.functional.avg_pool2d(torch.rand(6, 1, 40, 74, generator=torch.Generator().manual_seed(1)), 3, 1, 1)
        params = affine_parameters(torch.rand(6, 6, generator=torch.Generator().manual_seed(2)), augmentation(preset), (40, 74))
        params["translate"] = params["translate"].round()  # torchvision shifts by whole pixels
        grid = torch.nn.functional.affine_grid(affine_theta(params, (40, 74)).float(), [6, 1, 40, 74], align_corners=False)
        ours = torch.nn.functional.grid_sample(x, grid, align_corners=False)
        assert params["flip"].any() and not params["flip"].all()
        for i in range(6):
            image = TF.horizontal_flip(x[i]) if params["flip"][i] else x[i]
            kw = dict(angle=float(params["angle"][i]), translate=[int(v) for v in params["translate"][i]], scale=float(params["scale"][i]),
                      shear=[float(params["shear"][i]), 0.0], interpolation=TF.InterpolationMode.BILINEAR)
            theirs, covered = TF.affine(image, **kw), TF.affine(torch.ones_like(image), **kw) > 0.9999
            assert covered.float().mean() > 0.5
            assert torch.allclose(ours[i][covered], theirs[covered], atol=1e-5)

    @pytest.mark.parametrize("preset", ["paper", "strong"])
    def test_padding_keeps_the_statistics_of_the_image(self, preset):
        # a dim, flat crop (like a panoramic one) stays what it is: no zero border shifts its mean
        aug = BatchAugment(augmentation(preset)).train()
        torch.manual_seed(0)
        flat = aug(torch.full((8, 1, 20, 37), 0.37))
        assert torch.allclose(flat, torch.full_like(flat, 0.37), atol=1e-6)
        smooth = torch.nn.functional.avg_pool2d(torch.randn(8, 1, 40, 74), 5, 1, 2)
        texture = 0.37 + 0.03 * smooth / smooth.std()  # mean 0.37, std 0.03, as the crops that collapsed
        out = aug(texture)  # zero padding: mean ~0.34, std x3
        assert abs(float(out.mean()) - 0.37) < 0.005 and abs(float(out.std()) / float(texture.std()) - 1) < 0.15

    @pytest.mark.parametrize("device", ["meta", "cuda"])
    def test_follows_the_input_device(self, device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        aug = BatchAugment(augmentation("paper")).train()
        assert aug(torch.rand(3, 1, 20, 37, device=device), torch.rand(3, 6)).device.type == device

    def test_differentiable(self):
        x = torch.rand(3, 1, 20, 37, requires_grad=True)
        BatchAugment(augmentation("paper")).train()(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


class TestRoIRotation:
    def test_no_black_corners_at_the_allowed_angle(self):
        image = torch.ones(2, 1, 100, 180)
        boxes = torch.tensor([[40.0, 25, 140, 79], [0, 20, 100, 74]])  # the second touches the left border
        limit = max_inside_rotation(boxes, (100, 180), 15.0)
        assert limit[0] > 5 and limit[1] == 0
        crops = roi_rotation_crop(image, boxes, limit, (27, 50))
        assert crops.min() > 0.999
        # beyond the limit the rotated box leaves the image and zeros come in
        assert roi_rotation_crop(image[:1], torch.tensor([[2.0, 2, 178, 97]]), torch.tensor([10.0]), (27, 50)).min() < 0.5

    def test_zero_angle_is_the_crop_and_rotation_turns_about_the_centre(self):
        x = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 80, 150), 5, 1, 2)
        box = torch.tensor([[30.0, 10, 104, 50]])
        assert torch.allclose(roi_rotation_crop(x, box, torch.zeros(1), (40, 74)), crop_resize(x, box, (40, 74)), atol=1e-5)
        # a point image: its only bright pixel sits at the box centre, which rotation keeps
        point = torch.zeros(1, 1, 81, 151)
        point[..., 40, 75] = 1
        centre = torch.tensor([[65.5, 30.5, 85.5, 50.5]])
        for angle in (0.0, 30.0):
            crop = roi_rotation_crop(point, centre, torch.tensor([angle]), (21, 21))
            assert crop[0, 0].argmax().item() == 10 * 21 + 10

    @pytest.mark.parametrize("device", ["meta", "cuda"])
    def test_max_inside_rotation_works_where_the_boxes_are(self, device):
        # meta catches any tensor made on the CPU without a GPU: the angle grid must follow the boxes
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        boxes = torch.tensor([[40.0, 25, 140, 79], [0, 20, 100, 74]], device=device)
        limit = max_inside_rotation(boxes, (100, 180), 15.0)
        assert limit.device == boxes.device and limit.shape == (2,)
        if device != "meta":
            assert torch.equal(limit.cpu(), max_inside_rotation(boxes.cpu(), (100, 180), 15.0))

    def test_bad_input_raises(self):
        with pytest.raises(DACInputError, match="angles"):
            roi_rotation_crop(torch.rand(2, 1, 20, 20), torch.tensor([[0.0, 0, 5, 5]] * 2), torch.zeros(3), (4, 4))
        with pytest.raises(DACInputError, match="boxes"):
            roi_rotation_crop(torch.rand(1, 1, 20, 20), torch.tensor([[5.0, 0, 1, 5]]), torch.zeros(1), (4, 4))
        with pytest.raises(DACInputError, match="limit"):
            max_inside_rotation(torch.tensor([[0.0, 0, 5, 5]]), (20, 20), 95.0)


# ----------------------------------------------------------------------------- pipelines


class TestPipelines:
    @pytest.mark.parametrize("kind", KINDS)
    def test_shapes_for_batches_and_lists(self, kind, phantoms):
        net = tiny_pipeline(kind).eval()
        batch = torch.stack([phantoms[i]["image"] for i in range(3)])
        mixed = [phantoms[0]["image"], make_phantom(50, 100, 180).image, phantoms[1]["image"]]
        assert net(batch).shape == (3, 5)
        out = net(mixed)
        assert out.shape == (3, 5)
        assert torch.allclose(out[[0, 2]], net(batch[:2]), atol=1e-5)  # list rows come back in order
        assert net.front_is_fixed == (kind in ("resize", "dac"))

    def test_dac_front_crops_the_raw_image_where_it_finds_the_box(self, phantoms):
        from torchvision.ops import roi_align

        front = tiny_pipeline("dac").front.eval()
        x = torch.stack([phantoms[i]["image"] for i in range(3)])
        out = front(x)
        boxes, crops = front.locate(x), out.crops
        assert torch.equal(out.boxes, boxes) and out.unconverged.shape == (3,)
        # an independent resampler (torchvision's RoIAlign, same xyxy convention) reads the same region...
        ref = roi_align(x.float() / 255, list(boxes[:, None]), (20, 37), spatial_scale=1.0, sampling_ratio=4, aligned=True)
        assert (crops - ref).abs().mean() < 0.02
        # ...and not one a few pixels off (pooled-pixel or half-pixel slips would land there)
        for shift in ([4.0, 0, 4, 0], [0, 3.0, 0, 3]):
            off = roi_align(x.float() / 255, list((boxes + torch.tensor(shift))[:, None]), (20, 37), spatial_scale=1.0, sampling_ratio=4, aligned=True)
            assert (crops - off).abs().mean() > 2 * (crops - ref).abs().mean()
        # the box is found on the image, in its pixels: a mirrored image gives the mirrored box
        mirrored = front.locate(x.flip(-1))
        assert torch.allclose(mirrored[:, [2, 0]], 177 - boxes[:, [0, 2]], atol=0.05)
        assert torch.allclose(mirrored[:, [1, 3]], boxes[:, [1, 3]], atol=0.05)

    def test_e2e_saliency_learns_through_the_box_only(self, phantoms):
        net = tiny_pipeline("dac_e2e").train()
        plain = tiny_pipeline("dac").front
        x = torch.stack([phantoms[i]["image"] for i in range(4)])
        image = x.float() / 255
        saliency = net.front.saliency
        assert isinstance(saliency, SaliencyNet) and saliency.pool_size == 3
        start = net.front.locate(x)
        assert torch.allclose(start, plain.locate(x), atol=1e-3)  # untrained: the paper's DAC, same search
        with torch.no_grad():  # a net whose map differs from the paper's
            g = torch.Generator().manual_seed(3)
            for p in saliency.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        boxes = net.front.locate(x)
        assert boxes.requires_grad
        assert (boxes - start).abs().max() > 3  # the map moved the boxes
        crops = net.front(x).crops
        # the crop is taken from the original image at the box
        assert torch.allclose(crops, crop_resize(image, boxes.detach(), (20, 37)), atol=1e-5)
        # so the saliency's whole gradient is the one that flows through the box
        crops.pow(2).sum().backward()
        through_front = [p.grad.clone() for p in saliency.parameters()]
        assert all(torch.isfinite(t).all() for t in through_front)
        saliency.zero_grad()
        crop_resize(image, net.front.locate(x), (20, 37)).pow(2).sum().backward()
        for p, expected in zip(saliency.parameters(), through_front):
            assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-6)

    def test_e2e_box_gradient_matches_finite_differences(self, phantoms):
        # float64 end to end: d(loss on the boxes)/d(gate bias) of the front against central differences
        front = tiny_pipeline("dac_e2e").front.double()
        saliency = front.saliency
        with torch.no_grad():
            g = torch.Generator().manual_seed(4)
            for p in saliency.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        x = torch.stack([phantoms[i]["image"] for i in range(2)]).double() / 255
        w = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 1.5, 2.0, -0.5]], dtype=torch.float64)
        loss = (front.locate(x) * w).sum()
        (grad,) = torch.autograd.grad(loss, saliency.gate.bias)
        eps = 1e-6
        with torch.no_grad():
            saliency.gate.bias += eps
            up = (front.locate(x) * w).sum()
            saliency.gate.bias -= 2 * eps
            down = (front.locate(x) * w).sum()
            saliency.gate.bias += eps
        fd = (up - down) / (2 * eps)
        assert abs(float(grad) - float(fd)) <= 1e-4 * max(1.0, abs(float(fd))), (float(grad), float(fd))
        assert abs(float(fd)) > 1e-3  # the loss does depend on the bias

    @pytest.mark.parametrize("kind", KINDS)
    def test_classifier_sees_each_image_standardised(self, kind, phantoms):
        # dim, flat crops (mean ~0.37, std ~0.03) reach the classifier as mean 0, std 1, in training and in eval
        net = tiny_pipeline(kind)
        seen = []
        net.classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
        x = torch.stack([phantoms[i]["image"] for i in range(4)])
        dim = (x.float() * 0.15 + 60).to(torch.uint8)  # a fifth of the contrast, around gray 60-100
        for mode in (net.train, net.eval):
            mode()
            net(dim)
        for batch in seen:
            assert torch.allclose(batch.mean((1, 2, 3)), torch.zeros(4), atol=1e-4)
            assert torch.allclose(batch.std((1, 2, 3), unbiased=False), torch.ones(4), atol=2e-3)

    def test_stn_localisation_sees_where_things_are(self):
        # a localisation net that averages its features over the image cannot tell where a blob is
        def blobs(n, generator, h=32, w=59):
            centre = torch.rand(n, 2, generator=generator) * 0.8 + 0.1
            yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            d2 = (xx - centre[:, 0, None, None] * w) ** 2 + (yy - centre[:, 1, None, None] * h) ** 2
            image = 0.2 + 0.6 * torch.exp(-d2 / 18) + 0.05 * torch.rand(n, h, w, generator=generator)
            return image[:, None], centre * 2 - 1

        torch.manual_seed(0)
        net = SpatialTransformerCrop((20, 37), (32, 59)).localization
        optimizer = torch.optim.Adam(net.parameters(), 3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(60):
            x, target = blobs(32, g)
            loss = (net(x)[:, 1:] - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        x, target = blobs(256, torch.Generator().manual_seed(99))
        with torch.no_grad():
            error = (net(x)[:, 1:] - target).pow(2).sum(0)
        r2 = 1 - error / (target - target.mean(0)).pow(2).sum(0)
        assert (r2 > 0.8).all(), r2  # global average pooling: R^2 ~ 0

    def test_stn_starts_at_the_centred_box_and_learns(self, phantoms):
        front = SpatialTransformerCrop((20, 37), (32, 59), init_scale=0.8)
        x = torch.stack([phantoms[i]["image"] for i in range(2)])
        boxes = front.locate(x)
        w_max = min(177, 96 / (20 / 37))
        assert torch.allclose(boxes[0], torch.tensor([(177 - 0.8 * w_max) / 2, (96 - 0.8 * w_max * 20 / 37) / 2,
                                                      (177 + 0.8 * w_max) / 2, (96 + 0.8 * w_max * 20 / 37) / 2]), atol=1e-3)
        out = front(x)
        assert torch.equal(out.boxes, boxes) and out.unconverged is None
        out.crops.sum().backward()
        assert front.localization[-1].weight.grad.abs().sum() > 0

    def test_resize_front_matches_interpolate(self, phantoms):
        x = phantoms[0]["image"][None]
        expected = torch.nn.functional.interpolate(x.float() / 255, size=(24, 24), mode="bilinear", antialias=True)
        out = ResizeFront((24, 24))(x)
        assert torch.allclose(out.crops, expected)
        assert out.boxes.tolist() == [[0.0, 0.0, 177.0, 96.0]] and out.unconverged is None

    def test_bad_input_raises(self):
        with pytest.raises(DACInputError, match="images"):
            ResizeFront((8, 8))([torch.rand(8, 8)])
        with pytest.raises(DACInputError, match="roi_rotate_degrees"):
            DACFront((20, 37), roi_rotate_degrees=120)
        with pytest.raises(DACInputError, match="init_scale"):
            SpatialTransformerCrop(init_scale=1.5)
        with pytest.raises(DACInputError, match="saliency_width"):
            config_from_dict({"pipelines": {"dac_e2e": {"saliency_width": 0}}})


# ----------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def predictions():
    """Fixed labels (5 classes) and probabilities with ties."""
    rng = np.random.default_rng(3)
    labels = np.r_[np.arange(5), rng.integers(0, 5, 55)]
    logits = rng.integers(0, 3, size=(60, 5)) + 2.0 * np.eye(5)[labels] * rng.integers(0, 2, size=(60, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # integer logits: many tied scores
    assert len(np.unique(probs[:, 0])) < 50
    return labels, probs


class TestMetrics:
    def test_against_scikit_learn(self, predictions):
        from sklearn import metrics as skm

        labels, probs = predictions
        m = classification_metrics(labels, probs)
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
        assert m["confusion"] == skm.confusion_matrix(labels, probs.argmax(1), labels=range(5)).tolist()
        for k in range(5):
            assert m["per_class_auc"][k] == pytest.approx(skm.roc_auc_score(labels == k, probs[:, k]), abs=1e-12)
            fpr, tpr, thr = roc_curve(probs[:, k], labels == k)
            sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels == k, probs[:, k], drop_intermediate=False)
            np.testing.assert_allclose(fpr, sk_fpr)
            np.testing.assert_allclose(tpr, sk_tpr)
            np.testing.assert_allclose(thr[1:], sk_thr[1:])
        assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)

    def test_absent_class_and_bad_input(self):
        m = classification_metrics(np.array([0, 0, 1]), np.array([[0.9, 0.1, 0], [0.4, 0.6, 0], [0.2, 0.8, 0]]))
        assert m["per_class_auc"][2] is None and m["macro_auc"] == pytest.approx(np.mean(m["per_class_auc"][:2]))
        with pytest.raises(DACInputError, match="labels"):
            classification_metrics(np.array([0, 3]), np.zeros((2, 3)))
        with pytest.raises(DACInputError, match="probs"):
            classification_metrics(np.array([0, 1]), np.zeros((2, 3)), num_classes=4)

    def test_fold_aggregation(self, predictions):
        labels, probs = predictions
        folds = [classification_metrics(labels[s], probs[s], 5) | {"fold": i} for i, s in enumerate((slice(0, 30), slice(30, 60)))]
        s = summarize_folds(folds)
        acc = [f["accuracy"] for f in folds]
        assert s["accuracy_mean"] == pytest.approx(np.mean(acc)) and s["accuracy_std"] == pytest.approx(np.std(acc, ddof=1))
        assert s["macro_auc_std"] == pytest.approx(np.std([f["macro_auc"] for f in folds], ddof=1))
        assert s["per_class_auc_mean"][2] == pytest.approx(np.mean([f["per_class_auc"][2] for f in folds]))
        assert np.array_equal(s["confusion"], np.add(folds[0]["confusion"], folds[1]["confusion"]))
        assert [f["fold"] for f in s["folds"]] == [0, 1] and "roc" not in s["folds"][0]
        assert mean_std([0.5]) == (0.5, None) and mean_std([None]) == (None, None)
        json.dumps(s)  # plain Python values

    def test_stratified_folds(self):
        labels = [0, 1, 2, 3, 4] * 6
        folds = stratified_folds(labels, 3, seed=1)
        assert sorted(np.concatenate(folds).tolist()) == list(range(30))
        assert all(np.bincount(np.asarray(labels)[f], minlength=5).tolist() == [2] * 5 for f in folds)
        assert [f.tolist() for f in folds] == [f.tolist() for f in stratified_folds(labels, 3, seed=1)]
        with pytest.raises(DACInputError, match="folds"):
            stratified_folds([0, 0, 1], 2)


# ----------------------------------------------------------------------------- training


class TestTraining:
    @pytest.mark.parametrize(
        "kind, kw", [(k, {}) for k in KINDS] + [("dac", {"roi_rotate_degrees": 7.0}), ("dac_e2e", {"backward_mode": "truncated"})]
    )
    def test_two_steps_of_every_pipeline(self, kind, kw, phantoms):
        net = tiny_pipeline(kind, **kw)
        engine = Engine(init_runtime("cpu"), batch_size=6)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        source = engine.front_outputs(net, phantoms) if net.front_is_fixed else phantoms
        history = engine.fit(net, source, np.arange(12), epochs=1)
        assert len(history) == 1 and np.isfinite(history[0]["loss"])
        assert 0 <= history[0]["eval_train_accuracy"] <= 1
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
        assert any(k.startswith("classifier.") for k in changed)
        if kind in ("dac_e2e", "stn"):  # the front learned from the task loss
            assert any(k.startswith("front.") for k in changed)
        probs = engine.predict(net, source, [0, 5, 7])
        assert probs.shape == (3, 5) and np.allclose(probs.sum(1), 1)
        if kind.startswith("dac") and source is phantoms:  # the engine counts the searches that fell short
            assert isinstance(history[0]["boxes_unconverged"], int)

    @pytest.mark.parametrize("kind, kw", [(k, {}) for k in KINDS] + [("dac", {"roi_rotate_degrees": 7.0})])
    def test_every_pipeline_trains_on_cuda(self, kind, kw, phantoms):
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        engine = Engine(init_runtime("cuda"), batch_size=6)
        net = tiny_pipeline(kind, **kw)
        source = engine.front_outputs(net, phantoms) if net.front_is_fixed else phantoms
        history = engine.fit(net, source, np.arange(12), epochs=1)
        assert np.isfinite(history[0]["loss"]) and next(net.parameters()).device.type == "cuda"
        assert engine.predict(net, source, [0, 5]).shape == (2, 5)

    def test_checkpoint_round_trip_is_weights_only_and_atomic(self, tmp_path):
        net = tiny_pipeline("stn")
        save_checkpoint(tmp_path / "c.pt", {"model": net.state_dict(), "epoch": 3, "history": [{"loss": 1.5}]})
        state = torch.load(tmp_path / "c.pt", weights_only=True)
        assert state["epoch"] == 3 and state["history"] == [{"loss": 1.5}]
        fresh = tiny_pipeline("stn")
        fresh.load_state_dict(load_checkpoint(tmp_path / "c.pt")["model"])
        assert state_hash(fresh) == state_hash(net)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left

    def test_resumed_fit_equals_uninterrupted(self, phantoms, tmp_path):
        engine = Engine(init_runtime("cpu"), batch_size=6)
        straight = tiny_pipeline("dac_e2e")
        engine.fit(straight, phantoms, np.arange(12), epochs=2, seed=4)

        class Stop(Exception):
            pass

        def stop_after_first(event, info):
            if event == "epoch_end" and info["epoch"] == 1:
                raise Stop

        ckpt = tmp_path / "fold" / "checkpoint.pt"
        with pytest.raises(Stop):
            engine.fit(tiny_pipeline("dac_e2e"), phantoms, np.arange(12), epochs=2, seed=4, checkpoint=ckpt, callback=stop_after_first)
        assert load_checkpoint(ckpt)["epoch"] == 1
        events = []
        resumed = tiny_pipeline("dac_e2e")
        history = engine.fit(resumed, phantoms, np.arange(12), epochs=2, seed=4, checkpoint=ckpt,
                      callback=lambda e, i: events.append((e, i.get("start_epoch", i.get("epoch")))))
        assert events == [("fit_start", 1), ("epoch_end", 2), ("fit_end", None)] and [h["epoch"] for h in history] == [1, 2]
        for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name  # bit for bit: each epoch and image draws from its own seed

    def test_eval_mode_far_below_train_mode_is_recorded_and_warned(self, phantoms):
        class EvalDiffers(torch.nn.Module):  # right in training, wrong in eval: what broken BatchNorm statistics do
            def __init__(self):
                super().__init__()
                self.bias = torch.nn.Parameter(torch.tensor([5.0, 0, 0, 0, 0]))

            def forward(self, x):
                logits = self.bias.expand(x.shape[0], 5) + 0 * x.mean()
                return logits if self.training else logits.flip(-1)

        from dac.train import Pipeline

        data = MemoryDataset([phantoms[i]["image"] for i in range(12)], [0] * 12, [str(c) for c in range(5)])
        net = Pipeline(ResizeFront((24, 24)), EvalDiffers())
        with pytest.warns(RuntimeWarning, match="eval-mode accuracy on the training images is 0.000, train-mode accuracy 1.000"):
            history = Engine(init_runtime("cpu"), batch_size=6).fit(net, data, np.arange(12), epochs=1)
        assert history[-1]["train_accuracy"] == 1.0 and history[-1]["eval_train_accuracy"] == 0.0
        assert history[-1]["eval_gap_warning"] is True

    def test_batchnorm_statistics_describe_clean_training_inputs(self, phantoms):
        # the first BatchNorm's running mean and variance are those of the un-augmented training images
        net = tiny_pipeline("resize")
        engine = Engine(init_runtime("cpu"), batch_size=6)
        engine.fit(net, phantoms, np.arange(12), epochs=2, seed=3)
        net.eval()
        seen = []
        hook = net.classifier.bn1.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
        with torch.no_grad():
            for start in (0, 6):  # the training batches' sizes, in index order
                net(torch.stack([phantoms[i]["image"] for i in range(start, start + 6)]))
        hook.remove()
        means = torch.stack([s.mean((0, 2, 3)) for s in seen]).mean(0)
        variances = torch.stack([s.var((0, 2, 3)) for s in seen]).mean(0)
        bn = net.classifier.bn1
        assert torch.allclose(bn.running_mean, means, rtol=1e-4, atol=1e-5)
        assert torch.allclose(bn.running_var, variances, rtol=1e-3, atol=1e-5)

    def test_resume_refuses_a_checkpoint_of_another_world_size(self, phantoms, tmp_path):
        engine = Engine(init_runtime("cpu"), batch_size=6)
        ckpt = tmp_path / "checkpoint.pt"

        class Stop(Exception):
            pass

        def stop(event, info):
            if event == "epoch_end":
                raise Stop

        with pytest.raises(Stop):
            engine.fit(tiny_pipeline("resize"), phantoms, np.arange(12), epochs=2, checkpoint=ckpt, callback=stop)
        state = load_checkpoint(ckpt)
        save_checkpoint(ckpt, {**state, "world_size": 2})  # as a 2-process torchrun would have left it
        with pytest.raises(DACInputError, match="2 process"):
            engine.fit(tiny_pipeline("resize"), phantoms, np.arange(12), epochs=2, checkpoint=ckpt)


# ----------------------------------------------------------------------------- k-fold runs


class TestCrossValidation:
    def test_results_folder(self, tmp_path):
        out = tmp_path / "cv"
        summary = run_cv(tiny_config(), out)
        saved = json.loads((out / "summary.json").read_text())
        assert list(saved) == list(KINDS) == list(summary)
        for name in KINDS:
            entry = saved[name]
            for key in ("accuracy_mean", "accuracy_std", "macro_auc_mean", "macro_auc_std"):
                assert isinstance(entry[key], float)
            assert [f["fold"] for f in entry["folds"]] == [0, 1] and len(entry["per_class_auc_mean"]) == 5
            assert entry["accuracy_mean"] == pytest.approx(np.mean([f["accuracy"] for f in entry["folds"]]))
            for k in range(2):
                assert (out / name / f"fold_{k}" / "checkpoint.pt").is_file()
                assert (out / name / f"fold_{k}" / "predictions.csv").is_file()
        folds_csv = (out / "folds.csv").read_text().splitlines()
        assert folds_csv[0].startswith("pipeline,fold,n,accuracy,macro_auc,auc_0") and len(folds_csv) == 1 + 4 * 2
        table = (out / "summary.md").read_text()
        for title in ("resize (whole image)", "| DAC |", "DAC end to end", "STN", "94.5 / 0.993"):
            assert title in table
        for fig in ("confusion", "roc", "auc_per_class", "macro_auc"):
            assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
        test_sets = json.loads((out / "folds.json").read_text())
        assert sorted(np.concatenate(test_sets).tolist()) == list(range(20))
        # a trained fold model loads for inference on raw images
        model = load_pipeline(out, "dac", fold=1)
        assert model(make_phantom(99, 96, 177).image[None]).shape == (1, 5)
        # a different config may not write into this folder
        other = tiny_config()
        other.train.lr = 0.01
        with pytest.raises(DACInputError, match="another run"):
            run_cv(other, out)

    def test_interrupted_run_resumes_without_redoing_finished_folds(self, tmp_path):
        config = tiny_config(resize=TINY["pipelines"]["resize"], dac=TINY["pipelines"]["dac"])
        reference = run_cv(config, tmp_path / "straight", figures=False)

        class Stop(Exception):
            pass

        def interrupt(event, info):  # after dac fold 0 has finished, in the middle of dac fold 1
            if event == "epoch_end" and info["pipeline"] == "dac" and info["fold"] == 1 and info["epoch"] == 1:
                raise Stop

        out = tmp_path / "resumed"
        with pytest.raises(Stop):
            run_cv(config, out, callback=interrupt, figures=False)
        done = out / "dac" / "fold_0"
        stamps = {p: p.stat().st_mtime_ns for p in (done / "metrics.json", done / "checkpoint.pt", out / "resize" / "fold_1" / "metrics.json")}
        assert not (out / "dac" / "fold_1" / "metrics.json").exists() and not (out / "summary.json").exists()
        with pytest.raises(DACInputError, match="unfinished"):  # the interrupted fold's model is not served
            load_pipeline(out, "dac", fold=1)
        assert load_pipeline(out, "dac", fold=0)(make_phantom(99, 96, 177).image[None]).shape == (1, 5)
        run = json.loads((out / "run.json").read_text())
        (out / "run.json").write_text(json.dumps({**run, "fingerprint": "0123456789abcdef"}))  # as an older version wrote it
        with pytest.raises(DACInputError, match="another version"):
            load_pipeline(out, "dac", fold=0)
        (out / "run.json").write_text(json.dumps(run))
        events = []
        summary = run_cv(config, out, callback=lambda e, i: events.append((e, i["pipeline"], i["fold"], i.get("start_epoch"))), figures=False)
        assert [e for e in events if e[0] in ("fold_start", "fit_start")] == [("fold_start", "dac", 1, None), ("fit_start", "dac", 1, 1)]
        assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
        for name in ("resize", "dac"):
            assert summary[name]["accuracy_mean"] == pytest.approx(reference[name]["accuracy_mean"])
            assert summary[name]["macro_auc_mean"] == pytest.approx(reference[name]["macro_auc_mean"])


    def test_a_subset_run_keeps_the_other_pipelines_in_the_report(self, tmp_path, monkeypatch):
        from dac.train import report

        config = tiny_config(resize=TINY["pipelines"]["resize"], dac=TINY["pipelines"]["dac"])
        out = tmp_path / "cv"
        run_cv(config, out, pipelines=["resize"], figures=False)
        drawn = {}  # figure -> the pipelines it was drawn with (each figure still drawn by matplotlib)
        for name in ("_plot_confusions", "_plot_roc", "_plot_auc_per_class", "_plot_macro_auc"):
            def spy(path, data, *rest, _draw=getattr(report, name)):
                drawn[Path(path).name] = list(data)
                return _draw(path, data, *rest)
            monkeypatch.setattr(report, name, spy)
        summary = run_cv(config, out, pipelines=["dac"])
        saved = json.loads((out / "summary.json").read_text())
        assert list(saved) == list(summary) == ["resize", "dac"]
        assert "resize (whole image)" in (out / "summary.md").read_text()
        assert {line.split(",")[0] for line in (out / "folds.csv").read_text().splitlines()[1:]} == {"resize", "dac"}
        assert drawn == {f: ["resize", "dac"] for f in ("confusion.png", "roc.png", "auc_per_class.png", "macro_auc.png")}
        assert all((out / "figures" / f).stat().st_size > 0 for f in drawn)

    def test_missing_matplotlib_stops_the_run_before_any_work(self, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
        with pytest.raises(DACInputError, match="matplotlib"):
            run_cv(tiny_config(resize=TINY["pipelines"]["resize"]), tmp_path / "cv")
        assert not (tmp_path / "cv").exists()


# ----------------------------------------------------------------------------- CLI


def write_class_folders(root: Path, count: int = 12) -> None:
    for i in range(count):
        p = make_phantom(i, 96, 177, label=i % 3)
        folder = root / ["none", "few", "many"][p.label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(p.image[0].numpy()).save(folder / f"{i}.png")


class TestCLI:
    def test_train_on_a_folder_then_resume(self, tmp_path, capsys):
        data = tmp_path / "images"
        write_class_folders(data)
        config = tmp_path / "tiny.yaml"
        config.write_text(json.dumps(TINY))  # JSON is YAML
        args = ["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "out"), "--pipeline", "dac", "--quiet"]
        assert main(args) == 0
        metrics = json.loads((tmp_path / "out" / "dac" / "metrics.json").read_text())
        assert metrics["n"] == 3 and len(metrics["per_class_auc"]) == 3 and len(metrics["history"]) == 2
        assert "held-out accuracy" in capsys.readouterr().err
        stamp = (tmp_path / "out" / "dac" / "checkpoint.pt").stat().st_mtime_ns
        assert main(args) == 0  # finished: nothing retrained
        assert (tmp_path / "out" / "dac" / "checkpoint.pt").stat().st_mtime_ns == stamp

    @pytest.fixture
    def finished_run(self, tmp_path):
        """(data folder, argv) of a finished dac train of the cheapest pipeline on 12 class-folder images."""
        data = tmp_path / "images"
        write_class_folders(data)
        config = tmp_path / "tiny.yaml"
        config.write_text(json.dumps({**TINY, "pipelines": {"resize": TINY["pipelines"]["resize"]}}))
        args = ["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"]
        assert main(args) == 0
        return data, args

    def test_changed_data_is_refused_not_mixed(self, finished_run, capsys):
        data, args = finished_run
        moved = sorted((data / "few").iterdir())[0]
        moved.rename(data / "many" / moved.name)  # one image relabelled
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "other data" in err and len(err.strip().splitlines()) == 1
        (data / "many" / moved.name).rename(moved)  # restored: the finished run is recognised again
        assert main(args) == 0

    @pytest.mark.parametrize("command", ["train", "cv"])
    def test_a_run_stopped_before_training_takes_the_mended_data_and_config(self, tmp_path, capsys, command):
        # An unreadable image stops the run before any training, but run.json already held
        # the data's digest: with the file mended (here removed) the same command was
        # refused, "holds results on other data", and so was an edited config.
        data = tmp_path / "images"
        write_class_folders(data, count=15)
        (data / "few" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        config = tmp_path / "tiny.yaml"
        config.write_text(json.dumps({**TINY, "pipelines": {"resize": TINY["pipelines"]["resize"]}}))
        out = tmp_path / "out"
        args = [command, "--config", str(config), "--data", str(data), "--out", str(out), "--quiet"]
        assert main(args) == 2 and "broken.png" in capsys.readouterr().err
        (data / "few" / "broken.png").unlink()
        config.write_text(json.dumps({**TINY, "seed": 1, "pipelines": {"resize": TINY["pipelines"]["resize"]}}))
        assert main(args) == 0, capsys.readouterr().err
        record = json.loads((out / "run.json").read_text())
        assert record["images"] == 15 and load_config(out / "config.yaml").seed == 1
        # once something is trained there, other data is refused as before
        (data / "few" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        assert main(args) == 2 and "other data" in capsys.readouterr().err

    @pytest.mark.parametrize("cached", [True, False])
    def test_an_image_too_small_for_the_pooling_is_named(self, tmp_path, capsys, cached):
        # it stopped the run with "images: an image of 5x9 pixels is too small ...": which
        # of thousands of files was it? (read lazily: only when its batch came)
        data = tmp_path / "images"
        write_class_folders(data, count=9)
        Image.fromarray(np.full((5, 9), 77, dtype=np.uint8)).save(data / "few" / "thumb.png")
        raw = {**TINY, "data": {**TINY["data"], "cache_images": cached, "workers": 0},
               "pipelines": {"dac": TINY["pipelines"]["dac"], "resize": TINY["pipelines"]["resize"]}}
        config = tmp_path / "tiny.yaml"
        config.write_text(json.dumps(raw))
        args = ["cv", "--config", str(config), "--data", str(data), "--quiet"]
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "thumb.png" in err and "5x9" in err and "6x6" in err and len(err.strip().splitlines()) == 1, err
        # a run of the resize pipeline alone takes it
        assert main([*args, "--out", str(tmp_path / "resized"), "--pipelines", "resize"]) == 0

    def test_files_read_lazily_are_checked_before_training(self, tmp_path, capsys):
        # read batch by batch, a broken file stopped the run only when its batch came (in
        # the first fold's training or, for its test images, after every epoch of it)
        data = tmp_path / "images"
        write_class_folders(data, count=9)
        for name in ("broken.png", "zzz.png"):
            (data / "many" / name).write_bytes(b"\x89PNG\r\n\x1a\n broken " + name.encode())
        raw = {**TINY, "data": {**TINY["data"], "cache_images": False, "workers": 0},
               "pipelines": {"dac_e2e": TINY["pipelines"]["dac_e2e"]}}  # a front that learns: nothing cached
        config = tmp_path / "tiny.yaml"
        config.write_text(json.dumps(raw))
        out = tmp_path / "out"
        args = ["cv", "--config", str(config), "--data", str(data), "--out", str(out), "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "broken.png': not an image" in err and "and 1 more" in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "dac_e2e").exists()  # nothing trained
        for name in ("broken.png", "zzz.png"):
            (data / "many" / name).unlink()
        assert main(args) == 0

    def test_added_or_removed_images_are_refused_like_a_relabelled_one(self, finished_run, capsys):
        data, args = finished_run
        checkpoint = Path(args[args.index("--out") + 1]) / "resize" / "checkpoint.pt"
        stamp = checkpoint.stat().st_mtime_ns
        first, second = sorted((data / "few").iterdir())[:2]
        victim = sorted((data / "none").iterdir())[0]
        relabelled, added, aside = data / "many" / first.name, data / "many" / "added.png", data.parent / victim.name
        changes = {  # (make the change, undo it)
            "relabelled": (lambda: first.rename(relabelled), lambda: relabelled.rename(first)),
            # a 13th image, in an existing class (another image: a copy of one is refused as such)
            "added": (lambda: Image.eval(Image.open(second), lambda v: 255 - v).save(added), added.unlink),
            "removed": (lambda: victim.rename(aside), lambda: aside.rename(victim)),  # out of --data: 11 images
        }
        errors = {}
        for name, (change, undo) in changes.items():
            change()
            capsys.readouterr()
            assert main(args) == 2, name
            errors[name] = capsys.readouterr().err
            undo()
            assert main(args) == 0, name  # restored: the finished run is recognised again
        for name, err in errors.items():
            assert "other data" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert "the data now has 13 images" in errors["added"] and "the data now has 11 images" in errors["removed"]
        # One refusal, whatever changed: the messages differ in the new count and digest only.
        same = {re.sub(r"now has \d+ images, digest \w+", "now has N images, digest D", e) for e in errors.values()}
        assert len(same) == 1, errors
        assert checkpoint.stat().st_mtime_ns == stamp  # nothing was trained on the changed data

    @pytest.mark.parametrize("cached", [True, False])
    def test_a_corrupt_image_is_a_usage_error_naming_it(self, tmp_path, capsys, cached):
        data = tmp_path / "images"
        write_class_folders(data)
        bad = data / "few" / "broken.png"
        bad.write_bytes((data / "few" / "1.png").read_bytes()[:200])  # a truncated PNG
        config = tmp_path / "tiny.yaml"
        raw = {**TINY, "pipelines": {"dac_e2e": TINY["pipelines"]["dac_e2e"]}}
        raw["data"] = {**TINY["data"], "cache_images": cached, "workers": 0 if cached else 1}
        config.write_text(json.dumps(raw))
        assert main(["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "broken.png" in err and "Traceback" not in err

    @pytest.mark.parametrize("device", ["cuda:99", "tpu", "mps"])
    def test_an_unusable_device_is_refused_before_any_work(self, tmp_path, capsys, device):
        config = tmp_path / "tiny.yaml"
        config.write_text(json.dumps(TINY))
        assert main(["cv", "--config", str(config), "--out", str(tmp_path / "out"), "--device", device]) == 2
        assert "--device" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()

    def test_usage_errors_exit_2(self, tmp_path, capsys):
        assert main(["cv", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
        assert "config" in capsys.readouterr().err
        bad = tmp_path / "bad.yaml"
        bad.write_text("train: {lr: fast}")
        assert main(["cv", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
        assert "train.lr" in capsys.readouterr().err
        good = tmp_path / "good.yaml"
        good.write_text(json.dumps(TINY))
        assert main(["cv", "--config", str(good), "--out", str(tmp_path / "o"), "--pipelines", "dac,nope"]) == 2
        assert "nope" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["cv", "--out", str(tmp_path / "o")])  # --config is required
