"""A bounded-time load test of one :class:`~kvstore.store.KVStore`: many streams, every answer checked.

``concurrency`` coroutines (streams) share one store for ``duration_s`` and
loop over a random mix of operations on small synthetic contexts (a tiny
model shape, ``raw`` codec, 1 to 4 chunks of 16 tokens), so the load is about
operations and round trips, not bytes:

==========  =====================================================================
kind        what it does, and what counts as wrong
==========  =====================================================================
``put``     stores a new context (or, one time in four, stores a live one again,
            racing its readers); the manifest must describe the context
``get``     loads a live context (or a chunk-aligned prefix of it); every tensor
            must equal what was stored, byte for byte (else ``wrong_kv``)
``lookup``  asks for a prefix, or the context plus extra tokens; the answer must
            be exactly the stored chunk-aligned prefix
``miss``    asks for a live context's tokens under another model: must raise
            :class:`~kvstore.errors.ContextNotFoundError`, never return KV
``delete``  deletes a live context no other stream is using; must find it, and
            ``lookup`` must then report nothing
==========  =====================================================================

Contexts never share a prefix (random token ids), and a context is deleted only
while no stream reads or writes it, so every error reported is the library's
or the backend's. At the end the namespace is checked with
:func:`~kvstore.admin.verify_store` and emptied.

:func:`run_load_test` runs against a store URL; :func:`run_load_tests` starts
Redis and S3 (moto) on loopback with :mod:`tests.tools.servers` and runs
it against each, for ``kvstore bench``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore.admin import verify_store
from kvstore.errors import ContextNotFoundError
from kvstore.kv import KV
from kvstore.store import KVStore

MODEL = "loadtest/tiny@v1"
OTHER_MODEL = "loadtest/other@v1"
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
CHUNK_TOKENS = 16
MAX_CHUNKS = 4
VOCAB = 50_000
KINDS = ("put", "get", "lookup", "miss", "delete")
WEIGHTS = (0.2, 0.35, 0.25, 0.1, 0.1)
OP_TIMEOUT_S = 60.0
MAX_EXAMPLES = 5
SAMPLE_EVERY_S = 0.25


@dataclass(eq=False)
class _Context:
    """A stored context and the KV it was stored with; ``users`` counts streams using it."""

    tokens: np.ndarray
    kv: KV
    users: int = 0


@dataclass
class _State:
    """What the streams share: the live contexts, counters and latencies."""

    live: list[_Context] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    latency_ms: dict[str, array.array] = field(default_factory=lambda: {k: array.array("d") for k in KINDS})
    wrong_kv: int = 0
    examples: list[str] = field(default_factory=list)

    def error(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{kind}: {what}")


class _Wrong(Exception):
    """An answer that came back but is not what was stored."""


def _rss_mb() -> float | None:
    """This process's resident set size in MB (Linux), else ``None``."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


def _new_context(rng: random.Random) -> _Context:
    n = rng.randint(1, MAX_CHUNKS * CHUNK_TOKENS)
    seed = rng.getrandbits(63)
    tokens = np.random.default_rng(seed).integers(0, VOCAB, n, dtype=np.int32)
    g = torch.Generator().manual_seed(seed)
    kv = [
        (torch.randn(KV_HEADS, n, HEAD_DIM, generator=g).half(), torch.randn(KV_HEADS, n, HEAD_DIM, generator=g).half())
        for _ in range(LAYERS)
    ]
    return _Context(tokens, kv)


def _expected_lookup(stored: int, asked: int, extended: bool) -> int:
    """What ``lookup`` must answer for the first ``asked`` tokens of a stored context
    of ``stored`` tokens (``extended``: followed by tokens never stored)."""
    if not extended and asked == stored:
        return stored
    return min(asked, stored) // CHUNK_TOKENS * CHUNK_TOKENS


def _check_kv(got: KV, want: KV, tokens: int) -> None:
    if len(got) != len(want):
        raise _Wrong(f"{len(got)} layers returned, {len(want)} stored")
    for layer, ((gk, gv), (wk, wv)) in enumerate(zip(got, want)):
        for name, g, w in (("key", gk, wk[:, :tokens]), ("value", gv, wv[:, :tokens])):
            if g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g.view(torch.int16), w.view(torch.int16)):
                raise _Wrong(f"layer {layer} {name}: returned {g.dtype}{list(g.shape)} differs from stored")


@contextlib.contextmanager
def _using(ctx: _Context) -> Iterator[_Context]:
    ctx.users += 1
    try:
        yield ctx
    finally:
        ctx.users -= 1


