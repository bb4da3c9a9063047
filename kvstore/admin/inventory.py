"""What a byte store holds, with each object's age where the backend can tell it.

The :class:`~kvstore.backends.base.Store` interface has no timestamps, so this
module asks each backend in its own terms, without side effects:

=========================  ====================================================
backend                    age of an object
=========================  ====================================================
local directory            seconds since the file's mtime (its last write)
S3 (fsspec)                seconds since ``LastModified``
Redis / Redis Cluster      ``OBJECT IDLETIME`` (since last access: never more
                           than the real age, so a grace period stays safe);
                           unknown under an LFU eviction policy
memory, anything else      unknown
=========================  ====================================================

It also finds expired objects that still take space (local TTL sidecars, S3
objects whose TTL hint has passed, memory entries) and the local backend's
left-over temporary files, and removes them on request.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.backends.base import Store, is_valid_key
from kvstore.backends.fsspec import FsspecStore
from kvstore.backends.fsspec import head_expired
from kvstore.backends.local import TMP_MARK, TTL_DIR, LocalStore
from kvstore.backends.memory import MemoryStore
from kvstore.backends.signed import unsigned
from kvstore.backends.redis import RedisStoreBase
from kvstore.errors import KVStoreError

log = logging.getLogger("kvstore.admin")

_REDIS_BATCH = 500


@dataclass(frozen=True, slots=True)
class Entry:
    """A live object and its age in seconds (``None``: the backend cannot tell)."""

    key: str
    age: float | None


async def entries(store: Store, prefix: str = "") -> list[Entry]:
    """Every live key starting with ``prefix``, with its age where known."""
    store = unsigned(store)
    if isinstance(store, LocalStore):
        return await _io(_local_entries, store, prefix)
    if isinstance(store, FsspecStore):
        return await _s3_entries(store, prefix)
    keys = [key async for key in store.list(prefix)]
    if isinstance(store, RedisStoreBase):
        return await _redis_entries(store, keys)
    return [Entry(key, None) for key in keys]


def age_note(store: Store) -> str:
    """Why ages are unknown on ``store`` (``""`` when the backend reports them)."""
    store = unsigned(store)
    if isinstance(store, LocalStore | FsspecStore):
        return ""
    if isinstance(store, RedisStoreBase):
        return "Redis reports no idle time for some keys (an LFU maxmemory-policy?)"
    return f"{type(store).__name__} does not record when objects were written"


# -- local directory ----------------------------------------------------------------


def _local_expiry(store: LocalStore, key: str) -> float | None:
    try:
        return float((store.root / TTL_DIR / key).read_text())
    except (OSError, ValueError):
        return None


def _local_entries(store: LocalStore, prefix: str) -> list[Entry]:
    now = time.time()
    found = []
    for dirpath, dirnames, filenames in os.walk(store.root):
        rel_dir = os.path.relpath(dirpath, store.root).replace(os.sep, "/")
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != TTL_DIR]
            rel_dir = ""
        for name in filenames:
            key = f"{rel_dir}/{name}" if rel_dir else name
            if not key.startswith(prefix) or not is_valid_key(key) or (name.startswith(".") and TMP_MARK in name):
                continue
            try:
                mtime = os.stat(os.path.join(dirpath, name)).st_mtime
            except FileNotFoundError:
                continue
            expires_at = _local_expiry(store, key)
            if expires_at is None or now < expires_at:
                found.append(Entry(key, max(0.0, now - mtime)))
    return found


def _local_expired(store: LocalStore) -> list[str]:
    """Keys whose TTL sidecar has passed (the value may already be gone)."""
    ttl_root = store.root / TTL_DIR
    now = time.time()
    keys = []
    for dirpath, _, filenames in os.walk(ttl_root):
        for name in filenames:
            if name.startswith(".") and TMP_MARK in name:
                continue
            key = os.path.relpath(os.path.join(dirpath, name), ttl_root).replace(os.sep, "/")
            expires_at = _local_expiry(store, key)
            if is_valid_key(key) and expires_at is not None and now >= expires_at:
                keys.append(key)
    return keys


def _local_remove_expired(store: LocalStore, keys: list[str]) -> int:
    removed = 0
    for key in keys:
        expires_at = _local_expiry(store, key)  # read again: the key may have been rewritten since
        if expires_at is not None and time.time() >= expires_at:
            store._remove(key)
            removed += 1
    return removed


def temp_files(store: Store, grace: float) -> list[Path]:
    """The local backend's temporary files (``.<name>.tmp-*``) older than ``grace`` seconds."""
    store = unsigned(store)
    if not isinstance(store, LocalStore):
        return []
    now = time.time()
    found = []
    for dirpath, _, filenames in os.walk(store.root):
        for name in filenames:
            if name.startswith(".") and TMP_MARK in name:
                path = Path(dirpath) / name
                try:
                    if now - path.stat().st_mtime >= grace:
                        found.append(path)
                except FileNotFoundError:
                    continue
    return found


