"""Atomic file writes (see :mod:`dac._files`)."""
from .._files import atomic_write, write_json, write_text

__all__ = ["atomic_write", "write_json", "write_text"]
