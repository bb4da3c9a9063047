"""Collector leases: how a ``put`` and the collectors (``gc``, ``delete``) agree on deletions.

A collector decides from the manifests it reads which objects no context needs and then
deletes them; a ``put`` may meanwhile re-use one of those objects and write a manifest the
collector never read. So a collector holds a lease (a small object at a fixed key, created
create-only, renewed while it works, removed when it is done) from before it reads any
manifest until its last deletion; ``gc`` holds its namespace's, ``delete`` its model's. A
``put``, after writing its manifest, waits until neither lease is held and only then
re-checks that every object its manifest lists is in place, writing again what is not.
Any collector that deletes after that re-check took its lease after the manifest was
written, and so reads it.

A collector that dies leaves its lease to expire after ``LEASE_TTL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from kvstore.backends.base import Store
from kvstore.errors import ConcurrentWriteError, KVStoreError
from kvstore.format import container

log = logging.getLogger("kvstore")

LEASE_TTL = 30.0  # seconds a lease lives unless renewed
RENEW_EVERY = 10.0
POLL = 0.02  # seconds between checks of a held lease
WAIT_LIMIT = 600.0  # the longest a put or a collector waits for another collector
KIND = "collector-lease"


@contextlib.asynccontextmanager
async def collector_lease(store: Store, key: str, *, ttl: float = LEASE_TTL) -> AsyncIterator[None]:
    """Hold the lease at ``key`` for the body (waiting while another collector holds it)."""
    run = uuid.uuid4().hex
    data = container.encode({}, kind=KIND, meta={"run": run, "started": time.time()})
    deadline = time.monotonic() + WAIT_LIMIT
    while not await store.put(key, data, ttl=ttl, create_only=True):
        if time.monotonic() > deadline:
            raise ConcurrentWriteError(f"another collector has held {key} for over {WAIT_LIMIT:.0f} s")
        await asyncio.sleep(POLL)

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


async def wait_for_collectors(store: Store, keys: Sequence[str]) -> None:
    """Return once none of the leases at ``keys`` is held; :class:`ConcurrentWriteError`
    after ``WAIT_LIMIT`` seconds."""
    deadline = time.monotonic() + WAIT_LIMIT
    waited = False
    while any(await asyncio.gather(*(store.exists(key) for key in keys))):
        if time.monotonic() > deadline:
            raise ConcurrentWriteError(f"a collector held one of {list(keys)} for over {WAIT_LIMIT:.0f} s")
        if not waited:
            log.debug("put waits for a collector (%s) before its final check", ", ".join(keys))
            waited = True
        await asyncio.sleep(POLL)
