"""Throughput of ``dac crop`` against its parts: decoding alone and the layer alone, in one run.

Run (from the repository root)::

    .venv/bin/python benchmarks/crop_throughput.py --count 32 --json crop_throughput.json
    .venv/bin/python benchmarks/crop_throughput.py --inputs phantoms/ --keep  # reuse generated PNGs

Writes ``--count`` 8-bit phantoms (``dac.data.phantoms.make_phantom``, 1536 x 2836 by default)
as PNG files (not timed; ``--inputs DIR --keep`` keeps them there for the next run, since
generating paper-size phantoms takes seconds each), then, ``--repeats`` times in turn:

* **decode**: every file read as ``dac crop`` reads it (``dac.data.io.read_input``),
  one after the other in this process;
* **layer**: ``DACrop`` (the paper's) on the decoded images, ``--batch-size`` at a time,
  with torch's default threads and with the threads ``dac crop`` gives its search; the
  faster of the two counts (the stricter baseline);
* **crop**: the command ``dac crop FOLDER --out OUT --workers W --batch-size B`` end to
  end in this process (``dac.cli.main``, a fresh ``OUT`` each time): workers starting,
  decoding, hashing, the search, the crops and the atomic writes.

Reports ms per image (wall and CPU) and images/s of each (medians over the repeats), and the ratios
``crop / (decode + layer)`` (below 1: the parts overlap) and ``crop / max(decode,
layer)`` (1 is the floor with enough cores), how many cores ``dac crop`` kept busy
(its CPU seconds, workers included, over its wall seconds: the parts can overlap only as
far as cores are free), the machine and its load average, and the mean IoU of the boxes
against the phantoms' true regions. Everything runs on the CPU (there is no
``--device``: ``dac crop --device cuda`` is not measured here).
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from dac import DACrop  # noqa: E402
from dac.data import io as dio  # noqa: E402
from dac.jobs.engine import _cpus, default_workers, search_threads
from dac.data.io import read_input  # noqa: E402
from dac.cli import main as dac_main  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402
from dac.data.phantoms import make_phantom  # noqa: E402


def _phantoms(root: Path, count: int, height: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    """Write the phantoms that are missing (their true regions in ``regions.json``);
    return resolved path -> true region."""
    root.mkdir(parents=True, exist_ok=True)
    record = root / "regions.json"
    regions = json.loads(record.read_text()) if record.exists() else {}
    truth = {}
    for i in range(count):
        path = root / f"phantom_{seed + i:05d}_{height}x{width}.png"
        if not path.exists() or path.name not in regions:
            p = make_phantom(seed + i, height, width)
            dio.write_png(path, p.image, bits=8)
            regions[path.name] = p.roi.tolist()
            record.write_text(json.dumps(regions))
        truth[str(path.resolve())] = torch.tensor(regions[path.name])
    return truth


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _decode(paths: list[Path]) -> tuple[float, float, list[torch.Tensor]]:
    cpu, start = _cpu_seconds(), time.perf_counter()
    images = [read_input(str(p))[0] for p in paths]
    return time.perf_counter() - start, _cpu_seconds() - cpu, images


def _layer(images: list[torch.Tensor], batch_size: int, threads: int) -> tuple[float, float]:
    layer = DACrop()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu, start = _cpu_seconds(), time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                layer(torch.stack(images[i:i + batch_size]), return_boxes=True)
        return time.perf_counter() - start, _cpu_seconds() - cpu
    finally:
        torch.set_num_threads(before)


def _crop(folder: Path, out: Path, batch_size: int, workers: int | str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process and its workers, exit status)."""
    shutil.rmtree(out, ignore_errors=True)
    cpu, start = _cpu_seconds(), time.perf_counter()
    status = dac_main(["crop", str(folder), "--out", str(out), "--batch-size", str(batch_size),
                       "--workers", str(workers), "--no-progress"])
    return time.perf_counter() - start, _cpu_seconds() - cpu, status


