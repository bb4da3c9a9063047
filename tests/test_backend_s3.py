import asyncio
import time
import uuid

import pytest
import s3fs

from kvstore.backends import RetryPolicy, open_store
from kvstore.backends.fsspec import EXPIRES_META, FsspecStore
from kvstore.errors import BackendError, ConfigError, TransientBackendError
from kvstore.testing import StoreTests
from tests.tools.servers import free_port


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def _clear(store: FsspecStore) -> None:
    """Remove everything under the store's prefix (TTL hints too), in batched requests."""
    paths = [p async for p in store._list_paths(f"{store.prefix}/")]
    client = await store.fs.set_session()
    for start in range(0, len(paths), 1000):
        objects = [{"Key": p} for p in paths[start : start + 1000]]
        await client.delete_objects(Bucket=store.bucket, Delete={"Objects": objects})


class TestS3Store(StoreTests):
    @pytest.fixture
    async def store(self, moto_s3):
        async with open_store(f"{moto_s3.url}/{_prefix()}", **moto_s3.storage_options()) as store:
            yield store
            await _clear(store)


@pytest.fixture
def plain_fs(moto_s3):
    """A plain, synchronous s3fs client on the same server."""
    return s3fs.S3FileSystem(skip_instance_cache=True, **moto_s3.storage_options())


async def test_open_store_with_endpoint_key_secret(moto_s3):
    prefix = _prefix()
    url = f"s3://{moto_s3.bucket}/{prefix}"
    async with open_store(
        url, endpoint_url=moto_s3.endpoint_url, key=moto_s3.key, secret=moto_s3.secret
    ) as store:
        assert isinstance(store, FsspecStore)
        assert store.url == url and repr(store) == f"FsspecStore({url!r})"
        assert await store.put("a/b", b"value")
        assert await store.get("a/b") == b"value"
        assert [k async for k in store.list()] == ["a/b"]


async def test_keys_are_plain_objects_under_the_prefix(moto_s3, plain_fs):
    prefix = _prefix()
    async with open_store(f"{moto_s3.url}/{prefix}/", **moto_s3.storage_options()) as store:
        await store.put("ctx/chunk-0", b"stored by kvstore")
        assert plain_fs.cat(f"{moto_s3.bucket}/{prefix}/ctx/chunk-0") == b"stored by kvstore"
        plain_fs.pipe(f"{moto_s3.bucket}/{prefix}/ctx/chunk-1", b"stored by s3fs")
        assert await store.get("ctx/chunk-1") == b"stored by s3fs"
        assert {k async for k in store.list("ctx/")} == {"ctx/chunk-0", "ctx/chunk-1"}


async def test_missing_bucket_is_a_clear_error(moto_s3):
    async with open_store("s3://no-such-bucket/p", **moto_s3.storage_options()) as store:
        for operation in (
            lambda: store.get("k"),
            lambda: store.get("k", None),
            lambda: store.exists("k"),
            lambda: store.put("k", b"v"),
            lambda: store.delete("k"),
        ):
            with pytest.raises(BackendError, match="bucket 'no-such-bucket' does not exist"):
                await operation()
        with pytest.raises(BackendError, match="does not exist"):
            [k async for k in store.list()]


async def test_ttl_lives_in_metadata_and_gc_removes_expired(moto_s3, plain_fs):
    prefix = _prefix()
    async with open_store(f"{moto_s3.url}/{prefix}", **moto_s3.storage_options()) as store:
        before = time.time()
        await store.put("short", b"x", ttl=4.0)  # long enough to list it on a loaded machine
        await store.put("long", b"y", ttl=3600)
        await store.put("plain", b"z")
        assert {k async for k in store.list()} == {"short", "long", "plain"}  # hints are not keys
        meta = plain_fs.metadata(f"{moto_s3.bucket}/{prefix}/long")
        assert before + 3600 <= float(meta[EXPIRES_META]) <= time.time() + 3600
        await asyncio.sleep(before + 4.1 - time.time())
        assert plain_fs.exists(f"{moto_s3.bucket}/{prefix}/short")  # S3 still holds it...
        assert await store.get("short") is None  # ...but it reads as absent
        assert {k async for k in store.list()} == {"long", "plain"}
        assert await store.gc() == 1
        assert not plain_fs.exists(f"{moto_s3.bucket}/{prefix}/short")
        assert await store.gc() == 0
        assert {k async for k in store.list()} == {"long", "plain"}


