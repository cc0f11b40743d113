"""``python -m dac.demo``: crop a few generated images and print the boxes found.

Each image is a dark, noisy frame holding one bright textured region (a stand-in for
the dental arch) at a random place; the demo prints the box DACrop finds, the true
region and their IoU, and the solver's flags.
"""
from __future__ import annotations

import argparse
import time

import torch

from .layer import DACrop


def textured_scene(count: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` uint8 images Tensor[N, 1, H, W] and their true regions Tensor[N, 4] (xyxy)."""
    gen = torch.Generator().manual_seed(seed)
    images = (20 * torch.rand(count, 1, height, width, generator=gen)).to(torch.uint8)
    regions = []
    for i in range(count):
        rw = int(width * (0.55 + 0.2 * torch.rand(1, generator=gen).item()))
        rh = int(rw * height / width * (0.7 + 0.2 * torch.rand(1, generator=gen).item()))
        x0 = int((width - rw) * torch.rand(1, generator=gen).item())
        y0 = int((height - rh) * torch.rand(1, generator=gen).item())
        texture = 60 + 140 * torch.rand(rh, rw, generator=gen)
        images[i, 0, y0 : y0 + rh, x0 : x0 + rw] = texture.to(torch.uint8)
        regions.append([x0, y0, x0 + rw, y0 + rh])
    return images, torch.tensor(regions, dtype=torch.float32)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two Tensor[N, 4] xyxy boxes."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4, help="number of images (default 4)")
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--width", type=int, default=2836)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, regions = textured_scene(args.count, args.height, args.width, args.seed)
    layer = DACrop(output_size=(200, 370), pool_size=10)
    start = time.perf_counter()
    with torch.no_grad():
        boxes, info = layer.locate(images, return_info=True)
        crops = layer(images)
    elapsed = time.perf_counter() - start
    iou = box_iou(boxes, regions)
    print(f"DACrop on {args.count} uint8 images of {args.height}x{args.width} -> crops {tuple(crops.shape)}")
    print(f"{'#':>2} {'box found (x1, y1, x2, y2)':>34} {'true region':>28} {'IoU':>5} conv held")
    for i in range(args.count):
        found = ", ".join(f"{v:7.1f}" for v in boxes[i].tolist())
        true = ", ".join(f"{v:5.0f}" for v in regions[i].tolist())
        print(f"{i:>2} {found:>34} {true:>28} {iou[i]:5.2f} {bool(info.converged[i])!s:>4} {info.held[i].tolist()}")
    print(f"mean IoU {iou.mean():.3f}; locate + crop took {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
