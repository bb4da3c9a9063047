"""Random interleavings of puts of different KV, deletes, gc, expiry and gets, checked
against the store's consistency invariant (used by ``tests/test_consistency.py`` and
``kvstore bench faults``).

The invariant: every ``get`` returns exactly the KV of one ``put`` of those tokens (or,
for a prefix read without a manifest of its own, the prefix of one put of a longer
context), or raises a ``KVStoreError``; every context put without a TTL and not deleted
since still reads back; a context put with a TTL reads back until the TTL is near.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import torch

from kvstore.admin.gc import collect_garbage
from kvstore.errors import KVStoreError
from kvstore.kv import KV
from kvstore.store import KVStore
from tests.tools.faults import kv_identical

TTL = 1.0
GC_GRACE = 0.3
COUNTS = ("rounds", "gets", "raised", "puts", "puts_diverging", "puts_failed", "deletes_failed", "mixed_or_wrong",
          "lost_durable_contexts", "expired_too_early")


def random_kv(tokens: int, seed: int, dtype: torch.dtype = torch.float16) -> KV:
    """Two layers of ``[2, tokens, 4]`` random keys and values."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, tokens, 4, generator=g).to(dtype), torch.randn(2, tokens, 4, generator=g).to(dtype))
            for _ in range(2)]


async def run_interleavings(kvs: KVStore, rounds: int, seed: int, *, with_ttl: bool) -> dict[str, int]:
    """``rounds`` rounds of 2-5 concurrent operations on three contexts that are prefixes of
    one another (chunks of ``kvs.chunk_tokens`` = 8 tokens), each put with new random values
    in fp16 or fp32; after each round, with nothing in flight, every durable context and
    every context put with a TTL less than ``0.6 * TTL`` ago is read back. ``gc`` runs with
    a grace period or with none (which also removes the objects of puts in flight)."""
    rng = random.Random(seed)
    stats = dict.fromkeys(COUNTS, 0)
    contexts = {n: list(range(100, 100 + n)) for n in (8, 16, 24)}
    puts: dict[int, list[KV]] = {n: [] for n in contexts}  # every KV put for each context, in order
    durable: set[int] = set()  # contexts whose puts since the last delete were all without TTL
    fresh: dict[int, float] = {}  # contexts put with a TTL this round (alone) -> when the put returned
    touched: dict[int, set[str]] = {}  # this round: context -> {"durable", "ttl", "delete", "failed"}

    async def put(n: int) -> None:
        kv = random_kv(n, rng.randrange(1 << 30), rng.choice([torch.float16, torch.float32]))
        ttl = rng.choice([None, None, TTL]) if with_ttl else None
        stats["puts"] += 1
        stats["puts_diverging"] += any(puts.values())  # every context overlaps every other
        puts[n].append(kv)
        touched.setdefault(n, set()).add("durable" if ttl is None else "ttl")
        try:
            await kvs.put("m", contexts[n], kv, ttl=ttl)
        except KVStoreError:  # e.g. gc without grace removed its temp file: the put makes no claim
            stats["puts_failed"] += 1
            touched[n].add("failed")
            return
        if ttl is not None:
            fresh[n] = time.monotonic()

    async def delete(n: int) -> None:
        touched.setdefault(n, set()).add("delete")
        try:
            await kvs.delete("m", contexts[n])
        except KVStoreError:  # e.g. gc without grace removed its lease's temp file: it may have done part
            stats["deletes_failed"] += 1

    async def get(n: int) -> None:
        stats["gets"] += 1
        try:
            got = await kvs.get("m", contexts[n])
        except KVStoreError:
            stats["raised"] += 1
            return
        candidates = puts[n] + [kv for m in contexts if m > n for kv in puts[m]]  # theirs: their first n tokens
        if not any(kv_identical(got, kv, 0, n) for kv in candidates):
            stats["mixed_or_wrong"] += 1

    async def read_back(n: int, problem: str) -> None:
        try:
            got = await kvs.get("m", contexts[n])
        except KVStoreError:
            stats[problem] += 1
            return
        if not any(kv_identical(got, kv) for kv in puts[n]):
            stats["mixed_or_wrong"] += 1

    for _ in range(rounds):
        stats["rounds"] += 1
        touched.clear()
        fresh.clear()
        ops = []
        for _ in range(rng.randrange(2, 6)):
            n = rng.choice(list(contexts))
            op = rng.choice(["put", "put", "put", "delete", "get", "get", "gc"])
            if op == "put":
                ops.append(put(n))
            elif op == "delete":
                ops.append(delete(n))
            elif op == "gc":
                grace = rng.choice([0.0, GC_GRACE])
                ops.append(collect_garbage(kvs.store, namespace=kvs.keys.namespace, grace=grace))
            else:
                ops.append(get(n))
        await asyncio.gather(*ops)
        for n, what in touched.items():  # concurrent puts and deletes of one context: either may land last
            if what == {"durable"}:
                durable.add(n)
            elif what - {"durable"}:
                durable.discard(n)
        for n in durable:
            await read_back(n, "lost_durable_contexts")
        for n, when in fresh.items():
            if touched[n] == {"ttl"} and n not in durable and time.monotonic() - when < 0.6 * TTL:
                await read_back(n, "expired_too_early")
    return stats


async def run_backend(url: str, rounds: int, seed: int, *, with_ttl: bool, **storage_options: Any) -> dict[str, int]:
    """:func:`run_interleavings` on a fresh namespace of the store at ``url``."""
    namespace = f"consistency-{seed}-{random.Random().getrandbits(32):08x}"
    async with KVStore(url, namespace=namespace, chunk_tokens=8, storage_options=storage_options) as kvs:
        return await run_interleavings(kvs, rounds, seed, with_ttl=with_ttl)


def run_consistency(kinds: tuple[str, ...], rounds: int, seed: int = 0) -> dict[str, Any]:
    """Start each backend's server on loopback and run ``rounds`` interleavings on it
    (blocking). S3 runs without TTLs: it expires only through ``gc``."""
    from tests.tools.loadtest import backend_target
    from tests.tools.servers import ServerUnavailable

    backends: dict[str, Any] = {}
    for kind in kinds:
        started = time.perf_counter()
        try:
            with backend_target(kind) as (url, options):
                backends[kind] = asyncio.run(run_backend(url, rounds, seed, with_ttl=kind != "s3", **options))
        except ServerUnavailable as exc:
            backends[kind] = {"error": str(exc)}
            continue
        backends[kind]["seconds"] = round(time.perf_counter() - started, 1)
    return backends
