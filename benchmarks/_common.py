"""Helpers shared by the benchmark scripts: clocks, the machine record, matplotlib."""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[list[float], Any]:
    """One warm-up call, then ``repeats`` timed calls: (seconds per call, last result)."""
    result = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def machine(device: torch.device) -> dict:
    """What the numbers were measured on (JSON-ready)."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    try:
        info["load_average"] = list(os.getloadavg())
    except (AttributeError, OSError):
        pass
    return info


def pyplot(path: str):
    """matplotlib.pyplot on the Agg backend, or None (with a message) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return None
    return plt
