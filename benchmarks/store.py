"""``kvstore bench store``: put/get throughput of every byte-store backend, against its raw client.

Starts moto, one ``redis-server`` and a 3-node Redis Cluster itself (see
:mod:`tests.tools.servers`), then, for 1 MiB and 16 MiB values, times
``Store.put``/``Store.get`` and, interleaved with them in the same run, the
backend's own client doing the same transfer:

=============  ============================================================
backend        raw client
=============  ============================================================
memory         a dict
local          a plain file write / read (in a temporary directory)
s3             ``s3fs`` ``_pipe_file`` / ``_cat_file`` on the store's own filesystem
redis          redis-py ``SET`` / ``GET`` on the store's own client
redis-cluster  redis-py cluster ``SET`` / ``GET`` on the store's own client
=============  ============================================================

Figures are medians over repetitions, in MB/s (10^6 bytes per second). A
backend whose server cannot start here is reported with an ``error`` entry.

``kvstore_get``, per backend: ``KVStore.get`` of a 2,048-token SmolLM2-shaped context
against its floor (reading every object, all at once, and one xxh3 pass; see
:func:`benchmarks.load.measure_get`), at the raw and int8 levels, fresh and into an
earlier get's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.load import measure_get
from kvstore.backends import Store, open_store
from kvstore.errors import KVStoreError
from tests.tools.servers import (
    ServerUnavailable,
    moto_server,
    redis_cluster,
    redis_server,
)

SIZES = {"1MiB": 1 << 20, "16MiB": 16 << 20}
HEADLINE = "16MiB"

Put = Callable[[str, bytes], Awaitable[Any]]
Get = Callable[[str], Awaitable[Any]]


def run(quick: bool) -> dict[str, Any]:
    """Measure every backend; ``quick`` takes about a minute on two cores."""
    repetitions = {"1MiB": 21, "16MiB": 13, "kvstore_get": 5} if quick else {"1MiB": 61, "16MiB": 41, "kvstore_get": 15}
    backends: dict[str, Any] = {}
    with (
        contextlib.ExitStack() as servers,
        tempfile.TemporaryDirectory(prefix="kvstore-bench-") as tmp,
    ):
        targets: dict[str, tuple[str, dict[str, Any]] | str] = {
            "memory": ("memory://", {}),
            "local": (Path(tmp, "local").as_uri(), {}),
        }
        for name, start in (("s3", _s3), ("redis", _redis), ("redis-cluster", _redis_cluster)):
            try:
                targets[name] = start(servers)
            except ServerUnavailable as exc:
                targets[name] = str(exc)
        for name, target in targets.items():
            if isinstance(target, str):
                backends[name] = {"error": target}
                print(f"{name:14s} skipped: {target}", file=sys.stderr)
                continue
            url, options = target
            try:
                backends[name] = asyncio.run(_measure(name, url, options, repetitions, Path(tmp)))
            except KVStoreError as exc:
                backends[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{name:14s} failed: {exc}", file=sys.stderr)
    return {"unit": "MB/s (1e6 bytes/s), median", "repetitions": repetitions, "backends": backends}


def _s3(servers: contextlib.ExitStack) -> tuple[str, dict[str, Any]]:
    s3 = servers.enter_context(moto_server("kvstore-bench"))
    return f"{s3.url}/bench", s3.storage_options()


def _redis(servers: contextlib.ExitStack) -> tuple[str, dict[str, Any]]:
    return servers.enter_context(redis_server()).url, {"prefix": "bench:"}


def _redis_cluster(servers: contextlib.ExitStack) -> tuple[str, dict[str, Any]]:
    return servers.enter_context(redis_cluster(nodes=3)).url, {"prefix": "bench:"}


def _raw_client(name: str, store: Store, workdir: Path) -> tuple[Put, Get]:
    """The backend's own client, configured exactly as the store's."""
    if name == "memory":
        values: dict[str, bytes] = {}

        async def put(key: str, value: bytes) -> None:
            values[key] = value

        async def get(key: str) -> bytes:
            return values[key]

        return put, get
    if name == "local":
        root = workdir / "raw-files"
        root.mkdir(exist_ok=True)

        async def put(key: str, value: bytes) -> None:
            (root / key).write_bytes(value)

        async def get(key: str) -> bytes:
            return (root / key).read_bytes()

        return put, get
    if name == "s3":
        fs, base = store.fs, f"{store.bucket}/{store.prefix}"  # type: ignore[attr-defined]
        return (lambda key, value: fs._pipe_file(f"{base}/{key}", value)), (
            lambda key: fs._cat_file(f"{base}/{key}")
        )
    client, prefix = store.client, store.prefix  # type: ignore[attr-defined]

    def raw_name(key: str) -> str:  # a hash tag: the kvstore key's slot, so the same cluster node
        return "{" + prefix + key.removeprefix("raw-") + "}:" + key

    return (lambda key, value: client.set(raw_name(key), value)), (
        lambda key: client.get(raw_name(key))
    )


async def _timed(operation: Awaitable[Any], size: int | None = None) -> float:
    started = time.perf_counter()
    result = await operation
    elapsed = time.perf_counter() - started
    if size is not None and (result is None or len(result) != size):
        raise RuntimeError(
            f"read back {None if result is None else len(result)} bytes, expected {size}"
        )
    return elapsed


async def _measure(
    name: str, url: str, options: dict[str, Any], repetitions: dict[str, int], workdir: Path
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    async with open_store(url, **options) as store:
        raw_put, raw_get = _raw_client(name, store, workdir)
        for label, size in SIZES.items():
            value = os.urandom(size)
            key = f"bench-{label}"
            await store.put(key, value)  # warm up connections, scripts and caches
            await raw_put(f"raw-{key}", value)
            times: dict[str, list[float]] = {"put": [], "get": [], "raw_put": [], "raw_get": []}
            for rep in range(repetitions[label]):
                # kvstore and the raw client take turns op by op, each going first every other time
                pairs = [("put", store.put(key, value)), ("raw_put", raw_put(f"raw-{key}", value))]
                for op, call in pairs if rep % 2 == 0 else pairs[::-1]:
                    times[op].append(await _timed(call))
                pairs = [("get", store.get(key)), ("raw_get", raw_get(f"raw-{key}"))]
                for op, call in pairs if rep % 2 == 1 else pairs[::-1]:
                    times[op].append(await _timed(call, size))
            figures[label] = {
                f"{op}_MBps": round(size / 1e6 / statistics.median(t), 1) for op, t in times.items()
            }
            await store.delete(key)
    headline = figures[HEADLINE]
    summary = {
        **headline,
        "get_ratio_vs_raw": round(headline["get_MBps"] / headline["raw_get_MBps"], 3),
        "kvstore_get": await measure_get(url, repetitions["kvstore_get"], **options),
    }
    print(
        f"{name:14s} 16MiB put {headline['put_MBps']:8.1f} (raw {headline['raw_put_MBps']:8.1f})"
        f"  get {headline['get_MBps']:8.1f} (raw {headline['raw_get_MBps']:8.1f}) MB/s",
        file=sys.stderr,
    )
    return {**summary, **figures}
