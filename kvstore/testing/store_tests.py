"""The backend contract suite: one set of tests every byte-store backend must pass.

A backend's test module subclasses :class:`StoreTests` and provides an async
``store`` fixture yielding a fresh, empty store (for shared servers, one under
a prefix unique to the test). The test ids then read the same for every
backend, e.g. ``TestRedisStore::test_round_trip[64MiB]``.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from kvstore.backends.base import RangeRequest, Store, SuffixRequest
from kvstore.errors import ConfigError, InvalidKeyError

SIZES = {"0B": 0, "1B": 1, "1KiB": 1 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20}


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def _keys(store: Store, prefix: str = "") -> set[str]:
    return {key async for key in store.list(prefix)}


class StoreTests:
    """Subclass and define an async ``store`` fixture."""

    #: seconds a TTL'd value is given before the expiry test checks it has gone
    ttl_seconds = 2.5

    async def test_missing_key_reads_none(self, store: Store) -> None:
        assert await store.get("absent") is None
        assert await store.get("absent/deeper", RangeRequest(0, 10)) is None
        assert not await store.exists("absent")

    @pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
    async def test_round_trip(self, store: Store, size: int) -> None:
        value = _payload(size, seed=size)
        assert await store.put(f"obj/{size}", value) is True
        got = await store.get(f"obj/{size}")
        assert isinstance(got, bytes)
        assert len(got) == size
        assert got == value
        assert await store.exists(f"obj/{size}")

    async def test_put_accepts_bytes_like(self, store: Store) -> None:
        value = _payload(4096, seed=1)
        await store.put("ba", bytearray(value))
        await store.put("mv", memoryview(value)[100:200])
        assert await store.get("ba") == value
        assert await store.get("mv") == value[100:200]

    async def test_overwrite_replaces_value(self, store: Store) -> None:
        await store.put("k", b"first value, longer")
        await store.put("k", b"second")
        assert await store.get("k") == b"second"

    async def test_byte_ranges(self, store: Store) -> None:
        value = _payload(10_000, seed=2)
        await store.put("r", value)
        cases = [
            (RangeRequest(0, 1), value[0:1]),
            (RangeRequest(100, 4_196), value[100:4_196]),
            (RangeRequest(9_990), value[9_990:]),
            (RangeRequest(9_000, 20_000), value[9_000:]),  # clipped at the end
            (RangeRequest(5, 5), b""),
            (SuffixRequest(16), value[-16:]),
            (SuffixRequest(20_000), value),
        ]
        for request, expected in cases:
            assert await store.get("r", request) == expected, request

    async def test_get_many_reads_each_request_in_order(self, store: Store) -> None:
        values = {f"many/{i}": _payload(3_000 + 700 * i, seed=40 + i) for i in range(300)}
        for key, value in values.items():
            await store.put(key, value)
        requests = [(key, None if i % 3 == 0 else RangeRequest(i, 2 * i + 10) if i % 3 == 1 else SuffixRequest(i))
                    for i, key in enumerate(values)]
        requests.insert(7, ("many/absent", RangeRequest(0, 8)))
        requests.insert(9, ("many/also-absent", None))
        got = await store.get_many(requests)
        assert len(got) == len(requests)
        for (key, byte_range), reply in zip(requests, got):
            assert reply == await store.get(key, byte_range), (key, byte_range)
        assert got[7] is None and got[9] is None and got[0] == values["many/0"]
        assert await store.get_many([]) == []

    async def test_range_past_end_is_empty(self, store: Store) -> None:
        await store.put("short", b"abc")
        assert await store.get("short", RangeRequest(10, 20)) == b""

    def test_invalid_ranges_rejected(self) -> None:
        for bad in (lambda: RangeRequest(-1), lambda: RangeRequest(5, 2), lambda: SuffixRequest(-3)):
            with pytest.raises(ConfigError):
                bad()

    async def test_create_only(self, store: Store) -> None:
        assert await store.put("once", b"A", create_only=True) is True
        assert await store.put("once", b"B", create_only=True) is False
        assert await store.get("once") == b"A"

    async def test_create_only_race_has_one_winner(self, store: Store) -> None:
        values = [_payload(50_000, seed=100 + i) for i in range(16)]
        results = await asyncio.gather(
            *(store.put("contended", v, create_only=True) for v in values)
        )
        assert results.count(True) == 1
        assert await store.get("contended") == values[results.index(True)]

    async def test_ttl_expiry(self, store: Store) -> None:
        await store.put("ephemeral", b"soon gone", ttl=self.ttl_seconds)
        await store.put("durable", b"stays")
        assert await store.get("ephemeral") == b"soon gone"
        assert "ephemeral" in await _keys(store)
        await asyncio.sleep(self.ttl_seconds + 0.6)
        assert await store.get("ephemeral") is None
        assert await store.get("ephemeral", RangeRequest(0, 2)) is None
        assert not await store.exists("ephemeral")
        assert await _keys(store) == {"durable"}
        assert await store.put("ephemeral", b"again", create_only=True) is True

    async def test_overwrite_without_ttl_clears_expiry(self, store: Store) -> None:
        await store.put("k", b"v1", ttl=self.ttl_seconds)
        await store.put("k", b"v2")
        await asyncio.sleep(self.ttl_seconds + 0.6)
        assert await store.get("k") == b"v2"

    async def test_keep_only_ever_lengthens_a_life(self, store: Store) -> None:
        t = self.ttl_seconds
        await store.put("short", b"a", ttl=t)
        await store.put("made-durable", b"b", ttl=t)
        await store.put("durable", b"c")
        await store.put("lengthened", b"d", ttl=t)
        assert await store.keep("short", 60 * t) is True and await store.keep("short", t / 10) is True
        assert await store.keep("made-durable", None) is True
        assert await store.keep("durable", t) is True  # no expiry stays no expiry
        assert await store.keep("lengthened", 3 * t) is True
        assert await store.keep("absent", t) is False and await store.keep("absent", None) is False
        await asyncio.sleep(t + 0.6)
        assert [await store.get(k) for k in ("short", "made-durable", "durable", "lengthened")] == [b"a", b"b", b"c", b"d"]
        await store.put("shortened-not", b"e", ttl=60 * t)
        await store.keep("shortened-not", t / 10)  # never shortens
        await asyncio.sleep(0.3)
        assert await store.get("shortened-not") == b"e"

    async def test_invalid_ttl_rejected(self, store: Store) -> None:
        for ttl in (0, -1, float("nan"), "10"):
            with pytest.raises(ConfigError):
                await store.put("k", b"v", ttl=ttl)  # type: ignore[arg-type]

    async def test_list_by_prefix(self, store: Store) -> None:
        for key in ("a/1", "a/2", "a/sub/3", "ab/1", "b/1"):
            await store.put(key, key.encode())
        assert await _keys(store, "a/") == {"a/1", "a/2", "a/sub/3"}
        assert await _keys(store, "a") == {"a/1", "a/2", "a/sub/3", "ab/1"}
        assert await _keys(store, "zzz/") == set()
        assert await _keys(store) == {"a/1", "a/2", "a/sub/3", "ab/1", "b/1"}

    async def test_list_many_keys(self, store: Store) -> None:
        keys = {f"many/{i:05d}" for i in range(1_200)}
        await asyncio.gather(*(store.put(k, b"x") for k in keys))
        assert await _keys(store, "many/") == keys

    async def test_delete(self, store: Store) -> None:
        await store.put("d/1", b"x")
        await store.put("d/2", b"y")
        await store.delete("d/1")
        await store.delete("d/never-existed")
        assert await store.get("d/1") is None
        assert await _keys(store, "d/") == {"d/2"}

    async def test_invalid_keys_rejected(self, store: Store) -> None:
        for key in ("", "/abs", "a//b", "../escape", "a/../b", "a/./b", "trailing/", "glob*", "sp ace", "a\\b", "\x00"):
            with pytest.raises(InvalidKeyError):
                await store.put(key, b"x")
            with pytest.raises(InvalidKeyError):
                await store.get(key)

    async def test_concurrent_coroutines(self, store: Store) -> None:
        rng = random.Random(7)
        values = {f"c/{i}": os.urandom(rng.randrange(0, 300_000)) for i in range(96)}

        async def round_trip(key: str, value: bytes) -> bool:
            await store.put(key, value)
            head = await store.get(key, RangeRequest(0, 64))
            whole = await store.get(key)
            return head == value[:64] and whole == value

        results = await asyncio.gather(*(round_trip(k, v) for k, v in values.items()))
        assert all(results)
        assert await _keys(store, "c/") == set(values)
