import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from kvstore.backends import RangeRequest, RetryPolicy, SuffixRequest, open_store
from kvstore.backends.redis import RedisStore
from kvstore.errors import BackendError, ConfigError, TransientBackendError
from kvstore.testing import StoreTests


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}/"


async def _clear(store) -> None:
    await asyncio.gather(*[store.delete(key) async for key in store.list()])


class TestRedisStore(StoreTests):
    @pytest.fixture
    async def store(self, redis_url):
        async with open_store(redis_url, prefix=_prefix()) as store:
            yield store
            await _clear(store)


async def test_db_number_from_url(redis_url):
    base = redis_url.rsplit("/", 1)[0]
    async with (
        open_store(f"{base}/3", prefix=_prefix()) as db3,
        open_store(f"{base}/4", prefix=db3.prefix) as db4,
    ):
        assert isinstance(db3, RedisStore)
        await db3.put("k", b"in db 3")
        assert await db4.get("k") is None
        raw = aioredis.Redis.from_url(f"{base}/3")
        try:
            assert await raw.get(f"{db3.prefix}k") == b"in db 3"
        finally:
            await raw.aclose()
        await db3.delete("k")


async def test_prefix_isolation(redis_url):
    async with (
        open_store(redis_url, prefix="iso-a") as a,
        open_store(redis_url, prefix="iso-ab") as ab,
        open_store(redis_url) as root,
    ):
        assert a.prefix == "iso-a/"
        await a.put("x/1", b"a")
        await ab.put("x/1", b"ab")
        assert await a.get("x/1") == b"a" and await ab.get("x/1") == b"ab"
        assert {k async for k in a.list()} == {"x/1"}
        assert {k async for k in ab.list()} == {"x/1"}
        assert await root.get("iso-a/x/1") == b"a"  # stored as <prefix><key>
        await a.delete("x/1")
        assert await ab.get("x/1") == b"ab"
        await ab.delete("x/1")


async def test_glob_characters_in_prefix_are_escaped(redis_url):
    async with (
        open_store(redis_url, prefix="glob*[x]?:") as star,
        open_store(redis_url, prefix="globZxQ:") as other,
    ):
        await star.put("k", b"1")
        await other.put("k", b"2")
        assert {k async for k in star.list()} == {"k"}
        await star.delete("k")
        await other.delete("k")


async def test_empty_value_and_ranges_tell_missing_from_empty(redis_url):
    async with open_store(redis_url, prefix=_prefix()) as store:
        await store.put("empty", b"")
        assert await store.get("empty") == b""
        for request in (
            RangeRequest(0, 10),
            RangeRequest(3),
            RangeRequest(0, 0),
            SuffixRequest(5),
            SuffixRequest(0),
        ):
            assert await store.get("empty", request) == b"", request
            assert await store.get("missing", request) is None, request
        await store.put("v", b"abcdef")
        assert await store.get("v", SuffixRequest(0)) == b""
        assert await store.get("v", RangeRequest(2**40, 2**41)) == b""
        await store.delete("empty")
        await store.delete("v")


async def test_memoryview_of_wider_items_is_sent_as_bytes(redis_url):
    import array

    values = array.array("I", range(1000))
    async with open_store(redis_url, prefix=_prefix()) as store:
        await store.put("mv", memoryview(values))
        assert await store.get("mv") == values.tobytes()
        await store.delete("mv")


async def test_killed_server_is_transient_after_bounded_retries_then_reconnects(own_redis_server):
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, deadline=5)
    async with open_store(own_redis_server.url, retry=policy, socket_timeout=2) as store:
        await store.put("k", b"before")
        own_redis_server.kill()
        started = time.monotonic()
        with pytest.raises(TransientBackendError):
            await store.get("k")
        with pytest.raises(TransientBackendError):
            await store.put("k", b"during")
        assert time.monotonic() - started < 5
        own_redis_server.start()  # same port, empty (no persistence)
        assert await store.get("k") is None
        await store.put("k", b"after")
        assert (
            await store.get("k", RangeRequest(0, 3)) == b"aft"
        )  # the range script is loaded again


async def test_close_releases_the_pool(redis_url):
    store = open_store(redis_url, prefix=_prefix(), max_connections=4)
    await asyncio.gather(*(store.exists(f"k{i}") for i in range(20)))
    assert len(store.pool._in_use_connections) == 0
    await store.close()
    assert all(not c.is_connected for c in store.pool._available_connections)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="unknown options"):
        open_store("redis://127.0.0.1:1/0", passwd="x")
    with pytest.raises(ConfigError):
        open_store("redis://127.0.0.1:1/0", max_connections=0)
    with pytest.raises(ConfigError):
        open_store("redis://127.0.0.1:1/notadb")
    store = open_store("redis://user:secret@127.0.0.1:1/2", max_connections=7)
    assert store.url == "redis://user@127.0.0.1:1/2" and "secret" not in repr(store)
    assert store.pool.max_connections == 7


async def test_wrong_type_is_a_backend_error(redis_url):
    async with open_store(redis_url, prefix=_prefix()) as store:
        await store.client.lpush(f"{store.prefix}list", b"x")
        with pytest.raises(BackendError) as info:
            await store.get("list")
        assert not isinstance(info.value, TransientBackendError)
        await store.client.delete(f"{store.prefix}list")


async def test_retries_are_ours_alone():
    connections = 0

    def accept(reader, writer):
        nonlocal connections
        connections += 1
        writer.transport.abort()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        policy = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)
        async with open_store(f"redis://127.0.0.1:{port}/0", retry=policy) as store:
            with pytest.raises(TransientBackendError):
                await store.get("k")
        assert connections == 4
    finally:
        server.close()
        await server.wait_closed()
