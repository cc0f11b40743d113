"""Training and prediction: Adam epochs that resume from checkpoints, on one process or many.

* :func:`fit` trains a :class:`~dac.train.pipelines.Pipeline` with cross-entropy and
  Adam. Every epoch draws its sample order and augmentation from seeds derived from
  ``(seed, epoch)``, so a run resumed from the checkpoint of epoch *e* continues as the
  uninterrupted run would have (up to the rounding of threaded kernels: ~1e-6 here).
  Under torchrun the model is wrapped in DistributedDataParallel and each global batch
  is split across the processes.
* :func:`predict` returns class probabilities (each process predicts a share).
* :func:`precompute_front` runs a front with nothing to learn over every image once
  (the DAC crop or the resize; augmentation is applied after it, per step).
* Checkpoints are plain state dicts and Python numbers, written atomically
  (temporary file + ``os.replace``) and read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._checks import DACInputError
from ..datasets import collate_images
from ._io import atomic_write
from .distributed import Runtime, all_reduce_sum, gather_shards, shard
from .pipelines import DACFront, Pipeline

__all__ = ["fit", "load_checkpoint", "precompute_front", "predict", "save_checkpoint", "seed_for"]

Callback = Callable[[str, dict], None]


def seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs and machines).

    Example:
        >>> seed_for(0, "order", 3) == seed_for(0, "order", 3) != seed_for(0, "order", 4)
        True
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (state dicts, tensors, Python numbers and strings) to ``path`` atomically."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` onto the CPU."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def _to(images: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    if isinstance(images, Tensor):
        return images.to(device, non_blocking=True)
    return [image.to(device, non_blocking=True) for image in images]


def _loader(dataset: Dataset, batches: list[list[int]], workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_images, num_workers=workers)


def _optimizer(model: Pipeline, lr: float, front_lr: float | None) -> torch.optim.Optimizer:
    front = [p for p in model.front.parameters() if p.requires_grad]
    rest = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("front.")]
    groups = [{"params": rest, "lr": lr}]
    if front:
        groups.append({"params": front, "lr": front_lr if front_lr is not None else lr})
    return torch.optim.Adam(groups, lr=lr)


def fit(
    model: Pipeline,
    dataset: Dataset,
    train_indices: Sequence[int],
    *,
    epochs: int,
    rt: Runtime,
    batch_size: int = 24,
    lr: float = 1e-3,
    front_lr: float | None = None,
    seed: int = 0,
    fronted: bool = False,
    workers: int = 0,
    checkpoint: str | Path | None = None,
    callback: Callback | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on ``dataset[train_indices]`` for ``epochs`` epochs (Adam, cross-entropy).

    Args:
        model: the network (moved to ``rt.device``).
        dataset: items ``{"image": Tensor[C, H, W], "label": int}``: raw images, or the
            front's cached outputs when ``fronted``.
        train_indices: the items to train on.
        epochs: total epochs (a resumed run trains only the missing ones).
        rt: the runtime (device; rank and world size under torchrun).
        batch_size: images per step over all processes (paper: 24).
        lr: Adam learning rate (paper: 1e-3); ``front_lr`` for the front's parameters.
        seed: seeds the sample order and augmentation of every epoch.
        fronted: the dataset holds front outputs (see :func:`precompute_front`).
        workers: DataLoader processes.
        checkpoint: a file written after every epoch (by rank 0) and, if present,
            resumed from: the model, the optimizer, the epoch and the history.
        callback: ``callback(event, info)`` with ``"epoch_end"`` after each epoch
            (info: ``epoch``, ``epochs``, ``record``, ``model``) and ``"fit_start"``
            (``start_epoch``).

    Returns:
        The history: one dict per epoch (``epoch``, ``loss``, ``train_accuracy``,
        ``seconds``, and for DAC fronts ``boxes_unconverged``).

    Raises:
        RuntimeError: the loss became NaN or infinite.
    """
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if train_indices.size < rt.world_size:
        raise DACInputError(f"train_indices: need at least {rt.world_size} images (one per process), got {train_indices.size}")
    model.to(rt.device)
    optimizer = _optimizer(model, lr, front_lr)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    if callback:
        callback("fit_start", {"start_epoch": start, "epochs": epochs})
    net: nn.Module = model
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    for epoch in range(start, epochs):
        began = time.perf_counter()
        order = train_indices[torch.randperm(train_indices.size, generator=torch.Generator().manual_seed(seed_for(seed, "order", epoch))).numpy()]
        batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
        batches = [b for b in batches if b.size >= rt.world_size]  # every process gets a share of every step
        torch.manual_seed(seed_for(seed, "augment", epoch, rt.rank))
        model.train()
        loss_sum = correct = count = 0.0
        for batch in _loader(dataset, [shard(rt, b.tolist()) for b in batches], workers):
            images, labels = _to(batch["image"], rt.device), batch["label"].to(rt.device)
            logits = net(images, fronted=fronted)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * labels.numel()
            correct += float((logits.detach().argmax(1) == labels).sum())
            count += labels.numel()
        unconverged = float(getattr(model.front, "boxes_unconverged", 0)) if isinstance(model.front, DACFront) and not fronted else 0.0
        loss_sum, correct, count, unconverged = all_reduce_sum(rt, [loss_sum, correct, count, unconverged])
        if not math.isfinite(loss_sum):
            raise RuntimeError(f"training diverged: the loss is {loss_sum} in epoch {epoch + 1}")
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / count,
            "train_accuracy": correct / count,
            "seconds": time.perf_counter() - began,
        }
        if isinstance(model.front, DACFront) and not fronted:
            record["boxes_unconverged"] = int(unconverged)
            model.front.boxes_total = model.front.boxes_unconverged = 0
        history.append(record)
        if checkpoint is not None and rt.is_main:
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "epochs": epochs, "history": history})
        if callback:
            callback("epoch_end", {"epoch": epoch + 1, "epochs": epochs, "record": record, "model": model})
    return history


