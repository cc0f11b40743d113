"""Speed of the DAC layer against a paper-style dense search and a memory-bound floor.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/speed.py --json speed.json
    PYTHONPATH=src .venv/bin/python benchmarks/speed.py --device cuda --sizes 768x1418,1536x2836

What is timed, on one seeded batch of synthetic uint8 radiograph-like images
(``--batch`` x 1 x ``--height`` x ``--width``; default 24 x 1 x 1536 x 2836, the
paper's batch size and image size): a dark noisy background with one bright textured
rectangle, ~60% of the width and ~55% of the height, at a random place per image.

* ``layer``: the whole forward ``DACrop(output_size=(200, 370), pool_size=10)(images)``
  under ``torch.no_grad()``: max–min pooling + staged ascent (with the layer's
  Newton polish) + crop-and-resize. Its parts are timed separately:
  ``pool`` (``max_min_pool``), ``locate`` (``layer.locate``: pooling + search),
  ``search`` (= locate - pool, derived from the two medians) and ``crop``
  (``crop_resize`` of the found boxes to 200 x 370).
* ``dense``: a reference search written here the way the paper describes it: on the
  same pooled maps (times 255) the full h x w sigmoid field
  ``z = s(g(x-x1)) s(g(x2-x)) s(g(y-y1)) s(g(y2-y))`` is built on the meshgrid every
  step, ``f = f_in / (f_out + 1)`` with ``f_in = sum(S z) / sum(z)`` and
  ``f_out = sum(S (1-z)) / sum(1-z)``, its gradient comes from ``torch.autograd``, and
  the layer's schedule is run (4 stages x 50 steps, gamma 0.025 doubling, eta 96
  halving per stage, step ``clamp(eta grad, +-max_step)``, then ``shift_into_image``
  with ``|r|``) from ``initial_theta``. It has NO Newton polish (the paper has none),
  so its boxes differ from the layer's: ``max_box_diff_px`` reports the largest
  |difference| of box coordinates, in input pixels, as a sanity figure only, and
  ``max_box_diff_prepolish_px`` the same against the layer's box after its last
  ascent stage (``info.stage_thetas[:, -2]``), where the two should agree to rounding.
  It does not pool or crop: it starts from the pooled maps.
* ``floor``: one pass over the input batch, ``images.float()``: reading every pixel
  once, which any layer that looks at the whole image must pay for.

Each item is run once to warm up and then ``--repeats`` times; the median (and the
min) per image is reported. ``dense_over_layer`` compares the dense *search* alone
with the whole layer forward (pool + search + crop); ``dense_over_search`` with the
layer's search alone. Clocks are read after ``torch.cuda.synchronize()`` on CUDA.
A fresh ``DACrop`` is built for each image size. ``--json`` writes one record, or a
list of records with ``--sizes``. On a small shared CPU, other load inflates the
medians a lot (threads wait on each other); the min column is the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

from _common import machine, pyplot, time_it
from dac import DACrop
from dac.functional import (
    crop_resize,
    fit_r_min,
    initial_theta,
    max_min_pool,
    shift_into_image,
    theta_to_boxes,
)

OUTPUT_SIZE = (200, 370)
POOL_SIZE = 10


# --------------------------------------------------------------------------- data
def make_images(batch: int, height: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    """Tensor[B, 1, H, W] uint8: noisy dark background, one bright textured rectangle."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 48, (batch, 1, height, width), dtype=torch.uint8, generator=gen)
    box_w, box_h = max(1, round(0.6 * width)), max(1, round(0.55 * height))
    yy = torch.arange(box_h, dtype=torch.float32)[:, None]
    xx = torch.arange(box_w, dtype=torch.float32)[None, :]
    for b in range(batch):
        x0 = int(torch.randint(0, width - box_w + 1, (1,), generator=gen))
        y0 = int(torch.randint(0, height - box_h + 1, (1,), generator=gen))
        period = 8.0 + 24.0 * float(torch.rand((), generator=gen))
        stripes = 40.0 * torch.sin(2 * math.pi * xx / period) * torch.cos(2 * math.pi * yy / (1.7 * period))
        noise = torch.randint(0, 60, (box_h, box_w), generator=gen).float()
        images[b, 0, y0 : y0 + box_h, x0 : x0 + box_w] = (140.0 + stripes + noise).clamp(0, 255).to(torch.uint8)
    return images.to(device)


