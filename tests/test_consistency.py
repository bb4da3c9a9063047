"""Never the wrong KV, never lost KV: lifetimes of shared objects, and interleaved puts of
different KV, deletes, gc and expiry checked against one invariant.

The invariant, on memory, local files and Redis (and S3 without TTLs): every ``get``
returns exactly the KV of one ``put`` of those tokens, or raises a ``KVStoreError``; every
context put without a TTL and not deleted since is still readable; a context put with a TTL
reads back until its TTL is near. The interleavings (:mod:`tests.tools.consistency`)
include ``gc`` without a grace period while puts are in flight.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from kvstore import KVStore
from kvstore.backends.memory import MemoryStore
from kvstore.errors import KVStoreError

from kvstore.leases import collector_lease
from tests.tools.consistency import TTL, random_kv, run_interleavings
from tests.tools.faults import kv_identical

CHUNK = 8
_kv, _same = random_kv, kv_identical


def _prefix(kv, n):
    return [(k[:, :n], v[:, :n]) for k, v in kv]


@pytest.fixture(params=["memory", "local", "redis", "s3"])
async def store_factory(request, tmp_path):
    kind = request.param
    namespace = f"c-{uuid.uuid4().hex[:8]}"
    opened: list[KVStore] = []
    shared = MemoryStore()

    def make(**kwargs) -> KVStore:
        kwargs.setdefault("chunk_tokens", CHUNK)
        if kind == "memory":
            kvs = KVStore(shared, namespace=namespace, **kwargs)
        elif kind == "local":
            kvs = KVStore(tmp_path.as_uri(), namespace=namespace, **kwargs)
        elif kind == "redis":
            kvs = KVStore(request.getfixturevalue("redis_url"), namespace=namespace, **kwargs)
        else:
            s3 = request.getfixturevalue("moto_s3")
            kvs = KVStore(f"{s3.url}/consistency", namespace=namespace, storage_options=s3.storage_options(), **kwargs)
        opened.append(kvs)
        return kvs

    make.kind = kind  # type: ignore[attr-defined]
    yield make
    for kvs in opened[1:] if kind == "memory" else opened:
        await kvs.close()


async def test_re_putting_without_a_ttl_makes_a_context_durable(store_factory):
    if store_factory.kind == "s3":
        pytest.skip("S3 expires only through gc: covered by the local store's sidecars")
    kvs, ids, kv = store_factory(), list(range(24)), _kv(24, 0)
    await kvs.put("m", ids, kv, ttl=TTL)
    await kvs.put("m", ids, kv)  # the same KV again, durable now
    await asyncio.sleep(TTL + 0.5)
    assert _same(await kvs.get("m", ids), kv) and await kvs.lookup("m", ids) == 24


async def test_a_durable_context_keeps_the_chunks_it_shares_with_an_expiring_one(store_factory):
    if store_factory.kind == "s3":
        pytest.skip("S3 expires only through gc: covered by the local store's sidecars")
    kvs = store_factory()
    ids = list(range(32))
    kv = _kv(32, 1)
    await kvs.put("m", ids, kv, ttl=TTL)  # A, expiring
    await kvs.put("m", ids[:16], _prefix(kv, 16))  # C, durable, shares A's first two chunks
    await asyncio.sleep(TTL + 0.5)
    assert _same(await kvs.get("m", ids[:16]), _prefix(kv, 16))
    assert await kvs.lookup("m", ids) == 16
    with pytest.raises(KVStoreError):
        await kvs.get("m", ids)  # A itself expired


@pytest.mark.parametrize("seed", [1, 2])
async def test_interleaved_puts_deletes_gc_and_gets_keep_the_invariant(store_factory, seed):
    kvs = store_factory()
    stats = await run_interleavings(kvs, rounds=25, seed=seed, with_ttl=store_factory.kind != "s3")
    assert stats["mixed_or_wrong"] == 0 and stats["lost_durable_contexts"] == 0, stats
    assert stats["expired_too_early"] == 0, stats
    assert stats["gets"] > 0 and stats["puts_diverging"] > 0


async def test_a_put_waits_for_a_collector_and_writes_again_what_it_removed(store_factory):
    """The lease protocol, step by step: a collector that read the manifests before a put
    re-used the chunks removes them after the put wrote its manifest; the put must not
    return before the collector is done, and must then write the chunks again."""
    kvs, ids, kv = store_factory(), list(range(16)), _kv(16, 2)
    await kvs.put("m", ids, kv)
    chunks = [k async for k in kvs.store.list(f"{kvs.keys.namespace}/") if "/chunks/" in k]
    async with collector_lease(kvs.store, kvs.keys.lease_keys()):
        put = asyncio.create_task(kvs.put("m", ids, kv))  # re-uses every chunk object
        await asyncio.sleep(0.5)
        assert not put.done()  # its manifest is written; it waits for the collector
        for key in chunks:
            await kvs.store.delete(key)
    await asyncio.wait_for(put, 30)
    assert _same(await kvs.get("m", ids), kv)


async def test_a_dead_collectors_lease_expires(store_factory):
    kvs, ids, kv = store_factory(), list(range(8)), _kv(8, 3)
    plan = kvs._plan("m", ids)
    dead_delete = kvs.keys.lease_keys(plan.fingerprint, plan.hashes[0])[2]  # a slot of this context's deletes
    started = time.time()  # the clock lifetimes are kept in (a VM's monotonic clock can lag it)
    await kvs.store.put(dead_delete, b"left by a delete that died", ttl=1.0)
    await asyncio.wait_for(kvs.put("m", ids, kv), 30)
    assert time.time() - started >= 0.9
    assert _same(await kvs.get("m", ids), kv)
