"""Kernel bandwidth shaping (needs root, iproute2 and redis-server; skips otherwise)."""

import asyncio
import time

import pytest

from kvstore.backends import open_store
from kvstore.testing.netshape import netshape_available, shaped_redis

pytestmark = pytest.mark.skipif(netshape_available() is not None, reason=str(netshape_available()))


async def _timed_get(store, key):
    started = time.perf_counter()
    value = await store.get(key)
    return value, time.perf_counter() - started


async def test_tbf_limits_downloads_and_changes_mid_run():
    payload = bytes(range(256)) * 8192  # 2 MiB
    with shaped_redis(8e6) as server:  # 64 Mbit/s
        async with open_store(server.url) as store:
            await store.put("blob", payload)
            value, fast = await _timed_get(store, "blob")
            assert value == payload
            await asyncio.to_thread(server.set_rate, 2e6)  # 16 Mbit/s
            value, slow = await _timed_get(store, "blob")
            assert value == payload
    assert 0.15 < fast < 0.6, fast  # ~0.26 s at 8 MB/s
    assert slow > 2.5 * fast and 0.7 < slow < 2.5, (fast, slow)  # ~1.05 s at 2 MB/s
