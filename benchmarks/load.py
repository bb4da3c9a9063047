"""``kvstore bench load``: how close ``KVStore.get`` comes to its floor on the CPU (issue #24).

A 2,048-token context of SmolLM2's KV shape (30 layers, 3 KV heads x 64, fp16; random
values: the raw and int8 codecs' speed does not depend on them) is stored once per
backend (memory://, a local directory) at the raw and int8 levels, then read back with
``get`` many times. The floor of a get is what no implementation can skip: one xxh3 pass
over the objects it reads (every stored byte is verified) and allocating the output; for
a local store, reading the files (into reused buffers) is added. ``get_vs_floor`` is the
floor's median time over get's (1.0: at the floor), measured interleaved in one run.
``get_vs_floor_with_output`` adds what every get of a new output also pays: writing the
output once into freshly allocated pages (first-touch page faults).
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

LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 30, 3, 64, 2048
LEVELS = ("raw", "int8")


def _context() -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    kv = [tuple(torch.randn(KV_HEADS, TOKENS, HEAD_DIM, generator=g).half() for _ in range(2))
          for _ in range(LAYERS)]
    return list(range(TOKENS)), kv  # type: ignore[return-value]


async def _object_keys(store: KVStore, level: int) -> list[str]:
    """The chunk objects of ``level`` (``<ns>/<model>/chunks/<hash>/<level tag>``)."""
    tag = store.codecs[level].tag
    return [key async for key in store.store.list("kvstore/") if key.endswith(f"/chunks/{key.split('/')[3]}/{tag}")]


async def _measure(url: str, repetitions: int) -> dict[str, Any]:
    tokens, kv = _context()
    result: dict[str, Any] = {}
    async with KVStore(url, levels=list(LEVELS)) as store:
        await store.put("m", tokens, kv)
        for level, name in enumerate(LEVELS):
            keys = await _object_keys(store, level)
            blobs = [await store.store.get(key) for key in keys]
            nbytes = sum(len(b) for b in blobs)
            reads_files = url.startswith("file://")

            async def floor() -> None:
                data = [await store.store.get(key) for key in keys] if reads_files else blobs
                for blob in data:
                    xxhash.xxh3_64_intdigest(blob)
                torch.empty(LAYERS, KV_HEADS, TOKENS, HEAD_DIM, dtype=torch.float16)
                torch.empty(LAYERS, KV_HEADS, TOKENS, HEAD_DIM, dtype=torch.float16)

            async def floor_with_output() -> None:  # and the output written once, into fresh pages
                data = [await store.store.get(key) for key in keys] if reads_files else blobs
                for blob in data:
                    xxhash.xxh3_64_intdigest(blob)
                torch.empty(LAYERS, KV_HEADS, TOKENS, HEAD_DIM, dtype=torch.float16).fill_(0)
                torch.empty(LAYERS, KV_HEADS, TOKENS, HEAD_DIM, dtype=torch.float16).fill_(0)

            async def get() -> None:
                await store.get("m", tokens, level=level)

            times: dict[str, list[float]] = {"floor": [], "floor_with_output": [], "get": []}
            for _ in range(repetitions):  # interleaved: the machine's load hits all alike
                for what, fn in (("floor", floor), ("floor_with_output", floor_with_output), ("get", get)):
                    started = time.perf_counter()
                    await fn()
                    times[what].append(time.perf_counter() - started)
            floor_s, get_s = statistics.median(times["floor"]), statistics.median(times["get"])
            kv_bytes = 2 * LAYERS * KV_HEADS * TOKENS * HEAD_DIM * 2
            result[name] = {
                "stored_bytes": nbytes,
                "get_ms": round(get_s * 1e3, 2),
                "floor_ms": round(floor_s * 1e3, 2),
                "get_vs_floor": round(floor_s / get_s, 3),
                "floor_with_output_ms": round(statistics.median(times["floor_with_output"]) * 1e3, 2),
                "get_vs_floor_with_output": round(statistics.median(times["floor_with_output"]) / get_s, 3),
                "get_GBps_of_kv": round(kv_bytes / get_s / 1e9, 2),
            }
    return result


def run(quick: bool) -> dict[str, Any]:
    """The figures of issue #24's CPU load path (see the module docstring)."""
    repetitions = 7 if quick else 25
    with tempfile.TemporaryDirectory() as root:
        backends = {"memory": asyncio.run(_measure("memory://", repetitions)),
                    "local": asyncio.run(_measure(f"file://{root}/store", repetitions))}
    return {"context_tokens": TOKENS, "shape": [LAYERS, KV_HEADS, HEAD_DIM], "dtype": "float16",
            "repetitions": repetitions, "backends": backends,
            "note": "get_vs_floor = median floor time / median get time, interleaved in one run"}
