"""``kvstore ls`` and ``kvstore inspect``: the contexts in a store, and one context in depth."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvstore.admin.checks import (
    CORRUPT,
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
from kvstore.backends.base import Store, validate_key
from kvstore.errors import ConfigError, ContextNotFoundError, KVStoreError
from kvstore.format.manifest import ChunkObject, Manifest


def _time(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _levels(manifest: Manifest) -> list[dict[str, Any]]:
    return [
        {"level": i, "tag": spec.tag, "codec": spec.codec, "params": spec.params, "bytes": manifest.level_bytes(i)}
        for i, spec in enumerate(manifest.levels)
    ]


@dataclass(slots=True)
class ContextSummary:
    """One stored context, as ``ls`` shows it."""

    key: str
    manifest: Manifest

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "key": self.key, "context": classify(self.key).name, "model_id": m.model_id,
            "fingerprint": m.fingerprint, "tokens": m.num_tokens, "chunks": len(m.chunks),
            "chunk_tokens": m.chunk_tokens, "levels": _levels(m),
            "pq_bytes": None if m.pq is None else m.pq.total_bytes,
            "created_at": m.created_at, "created": _time(m.created_at),
        }

    def to_text(self) -> str:
        m = self.manifest
        sizes = " ".join(f"{spec.tag}={human_bytes(m.level_bytes(i))}" for i, spec in enumerate(m.levels))
        if m.pq is not None:
            sizes += f" pq={human_bytes(m.pq.total_bytes)}"
        return (f"{classify(self.key).name[:12]}  {m.model_id}  {m.num_tokens} tokens  {len(m.chunks)} chunks  "
                f"{len(m.levels)} levels  {sizes}  {_time(m.created_at)}")


@dataclass(slots=True)
class Listing:
    """The result of ``ls``: readable contexts (oldest first) and unreadable manifests."""

    contexts: list[ContextSummary] = field(default_factory=list)
    unreadable: list[ObjectCheck] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"contexts": [c.to_json() for c in self.contexts],
                "unreadable": [u.to_json() for u in self.unreadable]}

    def to_text(self) -> str:
        lines = [c.to_text() for c in self.contexts]
        lines += [f"UNREADABLE {u.key}: {u.error}" for u in self.unreadable]
        lines.append(f"{len(self.contexts)} contexts" + (f", {len(self.unreadable)} unreadable" if self.unreadable else ""))
        return "\n".join(lines)


async def manifest_keys(store: Store, namespace: str) -> list[str]:
    """The manifest keys under ``namespace``."""
    return sorted([
        key async for key in store.list(f"{namespace}/")
        if (info := classify(key)).kind == MANIFEST and info.namespace == namespace
    ])


async def list_contexts(store: Store, namespace: str = "kvstore") -> Listing:
    """Every context stored under ``namespace``."""
    listing = Listing()
    keys = await manifest_keys(store, namespace)
    for key, (check, manifest) in zip(keys, await bounded(keys, lambda k: fetch_and_check(store, k))):
        if manifest is not None:
            listing.contexts.append(ContextSummary(key, manifest))
        elif check.status != MISSING:  # MISSING: deleted or expired since it was listed
            listing.unreadable.append(check)
    listing.contexts.sort(key=lambda c: (c.manifest.created_at, c.key))
    return listing


async def resolve_context(store: Store, namespace: str, ref: str) -> str:
    """The manifest key ``ref`` names: a manifest key, or a unique prefix of a context hash."""
    if "/" in ref:
        validate_key(ref)
        if classify(ref).kind != MANIFEST:
            raise ConfigError(f"{ref!r} is not a manifest key (<namespace>/<fingerprint>/contexts/<hash>)")
        return ref
    ref = ref.lower()
    if not ref or any(c not in "0123456789abcdef" for c in ref):
        raise ConfigError(f"a context is a manifest key or a prefix of its hex context hash, got {ref!r}")
    matches = [k for k in await manifest_keys(store, namespace) if classify(k).name.startswith(ref)]
    if not matches:
        raise ContextNotFoundError(f"no context under {namespace!r} has a hash starting with {ref!r}")
    if len(matches) > 1:
        raise ConfigError(f"{ref!r} matches {len(matches)} contexts; give more of the hash: "
                          + ", ".join(classify(k).name for k in matches[:5]))
    return matches[0]


@dataclass(slots=True)
class ContextReport:
    """``inspect``'s findings: the manifest, and one verdict per stored object it lists."""

    key: str
    manifest_check: ObjectCheck
    manifest: Manifest | None = None
    objects: list[list[ObjectCheck]] = field(default_factory=list)  # [chunk][level]
    profiles: list[ObjectCheck] = field(default_factory=list)
    pq: list[ObjectCheck] = field(default_factory=list)  # centroids, then one codes object per chunk

    @property
    def problems(self) -> list[ObjectCheck]:
        found = [] if self.manifest_check.ok else [self.manifest_check]
        others = [*self.profiles, *self.pq]
        return found + [c for row in self.objects for c in row if not c.ok] + [p for p in others if not p.ok]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": self.key, "ok": self.ok, "manifest": self.manifest_check.to_json()}
        m = self.manifest
        if m is not None:
            doc.update(ContextSummary(self.key, m).to_json())
            doc.update(layers=m.layers, kv_heads=m.kv_heads, head_dim=m.head_dim, dtype=m.dtype,
                       layout=m.layout.to_dict())
            doc["chunks"] = [
                {"index": i, "hash": c.hash, "start": c.start, "stop": c.stop,
                 "objects": [check.to_json() for check in self.objects[i]]}
                for i, c in enumerate(m.chunks)
            ]
            doc["profiles"] = [p.to_json() for p in self.profiles]
            if m.pq is not None:
                doc["pq"] = {"config": m.pq.config, "bytes": m.pq.total_bytes,
                             "objects": [p.to_json() for p in self.pq]}
        doc["problems"] = [p.to_json() for p in self.problems]
        return doc

    def to_text(self) -> str:
        m = self.manifest
        lines = [f"context   {self.key}"]
        if m is None:
            lines.append(f"manifest  {self.manifest_check.status.upper()}: {self.manifest_check.error}")
            return "\n".join(lines)
        lines += [
            f"model     {m.model_id} (fingerprint {m.fingerprint})",
            f"tokens    {m.num_tokens} in {len(m.chunks)} chunks of {m.chunk_tokens}",
            f"layout    {m.layers} layers: {m.layout.describe()}, {m.dtype}",
            f"created   {_time(m.created_at)}",
            f"manifest  {human_bytes(self.manifest_check.size)} {self.manifest_check.status.upper()}",
            "levels",
        ]
        for lv in _levels(m):
            lines.append(f"  {lv['level']}  {lv['tag']:<16} {lv['codec']} {lv['params']}  {human_bytes(lv['bytes'])}")
        if self.profiles:
            lines.append("profiles")
            lines += [f"  {p.key}  {human_bytes(p.size)}  {_verdict(p)}" for p in self.profiles]
        if m.pq is not None:
            bad_pq = sum(not p.ok for p in self.pq)
            lines.append(f"pq        {m.pq.config}  {human_bytes(m.pq.total_bytes)} in {len(self.pq)} objects, "
                         + ("all OK" if not bad_pq else f"{bad_pq} not OK"))
        lines.append("chunks")
        for i, c in enumerate(m.chunks):
            cells = "  ".join(f"{_slot_name(m, c, j)} {human_bytes(o.size)} {_verdict(o)}"
                              for j, o in enumerate(self.objects[i]))
            lines.append(f"  {i:>4} [{c.start}, {c.stop}) {c.hash[:12]}  {cells}")
        checked = sum(len(row) for row in self.objects) + len(self.profiles) + len(self.pq) + 1
        bad = self.problems
        lines.append(f"checksums: {checked - len(bad)} of {checked} objects OK"
                     + "".join(f"\n  {p.status.upper()} {p.key}: {p.error}" for p in bad))
        return "\n".join(lines)


