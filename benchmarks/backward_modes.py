"""Backward modes of DACrop against the number of ascent iterations: time, memory, gradient error.

Run (from the repository root)::

    .venv/bin/python benchmarks/backward_modes.py --json backward_modes.json
    .venv/bin/python benchmarks/backward_modes.py --iterations 10,50,200 --plot backward_modes.png
    .venv/bin/python benchmarks/backward_modes.py --device cuda --json backward_modes_cuda.json

Data: one seeded float64 batch (``--batch`` x 1 x ``--height`` x ``--width``; default
2 x 1 x 300 x 555) of dark noise with one bright textured rectangle per image, shifted
a few pixels from image to image; ``DACrop(output_size=(20, 37), pool_size=5)``. The
scalar loss is ``sum(w * boxes)`` with fixed seeded weights ``w`` (Tensor[B, 4]).

Sweep: ``--iterations`` gives ``steps_per_stage`` values (default 10,25,50,100); a record's
``iterations`` is the number of ascent steps, ``stages * steps_per_stage`` = 40..400.
For each value these variants run (the record's ``mode``):

* ``implicit``: ``backward_mode="implicit"``, default polish (the layer's default).
* ``unroll``: ``backward_mode="unroll"``, ``polish_steps=0``: the paper's ascent alone,
  unrolled step by step.
* ``unroll+polish``: ``backward_mode="unroll"`` with the default Newton polish.
* ``truncated(K=k)``: ``backward_mode="truncated"``, ``backward_num_iterations=k`` for
  each k of ``--truncated-k`` (default 1,10), default polish.
* ``dlm``: ``backward_mode="dlm"``, ``dlm_epsilon=--dlm-epsilon`` (1e-8), default polish.

Gradient error: full-image finite differences would need two solves per pixel, far
too many, so the gradient g = d loss / d images is checked on ``--directions`` (3) smooth
random directions d_i (coarse 8 x 12 Gaussian noise, bicubic-upsampled; max pooling
is piecewise linear, so rough directions would cross its kinks). The reference is the
central finite difference ``(L(x + eps d_i) - L(x - eps d_i)) / (2 eps)``, eps = ``--eps``
(1e-7) in float64, of the *converged* boxes of the default layer (implicit,
steps_per_stage 50, full polish), i.e. the derivative of the true optimum. The FD
vector itself carries rounding error ~ 1e-16 * |box| / eps, ~1e-6 relative at
eps = 1e-7 on the default scene (eps = 1e-6 brings it to ~4e-8; eps >= 1e-5 starts to
cross the kinks of max pooling): errors near 1e-6 are the reference's floor. Each record compares the vector
``a = [g . d_1, ..., g . d_n]`` with the FD vector: ``grad_rel_err = |a - fd| / |fd|`` and
``grad_cos`` = cosine(a, fd). For ``unroll`` (no polish) with few steps the forward
box itself has not converged, so its error against this reference measures how far
the gradient of the unrolled ascent is from the implicit (true) one: that gap is what
the sweep shows. ``box_diff_px`` is the largest |difference| of the record's boxes from
the reference boxes, in input pixels (a gradient can only match if the box does).

Time: ``forward_s`` is ``layer.locate(x)`` with ``x.requires_grad_()``, ``backward_s`` is
``loss.backward()``; each variant is run once untimed (warm-up; it also gives the
gradient and the memory figure) and then ``--repeats`` times; the minimum is reported
(all runs are in the JSON as ``forward_s_runs`` / ``backward_s_runs``). Clocks are read
after ``torch.cuda.synchronize()`` on CUDA. On a small shared CPU other load inflates
single runs a lot; compare the minima, and rerun when the figures jump.

Memory: ``peak_bytes`` is the peak, during the forward, of the bytes *saved for
backward* by autograd (counted with ``torch.autograd.graph.saved_tensors_hooks``, each
storage once while any saved tensor still refers to it; the input images' own storage
is not counted, the caller holds it anyway). This is the memory that grows with the
number of differentiated steps, and it is the same on any device. ``saved_bytes_end``
is what is still saved when the forward returns (what backward will read). On CUDA
``cuda_peak_bytes`` is also reported: ``torch.cuda.max_memory_allocated`` over one
forward + backward, minus what was allocated before it.

Goals checked at the end (the project's issue): implicit backward time and saved
bytes flat in the iteration count (ratio at the largest / smallest iteration count),
and implicit ``grad_rel_err`` <= 1e-4 at every iteration count.

``--json PATH`` writes ``{"machine", "config", "reference", "records", "goals"}``,
``records`` holding one object per (mode, iterations) with keys ``mode``, ``iterations``,
``steps_per_stage``, ``forward_s``, ``backward_s``, ``peak_bytes``, ``grad_rel_err``,
``grad_cos`` and more. ``--plot PATH`` draws gradient error and backward time against
iterations (needs matplotlib; skipped with a message when it is absent).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
import weakref
from typing import Any

import torch

from _common import machine, pyplot, sync
from dac import DACrop

OUTPUT_SIZE = (20, 37)
POOL_SIZE = 5
STAGES = 4  # DACrop's default number of stages
EPS = 1e-7  # default FD step along a smooth direction, float64
IMPLICIT_REL_ERR_GOAL = 1e-4
FLAT_TIME_RATIO = 1.5  # backward-time ratio still called flat (timing noise on a shared CPU)
FLAT_BYTES_RATIO = 1.1  # saved-bytes ratio still called flat


# --------------------------------------------------------------------------- data
def make_scene(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Tensor[B, 1, H, W] float64 in [0, 1]: dark noise, one bright textured rectangle.

    The rectangle covers ~60% x ~60% of the image from (0.15 W, 0.2 H), moved by a few
    pixels per image, so every best box is well inside the image.
    """
    gen = torch.Generator().manual_seed(seed)
    images = 0.12 * torch.rand(batch, 1, height, width, dtype=torch.float64, generator=gen)
    rect_h, rect_w = int(0.6 * height), int(0.6 * width)
    yy = torch.arange(rect_h, dtype=torch.float64)[:, None]
    xx = torch.arange(rect_w, dtype=torch.float64)[None, :]
    for b in range(batch):
        y0, x0 = int(0.2 * height) + 4 * b, int(0.15 * width) + 6 * b
        texture = 0.08 * torch.sin(2 * math.pi * xx / 17.0) * torch.cos(2 * math.pi * yy / 23.0)
        noise = 0.4 * torch.rand(rect_h, rect_w, dtype=torch.float64, generator=gen)
        images[b, 0, y0 : y0 + rect_h, x0 : x0 + rect_w] += 0.3 + texture + noise
    return images.clamp(0.0, 1.0)


