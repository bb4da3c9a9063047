"""Never the wrong KV, never lost KV: lifetimes of shared objects, and interleaved puts of
different KV, deletes, gc and expiry checked against one invariant.

The invariant, on memory, local files and Redis (and S3 without TTLs): every ``get``
returns exactly the KV of one ``put`` of those tokens, or raises a ``KVStoreError``; every
context put without a TTL and not deleted since is still readable.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import torch

from kvstore import KVStore
from kvstore.admin.gc import collect_garbage
from kvstore.backends.memory import MemoryStore
from kvstore.errors import KVStoreError

CHUNK = 8
TTL = 1.0
GC_GRACE = 0.3


def _kv(tokens: int, seed: int, dtype: torch.dtype = torch.float16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, tokens, 4, generator=g).to(dtype), torch.randn(2, tokens, 4, generator=g).to(dtype))
            for _ in range(2)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) and torch.equal(p, q)
                                    for (x, p), (y, q) in zip(a, b))


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


async def _interleavings(kvs: KVStore, rounds: int, seed: int, *, with_ttl: bool) -> dict[str, int]:
    """Random interleavings of puts of different KV for shared token prefixes, deletes, gc,
    expiry and gets; checks the invariant after every get."""
    rng = random.Random(seed)
    stats = {"gets": 0, "raised": 0, "wrong": 0, "lost": 0, "puts_failed": 0}
    contexts = {n: list(range(100, 100 + n)) for n in (8, 16, 24)}  # prefixes of one another
    puts: dict[int, list] = {n: [] for n in contexts}  # every KV put for each context, in order
    durable: set[int] = set()  # contexts whose puts since the last delete were all without TTL
    touched: dict[int, set[str]] = {}  # this round: context -> {"durable", "ttl", "delete"}

    async def put(n: int) -> None:
        kv = _kv(n, rng.randrange(1 << 30), rng.choice([torch.float16, torch.float32]))
        ttl = rng.choice([None, None, TTL]) if with_ttl else None
        puts[n].append(kv)
        touched.setdefault(n, set()).add("durable" if ttl is None else "ttl")
        try:
            await kvs.put("m", contexts[n], kv, ttl=ttl)
        except KVStoreError:  # e.g. gc(grace=0), which assumes no writer, removed its temp file: no claim
            stats["puts_failed"] += 1
            touched[n].add("failed")

    async def delete(n: int) -> None:
        touched.setdefault(n, set()).add("delete")
        await kvs.delete("m", contexts[n])

    async def get(n: int) -> None:
        stats["gets"] += 1
        try:
            got = await kvs.get("m", contexts[n])
        except KVStoreError:
            stats["raised"] += 1
            return
        # exactly one put's KV: of this context, or (read without a manifest) a prefix of a longer one's
        candidates = puts[n] + [_prefix(kv, n) for m in contexts if m > n for kv in puts[m]]
        if not any(_same(got, kv) for kv in candidates):
            stats["wrong"] += 1

    for _ in range(rounds):
        touched.clear()
        ops = []
        for _ in range(rng.randrange(2, 6)):
            n = rng.choice(list(contexts))
            op = rng.choice(["put", "put", "put", "delete", "get", "get", "gc"])
            if op == "put":
                ops.append(put(n))
            elif op == "delete":
                ops.append(delete(n))
            elif op == "gc":
                # writers are active: a grace period (grace=0 tells gc that none is)
                ops.append(collect_garbage(kvs.store, namespace=kvs.keys.namespace, grace=GC_GRACE))
            else:
                ops.append(get(n))
        await asyncio.gather(*ops)
        for n, what in touched.items():  # concurrent puts and deletes of one context: either may land last
            if what == {"durable"}:
                durable.add(n)
            elif what - {"durable"}:
                durable.discard(n)
        # quiescent: every durable context reads back, exactly as one of its puts
        for n in durable:
            try:
                got = await kvs.get("m", contexts[n])
            except KVStoreError:
                stats["lost"] += 1
                continue
            if not any(_same(got, kv) for kv in puts[n]):
                stats["wrong"] += 1
    return stats


@pytest.mark.parametrize("seed", [1, 2])
async def test_interleaved_puts_deletes_gc_and_gets_keep_the_invariant(store_factory, seed):
    kvs = store_factory()
    stats = await _interleavings(kvs, rounds=25, seed=seed, with_ttl=store_factory.kind != "s3")
    assert stats["wrong"] == 0 and stats["lost"] == 0, stats
    assert stats["gets"] > 0
