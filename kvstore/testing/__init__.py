"""What users of the library reuse in their own tests: the backend contract suite
(:class:`StoreTests`, for a backend of their own) and a bandwidth-shaped store
(:mod:`kvstore.testing.shaping`, for the fetcher over a slow link).

:class:`StoreTests` needs pytest (the ``test`` extra); it is imported on first use, so the
shaping helpers work in an install without that extra.
"""

from typing import Any

__all__ = ["StoreTests"]


def __getattr__(name: str) -> Any:
    if name == "StoreTests":
        from kvstore.testing.store_tests import StoreTests

        return StoreTests
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
