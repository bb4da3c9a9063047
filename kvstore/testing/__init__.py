"""Reusable test suites and helpers (the backend contract suite, test servers)."""

from kvstore.testing.store_tests import StoreTests

__all__ = ["StoreTests"]
