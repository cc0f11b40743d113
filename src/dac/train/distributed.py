"""One process or many: the device, the rank, and the few collectives training needs.

Run a command as usual for one process, or under ``torchrun`` for several (one per
GPU, or several CPU processes): ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``, and :func:`init_runtime` then joins the process group — NCCL on CUDA,
gloo on CPU — and wraps nothing else: the engine uses DistributedDataParallel,
splits each batch across ranks, makes BatchNorm normalise with the whole batch's
statistics (:func:`sync_batchnorm`, on CPU and GPU alike), and gathers predictions.
Only rank 0 writes files.

Examples:
    >>> rt = init_runtime("cpu")
    >>> rt.world_size, rt.is_main, all_gather(rt, 7)
    (1, True, [7])
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._checks import DACInputError, check_device

__all__ = [
    "Runtime",
    "SyncBatchNorm2d",
    "all_gather",
    "all_reduce_sum",
    "barrier",
    "gather_shards",
    "init_runtime",
    "shard",
    "sync_batchnorm",
]


@dataclass(frozen=True)
class Runtime:
    """Where this process runs.

    Attributes:
        device: the torch device of this process.
        rank: this process's rank (0 when alone).
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def init_runtime(device: str = "auto", threads: int | None = None, *, name: str = "device") -> Runtime:
    """Pick the device and, under ``torchrun``, join the process group.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            Under torchrun with CUDA each process takes GPU ``LOCAL_RANK``.
        threads: torch CPU threads; None keeps torch's default, except that several
            CPU processes on one machine share its cores between them.
        name: how the device was given, for error messages (``--device``, ``train.device``).

    Returns:
        A :class:`Runtime`.

    Raises:
        DACInputError: an unknown device, or a CUDA device this machine lacks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    asked = check_device(device, name)
    if asked.type not in ("cpu", "cuda"):
        raise DACInputError(f"{name}: training runs on cpu or cuda, got {device!r}")
    if asked.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (asked.index or 0))
        check_device(dev, f"{name} (LOCAL_RANK {local_rank})")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    elif world > 1 and dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return Runtime(dev, rank, world, local_rank)


def barrier(rt: Runtime) -> None:
    """Wait for every process (nothing when alone)."""
    if rt.distributed:
        if rt.device.type == "cuda":
            dist.barrier(device_ids=[rt.device.index])
        else:
            dist.barrier()


def all_gather(rt: Runtime, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when alone."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(rt: Runtime, values: list[float]) -> list[float]:
    """Elementwise sum of a list of numbers over ranks."""
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def shard(rt: Runtime, items: Sequence[Any]) -> list[Any]:
    """This rank's share of ``items``: ``items[rank::world_size]``."""
    return list(items)[rt.rank :: rt.world_size]


def gather_shards(rt: Runtime, local: Sequence[Any], total: int) -> list[Any]:
    """Undo :func:`shard` on every rank: each rank's results, put back in item order.

    Args:
        rt: the runtime.
        local: this rank's results, one per item of ``shard(rt, items)``.
        total: ``len(items)``.
    """
    if not rt.distributed:
        return list(local)
    out: list[Any] = [None] * total
    for r, part in enumerate(all_gather(rt, list(local))):
        out[r :: rt.world_size] = part
    return out


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole batch across processes.

    In training mode under an initialised process group of more than one process,
    the mean and (biased) variance are computed over every process's images —
    two differentiable all-reduces (sum, then the centred sum of squares), so the
    gradient is that of BatchNorm over the global batch — and the running
    statistics are updated from them as ``nn.BatchNorm2d`` would on one process.
    Otherwise it *is* ``nn.BatchNorm2d``. Works with gloo (CPU) and NCCL (GPU),
    unlike ``torch.nn.SyncBatchNorm``, which needs a GPU.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        count = x.new_full((1,), x.numel() // x.shape[1])
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
        return y


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` in ``module`` into a :class:`SyncBatchNorm2d`, in place.

    The parameters and buffers are kept (the same tensors), so optimisers and state
    dicts are unaffected; outside a multi-process run the layers behave as before.

    Examples:
        >>> net = sync_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
        >>> type(net[1]).__name__
        'SyncBatchNorm2d'
    """
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = SyncBatchNorm2d
    return module