def smooth_directions(shape: tuple[int, ...], count: int, seed: int) -> list[torch.Tensor]:
    """``count`` smooth float64 fields of ``shape``: 8 x 12 Gaussian noise, bicubic-upsampled."""
    gen = torch.Generator().manual_seed(seed)
    fields = []
    for _ in range(count):
        coarse = torch.randn(shape[0], shape[1], 8, 12, dtype=torch.float64, generator=gen)
        fields.append(torch.nn.functional.interpolate(coarse, size=shape[-2:], mode="bicubic", align_corners=False))
    return fields


# ------------------------------------------------------------ saved-bytes tracker
class _Packed:
    """What autograd stores for one saved tensor while the tracker is on."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedBytes:
    """Bytes of the storages that autograd saves for backward, live and peak.

    Use as a context manager around a forward. Each storage is counted once while
    at least one saved tensor refers to it; when autograd drops its last saved tensor
    (graph freed, or backward done) it leaves the count. Storages in ``exclude`` (e.g.
    the input images) are never counted.
    """

    def __init__(self, exclude: tuple[torch.Tensor, ...] = ()) -> None:
        self._exclude = {self._key(t) for t in exclude}
        self._live: dict[tuple, list[int]] = {}  # key -> [refcount, nbytes]
        self._refs: set = set()
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())

    def _pack(self, tensor: torch.Tensor) -> Any:
        # Keep a detached alias (same storage, no grad_fn): no reference cycle with the
        # node that saves its own output; unpack may return any tensor of equal content.
        packed = _Packed(tensor.detach())
        if tensor.layout != torch.strided:
            return packed
        key = self._key(tensor)
        if key in self._exclude:
            return packed
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [0, tensor.untyped_storage().nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        self._refs.add(weakref.ref(packed, lambda ref, key=key: self._release(ref, key)))
        return packed

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def _release(self, ref: weakref.ref, key: tuple) -> None:
        self._refs.discard(ref)
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[key]

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


# ------------------------------------------------------------------------ helpers
def directional(grad: torch.Tensor, directions: list[torch.Tensor]) -> list[float]:
    return [float((grad * d).sum()) for d in directions]


def compare(analytic: list[float], fd: list[float]) -> tuple[float, float]:
    """(relative error |a - fd| / |fd|, cosine(a, fd)) of two direction-derivative vectors."""
    a = torch.tensor(analytic, dtype=torch.float64)
    f = torch.tensor(fd, dtype=torch.float64)
    rel = float((a - f).norm() / f.norm())
    cos = float((a @ f) / (a.norm() * f.norm()).clamp_min(torch.finfo(torch.float64).tiny))
    return rel, cos


def variants(truncated_k: list[int], dlm_epsilon: float) -> list[tuple[str, dict]]:
    """(mode label, DACrop keyword arguments) of every variant, in table order."""
    out: list[tuple[str, dict]] = [
        ("implicit", dict(backward_mode="implicit")),
        ("unroll", dict(backward_mode="unroll", polish_steps=0)),
        ("unroll+polish", dict(backward_mode="unroll")),
    ]
    out += [(f"truncated(K={k})", dict(backward_mode="truncated", backward_num_iterations=k)) for k in truncated_k]
    out.append(("dlm", dict(backward_mode="dlm", dlm_epsilon=dlm_epsilon)))
    return out


# ---------------------------------------------------------------------- measuring
def reference(images: torch.Tensor, weights: torch.Tensor, directions: list[torch.Tensor], eps: float = EPS) -> dict:
    """Central finite differences of the default layer's converged boxes along each direction."""
    layer = DACrop(output_size=OUTPUT_SIZE, pool_size=POOL_SIZE)
    fd = []
    with torch.no_grad():
        boxes, info = layer.locate(images, return_info=True)
        for d in directions:
            plus = layer.locate(images + eps * d)
            minus = layer.locate(images - eps * d)
            fd.append(float(((plus - minus) * weights).sum()) / (2 * eps))
    return {
        "fd": fd,
        "boxes": boxes,
        "converged": int(info.converged.sum()),
        "frozen": int(info.frozen.sum()),
        "eps": eps,
        "layer": repr(layer),
    }


