"""``kvstore verify``: re-check every checksum under a prefix, and every manifest's consistency.

Each object is read whole and checked by :func:`~kvstore.admin.checks.check_bytes`
(containers of any kind: chunks, manifests, profiles, unknown kinds). Then every
intact manifest is held against the store: each chunk object it lists must exist
with the size and header checksum it recorded and belong to the chunk it names,
and each codec profile its levels need must exist intact. Objects a manifest
lists outside the prefix are fetched and checked too.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvstore.admin.checks import (
    MANIFEST,
    MISSING,
    ObjectCheck,
    bounded,
    classify,
    compare_with_manifest,
    compare_with_record,
    fetch_and_check,
    human_bytes,
    profile_keys,
)
from kvstore.backends.base import Store, validate_prefix
from kvstore.errors import KVStoreError
from kvstore.format.manifest import Manifest

log = logging.getLogger("kvstore.admin")


@dataclass(frozen=True, slots=True)
class Problem:
    """One damaged, missing or mismatched object."""

    key: str
    kind: str
    problem: str  # "corrupt", "missing" or "mismatch"
    detail: str
    referenced_by: str = ""  # the manifest that lists it, for missing or mismatched objects

    def to_json(self) -> dict[str, Any]:
        doc = {"key": self.key, "kind": self.kind, "problem": self.problem, "detail": self.detail}
        if self.referenced_by:
            doc["referenced_by"] = self.referenced_by
        return doc

    def to_text(self) -> str:
        via = f" (listed by {self.referenced_by})" if self.referenced_by else ""
        return f"{self.problem.upper()} {self.key}{via}: {self.detail}"


@dataclass(slots=True)
class VerifyReport:
    """What ``verify`` checked and what it found wrong."""

    prefix: str
    objects: int = 0
    bytes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    manifests_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "ok": self.ok, "objects": self.objects, "bytes": self.bytes,
                "kinds": dict(self.kinds), "manifests_checked": self.manifests_checked,
                "problems": [p.to_json() for p in self.problems]}

    def to_text(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items())) or "none"
        lines = [p.to_text() for p in self.problems]
        lines.append(f"checked {self.objects} objects ({human_bytes(self.bytes)}; {kinds}) under "
                     f"{self.prefix or 'the whole store'!r} and {self.manifests_checked} manifests: "
                     + ("all OK" if self.ok else f"{len(self.problems)} problems"))
        return "\n".join(lines)


async def verify_store(store: Store, prefix: str = "kvstore/") -> VerifyReport:
    """Verify every object whose key starts with ``prefix`` and every manifest among them."""
    validate_prefix(prefix)
    report = VerifyReport(prefix)
    keys = sorted([key async for key in store.list(prefix)])
    results = await bounded(keys, lambda k: fetch_and_check(store, k))
    checks: dict[str, ObjectCheck] = {}
    manifests: list[tuple[str, Manifest]] = []
    for check, manifest in results:
        if check.status == MISSING:  # deleted or expired since it was listed: nothing to verify
            continue
        checks[check.key] = check
        report.objects += 1
        report.bytes += check.size or 0
        report.kinds[check.kind] += 1
        if not check.ok:
            report.problems.append(Problem(check.key, check.kind, "corrupt", check.error))
            log.info("corrupt object %s: %s", check.key, check.error)
        elif manifest is not None:
            manifests.append((check.key, manifest))
    for key, manifest in manifests:
        report.problems += await _check_manifest(store, key, manifest, checks)
        report.manifests_checked += 1
    return report


async def _check_manifest(store: Store, key: str, manifest: Manifest,
                          checks: dict[str, ObjectCheck]) -> list[Problem]:
    """Whether every object ``manifest`` lists is in the store as it recorded it."""
    pq_objects = list(manifest.pq.objects) if manifest.pq is not None else []
    outside = [o.key for c in manifest.chunks for o in c.objects if o.key not in checks]
    outside += [o.key for o in pq_objects if o.key not in checks]
    try:
        profiles = profile_keys(manifest, classify(key).namespace)
    except KVStoreError as exc:
        profiles = []
        found = [Problem(key, MANIFEST, "mismatch", f"cannot tell which profiles its levels need: {exc}")]
    else:
        found = []
    outside += [k for k in profiles if k not in checks]
    for check, _ in await bounded(sorted(set(outside)), lambda k: fetch_and_check(store, k)):
        checks[check.key] = check  # objects outside the prefix, fetched once
        if not check.ok and check.status != MISSING:
            found.append(Problem(check.key, check.kind, "corrupt", check.error, referenced_by=key))
    for entry in manifest.chunks:
        for obj in entry.objects:
            check = checks[obj.key]
            if check.status == MISSING:
                found.append(Problem(obj.key, "chunk", "missing", "listed by a manifest, not in the store", key))
            elif check.ok and (why := compare_with_manifest(check, obj, entry, manifest.fingerprint)):
                found.append(Problem(obj.key, "chunk", "mismatch", why, key))
    for obj in pq_objects:
        check = checks[obj.key]
        if check.status == MISSING:
            found.append(Problem(obj.key, "pq", "missing", "listed by a manifest, not in the store", key))
        elif check.ok and (why := compare_with_record(check, obj)):
            found.append(Problem(obj.key, "pq", "mismatch", why, key))
    for profile in profiles:
        if checks[profile].status == MISSING:
            found.append(Problem(profile, "profile", "missing", "a level's codec profile is not in the store", key))
    return found