# ------------------------------------------------------------------ dense search
def dense_cost(theta: torch.Tensor, saliency: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor,
               r_min: torch.Tensor, aspect: float, gamma: float) -> torch.Tensor:
    """Paper eq. 3 on the full sigmoid field: f = f_in / (f_out + 1), Tensor[B]."""
    x_c, y_c, r = (t[:, None, None] for t in theta.unbind(-1))
    r_total = r_min[:, None, None] + r
    x1, x2 = x_c - r_total, x_c + r_total
    y1, y2 = y_c - aspect * r_total, y_c + aspect * r_total
    z = (
        torch.sigmoid(gamma * (grid_x - x1))
        * torch.sigmoid(gamma * (x2 - grid_x))
        * torch.sigmoid(gamma * (grid_y - y1))
        * torch.sigmoid(gamma * (y2 - grid_y))
    )  # [B, h, w]
    outside = 1.0 - z
    f_in = (saliency * z).sum(dim=(1, 2)) / z.sum(dim=(1, 2))
    f_out = (saliency * outside).sum(dim=(1, 2)) / outside.sum(dim=(1, 2))
    return f_in / (f_out + 1.0)


def dense_search(saliency: torch.Tensor, layer: DACrop) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 with autograd on the dense field, no Newton polish.

    Args:
        saliency: Tensor[B, h, w], the pooled maps times the saliency scale.

    Returns:
        (theta Tensor[B, 3], r_min Tensor[B]).
    """
    batch, h, w = saliency.shape
    sched = layer.schedule
    aspect = layer.aspect
    r_min = fit_r_min(h, w, layer.r_min_fraction, aspect, saliency)
    theta = initial_theta(h, w, r_min, aspect, layer.r_init_fraction)
    ys = torch.arange(h, dtype=saliency.dtype, device=saliency.device)
    xs = torch.arange(w, dtype=saliency.dtype, device=saliency.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # paper: meshgrid(0..w-1, 0..h-1)
    for stage in range(sched.stages):
        gamma = layer.sharpness * sched.sharpness_factor**stage
        eta = sched.step_size * sched.step_factor**stage
        for _ in range(sched.steps_per_stage):
            with torch.enable_grad():
                theta_var = theta.detach().requires_grad_(True)
                f = dense_cost(theta_var, saliency, grid_x, grid_y, r_min, aspect, gamma)
                (grad,) = torch.autograd.grad(f.sum(), theta_var)
            step = (eta * grad).clamp(-sched.max_step, sched.max_step)
            theta = shift_into_image(theta + step, h, w, r_min, aspect, reflect=True)
    return theta, r_min


# ------------------------------------------------------------------------ timing
def measure(batch: int, height: int, width: int, repeats: int, device: torch.device, seed: int) -> dict:
    """All timings for one image size: a JSON-ready record."""
    torch.manual_seed(seed)
    images = make_images(batch, height, width, seed, device)
    layer = DACrop(output_size=OUTPUT_SIZE, pool_size=POOL_SIZE)
    per_image = 1000.0 / batch  # seconds per batch -> ms per image
    timings: dict[str, list[float]] = {}

    with torch.no_grad():
        timings["layer"], crops = time_it(lambda: layer(images), repeats, device)
        timings["pool"], pooled = time_it(lambda: max_min_pool(images, POOL_SIZE), repeats, device)
        timings["locate"], (boxes, info) = time_it(lambda: layer.locate(images, return_info=True), repeats, device)
        timings["crop"], _ = time_it(lambda: crop_resize(images, boxes, OUTPUT_SIZE), repeats, device)
        saliency = (pooled * layer.saliency_scale)[:, 0]
        timings["dense"], (theta_dense, r_min) = time_it(lambda: dense_search(saliency, layer), repeats, device)
        timings["floor"], _ = time_it(lambda: images.float(), repeats, device)
        dense_boxes = theta_to_boxes(theta_dense, r_min, layer.aspect, POOL_SIZE)
        max_box_diff = float((dense_boxes - boxes).abs().max())
        # stage_thetas[:, -2]: the layer's box after its last ascent stage, before the polish.
        ascent_boxes = theta_to_boxes(info.stage_thetas[:, -2].to(theta_dense), r_min, layer.aspect, POOL_SIZE)
        max_prepolish_diff = float((dense_boxes - ascent_boxes).abs().max())

    med = {k: statistics.median(v) * per_image for k, v in timings.items()}
    low = {k: min(v) * per_image for k, v in timings.items()}
    search = max(med["locate"] - med["pool"], 0.0)
    h, w = saliency.shape[1:]
    record = {
        "machine": machine(device),
        "batch": batch,
        "height": height,
        "width": width,
        "saliency_size": [int(h), int(w)],
        "output_size": list(OUTPUT_SIZE),
        "repeats": repeats,
        "seed": seed,
        "layer_ms_per_image": med["layer"],
        "pool_ms_per_image": med["pool"],
        "locate_ms_per_image": med["locate"],
        "search_ms_per_image": search,
        "crop_ms_per_image": med["crop"],
        "dense_ms_per_image": med["dense"],
        "floor_ms_per_image": med["floor"],
        "min_ms_per_image": low,
        "dense_over_layer": med["dense"] / med["layer"],
        "dense_over_search": med["dense"] / search if search > 0 else float("inf"),
        "layer_over_floor": med["layer"] / med["floor"],
        "max_box_diff_px": max_box_diff,
        "max_box_diff_prepolish_px": max_prepolish_diff,
        "layer_converged": int(info.converged.sum()),
        "layer_iterations_mean": float(info.iterations.float().mean()),
        "crops_shape": list(crops.shape),
        "raw_seconds_per_batch": timings,
    }
    return record


# ----------------------------------------------------------------------- output
def markdown(record: dict) -> str:
    floor = record["floor_ms_per_image"]
    rows = [
        ("layer forward (pool + search + crop)", "layer"),
        ("  max_min_pool", "pool"),
        ("  locate (pool + search)", "locate"),
        ("  search (locate - pool)", "search"),
        ("  crop_resize", "crop"),
        ("dense reference search (no polish)", "dense"),
        ("floor: images.float()", "floor"),
    ]
    lines = [
        f"### B={record['batch']}, {record['height']}x{record['width']} "
        f"(saliency {record['saliency_size'][0]}x{record['saliency_size'][1]}), "
        f"{record['machine']['device']}, {record['machine']['threads']} threads, "
        f"median of {record['repeats']}",
        "",
        "| item | ms/image (median) | ms/image (min) | x floor |",
        "|---|---:|---:|---:|",
    ]
    for label, key in rows:
        ms = record[f"{key}_ms_per_image"]
        low = record["min_ms_per_image"].get(key)
        low_s = f"{low:.3f}" if low is not None else "-"
        lines.append(f"| {label} | {ms:.3f} | {low_s} | {ms / floor:.1f} |")
    lines += [
        "",
        f"dense / layer = {record['dense_over_layer']:.1f}x, "
        f"dense / search = {record['dense_over_search']:.1f}x, "
        f"layer / floor = {record['layer_over_floor']:.1f}x, "
        f"max |box diff| dense vs layer = {record['max_box_diff_px']:.2f} px "
        f"({record['max_box_diff_prepolish_px']:.3f} px before the layer's polish; "
        f"layer converged {record['layer_converged']}/{record['batch']})",
    ]
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """Grouped bar chart of ms/image per item and size (needs matplotlib)."""
    plt = pyplot(path)
    if plt is None:
        return
    keys = ["layer", "pool", "search", "crop", "dense", "floor"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(records)
    for i, rec in enumerate(records):
        values = [rec[f"{k}_ms_per_image"] for k in keys]
        xs = [j + (i - (len(records) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, values, width, label=f"{rec['height']}x{rec['width']}")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yscale("log")
    ax.set_ylabel("ms / image (median)")
    ax.set_title(f"DAC speed, B={records[0]['batch']}, {records[0]['machine']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        h, _, w = part.strip().lower().partition("x")
        if not h.isdigit() or not w.isdigit():
            raise argparse.ArgumentTypeError(f"--sizes: expected HxW[,HxW...], got {part!r}")
        sizes.append((int(h), int(w)))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=24, help="images per batch (default 24)")
    parser.add_argument("--height", type=int, default=1536, help="image height H (default 1536)")
    parser.add_argument("--width", type=int, default=2836, help="image width W (default 2836)")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="size sweep, e.g. 768x1418,1536x2836 (overrides --height/--width)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    sizes = args.sizes or [(args.height, args.width)]
    records = []
    for height, width in sizes:
        record = measure(args.batch, height, width, args.repeats, device, args.seed)
        print(markdown(record), end="\n\n", flush=True)
        records.append(record)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records if args.sizes else records[0], fh, indent=2)
        print(f"results written to {args.json}")
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
