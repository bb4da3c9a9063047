"""Collector leases: how a ``put`` and the collectors (``gc``, ``delete``) agree on deletions.

A collector decides from the manifests it reads which objects no context needs and then
deletes them; a ``put`` may meanwhile re-use one of those objects and write a manifest the
collector never read. So a collector holds a lease (a small object at a fixed key, created
create-only, renewed while it works, removed when it is done) from before it reads any
manifest until its last deletion; ``gc`` holds its namespace's, ``delete`` one of its
model's few slots (so deletes of one model run side by side, a few at a time). A
``put``, after writing its manifest, waits until the collectors holding either lease
then have released it, and only then re-checks that every object its manifest lists
is in place, writing again what is not. Any collector that deletes after that re-check
took its lease after the manifest was written, and so reads it.

A collector that dies leaves its lease to expire after ``LEASE_TTL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from kvstore.backends.base import Store
from kvstore.errors import ConcurrentWriteError, KVStoreError
from kvstore.format import container

log = logging.getLogger("kvstore")

LEASE_TTL = 30.0  # seconds a lease lives unless renewed
RENEW_EVERY = 10.0
POLL = 0.02  # seconds before the first re-check of a held lease; doubles up to POLL_MAX
POLL_MAX = 0.5
WAIT_LIMIT = 600.0  # the longest a put or a collector waits for another collector
KIND = "collector-lease"


@contextlib.asynccontextmanager
async def collector_lease(store: Store, keys: Sequence[str], *, candidates: Sequence[str] | None = None,
                          ttl: float = LEASE_TTL) -> AsyncIterator[None]:
    """Hold one of the lease slots at ``keys`` for the body (waiting while all are held).

    ``candidates``: every key the collector may delete, when it knows them up front (a
    ``delete``: the objects its context's manifest lists); a put that lists none of them
    does not wait for this collector. ``None`` (``gc``): any key."""
    run = uuid.uuid4().hex
    meta: dict[str, object] = {"run": run, "started": time.time()}
    if candidates is not None:
        meta["candidates"] = sorted(candidates)
    data = container.encode({}, kind=KIND, meta=meta)

    async def take_a_free_slot() -> str | None:
        for slot in random.sample(list(keys), len(keys)):
            if await store.put(slot, data, ttl=ttl, create_only=True):
                return slot
        return None

    key = await take_a_free_slot()
    if key is None:
        async for _ in _after_pauses(f"other collectors have held {list(keys)}"):
            if (key := await take_a_free_slot()) is not None:
                break

    async def renew() -> None:
        while True:
            await asyncio.sleep(min(RENEW_EVERY, ttl / 3))
            await store.keep(key, ttl)

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError, KVStoreError):
            await renewing
        with contextlib.suppress(KVStoreError):
            if await store.get(key) == data:  # still ours (not expired and taken by another)
                await store.delete(key)


def _may_delete(lease: bytes, objects: set[str]) -> bool:
    """Whether the collector holding ``lease`` may delete one of ``objects``."""
    try:
        meta = container.decode(lease).header.meta
    except KVStoreError:
        return True  # not a lease we can read: assume the worst
    candidates = meta.get("candidates")
    return not isinstance(candidates, list) or not objects.isdisjoint(candidates)


async def wait_for_collectors(store: Store, keys: Sequence[str], objects: set[str]) -> None:
    """Return once every collector that held a lease at ``keys`` when called, and may delete
    one of ``objects``, has released it (or let it expire); :class:`ConcurrentWriteError`
    after ``WAIT_LIMIT`` seconds.

    Only the holders seen on the first check are waited for: a collector that takes a lease
    later started after the caller's manifest was written, and reads it. So a stream of
    collectors (deletes in a busy store) never starves a put, and a delete of unrelated
    contexts never delays it."""
    held = await asyncio.gather(*(store.get(key) for key in keys))
    waiting = [(key, lease) for key, lease in zip(keys, held) if lease is not None and _may_delete(lease, objects)]
    if not waiting:
        return
    log.debug("put waits for %d collectors before its final check", len(waiting))
    async for _ in _after_pauses(f"a collector held one of {[key for key, _ in waiting]}"):
        now = await asyncio.gather(*(store.get(key) for key, _ in waiting))
        waiting = [(key, lease) for (key, lease), current in zip(waiting, now) if current == lease]
        if not waiting:
            return


async def _after_pauses(what: str) -> AsyncIterator[None]:
    """Yield after each of a series of pauses doubling from ``POLL`` to ``POLL_MAX``;
    :class:`ConcurrentWriteError` (``what`` for over ``WAIT_LIMIT`` s) once that has passed."""
    deadline, pause = time.monotonic() + WAIT_LIMIT, POLL
    while True:
        if time.monotonic() > deadline:
            raise ConcurrentWriteError(f"{what} for over {WAIT_LIMIT:.0f} s")
        await asyncio.sleep(pause)
        pause = min(2 * pause, POLL_MAX)
        yield
