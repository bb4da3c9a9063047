"""Reusable test suites and helpers (the backend contract suite, test servers, link shaping).

:class:`StoreTests` needs pytest (the ``test`` extra); it is imported on first use, so the
helpers the demo and the benchmarks use (``kvstore.testing.shaping`` and others) work in an
install without the test extra.
"""

from typing import Any

__all__ = ["StoreTests"]


def __getattr__(name: str) -> Any:
    if name == "StoreTests":
        from kvstore.testing.store_tests import StoreTests

        return StoreTests
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