def measure(label: str, kwargs: dict, steps_per_stage: int, images: torch.Tensor, weights: torch.Tensor,
            directions: list[torch.Tensor], ref: dict, repeats: int, device: torch.device) -> dict:
    """One (mode, iterations) record."""
    layer = DACrop(output_size=OUTPUT_SIZE, pool_size=POOL_SIZE, steps_per_stage=steps_per_stage, **kwargs)
    caught: list[str] = []

    def run(track: bool) -> dict:
        x = images.clone().requires_grad_()
        tracker = SavedBytes(exclude=(x,)) if track else None
        cuda_base = 0
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            cuda_base = torch.cuda.memory_allocated(device)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            sync(device)
            start = time.perf_counter()
            if tracker is not None:
                with tracker:
                    boxes, info = layer.locate(x, return_info=True)
            else:
                boxes, info = layer.locate(x, return_info=True)
            sync(device)
            forward = time.perf_counter() - start
            saved_end = tracker.current if tracker is not None else None
            loss = (boxes * weights).sum()
            sync(device)
            start = time.perf_counter()
            loss.backward()
            sync(device)
            backward = time.perf_counter() - start
        caught.extend(str(w.message) for w in warned)
        return {
            "forward": forward,
            "backward": backward,
            "boxes": boxes.detach(),
            "info": info,
            "grad": x.grad,
            "peak": tracker.peak if tracker is not None else None,
            "saved_end": saved_end,
            "after_backward": tracker.current if tracker is not None else None,
            "cuda_peak": torch.cuda.max_memory_allocated(device) - cuda_base if device.type == "cuda" else None,
        }

    # Warm-up: builds the Theseus layer; tracked, gives the gradient and the saved bytes.
    first = run(track=True)
    timed = [run(track=False) for _ in range(repeats)]
    forwards = [t["forward"] for t in timed]
    backwards = [t["backward"] for t in timed]
    boxes, info, grad = first["boxes"], first["info"], first["grad"]

    analytic = directional(grad.cpu(), [d.cpu() for d in directions])
    rel, cos = compare(analytic, ref["fd"])
    record = {
        "mode": label,
        "iterations": layer.schedule.ascent_steps,
        "steps_per_stage": steps_per_stage,
        "backward_mode": layer.backward_mode,
        "polish_steps": layer.schedule.polish_steps,
        "forward_s": min(forwards),
        "backward_s": min(backwards),
        "peak_bytes": first["peak"],
        "saved_bytes_end": first["saved_end"],
        "grad_rel_err": rel,
        "grad_cos": cos,
        "directional_derivatives": analytic,
        "box_diff_px": float((boxes.cpu() - ref["boxes"].cpu()).abs().max()),
        "converged": int(info.converged.sum()),
        "frozen": int(info.frozen.sum()),
        "solver_iterations_mean": float(info.iterations.float().mean()),
        "forward_s_runs": forwards,
        "backward_s_runs": backwards,
        "saved_bytes_after_backward": first["after_backward"],
        "warnings": sorted(set(caught)),
    }
    if layer.backward_mode == "truncated":
        record["backward_num_iterations"] = layer.backward_num_iterations
    if layer.backward_mode == "dlm":
        record["dlm_epsilon"] = layer.dlm_epsilon
    if device.type == "cuda":
        record["cuda_peak_bytes"] = max(t["cuda_peak"] for t in timed)
    return record


