"""What a stored key is, and whether the object under it is intact.

Keys are classified from the right (the namespace may itself contain ``/``)::

    <ns>/<fingerprint>/chunks/<chunk hash>/<level tag>   chunk
    <ns>/<fingerprint>/contexts/<context hash>           manifest
    <ns>/<fingerprint>/profiles/<profile id>             profile
    <ns>/<fingerprint>/layout                            the model's cache layout
    <ns>/<fingerprint>/profile                           the model's default codec profile
    <ns>/<fingerprint>/pq/<context hash>/<tag>/centroids           PQ object
    <ns>/<fingerprint>/pq/<context hash>/<tag>/codes/<chunk hash>  PQ object
    anything else                                        other (checked as a plain container)

An object is *intact* when its container header and every buffer match their
checksums and the object is what its key says it is (a chunk's fingerprint and
hash, a manifest's fingerprint and last chunk hash, a profile's content hash).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvstore.backends.base import Store
from kvstore.codecs.base import profile_content_id
from kvstore.format.default_profile import default_profile_from_bytes
from kvstore.errors import KVStoreError, SignatureError
from kvstore.format import chunk as chunk_format
from kvstore.format import container
from kvstore.format import manifest as manifest_format
from kvstore.format.keys import is_hash
from kvstore.format.layout import layout_from_bytes
from kvstore.format.manifest import Manifest
from kvstore.retrieval import store as pq_store

T = TypeVar("T")
R = TypeVar("R")

CHUNK, MANIFEST, PROFILE, PQ, LAYOUT, OTHER = "chunk", "manifest", "profile", "pq", "layout", "other"
DEFAULT_PROFILE = "default-profile"  # the profile stores bound to the model encode with
OK, CORRUPT, MISSING = "ok", "corrupt", "missing"
CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key's place in the layout."""

    key: str
    kind: str  # CHUNK, MANIFEST, PROFILE, PQ, LAYOUT, DEFAULT_PROFILE or OTHER
    namespace: str = ""
    fingerprint: str = ""
    name: str = ""  # chunk hash, context hash, profile id, or a PQ object's context hash
    level_tag: str = ""


