"""``torch.compile`` of a model that holds ``DACrop``: the layer run eagerly against traced.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/compile_model.py --threads 2 --json compile_model.json

The model is ``nn.Sequential(DACrop(output_size, pool_size=4, search=S), conv, pooling,
linear)`` on ``--batch`` uniform-noise images of ``--size`` (96 x 177 by default). For
each search and each way of compiling, one run, the model compiled afresh
(``torch._dynamo.reset()``):

* ``eager layer`` (the library's way): ``DACrop``'s ``forward`` is
  ``torch.compiler.disable``-d, so dynamo breaks the graph around it;
* ``traced``: the same model with ``forward`` and ``locate`` undecorated for this run
  (``__wrapped__``), so that dynamo traces the search, as before the decorator.

Reported per row, forward and backward of one batch: the first call (compiling), the
median of ``--calls`` further calls, a first call at batch + 1 (a new shape), and the
eager model's median in the same run (the reference of the ratio).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from dac import DACrop  # noqa: E402


def model(search: str, size: tuple[int, int]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(DACrop(output_size=size, pool_size=4, search=search), nn.Conv2d(1, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def step(net: nn.Module, images: torch.Tensor) -> float:
    """Seconds for one forward and backward."""
    start = time.perf_counter()
    net(images).sum().backward()
    return time.perf_counter() - start


def row(search: str, traced: bool, opts: argparse.Namespace) -> dict:
    height, width = opts.size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(opts.batch, 1, height, width, generator=gen)
    wider = torch.rand(opts.batch + 1, 1, height, width, generator=gen)
    eager = model(search, (20, 37))
    names = ("forward", "locate") if traced else ()
    with contextlib.ExitStack() as patches:
        for name in names:
            patches.enter_context(mock.patch.object(DACrop, name, getattr(DACrop, name).__wrapped__))
        torch._dynamo.reset()
        compiled = torch.compile(model(search, (20, 37)))
        first = step(compiled, images)
        steady = [step(compiled, images) for _ in range(opts.calls)]
        new_shape = step(compiled, wider)
    reference = [step(eager, images) for _ in range(opts.calls)]
    out = {"search": search, "compile": "traced" if traced else "eager layer", "first_call_s": first,
           "median_s": statistics.median(steady), "new_batch_size_s": new_shape,
           "eager_median_s": statistics.median(reference)}
    out["median_over_eager"] = out["median_s"] / out["eager_median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(96, 177), help="HxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5, help="timed calls after the first")
    parser.add_argument("--searches", default="paper,global")
    parser.add_argument("--no-traced", action="store_true", help="skip the traced rows (minutes of compiling)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rows = []
    print("| search | compile | first call s | median s | new batch size s | eager median s | median / eager |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for search in opts.searches.split(","):
        for traced in (False,) if opts.no_traced else (False, True):
            r = row(search, traced, opts)
            rows.append(r)
            print(f"| {search} | {r['compile']} | {r['first_call_s']:.2f} | {r['median_s']:.3f} | "
                  f"{r['new_batch_size_s']:.2f} | {r['eager_median_s']:.3f} | {r['median_over_eager']:.2f} |", flush=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"command": " ".join(sys.argv), "options": vars(opts),
                                               "machine": machine(torch.device("cpu")), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
