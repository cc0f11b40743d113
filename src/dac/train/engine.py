"""Training and prediction: Adam epochs that resume from checkpoints, on one process or many.

* :func:`fit` trains a :class:`~dac.train.pipelines.Pipeline` with cross-entropy and
  Adam. Every epoch draws its sample order from a seed derived from ``(seed, epoch)``
  and every image its random transform from ``(seed, epoch, image index)``
  (:func:`sample_noise`), so a run resumed from the checkpoint of epoch *e* continues
  as the uninterrupted run would have, and a run on N processes (torchrun) trains on
  the same batches with the same transforms as one process: each global batch is
  split across the processes, BatchNorm normalises with the statistics of the whole
  global batch (:func:`~dac.train.distributed.sync_batchnorm`), and the loss is the
  mean over the global batch however unevenly it is split. On the CPU, with one
  thread count, two runs of one seed give identical bits.
* After the last epoch, BatchNorm's running statistics are re-estimated on the
  training images as evaluation sees them (no augmentation, no random RoI rotation;
  ``recalibrate_bn``), and the training images are predicted in eval mode: their
  accuracy is recorded (``eval_train_accuracy``), and a warning
  (:class:`EvalModeGapWarning`) is issued when it is far below the train-mode
  accuracy — the sign of a network that will collapse at evaluation.
* :func:`predict` returns class probabilities (each process predicts a share).
* :func:`precompute_front` runs a front with nothing to learn over every image once
  (the DAC crop or the resize; augmentation is applied after it, per step).
* Checkpoints are plain state dicts and Python numbers, written atomically
  (temporary file + ``os.replace``) and read with ``torch.load(weights_only=True)``;
  ``finished`` marks one whose training is complete.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._checks import DACInputError
from ..data.datasets import collate_images
from ._io import atomic_write
from .distributed import Runtime, all_gather, all_reduce_sum, shard, sync_batchnorm
from .folds import cannot_read, read_errors
from .pipelines import DACFront, Pipeline

__all__ = [
    "EVAL_GAP_WARNING",
    "EvalModeGapWarning",
    "epoch_batches",
    "fit",
    "load_checkpoint",
    "precompute_front",
    "predict",
    "recalibrate_batchnorm",
    "sample_noise",
    "save_checkpoint",
    "seed_for",
]

Callback = Callable[[str, dict], None]

#: :func:`fit` warns when eval-mode accuracy on the training images is this much below
#: the train-mode accuracy of the last epoch (and the gap is beyond the noise of a few images).
EVAL_GAP_WARNING = 0.2


class EvalModeGapWarning(RuntimeWarning):
    """Eval-mode accuracy on the training images is far below train-mode accuracy."""


def seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs and machines).

    Example:
        >>> seed_for(0, "order", 3) == seed_for(0, "order", 3) != seed_for(0, "order", 4)
        True
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_noise(seed: int, epoch: int, indices: Sequence[int], dims: int) -> Tensor:
    """Each image's uniform random numbers for one epoch, Tensor[len(indices), dims] in [0, 1).

    Row ``i`` depends only on ``(seed, epoch, indices[i])``: an image gets the same
    random transform whatever batch or process it is in.

    Example:
        >>> a, b = sample_noise(0, 1, [5, 9], 3), sample_noise(0, 1, [9], 3)
        >>> a.shape, torch.equal(a[1], b[0])
        (torch.Size([2, 3]), True)
    """
    rows = [torch.rand(dims, generator=torch.Generator().manual_seed(seed_for(seed, "noise", epoch, int(i)))) for i in indices]
    return torch.stack(rows) if rows else torch.zeros(0, dims)


def epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split an epoch's sample order into ``ceil(N / batch_size)`` batches of near-equal size.

    No batch is left with a handful of images (a lone last image would be a noisy
    BatchNorm batch and, split across processes, leave some with nothing).

    Example:
        >>> [b.size for b in epoch_batches(np.arange(50), 24)]
        [17, 17, 16]
    """
    order = np.asarray(order)
    return [b for b in np.array_split(order, max(1, math.ceil(order.size / batch_size))) if b.size]


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


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    errors = read_errors(items)
    return {"error": errors} if errors else collate_images(items)


