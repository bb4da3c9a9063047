"""Caches of what the kernels derive from codec objects (device tables, stream plans, steps).

Kept here, keyed by the object's identity and dropped when the object is, rather than
stored on objects that belong to the codecs package.
"""

from __future__ import annotations

import weakref
from typing import Any

_CACHES: dict[tuple[int, str], dict[Any, Any]] = {}


def derived(obj: object, name: str) -> dict[Any, Any]:
    """The cache called ``name`` of ``obj``: a dict that lives as long as ``obj``."""
    key = (id(obj), name)
    hit = _CACHES.get(key)
    if hit is None:
        hit = _CACHES.setdefault(key, {})
        weakref.finalize(obj, _CACHES.pop, key, None)
    return hit
