"""Store administration: list, inspect, verify and garbage-collect what a store holds.

The ``kvstore ls / inspect / verify / gc`` commands are thin wrappers of these
async functions, which work on any :class:`~kvstore.backends.base.Store`::

    async with open_store(url, **options) as store:
        report = await verify_store(store, "kvstore/")
        print(report.to_text()); assert report.ok

Every report has ``to_json()`` and ``to_text()``.
"""

from kvstore.admin.checks import ObjectCheck, check_bytes, classify
from kvstore.admin.contexts import (
    ContextReport,
    Listing,
    inspect_context,
    list_contexts,
    resolve_context,
)
from kvstore.admin.gc import DEFAULT_GRACE, GcReport, collect_garbage
from kvstore.admin.verify import Problem, VerifyReport, verify_store

__all__ = [
    "DEFAULT_GRACE",
    "ContextReport",
    "GcReport",
    "Listing",
    "ObjectCheck",
    "Problem",
    "VerifyReport",
    "check_bytes",
    "classify",
    "collect_garbage",
    "inspect_context",
    "list_contexts",
    "resolve_context",
    "verify_store",
]
