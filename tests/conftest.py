"""Shared test data: small generated scenes, made in the tests (nothing stored)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def textured_scene(
    batch: int,
    height: int,
    width: int,
    region: tuple[float, float] = (0.65, 0.6),
    offset: tuple[float, float] = (0.12, 0.25),
    dtype: torch.dtype = torch.float64,
    seed: int = 1,
) -> torch.Tensor:
    """Dark noise with one bright textured rectangle per image, Tensor[B, 1, H, W] in [0, 1].

    ``region`` is the rectangle's (width, height) as fractions of the image; ``offset``
    its top-left corner; each image shifts it by a few pixels.
    """
    gen = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(batch, 1, height, width, dtype=dtype, generator=gen)
    rh, rw = int(height * region[1]), int(width * region[0])
    for b in range(batch):
        y0, x0 = int(height * offset[1]) + 3 * b, int(width * offset[0]) + 5 * b
        x[b, :, y0 : y0 + rh, x0 : x0 + rw] += 0.5 * torch.rand(1, rh, rw, dtype=dtype, generator=gen)
    return x


def smooth_direction(shape: tuple[int, ...], seed: int = 4) -> torch.Tensor:
    """A smooth float64 perturbation field (finite differences through max pooling need one)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(shape[0], shape[1], 8, 12, dtype=torch.float64, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=shape[-2:], mode="bicubic", align_corners=False)


@pytest.fixture
def scene() -> torch.Tensor:
    """Two float64 300 x 555 scenes whose best boxes are interior (no bound held)."""
    return textured_scene(2, 300, 555)


def torchrun_dac(*args: str) -> str:
    """``dac ARGS`` under torchrun with 2 processes on this machine; its stderr (asserts exit 0)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dac.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr
