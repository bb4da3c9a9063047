"""How long ``put``'s check of its listed objects takes, batched (``Store.get_many``: one
Redis pipeline) against one ranged read per object, on a local ``redis-server`` and on
memory://, for a 32K-token SmolLM2-shaped context at the raw and int8 levels (256 objects).

Run from a checkout: ``PYTHONPATH=. python -m benchmarks.tools.put_check``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

from benchmarks.load import _context
from kvstore import KVStore
from tests.tools.servers import redis_server

TOKENS, REPETITIONS = 32768, 15


async def _measure(url: str) -> dict[str, float]:
    tokens, kv = _context(TOKENS)
    async with KVStore(url, levels=["raw", "int8"]) as store:
        manifest = await store.put("m", tokens, kv)
        del kv
        listed = [obj for chunk in manifest.chunks for obj in chunk.objects]

        async def one_by_one() -> None:  # the check before get_many: a ranged read per object
            flags = await store._bounded([lambda obj=obj: store._same_object(obj.key, obj) for obj in listed])
            assert all(flags)

        async def batched() -> None:
            assert await store._changed_objects(manifest) == []

        times: dict[str, list[float]] = {"one_by_one": [], "batched": []}
        for _ in range(REPETITIONS):
            for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
                started = time.perf_counter()
                await fn()
                times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        return {"objects": len(listed), **{f"{name}_ms": round(ms, 2) for name, ms in medians.items()},
                "speedup": round(medians["one_by_one"] / medians["batched"], 2)}


def main() -> None:
    with redis_server() as server:
        result = {"redis": asyncio.run(_measure(server.url)), "memory": asyncio.run(_measure("memory://"))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