def _loader(dataset: Dataset, batches: list[list[int]], workers: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The batches' items; an image that could not be read stops it with a DACInputError naming the file."""
    loader = DataLoader(
        dataset, batch_sampler=batches, collate_fn=_collate, num_workers=workers,
        generator=torch.Generator().manual_seed(seed),  # worker seeds from the run's seed, not torch's global RNG
    )
    for batch in loader:
        if "error" in batch:
            raise cannot_read(batch["error"])
        yield batch


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
    recalibrate_bn: bool = True,
    eval_batch_size: int = 32,
) -> list[dict[str, float]]:
    """Train ``model`` on ``dataset[train_indices]`` for ``epochs`` epochs (Adam, cross-entropy).

    Args:
        model: the network (moved to ``rt.device``; under torchrun its BatchNorm
            layers are made to synchronise their batch statistics across processes).
        dataset: items ``{"image": Tensor[C, H, W], "label": int}``: raw images, or the
            front's cached outputs when ``fronted``.
        train_indices: the items to train on.
        epochs: total epochs (a resumed run trains only the missing ones).
        rt: the runtime (device; rank and world size under torchrun).
        batch_size: images per step over all processes (paper: 24); an epoch of N
            images is ``ceil(N / batch_size)`` batches of near-equal size.
        lr: Adam learning rate (paper: 1e-3); ``front_lr`` for the front's parameters.
        seed: seeds the sample order and each image's random transform of every epoch.
        fronted: the dataset holds front outputs (see :func:`precompute_front`).
        workers: DataLoader processes.
        checkpoint: a file written after every epoch (by rank 0) and, if present,
            resumed from: the model, the optimizer, the epoch, the history and the
            number of processes (a checkpoint of another world size is refused).
        callback: ``callback(event, info)`` with ``"fit_start"`` (``start_epoch``),
            ``"epoch_end"`` after each epoch (``epoch``, ``epochs``, ``record``,
            ``model``) and ``"fit_end"`` (``record``: the last epoch's, with
            ``eval_train_accuracy``; ``warning``: a message or None).
        recalibrate_bn: after the last epoch, re-estimate BatchNorm's running
            statistics on the training images without augmentation
            (:func:`recalibrate_batchnorm`).
        eval_batch_size: images per batch of that pass and of the eval-mode check.

    Returns:
        The history: one dict per epoch (``epoch``, ``loss``, ``train_accuracy``,
        ``seconds``, for DAC fronts ``boxes_unconverged``); the last one also holds
        ``eval_train_accuracy`` (eval mode, no augmentation, after recalibration).

    Raises:
        RuntimeError: the loss became NaN or infinite.
        DACInputError: a checkpoint of another number of processes, a batch smaller
            than the number of processes, or an image that cannot be read.
    """
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if train_indices.size < rt.world_size:
        raise DACInputError(f"train_indices: need at least {rt.world_size} images (one per process), got {train_indices.size}")
    if min(b.size for b in epoch_batches(train_indices, batch_size)) < rt.world_size:
        raise DACInputError(f"batch_size: {batch_size} gives batches with fewer images than the {rt.world_size} processes")
    model.to(rt.device)
    if rt.distributed:
        sync_batchnorm(model)
    optimizer = _optimizer(model, lr, front_lr)
    start, history, finished = 0, [], False
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)
        saved_world = int(state.get("world_size", 1))
        if saved_world != rt.world_size:
            raise DACInputError(
                f"checkpoint: {str(checkpoint)!r} was trained by {saved_world} process(es), this run has {rt.world_size}; "
                f"resume it with {saved_world} (torchrun --nproc-per-node {saved_world}) or start in a new folder"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
        finished = bool(state.get("finished", False)) and start >= epochs

    def save(done: bool) -> None:
        if checkpoint is not None and rt.is_main:
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": len(history),
                                         "epochs": epochs, "history": history, "world_size": rt.world_size, "finished": done})

    if callback:
        callback("fit_start", {"start_epoch": start, "epochs": epochs})
    if finished:
        return history
    net: nn.Module = model
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    dims = model.noise_dims
    for epoch in range(start, epochs):
        began = time.perf_counter()
        order = train_indices[torch.randperm(train_indices.size, generator=torch.Generator().manual_seed(seed_for(seed, "order", epoch))).numpy()]
        batches = epoch_batches(order, batch_size)
        mine = [shard(rt, b.tolist()) for b in batches]
        model.train()
        loss_sum = correct = count = 0.0
        for step, batch in enumerate(_loader(dataset, mine, workers, seed_for(seed, "loader", epoch))):
            images, labels = _to(batch["image"], rt.device), batch["label"].to(rt.device)
            noise = sample_noise(seed, epoch, mine[step], dims).to(rt.device)
            logits = net(images, fronted=fronted, noise=noise)
            # the mean over the global batch, however it is split: DDP averages the processes' gradients
            loss_total = F.cross_entropy(logits, labels, reduction="sum")
            loss = loss_total * (rt.world_size / batches[step].size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss_total.detach())
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
        save(False)
        if callback:
            callback("epoch_end", {"epoch": epoch + 1, "epochs": epochs, "record": record, "model": model})
    # the training images as evaluation sees them, through the front once (a DAC search is costly)
    if fronted:
        clean, clean_indices, clean_workers = dataset, np.sort(train_indices), workers
    else:
        clean, clean_indices = _front_outputs(model, dataset, train_indices, rt, eval_batch_size, workers)
        clean_workers = 0
    if recalibrate_bn:
        recalibrate_batchnorm(model, clean, clean_indices, rt=rt, batch_size=batch_size, fronted=True, workers=clean_workers)
    last = history[-1]
    last["eval_train_accuracy"] = _accuracy(model, clean, clean_indices, rt=rt, batch_size=eval_batch_size, fronted=True, workers=clean_workers)
    warning = None
    if _far_below(last["eval_train_accuracy"], last["train_accuracy"], train_indices.size):
        warning = (
            f"eval-mode accuracy on the training images is {last['eval_train_accuracy']:.3f}, train-mode accuracy "
            f"{last['train_accuracy']:.3f}: the network behaves differently at evaluation (BatchNorm statistics that "
            f"do not describe un-augmented inputs?); test metrics will be poor"
        )
        last["eval_gap_warning"] = True
        warnings.warn(warning, EvalModeGapWarning, stacklevel=2)
    save(True)
    if callback:
        callback("fit_end", {"epochs": epochs, "record": last, "warning": warning, "model": model})
    return history


