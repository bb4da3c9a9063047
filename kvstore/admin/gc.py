"""``kvstore gc``: remove expired objects, stale temporary files and orphaned objects.

*Orphans* are chunk and PQ objects that no manifest lists and codec profiles that no
manifest's levels need, under one namespace. Writers store chunks (and
profiles) before the manifest that lists them, so an unlisted object may belong
to a ``put`` still in progress; gc therefore only removes orphans older than
``grace`` seconds, and only on backends that can tell an object's age (see
:meth:`kvstore.backends.base.Store.entries`). ``grace=0`` removes every orphan, whatever the
backend. Guards:

- gc holds the namespace's collector lease (:mod:`kvstore.leases`) from its first
  read to its last deletion; a ``put`` that ends meanwhile waits for it, then
  re-reads every object its manifest lists and writes again what gc removed. So a
  put in flight loses nothing even with ``grace=0``; the grace period spares it
  the rewrite (and, on local files, its temporary files);
- a fingerprint (model) with an unreadable manifest keeps all its objects: the
  manifest may list any of them;
- just before deleting, gc reads the candidates' manifests again, so a context
  written while gc was scanning keeps its chunks.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from kvstore.admin.checks import (
    CHUNK,
    MANIFEST,
    MISSING,
    PQ,
    PROFILE,
    bounded,
    classify,
    fetch_and_check,
    profile_keys,
)
from kvstore.backends.base import Entry, Store
from kvstore.errors import KVStoreError
from kvstore.format.keys import KeyScheme
from kvstore.leases import collector_lease

log = logging.getLogger("kvstore.admin")

DEFAULT_GRACE = 3600.0
COLLECTABLE = (CHUNK, PROFILE, PQ)  # kinds a manifest accounts for


@dataclass(frozen=True, slots=True)
class Orphan:
    """An object no manifest needs."""

    key: str
    kind: str
    age: float | None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "age": None if self.age is None else round(self.age, 3)}


@dataclass(slots=True)
class GcReport:
    """What gc removed (or, in a dry run, would remove) and what it left alone, and why."""

    dry_run: bool
    grace: float
    expired: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    referenced: int = 0  # objects kept because a manifest needs them
    young: int = 0  # unlisted objects kept because they are younger than the grace period
    unknown_age: int = 0  # unlisted objects kept because the backend cannot tell their age
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "grace": self.grace, "expired": self.expired,
                "temp_files": self.temp_files, "orphans": [o.to_json() for o in self.orphans],
                "referenced": self.referenced, "young": self.young, "unknown_age": self.unknown_age, "notes": self.notes, "errors": self.errors}

    def to_text(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} expired {key}" for key in self.expired]
        lines += [f"{verb} temp file {path}" for path in self.temp_files]
        lines += [f"{verb} orphan {o.kind} {o.key}" + ("" if o.age is None else f" (age {o.age:.0f}s)")
                  for o in self.orphans]
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"error: {error}" for error in self.errors]
        lines.append(f"{verb} {len(self.expired)} expired, {len(self.temp_files)} temp files, "
                     f"{len(self.orphans)} orphans; kept {self.referenced} referenced, "
                     f"{self.young} younger than {self.grace:g}s and {self.unknown_age} of unknown age")
        return "\n".join(lines)


async def collect_garbage(store: Store, namespace: str = "kvstore", *, grace: float = DEFAULT_GRACE,
                          dry_run: bool = False) -> GcReport:
    """Remove (``dry_run``: list) expired objects, temp files and orphans older than ``grace`` s.

    Holds the namespace's collector lease while it works (:mod:`kvstore.leases`): a ``put``
    that ends meanwhile waits for it, then writes again any object it re-used that was
    removed, so no context a put reported stored is lost. ``grace`` still protects the
    objects of puts in flight from being removed (and so written twice)."""
    if grace < 0:
        raise KVStoreError(f"grace must be >= 0 seconds, got {grace}")
    report = GcReport(dry_run, grace)
    lease = contextlib.nullcontext() if dry_run else collector_lease(store, KeyScheme(namespace).lease_keys())
    async with lease:
        await _expired(store, report)
        await _temp_files(store, report)
        await _orphans(store, namespace, report)
    return report


async def _expired(store: Store, report: GcReport) -> None:
    keys = await store.expired_keys()
    if store.expiry_note:
        report.notes.append(store.expiry_note)
    report.expired = sorted(keys)
    if not report.dry_run and keys:
        removed = await store.remove_expired(keys)
        log.info("removed %d expired objects", removed)


async def _temp_files(store: Store, report: GcReport) -> None:
    paths = await store.stale_temp_files(report.grace)
    report.temp_files = sorted(paths)
    if not report.dry_run:
        for path in paths:
            try:
                await store.remove_temp_file(path)
            except KVStoreError as exc:
                report.errors.append(f"cannot remove {path}: {exc}")


async def _references(store: Store, namespace: str, keys: list[str]) -> tuple[set[str], set[str]]:
    """Every object key the manifests at ``keys`` need, and the fingerprints with unreadable ones."""
    needed: set[str] = set()
    tainted: set[str] = set()
    for key, (check, manifest) in zip(keys, await bounded(keys, lambda k: fetch_and_check(store, k))):
        fingerprint = classify(key).fingerprint
        if manifest is None:
            if check.status != MISSING:  # gone since listed: it needs nothing now
                tainted.add(fingerprint)
                log.warning("unreadable manifest %s: %s", key, check.error)
            continue
        needed.update(obj.key for chunk in manifest.chunks for obj in chunk.objects)
        if manifest.pq is not None:
            needed.update(obj.key for obj in manifest.pq.objects)
        try:
            needed.update(profile_keys(manifest, namespace))
        except KVStoreError:
            tainted.add(fingerprint)
    return needed, tainted


async def _orphans(store: Store, namespace: str, report: GcReport) -> None:
    expired = set(report.expired)
    found = [e for e in await store.entries(f"{namespace}/") if e.key not in expired]
    infos = {e.key: classify(e.key) for e in found}
    ours = [e for e in found if infos[e.key].namespace == namespace]
    manifests = [e.key for e in ours if infos[e.key].kind == MANIFEST]
    needed, tainted = await _references(store, namespace, manifests)
    for fingerprint in sorted(tainted):
        report.notes.append(f"model {fingerprint} has an unreadable manifest: its objects are kept (run verify)")
    unlisted = [e for e in ours if infos[e.key].kind in COLLECTABLE and e.key not in needed
                and infos[e.key].fingerprint not in tainted]
    report.referenced = sum(infos[e.key].kind in COLLECTABLE for e in ours) - len(unlisted)
    if report.grace > 0 and any(e.age is None for e in unlisted):
        report.notes.append(f"{store.age_note}: orphans of unknown age are kept "
                            "(--grace 0 removes them)")
    old = [e for e in unlisted if report.grace == 0 or (e.age is not None and e.age >= report.grace)]
    report.unknown_age = 0 if report.grace == 0 else sum(e.age is None for e in unlisted)
    report.young = len(unlisted) - len(old) - report.unknown_age
    if old and not report.dry_run:
        old = await _still_unlisted(store, namespace, old, infos, report)
    report.orphans = [Orphan(e.key, infos[e.key].kind, e.age) for e in sorted(old, key=lambda e: e.key)]
    if not report.dry_run:
        await _delete(store, [o.key for o in report.orphans], report)


async def _still_unlisted(store: Store, namespace: str, old: list[Entry],
                          infos: dict[str, Any], report: GcReport) -> list[Entry]:
    """Re-read the candidates' manifests (they may have been written during the scan)."""
    fingerprints = sorted({infos[e.key].fingerprint for e in old})
    keys = [key for fp in fingerprints async for key in _contexts(store, namespace, fp)]
    needed, tainted = await _references(store, namespace, keys)
    keep = {e.key for e in old if e.key in needed or infos[e.key].fingerprint in tainted}
    report.referenced += len(keep)
    if keep:
        log.info("%d objects were listed by manifests written during gc: kept", len(keep))
    return [e for e in old if e.key not in keep]


async def _contexts(store: Store, namespace: str, fingerprint: str):  # type: ignore[no-untyped-def]
    async for key in store.list(f"{namespace}/{fingerprint}/contexts/"):
        info = classify(key)
        if info.kind == MANIFEST and info.namespace == namespace:
            yield key


async def _delete(store: Store, keys: list[str], report: GcReport) -> None:
    async def delete(key: str) -> None:
        try:
            await store.delete(key)
            log.info("removed orphan %s", key)
        except KVStoreError as exc:
            report.errors.append(f"cannot remove {key}: {exc}")

    await bounded(keys, delete)
