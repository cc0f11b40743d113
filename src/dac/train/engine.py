"""Training and prediction: Adam epochs that resume from checkpoints, on one process or many.

:class:`Engine` owns the runtime (device, processes), the batch sizes and the readers;
its methods take a model and data:

* :meth:`Engine.fit` trains a :class:`~dac.train.pipelines.Pipeline` with cross-entropy
  and Adam. Every epoch draws its sample order from a seed derived from ``(seed,
  epoch)`` and every image its random transform from ``(seed, epoch, image index)``
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
* :meth:`Engine.predict` returns class probabilities (each process predicts a share).
* :meth:`Engine.front_outputs` runs a front over images once (the DAC crop or the
  resize of a front with nothing to learn; augmentation is applied after it, per step).
* Checkpoints are plain state dicts and Python numbers, written atomically
  (temporary file + ``os.replace``) and read with ``torch.load(weights_only=True)``;
  ``finished`` marks one whose training is complete.

Lightning Fabric was considered for the runtime plumbing and not used: its samplers
split batches differently, and N processes training bitwise what one process trains
(per-image noise, BatchNorm synchronised over gloo on CPU) is this engine's own logic.
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
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._checks import DACInputError, check_int
from .._files import atomic_write
from ..data.datasets import MemoryDataset, collate_images
from .distributed import Runtime, all_gather, all_reduce_sum, gather_shards, shard, sync_batchnorm
from .folds import cannot_read, read_errors
from .pipelines import Pipeline

__all__ = [
    "EVAL_GAP_WARNING",
    "Engine",
    "EvalModeGapWarning",
    "epoch_batches",
    "load_checkpoint",
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

    Examples:
        >>> seed_for(0, "order", 3) == seed_for(0, "order", 3) != seed_for(0, "order", 4)
        True
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_noise(seed: int, epoch: int, indices: Sequence[int], dims: int) -> Tensor:
    """Each image's uniform random numbers for one epoch, Tensor[len(indices), dims] in [0, 1).

    Row ``i`` depends only on ``(seed, epoch, indices[i])``: an image gets the same
    random transform whatever batch or process it is in.

    Examples:
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

    Examples:
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