async def test_overwrite_with_longer_ttl_is_listed(moto_s3):
    async with open_store(f"{moto_s3.url}/{_prefix()}", **moto_s3.storage_options()) as store:
        await store.put("k", b"1", ttl=0.2)
        await store.put("k", b"2", ttl=3600)
        await asyncio.sleep(0.3)
        assert {k async for k in store.list()} == {"k"}  # an old hint expired, the object did not
        assert await store.gc() == 0
        assert await store.get("k") == b"2"


async def test_unreachable_endpoint_is_transient_after_bounded_retries():
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
    store = open_store(
        "s3://bucket/p",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        key="k",
        secret="s",
        client_kwargs={"region_name": "us-east-1"},
        retry=policy,
    )
    started = time.monotonic()
    async with store:
        with pytest.raises(TransientBackendError):
            await store.get("k")
        with pytest.raises(TransientBackendError):
            await store.put("k", b"v")
    assert time.monotonic() - started < 10


def test_s3fs_and_botocore_retries_are_off_by_default():
    store = open_store("s3://bucket/p", endpoint_url="http://127.0.0.1:1", key="k", secret="s")
    assert store.fs.retries == 1
    assert store.fs.config_kwargs["retries"] == {"total_max_attempts": 1}
    custom = open_store("s3://bucket", config_kwargs={"retries": {"max_attempts": 3}})
    assert custom.fs.config_kwargs["retries"] == {"max_attempts": 3}


@pytest.mark.parametrize(
    "url", ["s3://", "s3://key:secret@bucket/p", "s3://bucket/p?x=1", "s3://bucket/a//b"]
)
def test_bad_urls_rejected(url):
    with pytest.raises(ConfigError):
        open_store(url)


class _ResettingServer:
    """A loopback TCP server that counts connections and closes each at once."""

    async def __aenter__(self):
        self.connections = 0

        def accept(reader, writer):
            self.connections += 1
            writer.transport.abort()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


async def test_retries_do_not_multiply_with_s3fs_and_botocore():
    async with _ResettingServer() as server:
        store = open_store(
            "s3://bucket/p",
            endpoint_url=f"http://127.0.0.1:{server.port}",
            key="k",
            secret="s",
            client_kwargs={"region_name": "us-east-1"},
            retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02),
        )
        async with store:
            # 3 attempts of ours, botocore's and s3fs's retries off; aiohttp itself resends an
            # idempotent request once when the server drops the connection
            with pytest.raises(TransientBackendError):
                await store.get("k")
            assert 3 <= server.connections <= 6
            server.connections = 0
            with pytest.raises(TransientBackendError):
                await store.put("k", b"v")
            assert 3 <= server.connections <= 6


def test_error_codes_map_to_transient_or_permanent():
    from botocore.exceptions import ClientError

    store = open_store("s3://bucket/p", endpoint_url="http://127.0.0.1:1", key="k", secret="s")

    def error(code, status):
        return ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "GetObject",
        )

    for code, status in [("SlowDown", 503), ("InternalError", 500), ("Whatever", 502)]:
        assert isinstance(store._translate(error(code, status), "get", "k"), TransientBackendError)
    wrapped = OSError("s3fs translated it")
    wrapped.__cause__ = error("SlowDown", 503)
    assert isinstance(store._translate(wrapped, "get", "k"), TransientBackendError)
    denied = store._translate(error("AccessDenied", 403), "get", "k")
    assert type(denied) is BackendError and "permission denied" in str(denied)
    assert type(store._translate(error("InvalidArgument", 400), "get", "k")) is BackendError
