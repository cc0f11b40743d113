"""Settings digests: what names every setting that changes a job's outputs.

A job's settings (a JSON-ready dict) are digested into the ``settings`` cell of each
row (:func:`settings_digest`); ``OUT/settings.json`` says what each digest means
(:func:`record_settings`). A module contributes its class, its ``config()`` (what
changes its output) and a digest of its weights (:func:`weights_digest`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .._files import write_json

__all__ = ["module_settings", "record_settings", "settings_digest", "weights_digest"]


def settings_digest(settings: dict) -> str:
    """16 hex digits of the SHA-256 of ``settings`` as canonical JSON: a ``settings`` cell.

    Examples:
        >>> settings_digest({"a": 1, "b": [2]}) == settings_digest({"b": [2], "a": 1})
        True
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def module_settings(module: torch.nn.Module) -> dict:
    """A module's class and its ``config()``: every setting that changes its output, as JSON.

    Not ``vars(module)``: that holds state that changes no output (``training``, caches),
    so the same module in another mode would name other settings. A module without
    ``config()`` is named by its class alone (its weights are digested apart:
    :func:`weights_digest`).

    Examples:
        >>> module_settings(torch.nn.Identity())
        {'class': 'torch.nn.modules.linear.Identity'}
    """
    settings: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
    config = getattr(module, "config", None)
    if callable(config):
        settings |= config()
    return settings


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    head = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(head + data.tobytes()).hexdigest()[:16]


def weights_digest(module: torch.nn.Module) -> str:
    """16 hex digits naming a module's ``state_dict`` (every parameter and buffer)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}={_tensor_digest(tensor)};".encode())
    return digest.hexdigest()[:16]


def record_settings(out: Path, key: str, settings: dict) -> None:
    """Add ``key -> settings`` to ``OUT/settings.json``: what each ``settings`` value means."""
    path = out / "settings.json"
    known: dict = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(known, dict):
        known = {}
    if known.get(key) == settings:
        return
    known[key] = settings
    write_json(path, known)
