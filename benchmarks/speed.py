"""Speed of the DAC layer, both searches, against its parts, a dense search and a floor.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/speed.py --threads 2 --json speed.json
    PYTHONPATH=src .venv/bin/python benchmarks/speed.py --device cuda --sizes 768x1418,1536x2836

What is timed, on one seeded batch of synthetic uint8 radiograph-like images
(``--batch`` x 1 x ``--height`` x ``--width``; default 24 x 1 x 1536 x 2836, the
paper's batch size and image size): a dark noisy background with one bright textured
rectangle, ~60% of the width and ~55% of the height, at a random place per image
(``--images phantoms``: ``dac.data.phantoms.make_phantom`` seeds 8000.., slower to make).

For each search of ``--searches`` (``paper``: the staged ascent + Newton polish;
``global``: the grid search + Newton polish; see ``DACrop(search=...)``):

* ``layer``: the whole forward ``DACrop(output_size=(200, 370), pool_size=10,
  search=...)(images)`` under ``torch.no_grad()``; its parts ``locate``
  (``layer.locate``: pooling + search), ``search`` (= locate - pool, derived from the
  medians) and ``crop`` (``crop_resize`` of that search's boxes to 200 x 370);
* ``batch 1``: ``locate`` of the batch's first image alone against the max–min pooling
  of that image alone (``DACrop.saliency_map``), ``--repeats1`` runs; for the global
  search also its grid phase alone (every box of the lattice scored, the best local
  maxima kept: what any polish adds to);
* ``peak memory`` (``--memory``): the largest extra memory of one ``locate`` and one
  ``layer`` call at batch 1 and at ``--batch``, each in a fresh process after a
  warm-up call on the batch's first image: on CPU the peak resident set (VmHWM after
  ``clear_refs``, minus the resident set before; glibc's mmap threshold fixed at
  64 KiB so freed buffers go back to the system), on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before.

Shared by both searches: ``pool`` (``max_min_pool``), ``floor`` (one pass over the
input, ``images.float()``: reading every pixel once, which any layer that looks at the
whole image must pay for), and ``dense`` (``--dense``): a reference search written
here the way the paper describes it: on the same pooled maps (times 255) the full
h x w sigmoid field ``z = s(g(x-x1)) s(g(x2-x)) s(g(y-y1)) s(g(y2-y))`` is built on
the meshgrid every step, ``f = f_in / (f_out + 1)``, its gradient comes from
``torch.autograd``, and the layer's schedule is run (4 stages x 50 steps, gamma 0.025
doubling, eta 96 halving per stage, step ``clamp(eta grad, +-max_step)``, then
``shift_into_image`` with ``|r|``) from ``initial_theta``. It has NO Newton polish (the
paper has none): ``max_box_diff_prepolish_px`` compares it with the paper search's box
after its last ascent stage (``info.stage_thetas[:, -2]``), where the two should agree
to rounding.

``--compile``: the global search's grid scoring (``dac.functional.grid._grid_candidates``)
eager against ``torch.compile``-d, on this batch's maps and on one map: the first call
(compilation included) and the median of ``--repeats`` calls after it; and ``locate`` of
the batch's first image (global search) with the polish's per-step functions (the
stationarity residual and f, :mod:`dac.optim.solver`, and the final one of
:mod:`dac.optim.cost_function`) eager against ``torch.compile``-d, patched in for this
measurement only (the library runs them eager): the first call, and the median of
``--repeats1`` calls beside the image's pooling alone.

Each item is run once to warm up and then ``--repeats`` times; the median (and the
min) per image is reported. Ratios come from one run: ``layer_over_floor`` (batch B),
``locate_over_pool`` (batch 1). Clocks are read after ``torch.cuda.synchronize()`` on
CUDA. ``--json`` writes one record, or a list of records with ``--sizes``. On a small
shared CPU other load inflates the medians a lot (threads wait on each other; with 2
threads on 2 busy cores small operations slow down ~20x): the record holds the load
average, and the min column is the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from _common import machine, pyplot, sync, time_it
from dac import DACrop
from dac.functional.grid import _grid_candidates
from dac.layer import SEARCHES
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
def grid_phase(layer: DACrop, one: torch.Tensor) -> Callable[[], object]:
    """The global search's grid phase alone on ``one`` image's map, as ``locate`` runs it
    (:func:`dac.functional.grid._grid_candidates`: every box of the step-4 lattice scored,
    the best local maxima kept)."""
    with torch.no_grad():
        scaled = layer._searched_map(layer.saliency_map(one))[:, 0]
    h, w = scaled.shape[-2:]
    r_min = float(layer._r_min(h, w, scaled)[0])
    grid = layer.grid
    return lambda: _grid_candidates(scaled, r_min, layer.aspect, layer.final_sharpness, grid.step, grid.candidates)


def make_phantoms(batch: int, height: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    """Tensor[B, 1, H, W] uint8 phantoms (``dac.data.phantoms.make_phantom``, seeds 8000 + seed ..)."""
    from dac.data.phantoms import make_phantom

    images = [make_phantom(8000 + seed + i, height, width).image for i in range(batch)]
    return (torch.stack(images) * 255).round().to(torch.uint8).to(device)


def measure(batch: int, height: int, width: int, repeats: int, device: torch.device, seed: int, opts: argparse.Namespace) -> dict:
    """All timings for one image size: a JSON-ready record."""
    torch.manual_seed(seed)
    maker = make_phantoms if opts.images == "phantoms" else make_images
    images = maker(batch, height, width, seed, device)
    per_image = 1000.0 / batch  # seconds per batch -> ms per image
    shared: dict[str, list[float]] = {}
    searches: dict[str, dict] = {}
    with torch.no_grad():
        shared["pool"], pooled = time_it(lambda: max_min_pool(images, POOL_SIZE), repeats, device)
        shared["floor"], _ = time_it(lambda: images.float(), repeats, device)
        one = images[:1]
        for name in opts.searches:
            layer = DACrop(output_size=OUTPUT_SIZE, pool_size=POOL_SIZE, search=name)
            t: dict[str, list[float]] = {}
            t["layer"], crops = time_it(lambda: layer(images), repeats, device)
            t["locate"], (boxes, info) = time_it(lambda: layer.locate(images, return_info=True), repeats, device)
            t["crop"], _ = time_it(lambda: crop_resize(images, boxes, OUTPUT_SIZE), repeats, device)
            t["pool_1"], _ = time_it(lambda: layer.saliency_map(one), opts.repeats1, device)
            t["locate_1"], _ = time_it(lambda: layer.locate(one), opts.repeats1, device)
            if name == "global":  # its first phase alone: the floor of any polish
                t["grid_1"], _ = time_it(grid_phase(layer, one), opts.repeats1, device)
            med = {k: statistics.median(v) * (1000.0 if k.endswith("_1") else per_image) for k, v in t.items()}
            low = {k: min(v) * (1000.0 if k.endswith("_1") else per_image) for k, v in t.items()}
            searches[name] = {
                "layer_ms_per_image": med["layer"],
                "locate_ms_per_image": med["locate"],
                "search_ms_per_image": max(med["locate"] - statistics.median(shared["pool"]) * per_image, 0.0),
                "crop_ms_per_image": med["crop"],
                "batch1_pool_ms": med["pool_1"],
                "batch1_locate_ms": med["locate_1"],
                "batch1_locate_over_pool": med["locate_1"] / med["pool_1"],
                **({"batch1_grid_ms": med["grid_1"], "batch1_grid_over_pool": med["grid_1"] / med["pool_1"]}
                   if "grid_1" in med else {}),
                "min_ms": low,
                "converged": int(info.converged.sum()),
                "near_ties": int(info.near_tie.sum()),
                "iterations_mean": float(info.iterations.float().mean()),
                "mean_cost": float(info.cost.double().mean()),
                "boxes": boxes.tolist(),
                "raw_seconds": t,
                "_info": info,
            }
        if opts.dense and "paper" in searches:
            paper = DACrop(output_size=OUTPUT_SIZE, pool_size=POOL_SIZE)
            saliency = (pooled * paper.saliency_scale)[:, 0]
            shared["dense"], (theta_dense, r_min) = time_it(lambda: dense_search(saliency, paper), repeats, device)
            info = searches["paper"]["_info"]
            dense_boxes = theta_to_boxes(theta_dense, r_min, paper.aspect, POOL_SIZE)
            # stage_thetas[:, -2]: the paper search's box after its last ascent stage, before the polish.
            ascent_boxes = theta_to_boxes(info.stage_thetas[:, -2].to(theta_dense), r_min, paper.aspect, POOL_SIZE)
            searches["paper"]["max_box_diff_prepolish_px"] = float((dense_boxes - ascent_boxes).abs().max())
    for rec in searches.values():
        rec.pop("_info")
    floor = statistics.median(shared["floor"]) * per_image
    for rec in searches.values():
        rec["layer_over_floor"] = rec["layer_ms_per_image"] / floor
    h, w = pooled.shape[-2:]
    record = {
        "machine": machine(device),
        "images": opts.images,
        "batch": batch,
        "height": height,
        "width": width,
        "saliency_size": [int(h), int(w)],
        "output_size": list(OUTPUT_SIZE),
        "repeats": repeats,
        "seed": seed,
        "pool_ms_per_image": statistics.median(shared["pool"]) * per_image,
        "floor_ms_per_image": floor,
        "min_ms_per_image": {k: min(v) * per_image for k, v in shared.items()},
        "searches": searches,
        "raw_seconds_per_batch": shared,
    }
    if "dense" in shared:
        record["dense_ms_per_image"] = statistics.median(shared["dense"]) * per_image
    if opts.memory:
        record["peak_memory_mb"] = {
            name: {str(b): peak_memory(name, b, height, width, seed, device, opts) for b in sorted({1, batch})}
            for name in opts.searches
        }
    if opts.compile:
        record["compile"] = compile_timing(pooled, repeats, device)
        record["compile_polish"] = compile_polish_timing(images[:1], opts.repeats1, device)
    return record


def peak_memory(search: str, batch: int, height: int, width: int, seed: int, device: torch.device, opts: argparse.Namespace) -> dict:
    """Peak extra memory (MB) of one ``locate`` and one ``layer`` call, each in a fresh process."""
    out = {}
    for call in ("locate", "layer"):
        command = [sys.executable, __file__, "--_memory", f"{search},{batch},{height},{width},{seed},{call},{opts.images}",
                   "--device", str(device), "--threads", str(torch.get_num_threads())]
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        lines = done.stdout.strip().splitlines()
        out[call] = float(lines[-1]) if done.returncode == 0 and lines else None
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
    return out


def _memory_child(spec: str, device: torch.device) -> int:
    """``--_memory``: print the peak extra MB of one call (see :func:`peak_memory`)."""
    search, batch, height, width, seed, call, kind = spec.split(",")
    maker = make_phantoms if kind == "phantoms" else make_images
    images = maker(int(batch), int(height), int(width), int(seed), device)
    layer = DACrop(output_size=OUTPUT_SIZE, pool_size=POOL_SIZE, search=search)
    fn = layer.locate if call == "locate" else layer
    with torch.no_grad():
        fn(images[:1])  # warm-up at this image size: one-time allocations (libraries, kernels, buffers)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn(images)
            torch.cuda.synchronize(device)
            print((torch.cuda.max_memory_allocated(device) - before) / 2**20)
            return 0
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set (VmHWM) to the current one
        before = _status_kb("VmRSS")
        fn(images)
        print((_status_kb("VmHWM") - before) / 1024)
    return 0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def compile_timing(pooled: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """The grid scoring eager and under ``torch.compile``: first call and steady state (ms)."""
    layer = DACrop(output_size=OUTPUT_SIZE, pool_size=POOL_SIZE, search="global")
    h, w = pooled.shape[-2:]
    r_min = float(fit_r_min(h, w, layer.r_min_fraction, layer.aspect, pooled)[0])
    result = {}
    for label, maps in (("batch", pooled[:, 0] * layer.saliency_scale), ("one", pooled[:1, 0] * layer.saliency_scale)):
        args = (r_min, layer.aspect, layer.final_sharpness, layer.grid.step, layer.grid.candidates)
        entry = {}
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            fn = _grid_candidates if mode == "eager" else torch.compile(_grid_candidates, dynamic=False)
            sync(device)
            start = time.perf_counter()
            fn(maps, *args)
            sync(device)
            first = time.perf_counter() - start
            times, _ = time_it(lambda: fn(maps, *args), repeats, device)
            entry[mode] = {"first_call_ms": 1000 * first, "median_ms": 1000 * statistics.median(times)}
        result[label] = entry
    return result


def compile_polish_timing(one: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """``locate`` of one image, the polish's per-step functions eager and ``torch.compile``-d
    (patched into :mod:`dac.optim.solver` and :mod:`dac.optim.cost_function` here only):
    first call and median (ms), the pooling's median, and the largest box difference (px)."""
    from unittest import mock

    import dac.optim.cost_function as cost_function
    import dac.optim.solver as solver

    layer = DACrop(output_size=OUTPUT_SIZE, pool_size=POOL_SIZE, search="global")
    result: dict = {}
    boxes = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        wrap = (lambda fn: fn) if mode == "eager" else (lambda fn: torch.compile(fn, dynamic=False))
        with mock.patch.object(solver, "stationarity_residual", wrap(solver.stationarity_residual)), \
                mock.patch.object(solver, "_cost_derivatives", wrap(solver._cost_derivatives)), \
                mock.patch.object(cost_function, "stationarity_residual", wrap(cost_function.stationarity_residual)), \
                torch.no_grad():
            sync(device)
            start = time.perf_counter()
            layer.locate(one)
            sync(device)
            first = time.perf_counter() - start
            times, boxes[mode] = time_it(lambda: layer.locate(one), repeats, device)
            pool, _ = time_it(lambda: layer.saliency_map(one), repeats, device)
        result[mode] = {"first_call_ms": 1000 * first, "median_ms": 1000 * statistics.median(times),
                        "pool_ms": 1000 * statistics.median(pool)}
        result[mode]["locate_over_pool"] = result[mode]["median_ms"] / result[mode]["pool_ms"]
    result["max_box_diff_px"] = float((boxes["eager"] - boxes["compiled"]).abs().max())
    return result