# -- S3 -------------------------------------------------------------------------------


async def _s3_entries(store: FsspecStore, prefix: str) -> list[Entry]:
    client = await store._client()
    request: dict[str, Any] = {"Bucket": store.bucket, "Prefix": store._root + prefix}
    now = time.time()
    found: dict[str, float] = {}
    while True:
        page = await store._call("list", prefix + "*", lambda: client.list_objects_v2(**request))
        for item in page.get("Contents", ()):
            key = item["Key"][len(store._root):]
            if is_valid_key(key):
                found[key] = max(0.0, now - item["LastModified"].timestamp())
        if not page.get("IsTruncated"):
            break
        request["ContinuationToken"] = page["NextContinuationToken"]
    expired = set(await _s3_expired(store, prefix))
    return [Entry(key, age) for key, age in found.items() if key not in expired]


async def _s3_expired(store: FsspecStore, prefix: str = "") -> list[str]:
    """Keys whose TTL hint has passed and whose object S3 still holds, expired."""
    from kvstore.admin.checks import bounded

    now_ms = time.time() * 1000
    suspects = [key for key, stamps in (await store._hints(prefix)).items() if any(s <= now_ms for s in stamps)]

    async def expired(key: str) -> bool:
        head = await store._call("head", key, lambda: store._head(key))
        return head is not None and head_expired(head)

    return [key for key, gone in zip(suspects, await bounded(suspects, expired)) if gone]


# -- Redis ----------------------------------------------------------------------------


async def _redis_entries(store: RedisStoreBase, keys: list[str]) -> list[Entry]:
    ages: list[float | None] = []
    for start in range(0, len(keys), _REDIS_BATCH):
        batch = keys[start:start + _REDIS_BATCH]

        async def idle(batch: list[str] = batch) -> list[Any]:
            async with store.client.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.object("idletime", store._name(key))
                return await pipe.execute(raise_on_error=False)

        for reply in await store._call("object idletime", batch[0] + "...", idle):
            ages.append(float(reply) if isinstance(reply, int) else None)
    return [Entry(key, age) for key, age in zip(keys, ages)]


# -- expiry, for every backend --------------------------------------------------------


async def expired_keys(store: Store) -> tuple[list[str], str]:
    """Expired objects that still take space, and a note on how this backend expires them."""
    store = unsigned(store)
    if isinstance(store, LocalStore):
        return await _io(_local_expired, store), ""
    if isinstance(store, FsspecStore):
        return await _s3_expired(store), ""
    if isinstance(store, MemoryStore):
        now = time.monotonic()
        return [k for k, (_, exp) in list(store._values.items()) if exp is not None and now >= exp], ""
    if isinstance(store, RedisStoreBase):
        return [], "Redis removes expired keys itself"
    return [], f"{type(store).__name__}: no expiry collection"


async def remove_expired(store: Store, keys: list[str]) -> int:
    """Remove expired objects (re-checking each); returns how many went."""
    store = unsigned(store)
    if isinstance(store, LocalStore):
        return await _io(_local_remove_expired, store, keys)
    if isinstance(store, FsspecStore):
        return await store.gc()  # removes every expired object and stale hint (conditional deletes)
    if isinstance(store, MemoryStore):
        return sum(store._live(key) is None for key in keys)  # _live drops an expired entry
    return 0


async def _io(fn: Any, *args: Any) -> Any:
    import asyncio

    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as exc:
        raise KVStoreError(f"local store scan failed: {exc}") from exc
