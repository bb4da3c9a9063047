"""Implementations of codec operations for devices other than the CPU, registered by kernels.

A codec runs its own (torch / numba) path anywhere; for tensors on another device type it
asks here for an implementation of an operation (``"encode"``, ``"decode"``) that a kernel
package registered with :func:`register_impl`. The providers named in :data:`PROVIDERS`
are imported on the first such request, so the codecs never import the kernels (the
kernels import the codecs' formats), and importing a codec loads no GPU code.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

PROVIDERS = ("kvstore.kernels.codec_impls",)  # modules that register implementations when imported

_IMPLS: dict[tuple[str, str, str], Callable[..., Any]] = {}
_loaded = False
_lock = threading.Lock()


def register_impl(codec: str, device_type: str, op: str, fn: Callable[..., Any]) -> None:
    """Make ``fn`` the implementation of codec ``codec``'s ``op`` for tensors on ``device_type``."""
    _IMPLS[codec, device_type, op] = fn


def find_impl(codec: str, device_type: str, op: str) -> Callable[..., Any] | None:
    """The registered implementation, or ``None``: the codec's own path then runs."""
    global _loaded
    if device_type == "cpu":
        return _IMPLS.get((codec, device_type, op))
    if not _loaded:
        with _lock:
            if not _loaded:
                for module in PROVIDERS:
                    importlib.import_module(module)
                _loaded = True
    return _IMPLS.get((codec, device_type, op))