def run(count: int, height: int, width: int, batch_size: int, workers: int | str, repeats: int, seed: int,
        inputs: Path | None, keep: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dac-crop-bench-"))
    folder = inputs if inputs is not None else tmp / "in"
    try:
        truth = _phantoms(folder, count, height, width, seed)
        paths = sorted(Path(p) for p in truth)
        n = len(paths)
        chosen = default_workers("cpu") if workers == "auto" else int(workers)
        search = search_threads(chosen)
        names = ("decode", "layer_default", "layer_search", "crop")
        times: dict[str, list[float]] = {k: [] for k in names} | {f"{k}_cpu": [] for k in names}
        status = 0
        for _ in range(repeats):
            decode_s, decode_cpu, images = _decode(paths)
            times["decode"].append(decode_s)
            times["decode_cpu"].append(decode_cpu)
            for name, threads in (("layer_default", torch.get_num_threads()), ("layer_search", search)):
                wall, cpu = _layer(images, batch_size, threads)
                times[name].append(wall)
                times[f"{name}_cpu"].append(cpu)
            del images
            crop_s, crop_cpu, status = _crop(folder, tmp / "out", batch_size, workers)
            times["crop"].append(crop_s)
            times["crop_cpu"].append(crop_cpu)
        with open(tmp / "out" / "boxes.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        found = torch.tensor([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in rows])
        true = torch.stack([truth[r["path"]] for r in rows]).to(found.dtype)
        iou = box_iou(found, true).diagonal()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if inputs is not None and not keep:
            shutil.rmtree(inputs, ignore_errors=True)
    ms = {k: 1000 * statistics.median(v) / n for k, v in times.items()}
    layer_ms = min(ms["layer_default"], ms["layer_search"])
    layer_cpu = ms["layer_default_cpu"] if ms["layer_default"] <= ms["layer_search"] else ms["layer_search_cpu"]
    return {
        "count": n, "image_size": [height, width], "batch_size": batch_size, "workers": workers,
        "workers_used": chosen, "search_threads": search, "repeats": repeats, "exit_status": status,
        "ms_per_image": {"decode": ms["decode"], "layer": layer_ms, "layer_default_threads": ms["layer_default"],
                         "layer_search_threads": ms["layer_search"], "crop": ms["crop"]},
        "images_per_s": {"decode": 1000 / ms["decode"], "layer": 1000 / layer_ms, "crop": 1000 / ms["crop"]},
        "crop_over_sum": ms["crop"] / (ms["decode"] + layer_ms),
        "crop_parallelism": ms["crop_cpu"] / ms["crop"],
        "cpu_ms_per_image": {"decode": ms["decode_cpu"], "layer": layer_cpu, "crop": ms["crop_cpu"]},
        "crop_cpu_over_sum": ms["crop_cpu"] / (ms["decode_cpu"] + layer_cpu),
        "crop_over_slower": ms["crop"] / max(ms["decode"], layer_ms),
        "raw_seconds": times,
        "mean_iou": float(iou.mean()), "ok": sum(r["status"] == "ok" for r in rows),
        "machine": machine(torch.device("cpu")) | {"cpus_for_dac": _cpus()},
        "command": " ".join(sys.argv),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=32, help="phantom PNGs (default 32)")
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--width", type=int, default=2836)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="auto", help="dac crop --workers (default auto)")
    parser.add_argument("--repeats", type=int, default=3, help="decode / layer / crop rounds, in turn (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inputs", type=Path, help="folder for the phantom PNGs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep --inputs for the next run")
    parser.add_argument("--threads", type=int, help="torch threads of this process (default: torch's); dac crop's "
                        "search uses at most this many")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.workers if args.workers == "auto" else int(args.workers)
    r = run(args.count, args.height, args.width, args.batch_size, workers, args.repeats, args.seed, args.inputs, args.keep)
    ms, rate = r["ms_per_image"], r["images_per_s"]
    print(f"dac crop on {r['count']} phantom PNGs of {args.width}x{args.height}, batch {args.batch_size}, "
          f"workers {r['workers_used']} ({args.workers}), search threads {r['search_threads']}, "
          f"medians of {args.repeats} rounds; load average {r['machine'].get('load_average')}")
    print("| part | ms / image | images / s |\n|---|---:|---:|")
    print(f"| decode only | {ms['decode']:.1f} | {rate['decode']:.2f} |")
    print(f"| layer only (best of {torch.get_num_threads()} / {r['search_threads']} threads: "
          f"{ms['layer_default_threads']:.1f} / {ms['layer_search_threads']:.1f}) | {ms['layer']:.1f} | {rate['layer']:.2f} |")
    print(f"| dac crop | {ms['crop']:.1f} | {rate['crop']:.2f} |")
    print(f"crop / (decode + layer) = {r['crop_over_sum']:.2f}; crop / max(decode, layer) = {r['crop_over_slower']:.2f}; "
          f"{r['ok']}/{r['count']} ok; mean IoU {r['mean_iou']:.3f}")
    cpu = r["cpu_ms_per_image"]
    print(f"CPU ms / image: decode {cpu['decode']:.1f}, layer {cpu['layer']:.1f}, dac crop {cpu['crop']:.1f} (workers "
          f"included): crop / (decode + layer) = {r['crop_cpu_over_sum']:.2f} in CPU time; dac crop kept "
          f"{r['crop_parallelism']:.2f} cores busy (near 1 or below: no core was free for the parts to overlap)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