@torch.no_grad()
def predict(
    model: Pipeline,
    dataset: Dataset,
    indices: Sequence[int],
    *,
    rt: Runtime,
    batch_size: int = 32,
    fronted: bool = False,
    workers: int = 0,
) -> np.ndarray:
    """Class probabilities (softmax) of ``dataset[indices]``, array[N, num_classes] float64.

    Each process predicts ``indices[rank::world]``; every process gets all rows, in
    ``indices`` order. The model is put in eval mode (no augmentation).
    """
    indices = [int(i) for i in indices]
    if not indices:
        return np.zeros((0, 0))
    model.to(rt.device).eval()
    mine = shard(rt, indices)
    rows: list[np.ndarray] = []
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    for batch in _loader(dataset, batches, workers):
        logits = model(_to(batch["image"], rt.device), fronted=fronted)
        rows.extend(torch.softmax(logits.double(), dim=1).cpu().numpy())
    return np.stack(gather_shards(rt, rows, len(indices)))


@torch.no_grad()
def precompute_front(
    model: Pipeline, dataset: Dataset, *, rt: Runtime, batch_size: int = 32, workers: int = 0, dtype: torch.dtype = torch.float16
) -> Tensor:
    """The front's output for every image, Tensor[N, C, h, w] of ``dtype`` on the CPU.

    For fronts with nothing to learn and no randomness (``model.front_is_fixed``: the
    resize, and DAC without a learned saliency): their output does not change during
    training, so it is computed once per run; augmentation follows it per step.
    Stored as float16 by default (the 8-bit source needs no more).
    """
    if not model.front_is_fixed:
        raise DACInputError("model: its front learns or is random in training; its output cannot be cached")
    front = model.front.to(rt.device).eval()
    indices = list(range(len(dataset)))
    mine = shard(rt, indices)
    rows: list[Tensor] = []
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    for batch in _loader(dataset, batches, workers):
        rows.extend(front(_to(batch["image"], rt.device)).to("cpu", dtype))
    return torch.stack(gather_shards(rt, rows, len(indices)))
