"""A trained saliency stage on disk: its weights, its arguments and the ``DACrop`` it was trained with.

* :func:`save_saliency` — write a :class:`~dac.saliency.SaliencyNet` atomically (its
  arguments, weights and ``meta`` numbers/strings).
* :func:`load_saliency` — read it back weights-only (a tampered file runs nothing).
* :func:`load_dacrop` — the ``DACrop`` it was trained with, using it: what ``dac crop
  --saliency`` runs.
* :data:`SHIPPED_STAGE` — a stage trained on phantoms that ships with ``dac`` (``dac demo``).
"""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .._checks import DACInputError
from ..layer import DACrop
from .net import LEARNED_DEFAULTS, SaliencyNet

__all__ = ["SHIPPED_STAGE", "load_dacrop", "load_saliency", "save_saliency"]

#: A stage trained on 32 generated panoramic phantoms (1536 x 2836) by ``dac fit-saliency``;
#: the command and its ``fit.json`` are in ``phantoms-fit.json`` beside it. ``dac demo``
#: shows it beside the paper's map; ``load_dacrop(SHIPPED_STAGE)`` is a layer using it.
SHIPPED_STAGE = Path(__file__).with_name("phantoms.pt")


def save_saliency(net: SaliencyNet, path: str | Path, **meta: Any) -> None:
    """Write ``net`` (its arguments, weights and ``meta`` numbers/strings) to ``path`` atomically.

    Args:
        net: the stage.
        path: the file (``saliency.pt`` by convention).
        **meta: numbers and strings stored beside it; ``dacrop`` (a JSON dict of
            ``DACrop`` arguments) is what :func:`load_dacrop` builds the layer from.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "s.pt")
        >>> save_saliency(SaliencyNet(4, width=4), path, dacrop='{"output_size": [20, 37]}')
        >>> load_dacrop(path).output_size
        (20, 37)
    """
    from .._files import atomic_write

    state = {"kind": "SaliencyNet", "config": net.config(), "state_dict": net.state_dict(), "meta": dict(meta)}
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_saliency(path: str | Path, map_location: Any = "cpu") -> SaliencyNet:
    """A :class:`SaliencyNet` saved by :func:`save_saliency` (read weights-only), in eval mode.

    Raises:
        DACInputError: the file is missing or is not a saved saliency stage.
    """
    return _read(path, map_location)[0]


def load_dacrop(path: str | Path, **overrides) -> DACrop:
    """The ``DACrop`` a saved saliency stage was trained with, using it (eval mode).

    The settings are those ``dac fit-saliency`` stores with the stage. A stage saved
    without them (:func:`save_saliency` with no ``dacrop``) gets :data:`LEARNED_DEFAULTS`
    and ``DACrop``'s other defaults, with a warning. ``overrides`` replace stored
    settings or add others (``backward_mode``, ...).

    Raises:
        DACInputError: not a saved stage, or its stored settings are not a ``DACrop``'s.
    """
    net, meta = _read(path, "cpu")
    if "dacrop" not in meta:
        warnings.warn(f"saliency: {str(path)!r} holds no DACrop settings; using LEARNED_DEFAULTS {LEARNED_DEFAULTS} "
                      "(store them: save_saliency(net, path, dacrop=json.dumps(settings)))", UserWarning, stacklevel=2)
    try:
        stored = json.loads(meta.get("dacrop", json.dumps(LEARNED_DEFAULTS)))
    except ValueError as exc:
        raise DACInputError(f"saliency: {str(path)!r} stores DACrop settings that are not JSON ({exc})") from None
    if not isinstance(stored, dict) or "saliency" in stored:
        raise DACInputError(f"saliency: {str(path)!r} stores DACrop settings that are not a dict of DACrop arguments: {stored!r}")
    settings = stored | overrides
    if int(settings.get("pool_size", net.pool_size)) != net.pool_size:
        raise DACInputError(f"pool_size: the saliency stage {str(path)!r} works on windows of {net.pool_size}, not {settings['pool_size']}")
    settings["pool_size"] = net.pool_size
    try:
        return DACrop(saliency=net, **settings)
    except TypeError as exc:  # an argument DACrop does not have (bad values raise DACInputError naming it)
        raise DACInputError(f"saliency: {str(path)!r} with {sorted(settings)}: {exc}") from None


def _read(path: str | Path, map_location: Any) -> tuple[SaliencyNet, dict[str, Any]]:
    """The stage (eval mode) and its ``meta``, from one weights-only read of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DACInputError(f"saliency: no such file {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or state.get("kind") != "SaliencyNet":
            raise ValueError("not a saved SaliencyNet")
        net = SaliencyNet(**state["config"], generator=torch.Generator())  # weights from the file: no global random draws
        net.load_state_dict(state["state_dict"])
        meta = state.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError("its meta is not a dict")
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise DACInputError(f"saliency: {str(path)!r} is not a saliency stage saved by dac ({exc})") from None
    return net.eval(), meta
