"""Batches of differently sized images: group by size, apply, put rows back in order.

``DACrop`` and the training fronts take a Tensor[B, C, H, W] or a list of
Tensor[C, H, W] of different sizes (the paper's multi-resolution archive). Every
operation on them is written for one same-size batch; :func:`by_size` runs it on each
group of equal size and dtype and returns one result, rows in input order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import DACInputError, check_image_batch

__all__ = ["Images", "by_size"]

Images = Union[Tensor, Sequence[Tensor]]
R = TypeVar("R")


def by_size(images: Images, fn: Callable[..., R], *rows: Tensor | None) -> R:
    """``fn`` applied to each same-size group of ``images``, rows merged in input order.

    Args:
        images: Tensor[B, C, H, W], or a non-empty list of Tensor[C, H, W] on one device
            (sizes and dtypes may differ).
        fn: Tensor[b, C, H, W] -> a Tensor[b, ...], a numpy array[b, ...], None, or a
            tuple / dataclass of those (each field merged row-wise).
        *rows: per-image tensors Tensor[B, ...] (or None) handed to ``fn`` with each
            group, as ``fn(group, *rows_of_the_group)`` (e.g. each image's random numbers).

    Returns:
        What ``fn`` returns, for all B images in input order (tensors of different
        dtypes are promoted to a common one).

    Examples:
        >>> out = by_size([torch.zeros(1, 4, 6), torch.ones(1, 5, 6), torch.zeros(1, 4, 6)],
        ...               lambda x: x.flatten(1).mean(1))
        >>> out
        tensor([0., 1., 0.])
    """
    if isinstance(images, Tensor):
        check_image_batch(images)
        return fn(images, *rows)
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise DACInputError(
            f"images: expected a Tensor[B, C, H, W] or a non-empty list of Tensor[C, H, W], got {type(images).__name__}"
        )
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.ndim != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise DACInputError(f"images[{i}]: expected Tensor[C, H, W], got {shape}")
        if image.device != images[0].device:
            raise DACInputError(f"images[{i}]: on {image.device}, images[0] on {images[0].device}")
        groups.setdefault((tuple(image.shape), image.dtype), []).append(i)
    if len(groups) == 1:
        return fn(torch.stack(list(images)), *rows)

    def take(row: Tensor | None, idx: list[int]) -> Tensor | None:
        return None if row is None else row[torch.as_tensor(idx, device=row.device)]

    parts = [fn(torch.stack([images[i] for i in idx]), *(take(r, idx) for r in rows)) for idx in groups.values()]
    order = np.argsort(np.concatenate([np.asarray(idx) for idx in groups.values()]), kind="stable")
    return _merge(parts, order)


def _merge(parts: list[Any], order: np.ndarray) -> Any:
    """Concatenate ``parts`` row-wise and take rows ``order`` (recursing into tuples and dataclasses)."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        dtype = parts[0].dtype
        for p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        stacked = torch.cat([p.to(dtype) for p in parts])
        return stacked[torch.as_tensor(order, device=stacked.device)]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)[order]
    if isinstance(first, tuple):
        merged = [_merge([p[k] for p in parts], order) for k in range(len(first))]
        return type(first)(*merged) if hasattr(first, "_fields") else tuple(merged)  # a NamedTuple stays one
    if dataclasses.is_dataclass(first):
        fields = {f.name: _merge([getattr(p, f.name) for p in parts], order) for f in dataclasses.fields(first) if f.init}
        return dataclasses.replace(first, **fields)
    raise TypeError(f"by_size: cannot merge results of type {type(first).__name__}")
