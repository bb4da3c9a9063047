import asyncio
import uuid

import pytest

from kvstore.backends import RangeRequest, open_store
from kvstore.backends.redis import RedisClusterStore
from kvstore.errors import ConfigError
from kvstore.testing import StoreTests


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}/"


class TestRedisClusterStore(StoreTests):
    @pytest.fixture
    async def store(self, redis_cluster_url):
        async with open_store(redis_cluster_url, prefix=_prefix()) as store:
            yield store
            await asyncio.gather(*[store.delete(key) async for key in store.list()])


async def test_keys_spread_over_every_primary_and_all_are_listed(redis_cluster_url):
    async with open_store(redis_cluster_url, prefix=_prefix()) as store:
        assert isinstance(store, RedisClusterStore)
        keys = {f"k/{i}" for i in range(60)}
        await asyncio.gather(*(store.put(k, k.encode()) for k in keys))
        primaries = store.client.get_primaries()
        assert len(primaries) == 3
        counts = [await store.client.dbsize(target_nodes=node) for node in primaries]
        assert all(count > 0 for count in counts)
        assert {k async for k in store.list("k/")} == keys
        assert (
            await store.get("k/7", RangeRequest(2, 3)) == b"7"
        )  # the Lua script, on the key's node
        await asyncio.gather(*(store.delete(k) for k in keys))


def test_cluster_urls_are_checked():
    with pytest.raises(ConfigError):
        open_store("redis+cluster://127.0.0.1:1/3")
    with pytest.raises(ConfigError):
        open_store("redis+cluster:///nohost")
