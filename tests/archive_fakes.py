"""Test helpers for the batch engine: :class:`FastLayer`, a stand-in for ``DACrop`` that crops a fixed
box, so that tests of the engine's bookkeeping run :func:`dac.tasks.crop.crop_archive` in
milliseconds (the CLI tests in ``test_cli.py`` run the real search).

Import the fixtures into a test module to use them: ``from archive_fakes import three, clear_cropped``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dac.data import io as dio
from dac.functional import to_unit_range
from dac.jobs import ARCHIVE_FIELDS, ArchiveTask, output_name
from dac.tasks.crop import crop_archive

CROPPED: list[tuple[int, int]] = []  # (height, width) of every image FastLayer cropped


class FastLayer(torch.nn.Module):
    """Crops the middle 80 % of each image; optional learnable ``gain`` (a weight)."""

    def __init__(self, output_size=(8, 12), pool_size=4, gain: float | None = None):
        super().__init__()
        self.output_size, self.pool_size = tuple(output_size), pool_size
        if gain is not None:
            self.gain = torch.nn.Parameter(torch.tensor([gain]))

    def config(self):
        return {"output_size": list(self.output_size), "pool_size": self.pool_size}

    def forward(self, images, return_boxes=False):
        crops, boxes = [], []
        for image in images:
            CROPPED.append(tuple(image.shape[-2:]))
            h, w = image.shape[-2:]
            box = torch.tensor([0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])
            unit = to_unit_range(image, torch.float32)[None]
            crops.append(torch.nn.functional.interpolate(unit, size=self.output_size)[0])
            boxes.append(box)
        n = len(crops)
        info = SimpleNamespace(cost=torch.ones(n), iterations=torch.ones(n, dtype=torch.long),
                               frozen=torch.zeros(n, dtype=torch.bool))
        return torch.stack(crops), torch.stack(boxes), info


@pytest.fixture(autouse=True)
def clear_cropped():
    CROPPED.clear()


def write_image(path: Path, seed: int = 0, size=(30, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run(inputs, out, **kwargs):
    kwargs.setdefault("layer", FastLayer())
    return crop_archive([str(i) for i in inputs], out, progress=False, **kwargs)


def read_table(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "boxes.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def other_task() -> ArchiveTask:
    """A second command on the engine that writes its own table and ``crops/`` (as ``dac predict`` does)."""

    def write(out, key, image, result, found):
        dio.write_png(out / "crops" / output_name(key), image[:, :4, :4])
        return {"crop": f"crops/{output_name(key)}"}

    return ArchiveTask(table="other.csv", fields=ARCHIVE_FIELDS[0] + ("crop",) + ARCHIVE_FIELDS[1], settings={"other": 1},
                       read=dio.read_input, compute=lambda images: [None] * len(images), write=write,
                       outputs=("crop",), folders=("crops",), products=("crops",), name="dac other")


def listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time (what a refused run must leave as it was)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture
def three(tmp_path: Path) -> Path:
    for i, name in enumerate(("a.png", "b.png", "sub/c.png")):
        write_image(tmp_path / "in" / name, seed=i)
    return tmp_path / "in"
