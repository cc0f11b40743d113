"""Settings digests: what names every setting that changes a job's outputs.

A job's settings (a JSON-ready dict) are digested into the ``settings`` cell of each
row (:func:`settings_digest`); ``OUT/settings.json`` says what each digest means
(:func:`record_settings`). A module contributes its class, its ``config()`` (what
changes its output) and a digest of its weights (:func:`weights_digest`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .._files import write_json

__all__ = ["module_settings", "record_settings", "settings_digest", "weights_digest"]

_NOT_SETTINGS = frozenset({"last_info"})  # what a layer keeps of its last call


def settings_digest(settings: dict) -> str:
    """16 hex digits of the SHA-256 of ``settings`` as canonical JSON: a ``settings`` cell.

    Example:
        >>> settings_digest({"a": 1, "b": [2]}) == settings_digest({"b": [2], "a": 1})
        True
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]



def module_settings(module: torch.nn.Module) -> dict:
    """A module's class and public attributes, and those of its sub-modules, as JSON."""
    config: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
    for name, value in vars(module).items():
        if not name.startswith("_") and name not in _NOT_SETTINGS:
            config[name] = _plain(value)
    for name, child in module.named_children():
        config[f"module {name}"] = module_settings(child)
    return config


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON: numbers, strings, lists, dicts (never a repr with an address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return {"tensor": _tensor_digest(value)}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"class": name} | {f.name: _plain(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if hasattr(value, "__dict__") and depth < 4:
        return {"class": name} | {k: _plain(v, depth + 1) for k, v in vars(value).items() if not k.startswith("_")}
    return name


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