# ----------------------------------------------------------------------- output
def markdown(record: dict) -> str:
    floor = record["floor_ms_per_image"]
    lines = [
        f"### B={record['batch']}, {record['height']}x{record['width']} {record['images']} "
        f"(saliency {record['saliency_size'][0]}x{record['saliency_size'][1]}), "
        f"{record['machine']['device']}, {record['machine']['threads']} threads, median of {record['repeats']}, "
        f"load average {record['machine'].get('load_average', ['?'])[0]}",
        "",
        "| search | layer ms/image | locate | search | crop | layer / floor | batch 1: locate ms | pool ms | locate / pool |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in record["searches"].items():
        lines.append(
            f"| {name} | {r['layer_ms_per_image']:.2f} | {r['locate_ms_per_image']:.2f} | {r['search_ms_per_image']:.2f} | "
            f"{r['crop_ms_per_image']:.2f} | {r['layer_over_floor']:.2f}x | {r['batch1_locate_ms']:.2f} | "
            f"{r['batch1_pool_ms']:.2f} | {r['batch1_locate_over_pool']:.2f}x |"
        )
    for name, r in record["searches"].items():
        if "batch1_grid_ms" in r:
            lines += ["", f"batch 1, {name} search: its grid phase alone {r['batch1_grid_ms']:.2f} ms, "
                          f"{r['batch1_grid_over_pool']:.2f}x the pooling"]
    lines += ["", f"pool {record['pool_ms_per_image']:.2f} ms/image, floor (images.float()) {floor:.2f} ms/image"
              + (f", dense reference search {record['dense_ms_per_image']:.1f} ms/image" if "dense_ms_per_image" in record else "")]
    if "peak_memory_mb" in record:
        lines += ["", "| search | peak MB: locate B=1 | layer B=1 | locate B=%d | layer B=%d |" % (record["batch"], record["batch"]),
                  "|---|---:|---:|---:|---:|"]
        for name, m in record["peak_memory_mb"].items():
            one, full = m.get("1", {}), m.get(str(record["batch"]), {})
            cells = [one.get("locate"), one.get("layer"), full.get("locate"), full.get("layer")]
            lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    if "compile" in record:
        lines += ["", "| grid scoring | eager first / median ms | torch.compile first / median ms |", "|---|---:|---:|"]
        for label, e in record["compile"].items():
            lines.append(f"| {label} | {e['eager']['first_call_ms']:.1f} / {e['eager']['median_ms']:.2f} | "
                         f"{e['compiled']['first_call_ms']:.0f} / {e['compiled']['median_ms']:.2f} |")
    if "compile_polish" in record:
        c = record["compile_polish"]
        lines += ["", "| batch 1, global search, the polish's functions | first call ms | locate ms | pool ms | locate / pool |",
                  "|---|---:|---:|---:|---:|"]
        for mode in ("eager", "compiled"):
            e = c[mode]
            lines.append(f"| {mode} | {e['first_call_ms']:.0f} | {e['median_ms']:.2f} | {e['pool_ms']:.2f} | {e['locate_over_pool']:.2f}x |")
        lines.append(f"\nlargest box difference, eager against compiled: {c['max_box_diff_px']:.2g} px")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """Grouped bar chart of ms/image per item, search and size (needs matplotlib)."""
    plt = pyplot(path)
    if plt is None:
        return
    keys = ["layer", "search", "crop"]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = [(f"{rec['height']}x{rec['width']} {name}", [r[f"{k}_ms_per_image"] for k in keys] + [rec["pool_ms_per_image"], rec["floor_ms_per_image"]])
            for rec in records for name, r in rec["searches"].items()]
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(values))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks(range(len(keys) + 2), keys + ["pool", "floor"])
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
    parser.add_argument("--images", choices=("random", "phantoms"), default="random", help="synthetic images or phantoms")
    parser.add_argument("--searches", type=lambda t: t.split(","), default=["paper", "global"],
                        help="comma-separated DACrop searches (default paper,global)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--repeats1", type=int, default=10, help="timed runs at batch 1 (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="time the dense reference search")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    parser.add_argument("--compile", action="store_true", help="time torch.compile of the grid scoring and of the polish's functions")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (needs matplotlib)")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args._memory:
        return _memory_child(args._memory, device)
    if args.batch < 1 or args.repeats < 1 or args.repeats1 < 1:
        parser.error("--batch, --repeats and --repeats1 must be >= 1")
    for name in args.searches:
        if name not in SEARCHES:
            parser.error(f"--searches: expected names from {SEARCHES}, got {name!r}")

    torch.manual_seed(args.seed)
    sizes = args.sizes or [(args.height, args.width)]
    records = []
    for height, width in sizes:
        record = measure(args.batch, height, width, args.repeats, device, args.seed, args)
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