def classify(key: str) -> KeyInfo:
    """Where ``key`` sits in the key layout (``OTHER`` when it follows none of it)."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[-3] == "chunks" and is_hash(parts[-4]) and is_hash(parts[-2]):
        return KeyInfo(key, CHUNK, "/".join(parts[:-4]), parts[-4], parts[-2], parts[-1])
    if len(parts) >= 3 and parts[-1] == "layout" and is_hash(parts[-2]):
        return KeyInfo(key, LAYOUT, "/".join(parts[:-2]), parts[-2])
    if len(parts) >= 3 and parts[-1] == "profile" and is_hash(parts[-2]):
        return KeyInfo(key, DEFAULT_PROFILE, "/".join(parts[:-2]), parts[-2])
    if len(parts) >= 4 and is_hash(parts[-3]) and parts[-2] in ("contexts", "profiles"):
        kind = MANIFEST if parts[-2] == "contexts" else PROFILE
        if kind == PROFILE or is_hash(parts[-1]):
            return KeyInfo(key, kind, "/".join(parts[:-3]), parts[-3], parts[-1])
    for at in (-4, -5):  # .../pq/<context>/<tag>/centroids or .../pq/<context>/<tag>/codes/<chunk>
        if len(parts) >= 2 - at and parts[at] == "pq" and is_hash(parts[at - 1]) and is_hash(parts[at + 1]):
            tail = parts[at + 3:]
            if tail == ["centroids"] or (len(tail) == 2 and tail[0] == "codes" and is_hash(tail[1])):
                return KeyInfo(key, PQ, "/".join(parts[:at - 1]), parts[at - 1], parts[at + 1])
    return KeyInfo(key, OTHER)


@dataclass(slots=True)
class ObjectCheck:
    """The verdict on one stored object."""

    key: str
    kind: str
    status: str  # OK, CORRUPT or MISSING
    size: int | None = None
    error: str = ""
    header_checksum: int | None = None  # the container header checksum, when the header is intact
    meta: dict[str, Any] = field(default_factory=dict)  # the container's meta, when intact

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": self.key, "kind": self.kind, "status": self.status, "size": self.size}
        if self.error:
            doc["error"] = self.error
        return doc


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KVStoreError(message)


def check_bytes(key: str, data: bytes) -> tuple[ObjectCheck, Manifest | None]:
    """Verify one object's bytes (every checksum, and that it is what its key says).

    Returns the verdict and, for an intact manifest, the parsed manifest.
    """
    info = classify(key)
    result = ObjectCheck(key, info.kind, CORRUPT, size=len(data))
    manifest = None
    try:
        obj = container.decode(data)
        result.header_checksum = obj.header.checksum
        for name in obj.header.buffers:
            obj.raw(name)  # verifies the buffer's checksum
        kind, meta = obj.header.kind, obj.header.meta
        if info.kind == CHUNK:
            _require(kind == chunk_format.KIND, f"a chunk key holds a {kind!r} object")
            _require(meta.get("fingerprint") == info.fingerprint, "chunk fingerprint does not match its key")
            _require(meta.get("hash") == info.name, "chunk hash does not match its key")
        elif info.kind == MANIFEST:
            manifest, _ = manifest_format.from_bytes(data)
            _require(manifest.fingerprint == info.fingerprint, "manifest fingerprint does not match its key")
            _require(manifest.chunks[-1].hash == info.name, "manifest does not end with the chunk its key names")
        elif info.kind == LAYOUT:
            layout_from_bytes(data, info.fingerprint)
        elif info.kind == DEFAULT_PROFILE:
            default_profile_from_bytes(data, info.fingerprint)
        elif info.kind == PROFILE:
            _require(profile_content_id(data) == info.name, "profile does not match its content hash")
        elif info.kind == PQ:
            _require(kind in (pq_store.KIND_CENTROIDS, pq_store.KIND_CODES), f"a PQ key holds a {kind!r} object")
            _require(meta.get("fingerprint") == info.fingerprint, "PQ object fingerprint does not match its key")
            _require(meta.get("context") == info.name, "PQ object context does not match its key")
        result.meta = meta
    except (KVStoreError, ValueError) as exc:
        result.error = str(exc) or type(exc).__name__
        return result, None
    result.status = OK
    return result, manifest


async def fetch_and_check(store: Store, key: str) -> tuple[ObjectCheck, Manifest | None]:
    """Read ``key`` whole and verify it; a missing key is reported ``MISSING``, and one a
    signed store refuses (no valid MAC under its keys) ``CORRUPT``."""
    try:
        data = await store.get(key)
    except SignatureError as exc:
        return ObjectCheck(key, classify(key).kind, CORRUPT, error=str(exc)), None
    if data is None:
        return ObjectCheck(key, classify(key).kind, MISSING, error="not in the store"), None
    return await asyncio.to_thread(check_bytes, key, bytes(data))


def compare_with_manifest(check: ObjectCheck, expected: manifest_format.ChunkObject,
                          entry: manifest_format.ChunkEntry, fingerprint: str) -> str:
    """Why an intact chunk object is not the one a manifest recorded (``""`` if it is)."""
    recorded = compare_with_record(check, expected)
    if recorded:
        return recorded
    meta = check.meta
    wanted = {"fingerprint": fingerprint, "hash": entry.hash, "start": entry.start, "stop": entry.stop}
    for name, want in wanted.items():
        if meta.get(name) != want:
            return f"chunk records {name}={meta.get(name)!r}, the manifest says {want!r}"
    return ""


def compare_with_record(check: ObjectCheck, expected: manifest_format.ChunkObject) -> str:
    """Why an intact object is not the one a manifest recorded (size, header checksum; ``""`` if it is)."""
    if check.size != expected.size:
        return f"size {check.size} differs from the {expected.size} bytes the manifest recorded"
    if check.header_checksum != expected.checksum:
        return "header checksum differs from the one the manifest recorded (object replaced)"
    return ""


def profile_keys(manifest: Manifest, namespace: str) -> list[str]:
    """The profile keys a manifest's levels need (raises CodecError for an unknown codec)."""
    from kvstore.codecs.base import codec_class

    keys = []
    for spec in manifest.levels:
        profile_id = codec_class(spec.codec).profile_id_of(spec.params)
        if profile_id is not None:
            keys.append(f"{namespace}/{manifest.fingerprint}/profiles/{profile_id}")
    return keys


async def bounded(items: Iterable[T], fn: Callable[[T], Awaitable[R]], limit: int = CONCURRENCY) -> list[R]:
    """``[await fn(item) for item in items]`` with at most ``limit`` in flight."""
    semaphore = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with semaphore:
            return await fn(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


def human_bytes(n: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
