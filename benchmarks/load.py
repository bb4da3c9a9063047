"""``kvstore bench load``: how close ``KVStore.get`` comes to its floor on the CPU (issue #24).

A 2,048-token context of SmolLM2's KV shape (30 layers, 3 KV heads x 64, fp16; random
values: the raw and int8 codecs' speed does not depend on them) is stored once per
backend (memory://, a local directory) at the raw and int8 levels, then read back with
``get`` many times. The floor of a get is what no implementation can skip: one xxh3 pass
over the objects it reads (every stored byte is verified) and allocating the output; for
a local store, reading the files (into reused buffers) is added. ``get_vs_floor`` is the
floor's median time over get's (1.0: at the floor), measured interleaved in one run.
``get_vs_floor_with_output`` adds what every get of a new output also pays: writing the
output once into freshly allocated pages (first-touch page faults). ``get_into``: the same
get written into the output of an earlier one (``get(..., out=)``), which skips that cost.

``per_token_series``: put and get time per token (µs) for contexts of 2K and 8K tokens
(and 32K in the full run), each stored into an empty store, on both backends.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from typing import Any

import torch
import xxhash

from kvstore import KVStore
from kvstore.backends import open_store

LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 30, 3, 64, 2048
LEVELS = ("raw", "int8")


def _context(tokens: int = TOKENS) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    kv = [tuple(torch.randn(KV_HEADS, tokens, HEAD_DIM, generator=g).half() for _ in range(2))
          for _ in range(LAYERS)]
    return list(range(tokens)), kv  # type: ignore[return-value]


async def _object_keys(store: KVStore, level: int) -> list[str]:
    """The chunk objects of ``level`` (``<ns>/<model>/chunks/<hash>/<level tag>``)."""
    tag = store.codecs[level].tag
    return [key async for key in store.store.list("kvstore/") if key.endswith(f"/chunks/{key.split('/')[3]}/{tag}")]


async def measure_get(url: str, repetitions: int, **options: Any) -> dict[str, Any]:
    """``KVStore.get`` against its floor on the store at ``url`` (opened with ``options``), at
    the raw and int8 levels. The floor reads every object (all at once, ``Store.get_many``:
    one pipeline on Redis) except on memory://, where they are at hand, and hashes each."""
    tokens, kv = _context()
    result: dict[str, Any] = {}
    async with KVStore(open_store(url, **options), levels=list(LEVELS)) as store:
        await store.put("m", tokens, kv)
        for level, name in enumerate(LEVELS):
            keys = await _object_keys(store, level)
            blobs = [await store.store.get(key) for key in keys]
            nbytes = sum(len(b) for b in blobs)
            reads = not url.startswith("memory://")

            async def floor(write_output: bool = False) -> None:
                data = await store.store.get_many([(key, None) for key in keys]) if reads else blobs
                for blob in data:
                    xxhash.xxh3_64_intdigest(blob)
                for _ in range(2):  # keys and values; written once into fresh pages, with write_output
                    out = torch.empty(LAYERS, KV_HEADS, TOKENS, HEAD_DIM, dtype=torch.float16)
                    if write_output:
                        out.fill_(0)

            async def floor_with_output() -> None:
                await floor(write_output=True)

            async def get() -> None:
                await store.get("m", tokens, level=level)

            reused = await store.get("m", tokens, level=level)

            async def get_into() -> None:  # into an earlier get's output, as a server reusing it does
                await store.get("m", tokens, level=level, out=reused)

            times: dict[str, list[float]] = {"floor": [], "floor_with_output": [], "get": [], "get_into": []}
            for _ in range(repetitions):  # interleaved: the machine's load hits all alike
                for what, fn in (("floor", floor), ("floor_with_output", floor_with_output), ("get", get),
                                 ("get_into", get_into)):
                    started = time.perf_counter()
                    await fn()
                    times[what].append(time.perf_counter() - started)
            floor_s, get_s = statistics.median(times["floor"]), statistics.median(times["get"])
            into_s = statistics.median(times["get_into"])
            kv_bytes = 2 * LAYERS * KV_HEADS * TOKENS * HEAD_DIM * 2
            result[name] = {
                "stored_bytes": nbytes,
                "get_ms": round(get_s * 1e3, 2),
                "floor_ms": round(floor_s * 1e3, 2),
                "get_vs_floor": round(floor_s / get_s, 3),
                "floor_with_output_ms": round(statistics.median(times["floor_with_output"]) * 1e3, 2),
                "get_vs_floor_with_output": round(statistics.median(times["floor_with_output"]) / get_s, 3),
                "get_GBps_of_kv": round(kv_bytes / get_s / 1e9, 2),
                "get_into_ms": round(into_s * 1e3, 2),
                "get_into_vs_floor": round(floor_s / into_s, 3),
                "get_into_GBps_of_kv": round(kv_bytes / into_s / 1e9, 2),
            }
    return result


async def _per_token(url: str, sizes: tuple[int, ...], repetitions: int) -> dict[str, dict[str, float]]:
    """Put and get time per token (µs, median of ``repetitions``; get at the raw and int8
    levels) for contexts of each size, each put into an empty store: flat means no cost grows
    faster than the context."""
    series: dict[str, dict[str, float]] = {}
    for n in sizes:
        tokens, kv = _context(n)
        puts, gets = [], {name: [] for name in LEVELS}
        for r in range(repetitions):
            async with KVStore(f"{url}/{n}-{r}" if url.startswith("file://") else url, levels=list(LEVELS)) as store:
                started = time.perf_counter()
                await store.put(f"m{r}", tokens, kv)
                puts.append(time.perf_counter() - started)
                for level, name in enumerate(LEVELS):
                    started = time.perf_counter()
                    await store.get(f"m{r}", tokens, level=level)
                    gets[name].append(time.perf_counter() - started)
        series[str(n)] = {"put_us_per_token": round(statistics.median(puts) / n * 1e6, 3),
                          **{f"get_{name}_us_per_token": round(statistics.median(t) / n * 1e6, 3)
                             for name, t in gets.items()}}
        del kv
    return series


def run(quick: bool) -> dict[str, Any]:
    """The figures of issue #24's CPU load path (see the module docstring)."""
    repetitions = 7 if quick else 25
    with tempfile.TemporaryDirectory() as root:
        backends = {"memory": asyncio.run(measure_get("memory://", repetitions)),
                    "local": asyncio.run(measure_get(f"file://{root}/store", repetitions))}
        sizes = (2048, 8192) if quick else (2048, 8192, 32768)
        per_token = {"memory": asyncio.run(_per_token("memory://", sizes, 3)),
                     "local": asyncio.run(_per_token(f"file://{root}/series", sizes, 3))}
    return {"context_tokens": TOKENS, "shape": [LAYERS, KV_HEADS, HEAD_DIM], "dtype": "float16",
            "repetitions": repetitions, "backends": backends, "per_token_series": per_token,
            "note": "get_vs_floor = median floor time / median get time, interleaved in one run"}