async def _op(kvs: KVStore, state: _State, kind: str, rng: random.Random) -> None:
    """Run one operation of ``kind``, time its store call and check its answer."""
    timed: dict[str, float] = {}

    async def call(awaitable: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        try:
            return await awaitable
        finally:
            timed["ms"] = (time.perf_counter() - started) * 1e3

    try:
        async with asyncio.timeout(OP_TIMEOUT_S):
            await _OPS[kind](kvs, state, rng, call)
    except _Wrong as exc:
        if kind in ("get", "miss"):
            state.wrong_kv += 1
        state.error(kind, str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, recorded and counted
        state.error(kind, repr(exc))
    state.ops[kind] += 1
    if "ms" in timed:
        state.latency_ms[kind].append(timed["ms"])


Call = Callable[[Awaitable[Any]], Awaitable[Any]]


async def _put(kvs: KVStore, state: _State, rng: random.Random, call: Call) -> None:
    if state.live and rng.random() < 0.25:  # store a live context again, racing its readers
        with _using(rng.choice(state.live)) as ctx:
            manifest = await call(kvs.put(MODEL, ctx.tokens, ctx.kv))
    else:
        ctx = _new_context(rng)
        manifest = await call(kvs.put(MODEL, ctx.tokens, ctx.kv))
        state.live.append(ctx)
    if manifest.num_tokens != len(ctx.tokens) or manifest.model_id != MODEL:
        raise _Wrong(f"put returned a manifest of {manifest.num_tokens} tokens of {manifest.model_id!r}")


async def _get(kvs: KVStore, state: _State, rng: random.Random, call: Call) -> None:
    with _using(rng.choice(state.live)) as ctx:
        n = len(ctx.tokens)
        if n > CHUNK_TOKENS and rng.random() < 0.3:  # a chunk-aligned prefix: no manifest, chunks only
            n = rng.randint(1, (n - 1) // CHUNK_TOKENS) * CHUNK_TOKENS
        got = await call(kvs.get(MODEL, ctx.tokens[:n]))
        _check_kv(got, ctx.kv, n)


async def _lookup(kvs: KVStore, state: _State, rng: random.Random, call: Call) -> None:
    with _using(rng.choice(state.live)) as ctx:
        stored = len(ctx.tokens)
        extended = rng.random() < 0.3
        if extended:
            extra = np.random.default_rng(rng.getrandbits(63)).integers(0, VOCAB, rng.randint(1, 40), dtype=np.int32)
            tokens, asked = np.concatenate([ctx.tokens, extra]), stored
        else:
            asked = rng.randint(1, stored)
            tokens = ctx.tokens[:asked]
        found = await call(kvs.lookup(MODEL, tokens))
        want = _expected_lookup(stored, asked, extended)
        if found != want:
            raise _Wrong(f"lookup of {len(tokens)} tokens ({stored} stored) answered {found}, expected {want}")


async def _miss(kvs: KVStore, state: _State, rng: random.Random, call: Call) -> None:
    with _using(rng.choice(state.live)) as ctx:
        try:
            got = await call(kvs.get(OTHER_MODEL, ctx.tokens))
        except ContextNotFoundError:
            return
        raise _Wrong(f"another model's request for {len(ctx.tokens)} tokens returned KV of {len(got)} layers")


async def _delete(kvs: KVStore, state: _State, rng: random.Random, call: Call) -> None:
    idle = [i for i, c in enumerate(state.live) if c.users == 0]
    if not idle:  # every live context is in use (rare: _choose checked a moment ago)
        return
    ctx = state.live.pop(rng.choice(idle))  # gone before the first await: no stream picks it again
    if not await call(kvs.delete(MODEL, ctx.tokens)):
        raise _Wrong("delete found no manifest for a stored context")
    if (left := await kvs.lookup(MODEL, ctx.tokens)) != 0:
        raise _Wrong(f"after delete, lookup still finds {left} tokens")


_OPS: dict[str, Callable[[KVStore, _State, random.Random, Call], Awaitable[None]]] = {
    "put": _put, "get": _get, "lookup": _lookup, "miss": _miss, "delete": _delete,
}


def _choose(state: _State, rng: random.Random, low: int, cap: int) -> str:
    if len(state.live) < low:
        return "put"
    kind = "delete" if len(state.live) >= cap else rng.choices(KINDS, WEIGHTS)[0]
    if kind == "delete" and all(c.users for c in state.live):
        return "lookup"
    return kind


def _percentiles(values: array.array) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.frombuffer(values, dtype=np.float64)
    p50, p99 = np.percentile(a, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3), "max_ms": round(float(a.max()), 3)}


async def run_load_test(
    store_url: str,
    concurrency: int = 64,
    duration_s: float = 60.0,
    seed: int = 0,
    **store_options: Any,
) -> dict[str, Any]:
    """Run ``concurrency`` streams of mixed operations against one store for ``duration_s``.

    ``store_options`` are the backend's storage options (``open_store``). Latencies
    cover the store call alone; ``rss_mb_start`` is sampled after a warm-up (a fifth
    of the run, at most 10 s), ``rss_growth_mb`` is end minus start. Returns a
    JSON-able dict; ``errors`` counts every failed or wrong answer (``wrong_kv``
    those that returned KV that was not stored for the request).
    """
    if concurrency < 1 or duration_s <= 0:
        raise ValueError("concurrency must be >= 1 and duration_s > 0")
    namespace = f"loadtest-{uuid.uuid4().hex[:12]}"
    kvs = KVStore(store_url, chunk_tokens=CHUNK_TOKENS, levels=("raw",), namespace=namespace,
                  storage_options=store_options)
    state = _State()
    low, cap = max(1, concurrency // 2), 2 * concurrency + 8
    rss_before = _rss_mb()
    samples: list[tuple[float, float]] = []
    warmup_s = min(10.0, duration_s / 5)
    async with kvs:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + duration_s

        async def stream(i: int) -> None:
            rng = random.Random(f"{seed}-{i}")
            while loop.time() < deadline:
                await _op(kvs, state, _choose(state, rng, low, cap), rng)

        async def sample_rss() -> None:
            while True:
                if (rss := _rss_mb()) is not None:
                    samples.append((loop.time() - started, rss))
                await asyncio.sleep(SAMPLE_EVERY_S)

        sampler = asyncio.create_task(sample_rss())
        try:
            await asyncio.gather(*(stream(i) for i in range(concurrency)))
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        elapsed = loop.time() - started
        if (rss := _rss_mb()) is not None:
            samples.append((elapsed, rss))
        report = await verify_store(kvs.store, f"{namespace}/")
        for ctx in state.live:  # leave the store as found
            await kvs.delete(MODEL, ctx.tokens)
        leftover = len([k async for k in kvs.store.list(f"{namespace}/")])

    ops, errors = sum(state.ops.values()), sum(state.errors.values())
    everything = array.array("d")
    for values in state.latency_ms.values():
        everything.extend(values)
    after_warmup = [rss for t, rss in samples if t >= warmup_s] or [rss for _, rss in samples]
    rss_start = after_warmup[0] if after_warmup else None
    rss_end = samples[-1][1] if samples else None
    return {
        "store": kvs.store.url if hasattr(kvs.store, "url") else store_url,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "elapsed_s": round(elapsed, 3),
        "ops": ops,
        "ops_per_s": round(ops / elapsed, 1),
        "errors": errors,
        "wrong_kv": state.wrong_kv,
        "error_examples": state.examples,
        **_percentiles(everything),
        "by_kind": {
            k: {"ops": state.ops[k], "errors": state.errors[k], **_percentiles(state.latency_ms[k])} for k in KINDS
        },
        "contexts_live_at_end": len(state.live),
        "verify_ok": report.ok,
        "verify_problems": [p.to_text() for p in report.problems[:MAX_EXAMPLES]],
        "leftover_objects": leftover,
        "warmup_s": warmup_s,
        "rss_mb_before": _round(rss_before),
        "rss_mb_start": _round(rss_start),
        "rss_mb_end": _round(rss_end),
        "rss_mb_peak": _round(max((rss for _, rss in samples), default=None)),
        "rss_growth_mb": _round(None if rss_start is None or rss_end is None else rss_end - rss_start),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@contextlib.contextmanager
def backend_target(kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Start the server behind ``kind`` and yield ``(url, storage options)``."""
    import tempfile

    from tests.tools.servers import moto_server, redis_cluster, redis_server

    if kind == "memory":
        yield "memory://", {}
    elif kind == "local":
        with tempfile.TemporaryDirectory(prefix="kvstore-load-") as tmp:
            yield Path(tmp).as_uri(), {}
    elif kind == "redis":
        with redis_server() as server:
            yield server.url, {}
    elif kind == "redis-cluster":
        with redis_cluster(nodes=3) as cluster:
            yield cluster.url, {}
    elif kind == "s3":
        with moto_server("kvstore-load") as s3:
            yield f"{s3.url}/load", s3.storage_options()
    else:
        raise ValueError(f"unknown load-test target {kind!r}: memory, local, redis, redis-cluster or s3")


def run_load_tests(
    kinds: tuple[str, ...] = ("redis", "s3"),
    concurrency: int = 64,
    duration_s: float = 60.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Start each backend's server on loopback and load-test it (blocking; one event loop each).

    Returns the totals over the backends that ran (``ops``, ``errors``,
    ``wrong_kv``, the worst ``p99_ms``) and each backend's full result under
    ``backends``; a backend whose server cannot start gets an ``error`` entry.
    """
    from tests.tools.servers import ServerUnavailable

    backends: dict[str, Any] = {}
    for kind in kinds:
        try:
            with backend_target(kind) as (url, options):
                backends[kind] = asyncio.run(run_load_test(url, concurrency, duration_s, seed, **options))
        except ServerUnavailable as exc:
            backends[kind] = {"error": str(exc)}
    ran = [r for r in backends.values() if "error" not in r]
    p99s = [r["p99_ms"] for r in ran if r["p99_ms"] is not None]
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "ops": sum(r["ops"] for r in ran),
        "errors": sum(r["errors"] for r in ran),
        "wrong_kv": sum(r["wrong_kv"] for r in ran),
        "p99_ms": max(p99s) if p99s else None,
        "backends": backends,
    }