# ------------------------------------------------------------------------ summary
def goals(records: list[dict]) -> dict:
    """The issue's two goals, on the ``implicit`` records (plus ``unroll`` for contrast)."""

    def ratios(mode: str) -> dict | None:
        rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["iterations"])
        if len(rows) < 2:
            return None
        lo, hi = rows[0], rows[-1]
        return {
            "iterations": [lo["iterations"], hi["iterations"]],
            "backward_time_ratio": hi["backward_s"] / lo["backward_s"] if lo["backward_s"] > 0 else float("inf"),
            "peak_bytes_ratio": hi["peak_bytes"] / lo["peak_bytes"] if lo["peak_bytes"] > 0 else float("inf"),
        }

    out: dict[str, Any] = {}
    implicit = [r for r in records if r["mode"] == "implicit"]
    flat = ratios("implicit")
    if flat is not None:
        flat["flat"] = (
            flat["backward_time_ratio"] <= FLAT_TIME_RATIO and flat["peak_bytes_ratio"] <= FLAT_BYTES_RATIO
        )
        flat["thresholds"] = {"backward_time_ratio": FLAT_TIME_RATIO, "peak_bytes_ratio": FLAT_BYTES_RATIO}
        out["implicit_flat"] = flat
    if implicit:
        worst = max(r["grad_rel_err"] for r in implicit)
        out["implicit_grad_rel_err"] = {
            "max": worst,
            "goal": IMPLICIT_REL_ERR_GOAL,
            "reached": worst <= IMPLICIT_REL_ERR_GOAL,
        }
    unroll = ratios("unroll")
    if unroll is not None:
        out["unroll_for_contrast"] = unroll
    return out