def _far_below(eval_accuracy: float, train_accuracy: float, n: int) -> bool:
    """A gap of more than :data:`EVAL_GAP_WARNING` and of three standard errors of the difference."""
    spread = math.sqrt((train_accuracy * (1 - train_accuracy) + eval_accuracy * (1 - eval_accuracy)) / max(n, 1))
    return train_accuracy - eval_accuracy > max(EVAL_GAP_WARNING, 3 * spread)


@torch.no_grad()
def recalibrate_batchnorm(
    model: Pipeline, dataset: Dataset, indices: Sequence[int], *, rt: Runtime, batch_size: int = 24, fronted: bool = False, workers: int = 0
) -> None:
    """Re-estimate every BatchNorm's running mean and variance on ``dataset[indices]`` as evaluation sees them.

    The front and the augmentation run in eval mode (no random transform), the
    BatchNorm layers in training mode with a cumulative average over batches of
    ``batch_size`` (split like training batches), so the running statistics describe
    the final weights on clean inputs rather than a moving average over the last
    steps' augmented batches. Under torchrun every process gets the same statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    model.to(rt.device).eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        batches = [shard(rt, b.tolist()) for b in epoch_batches(np.sort(np.asarray(indices, dtype=np.int64)), batch_size)]
        for batch in _loader(dataset, batches, workers):
            model(_to(batch["image"], rt.device), fronted=fronted)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


@torch.no_grad()
def _front_outputs(model: Pipeline, dataset: Dataset, indices: np.ndarray, rt: Runtime, batch_size: int, workers: int) -> tuple[Dataset, np.ndarray]:
    """The eval-mode front outputs of ``dataset[sorted(indices)]`` (kept as float16, like
    :func:`precompute_front`'s), as a dataset of its own, and its indices."""
    from ..data.datasets import MemoryDataset

    order = np.sort(indices)
    model.to(rt.device).eval()

    def rows(batch: dict[str, Any]) -> list[tuple[Tensor, int]]:
        return list(zip(model.front(_to(batch["image"], rt.device)).to("cpu", torch.float16), batch["label"].tolist()))

    items = _eval_rows(rows, dataset, order, rt=rt, batch_size=batch_size, workers=workers)
    return MemoryDataset([c for c, _ in items], [y for _, y in items], [], dtype=torch.float32), np.arange(order.size)


def _eval_batches(rt: Runtime, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """This process's share of ``indices`` cut into batches of ``batch_size``: whole batches, round robin.

    The batches are the same for any number of processes (a DAC search's last bits
    depend on which images share its batch), so N processes compute what one does.
    """
    indices = [int(i) for i in indices]
    return shard(rt, [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)])


def _gather_batches(rt: Runtime, rows: list[list[Any]], total: int, batch_size: int) -> list[Any]:
    """Undo :func:`_eval_batches`: every process's rows of every batch, in item order."""
    parts = all_gather(rt, rows) if rt.distributed else [rows]
    batches = (total + batch_size - 1) // batch_size
    ordered = [parts[j % rt.world_size][j // rt.world_size] for j in range(batches)]
    return [row for batch in ordered for row in batch]


def _eval_rows(rows: Callable[[dict[str, Any]], list[Any]], dataset: Dataset, indices: Sequence[int], *, rt: Runtime, batch_size: int, workers: int) -> list[Any]:
    """``rows(batch)`` (one row per image) over ``dataset[indices]`` in :func:`_eval_batches`,
    each process a share; every process gets all rows, in ``indices`` order."""
    indices = [int(i) for i in indices]
    done = [rows(batch) for batch in _loader(dataset, _eval_batches(rt, indices, batch_size), workers)]
    return _gather_batches(rt, done, len(indices), batch_size)


def _accuracy(model: Pipeline, dataset: Dataset, indices: Sequence[int], *, rt: Runtime, batch_size: int, fronted: bool, workers: int) -> float:
    """Eval-mode accuracy on ``dataset[indices]`` (each process predicts a share)."""
    model.to(rt.device).eval()
    correct = 0.0
    with torch.no_grad():
        for batch in _loader(dataset, _eval_batches(rt, indices, batch_size), workers):
            logits = model(_to(batch["image"], rt.device), fronted=fronted)
            correct += float((logits.argmax(1).cpu() == batch["label"]).sum())
    (correct,) = all_reduce_sum(rt, [correct])
    return correct / len(indices)


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

    Each process predicts every ``world``-th batch of ``batch_size`` images; every
    process gets all rows, in ``indices`` order. The model is put in eval mode (no
    augmentation).
    """
    indices = [int(i) for i in indices]
    if not indices:
        return np.zeros((0, 0))
    model.to(rt.device).eval()

    def rows(batch: dict[str, Any]) -> list[np.ndarray]:
        logits = model(_to(batch["image"], rt.device), fronted=fronted)
        return list(torch.softmax(logits.double(), dim=1).cpu().numpy())

    return np.stack(_eval_rows(rows, dataset, indices, rt=rt, batch_size=batch_size, workers=workers))


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
    rows = _eval_rows(lambda batch: list(front(_to(batch["image"], rt.device)).to("cpu", dtype)),
                      dataset, range(len(dataset)), rt=rt, batch_size=batch_size, workers=workers)
    return torch.stack(rows)