class Engine:
    """Trains, predicts and evaluates pipelines in one runtime; owns how data reaches them.

    One object per run holds what every step shares — the runtime (device; rank and
    world size under torchrun), the batch sizes and the reading workers — so the
    functions below take a model and data, not the plumbing. The data says what it
    holds: items with ``"image"`` are raw images, which go through the whole pipeline;
    items with ``"crop"`` are a front's cached outputs (:meth:`front_outputs`), which
    go through :meth:`~dac.train.pipelines.Pipeline.classify` only.

    Args:
        rt: the runtime (:func:`~dac.train.distributed.init_runtime`).
        batch_size: images per training step over all processes (paper: 24); an epoch
            of N images is ``ceil(N / batch_size)`` batches of near-equal size.
        eval_batch_size: images per batch when predicting, recalibrating BatchNorm or
            caching front outputs.
        workers: DataLoader processes reading datasets that are not in memory.

    Examples:
        >>> from dac.train.distributed import init_runtime
        >>> Engine(init_runtime("cpu"), batch_size=6).batch_size
        6
    """

    def __init__(self, rt: Runtime, *, batch_size: int = 24, eval_batch_size: int = 32, workers: int = 0) -> None:
        self.rt = rt
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.eval_batch_size = check_int(eval_batch_size, "eval_batch_size", 1)
        self.workers = check_int(workers, "workers", 0)

    # ------------------------------------------------------------------- training
    def fit(
        self,
        model: Pipeline,
        dataset: Dataset,
        train_indices: Sequence[int],
        *,
        epochs: int,
        lr: float = 1e-3,
        front_lr: float | None = None,
        front_clip_norm: float | None = None,
        seed: int = 0,
        checkpoint: str | Path | None = None,
        callback: Callback | None = None,
        recalibrate_bn: bool = True,
    ) -> list[dict[str, float]]:
        """Train ``model`` on ``dataset[train_indices]`` for ``epochs`` epochs (Adam, cross-entropy).

        Args:
            model: the network (moved to the runtime's device; under torchrun its
                BatchNorm layers are made to synchronise their batch statistics). A front
                with a ``progress`` attribute has it set to ``epoch / (epochs - 1)``
                before each epoch (a schedule over training).
            dataset: items ``{"image": Tensor[C, H, W], "label": int}`` (raw images) or
                ``{"crop": ..., "label": int}`` (cached front outputs).
            train_indices: the items to train on.
            epochs: total epochs (a resumed run trains only the missing ones).
            lr: Adam learning rate (paper: 1e-3); ``front_lr`` for the front's parameters.
            front_clip_norm: each step, the front's gradient is scaled down to this norm
                where it is larger (None: not clipped); ``front_grad_norm`` records it
                before the clip.
            seed: seeds the sample order and each image's random transform of every epoch.
            checkpoint: a file written after every epoch (by rank 0) and, if present,
                resumed from: the model, the optimizer, the epoch, the history and the
                number of processes (a checkpoint of another world size is refused).
            callback: ``callback(event, info)`` with ``"fit_start"`` (``start_epoch``),
                ``"epoch_end"`` after each epoch (``epoch``, ``epochs``, ``record``,
                ``model``) and ``"fit_end"`` (``record``: the last epoch's, with
                ``eval_train_accuracy``; ``warning``: a message or None).
            recalibrate_bn: after the last epoch, re-estimate BatchNorm's running
                statistics on the training images without augmentation
                (:meth:`recalibrate_batchnorm`).

        Returns:
            The history: one dict per epoch (``epoch``, ``loss``, ``train_accuracy``,
            ``seconds``; with a DAC front on raw images ``boxes_unconverged``, the boxes
            whose search did not reach a stationary point; with a trainable front
            ``front_grad_norm``, the mean norm of its gradient over the steps); the last one also holds
            ``eval_train_accuracy`` (eval mode, no augmentation, after recalibration).

        Raises:
            RuntimeError: the loss became NaN or infinite.
            DACInputError: a checkpoint of another number of processes, a batch smaller
                than the number of processes, or an image that cannot be read.
        """
        rt = self.rt
        train_indices = np.asarray(train_indices, dtype=np.int64)
        if train_indices.size < rt.world_size:
            raise DACInputError(f"train_indices: need at least {rt.world_size} images (one per process), got {train_indices.size}")
        if min(b.size for b in epoch_batches(train_indices, self.batch_size)) < rt.world_size:
            raise DACInputError(f"batch_size: {self.batch_size} gives batches with fewer images than the {rt.world_size} processes")
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
            if hasattr(model.front, "progress"):  # a schedule over training (the soft edge's sharpness)
                model.front.progress = epoch / max(epochs - 1, 1)
            record = self._epoch(net, model, optimizer, dataset, train_indices, seed, epoch, dims, front_clip_norm)
            history.append(record)
            save(False)
            if callback:
                callback("epoch_end", {"epoch": epoch + 1, "epochs": epochs, "record": record, "model": model})
        # the training images as evaluation sees them, through the front once (a DAC search is costly)
        clean = self.front_outputs(model, dataset, train_indices)
        clean_indices = np.arange(len(clean))
        if recalibrate_bn:
            self.recalibrate_batchnorm(model, clean, clean_indices)
        last = history[-1]
        last["eval_train_accuracy"] = self.accuracy(model, clean, clean_indices)
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

    def _epoch(self, net: nn.Module, model: Pipeline, optimizer: torch.optim.Optimizer, dataset: Dataset,
               train_indices: np.ndarray, seed: int, epoch: int, dims: int,
               front_clip_norm: float | None = None) -> dict[str, float]:
        """One epoch of Adam steps; its record (loss, accuracy, seconds, unconverged boxes)."""
        rt = self.rt
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(seed_for(seed, "order", epoch))
        order = train_indices[torch.randperm(train_indices.size, generator=generator).numpy()]
        batches = epoch_batches(order, self.batch_size)
        mine = [shard(rt, b.tolist()) for b in batches]
        model.train()
        loss_sum = correct = count = unconverged = front_norm = 0.0
        searched = False
        front_params = [] if _holds_crops(dataset) else [p for p in model.front.parameters() if p.requires_grad]
        for step, batch in enumerate(self._loader(dataset, mine, seed_for(seed, "loader", epoch))):
            labels = batch["label"].to(rt.device)
            noise = sample_noise(seed, epoch, mine[step], dims).to(rt.device)
            logits, front = net(**self._inputs(batch), noise=noise, return_front=True)
            # the mean over the global batch, however it is split: DDP averages the processes' gradients
            loss_total = model.training_loss(logits, labels, front)  # cross-entropy, plus a drawn candidate's term
            loss = loss_total * (rt.world_size / batches[step].size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if front_params:
                graded = [p for p in front_params if p.grad is not None]
                norm = torch.nn.utils.get_total_norm([p.grad for p in graded])  # once: recorded, then clipped to
                front_norm += float(norm)
                if front_clip_norm is not None:
                    torch.nn.utils.clip_grads_with_norm_(graded, front_clip_norm, norm)
            optimizer.step()
            loss_sum += float(loss_total.detach())
            correct += float((logits.detach().argmax(1) == labels).sum())
            count += labels.numel()
            if front is not None and front.unconverged is not None:
                unconverged += float(front.unconverged.sum())
                searched = True
        loss_sum, correct, count, unconverged = all_reduce_sum(rt, [loss_sum, correct, count, unconverged])
        if not math.isfinite(loss_sum):
            raise RuntimeError(f"training diverged: the loss is {loss_sum} in epoch {epoch + 1}")
        record = {"epoch": epoch + 1, "loss": loss_sum / count, "train_accuracy": correct / count,
                  "seconds": time.perf_counter() - began}
        if searched:
            record["boxes_unconverged"] = int(unconverged)
        if front_params:
            record["front_grad_norm"] = front_norm / max(len(batches), 1)  # this process's mean over the steps
        return record

    @torch.no_grad()
    def recalibrate_batchnorm(self, model: Pipeline, dataset: Dataset, indices: Sequence[int]) -> None:
        """Re-estimate every BatchNorm's running mean and variance on ``dataset[indices]`` as evaluation sees them.

        The front and the augmentation run in eval mode (no random transform), the
        BatchNorm layers in training mode with a cumulative average over batches of
        ``batch_size`` (split like training batches), so the running statistics describe
        the final weights on clean inputs rather than a moving average over the last
        steps' augmented batches. Under torchrun every process gets the same statistics.
        """
        rt = self.rt
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
            batches = [shard(rt, b.tolist()) for b in epoch_batches(np.sort(np.asarray(indices, dtype=np.int64)), self.batch_size)]
            for batch in self._loader(dataset, batches):
                model(**self._inputs(batch))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            model.eval()

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(self, model: Pipeline, dataset: Dataset, indices: Sequence[int]) -> np.ndarray:
        """Class probabilities (softmax) of ``dataset[indices]``, array[N, num_classes] float64.

        Each process predicts every ``world``-th batch of ``eval_batch_size`` images;
        every process gets all rows, in ``indices`` order. The model is put in eval mode
        (no augmentation).
        """
        indices = [int(i) for i in indices]
        if not indices:
            return np.zeros((0, 0))
        model.to(self.rt.device).eval()

        def rows(batch: dict[str, Any]) -> list[np.ndarray]:
            logits = model(**self._inputs(batch))
            return list(torch.softmax(logits.double(), dim=1).cpu().numpy())

        return np.stack(self._eval_rows(rows, dataset, indices))

    def accuracy(self, model: Pipeline, dataset: Dataset, indices: Sequence[int]) -> float:
        """Eval-mode accuracy on ``dataset[indices]`` (each process predicts a share)."""
        indices = [int(i) for i in indices]
        if not indices:
            return float("nan")
        labels = np.asarray(dataset.labels)[indices]
        return float((self.predict(model, dataset, indices).argmax(1) == labels).mean())

    @torch.no_grad()
    def front_outputs(self, model: Pipeline, dataset: Dataset, indices: Sequence[int] | None = None,
                      dtype: torch.dtype = torch.float16) -> MemoryDataset:
        """The eval-mode front outputs of ``dataset[sorted(indices)]`` (all items when None),
        as a dataset of ``{"crop", "label"}`` items (stored as ``dtype`` on the CPU, read as float32).

        Items that already are front outputs come back as they are. A front with nothing
        to learn and no randomness (``model.front_is_fixed``: the resize, and DAC without
        a learned saliency) gives the same output all training long: cached once per run,
        with augmentation following it at every step. float16 by default (an 8-bit source
        needs no more).
        """
        order = np.sort(np.asarray(range(len(dataset)) if indices is None else indices, dtype=np.int64))
        if _holds_crops(dataset):
            return MemoryDataset(torch.stack([dataset[int(i)]["crop"] for i in order]), [int(dataset.labels[i]) for i in order],
                                 getattr(dataset, "classes", []), dtype=torch.float32, key="crop")
        model.to(self.rt.device).eval()

        def rows(batch: dict[str, Any]) -> list[tuple[Tensor, int]]:
            crops = model.front(_to(batch["image"], self.rt.device), **_regions(model, batch, self.rt.device)).crops
            return list(zip(crops.to("cpu", dtype), batch["label"].tolist()))

        items = self._eval_rows(rows, dataset, order)
        return MemoryDataset(torch.stack([c for c, _ in items]), [y for _, y in items], getattr(dataset, "classes", []),
                             dtype=torch.float32, key="crop")

    def load_images(self, dataset: Dataset, indices: Sequence[int] | None = None) -> MemoryDataset:
        """Read (or generate) ``dataset[indices]`` (all when None) into memory, split over the
        processes and gathered on all: a dataset of the same raw images."""
        indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        loader = DataLoader(torch.utils.data.Subset(dataset, shard(self.rt, indices)), batch_size=8,
                            num_workers=self.workers, collate_fn=_as_list)
        images, regions = [], []
        for batch in loader:
            if isinstance(batch, dict):
                raise cannot_read(batch["error"])
            images.extend(item["image"] for item in batch)
            regions.extend(item.get("roi") for item in batch)
        images = gather_shards(self.rt, images, len(indices))
        regions = gather_shards(self.rt, regions, len(indices))
        labels = [int(dataset.labels[i]) for i in indices]
        known = regions if all(r is not None for r in regions) else None
        return MemoryDataset(images, labels, getattr(dataset, "classes", []), regions=known)

    # ----------------------------------------------------------------- internals
    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's keyword inputs of a batch: raw ``images`` or cached ``crops``."""
        if "crop" in batch:
            return {"crops": _to(batch["crop"], self.rt.device)}
        return {"images": _to(batch["image"], self.rt.device)}

    def _loader(self, dataset: Dataset, batches: list[list[int]], seed: int = 0) -> Iterator[dict[str, Any]]:
        """The batches' items; an image that could not be read stops it with a DACInputError naming the file."""
        loader = DataLoader(
            dataset, batch_sampler=batches, collate_fn=_collate, num_workers=0 if _in_memory(dataset) else self.workers,
            generator=torch.Generator().manual_seed(seed),  # worker seeds from the run's seed, not torch's global RNG
        )
        for batch in loader:
            if "error" in batch:
                raise cannot_read(batch["error"])
            yield batch

    def _eval_rows(self, rows: Callable[[dict[str, Any]], list[Any]], dataset: Dataset, indices: Sequence[int]) -> list[Any]:
        """``rows(batch)`` (one row per image) over ``dataset[indices]`` in whole batches of
        ``eval_batch_size``, round robin over the processes; every process gets all rows,
        in ``indices`` order.

        The batches are the same for any number of processes (a DAC search's last bits
        depend on which images share its batch), so N processes compute what one does.
        """
        rt, size = self.rt, self.eval_batch_size
        indices = [int(i) for i in indices]
        batches = shard(rt, [indices[i : i + size] for i in range(0, len(indices), size)])
        done = [rows(batch) for batch in self._loader(dataset, batches)]
        parts = all_gather(rt, done) if rt.distributed else [done]
        count = (len(indices) + size - 1) // size
        ordered = [parts[j % rt.world_size][j // rt.world_size] for j in range(count)]
        return [row for batch in ordered for row in batch]


def _regions(model: Pipeline, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The front's ``regions`` keyword (the batch's ``roi``) where the front needs them (the oracle)."""
    if not getattr(model.front, "needs_regions", False):
        return {}
    if "roi" not in batch:
        raise DACInputError("regions: the oracle pipeline crops each image's true region; this data does not carry "
                            "regions (data.source: phantom or distractors do; for a folder or CSV, give data.regions or --regions: a CSV "
                            "of path,x1,y1,x2,y2)")
    roi = batch["roi"]
    return {"regions": (torch.stack(roi) if isinstance(roi, list) else roi).to(device)}


def _far_below(eval_accuracy: float, train_accuracy: float, n: int) -> bool:
    """A gap of more than :data:`EVAL_GAP_WARNING` and of three standard errors of the difference."""
    spread = math.sqrt((train_accuracy * (1 - train_accuracy) + eval_accuracy * (1 - eval_accuracy)) / max(n, 1))
    return train_accuracy - eval_accuracy > max(EVAL_GAP_WARNING, 3 * spread)


def _to(images: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    if isinstance(images, Tensor):
        return images.to(device, non_blocking=True)
    return [image.to(device, non_blocking=True) for image in images]


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    errors = read_errors(items)
    return {"error": errors} if errors else collate_images(items)


def _as_list(batch: list) -> list | dict:
    errors = read_errors(batch)
    return {"error": errors} if errors else batch


def _in_memory(dataset: Dataset) -> bool:
    return isinstance(dataset, MemoryDataset)


def _holds_crops(dataset: Dataset) -> bool:
    return isinstance(dataset, MemoryDataset) and dataset.key == "crop"


def _optimizer(model: Pipeline, lr: float, front_lr: float | None) -> torch.optim.Optimizer:
    front = [p for p in model.front.parameters() if p.requires_grad]
    rest = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("front.")]
    groups = [{"params": rest, "lr": lr}]
    if front:
        groups.append({"params": front, "lr": front_lr if front_lr is not None else lr})
    return torch.optim.Adam(groups, lr=lr)