def _slot_name(manifest: Manifest, chunk: Any, j: int) -> str:
    """``L<level>`` of a chunk's ``j``-th object, with its layer group where there are several."""
    groups = manifest.layout.groups
    level, group = chunk.slots[j] if chunk.slots is not None else divmod(j, len(groups))
    return f"L{level}" if len(groups) == 1 else f"L{level}/{groups[group].name}"


def _verdict(check: ObjectCheck) -> str:
    return "OK" if check.ok else check.status.upper()


async def inspect_context(store: Store, ref: str, namespace: str = "kvstore") -> ContextReport:
    """Read a context's manifest and verify every object it lists (all levels, profiles)."""
    key = await resolve_context(store, namespace, ref)
    check, manifest = await fetch_and_check(store, key)
    if check.status == MISSING:
        raise ContextNotFoundError(f"no manifest at {key}")
    report = ContextReport(key, check, manifest)
    if manifest is None:
        return report
    flat = [(entry, obj) for entry in manifest.chunks for obj in entry.objects]

    async def check_object(item: tuple[Any, Any]) -> ObjectCheck:
        entry, obj = item
        result, _ = await fetch_and_check(store, obj.key)
        if result.ok:
            mismatch = compare_with_manifest(result, obj, entry, manifest.fingerprint)
            if mismatch:
                result.status, result.error = CORRUPT, mismatch
        return result

    checks = await bounded(flat, check_object)
    report.objects, at = [], 0
    for entry in manifest.chunks:
        report.objects.append(checks[at:at + len(entry.objects)])
        at += len(entry.objects)
    ns = classify(key).namespace
    try:
        keys = profile_keys(manifest, ns)
    except KVStoreError as exc:
        where = f"{ns}/{manifest.fingerprint}/profiles/"
        report.profiles = [ObjectCheck(where, "profile", CORRUPT, error=f"cannot tell which profiles: {exc}")]
    else:
        report.profiles = [c for c, _ in await bounded(keys, lambda k: fetch_and_check(store, k))]
    if manifest.pq is not None:
        report.pq = await bounded(list(manifest.pq.objects), lambda obj: _check_recorded(store, obj))
    return report


async def _check_recorded(store: Store, expected: ChunkObject) -> ObjectCheck:
    """Fetch and verify one object, and that it is the one the manifest recorded."""
    result, _ = await fetch_and_check(store, expected.key)
    if result.ok:
        mismatch = compare_with_record(result, expected)
        if mismatch:
            result.status, result.error = CORRUPT, mismatch
    return result