def markdown(records: list[dict], ref: dict, summary: dict, config: dict, info: dict) -> str:
    lines = [
        f"### backward modes: B={config['batch']}, {config['height']}x{config['width']} float64, "
        f"pool {POOL_SIZE}, output {OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]}, {info['device']}, "
        f"{info['threads']} threads, min of {config['repeats']} runs",
        "",
        f"FD reference (eps {ref['eps']:g}, default layer, {ref['converged']}/{config['batch']} converged): "
        + ", ".join(f"{v:.6g}" for v in ref["fd"]),
        "",
        "| mode | iterations | forward s | backward s | saved MB (peak) | rel err | cos | box diff px | converged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['mode']} | {r['iterations']} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | "
            f"{r['peak_bytes'] / 1e6:.3f} | {r['grad_rel_err']:.2e} | {r['grad_cos']:.6f} | "
            f"{r['box_diff_px']:.2e} | {r['converged']}/{config['batch']} |"
        )
    if any("cuda_peak_bytes" in r for r in records):
        lines += ["", "CUDA peak (forward + backward, MB): " + ", ".join(
            f"{r['mode']}@{r['iterations']}={r['cuda_peak_bytes'] / 1e6:.2f}" for r in records)]
    lines.append("")
    flat = summary.get("implicit_flat")
    if flat is not None:
        a, b = flat["iterations"]
        lines.append(
            f"- implicit backward time & saved memory flat in iterations ({a} -> {b}): "
            f"time x{flat['backward_time_ratio']:.2f}, saved bytes x{flat['peak_bytes_ratio']:.2f} -> "
            f"{'REACHED' if flat['flat'] else 'NOT reached'} "
            f"(flat: time <= x{FLAT_TIME_RATIO}, bytes <= x{FLAT_BYTES_RATIO})"
        )
    unroll = summary.get("unroll_for_contrast")
    if unroll is not None:
        lines.append(
            f"  (unroll, for contrast: time x{unroll['backward_time_ratio']:.2f}, "
            f"saved bytes x{unroll['peak_bytes_ratio']:.2f})"
        )
    err = summary.get("implicit_grad_rel_err")
    if err is not None:
        lines.append(
            f"- implicit gradient relative error, max over iterations: {err['max']:.2e} -> "
            f"{'REACHED' if err['reached'] else 'NOT reached'} (goal <= {err['goal']:g})"
        )
    leaks = [f"{r['mode']}@{r['iterations']}" for r in records if r["saved_bytes_after_backward"]]
    if leaks:
        lines.append(f"- saved tensors still held after backward (unexpected): {', '.join(leaks)}")
    warned = sorted({f"{r['mode']}@{r['iterations']}" for r in records if r["warnings"]})
    if warned:
        lines.append(f"- warnings raised by the layer in: {', '.join(warned)} (see the JSON)")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """Two panels against iterations, one line per mode: grad rel err (log) and backward time."""
    plt = pyplot(path)
    if plt is None:
        return
    modes = list(dict.fromkeys(r["mode"] for r in records))
    fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    markers, styles = "osD^vx*", ["-", "--", ":", "-."]
    for i, mode in enumerate(modes):
        rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["iterations"])
        its = [r["iterations"] for r in rows]
        # Several modes give the same gradient: distinct markers and dashes keep them visible.
        style = dict(marker=markers[i % len(markers)], linestyle=styles[i % len(styles)], label=mode)
        ax_err.plot(its, [max(r["grad_rel_err"], 1e-16) for r in rows], **style)
        ax_time.plot(its, [r["backward_s"] for r in rows], **style)
    ax_err.axhline(IMPLICIT_REL_ERR_GOAL, color="grey", linestyle="--", linewidth=1, label="goal 1e-4")
    ax_err.set_yscale("log")
    ax_err.set_xlabel("ascent iterations (stages x steps per stage)")
    ax_err.set_ylabel("gradient relative error vs FD")
    ax_time.set_xlabel("ascent iterations (stages x steps per stage)")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("backward s (min of runs)")
    ax_err.legend(fontsize=8)
    ax_time.legend(fontsize=8)
    fig.suptitle("DACrop backward modes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=parse_ints, default=parse_ints("10,25,50,100"),
                        help="steps_per_stage values to sweep (default 10,25,50,100 = 40..400 ascent steps)")
    parser.add_argument("--truncated-k", type=parse_ints, default=parse_ints("1,10"),
                        help="backward_num_iterations of the truncated variants (default 1,10)")
    parser.add_argument("--modes", default=None,
                        help="only these variants, comma-separated labels (e.g. implicit,unroll,dlm)")
    parser.add_argument("--dlm-epsilon", type=float, default=1e-8, help="dlm_epsilon of the dlm variant (default 1e-8)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--height", type=int, default=300, help="image height H (default 300)")
    parser.add_argument("--width", type=int, default=555, help="image width W (default 555)")
    parser.add_argument("--directions", type=int, default=3, help="smooth FD directions (default 3)")
    parser.add_argument("--eps", type=float, default=EPS, help="central-difference step (default 1e-7)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of scene, weights and directions (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write the two-panel plot (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.directions < 1:
        parser.error("--batch, --repeats and --directions must be >= 1")
    if not args.eps > 0:
        parser.error("--eps must be > 0")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    chosen = variants(args.truncated_k, args.dlm_epsilon)
    if args.modes:
        wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in {label for label, _ in chosen}]
        if unknown:
            parser.error(f"--modes: unknown {unknown}; known: {[label for label, _ in chosen]}")
        chosen = [(label, kw) for label, kw in chosen if label in wanted]

    images = make_scene(args.batch, args.height, args.width, args.seed).to(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    weights = torch.randn(args.batch, 4, dtype=torch.float64, generator=gen).to(device)
    directions = [d.to(device) for d in smooth_directions(tuple(images.shape), args.directions, args.seed + 2)]

    started = time.perf_counter()
    ref = reference(images, weights, directions, args.eps)
    records = []
    for steps in args.iterations:
        for label, kwargs in chosen:
            records.append(measure(label, kwargs, steps, images, weights, directions, ref, args.repeats, device))
            r = records[-1]
            print(f"  {label:>16} @ {r['iterations']:>4}: fwd {r['forward_s']:.3f}s bwd {r['backward_s']:.3f}s "
                  f"rel err {r['grad_rel_err']:.2e}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started

    config = {
        "batch": args.batch,
        "height": args.height,
        "width": args.width,
        "pool_size": POOL_SIZE,
        "output_size": list(OUTPUT_SIZE),
        "stages": STAGES,
        "steps_per_stage": args.iterations,
        "truncated_k": args.truncated_k,
        "dlm_epsilon": args.dlm_epsilon,
        "directions": args.directions,
        "eps": args.eps,
        "repeats": args.repeats,
        "seed": args.seed,
        "dtype": "float64",
        "weights": weights.cpu().tolist(),
    }
    info = machine(device)
    summary = goals(records)
    print(markdown(records, ref, summary, config, info))
    print(f"\nwall time {wall:.1f} s")

    if args.json:
        ref_out = {k: v for k, v in ref.items() if k != "boxes"}
        ref_out["boxes"] = ref["boxes"].cpu().tolist()
        out = {"machine": info, "config": config, "reference": ref_out, "records": records,
               "goals": summary, "wall_s": wall}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"results written to {args.json}")
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
