"""Faults on the wire and server crashes: loads return the stored KV, recompute, or raise a clear error.

Real redis-server and moto S3 over real sockets, through :class:`FaultProxy`.
"""

import asyncio
import contextlib
import re
import time
import uuid
from urllib.parse import urlsplit

import pytest
import torch

from kvstore import KVStore
from kvstore.backends.fsspec import FsspecStore
from kvstore.backends.redis import RedisStore
from kvstore.backends.retry import RetryPolicy, count_retries
from kvstore.errors import ChecksumError, FormatError, KVStoreError, TransientBackendError
from kvstore.fetch import AdaptiveFetcher
from kvstore.fetch.policy import StaticPolicy
from tests.tools.faultproxy import Fault, FaultProxy, NoFaults, RandomFaults, ScriptedFaults
from tests.tools.faults import RESULT_KEYS, kv_identical, restart_redis, restartable_redis, run_fault_campaign
from tests.tools.servers import ServerUnavailable

MODEL = "faults-test"
L, H, D, CHUNK = 2, 2, 64, 32  # a raw chunk object is about 33 kB
TOKENS = list(range(500, 500 + 4 * CHUNK))
CHUNK_GET = {"min_response": 10_000}  # faults aimed at chunk reads, not at manifests or handshakes
RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=10)


def make_kv(tokens=len(TOKENS), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(H, tokens, D, generator=g).half(), torch.randn(H, tokens, D, generator=g).half()) for _ in range(L)]


KV = make_kv()


def truth_recompute(kv, calls):
    def recompute(tokens, prefix):
        start = 0 if prefix is None else prefix[0][0].shape[1]
        calls.append((start, len(tokens)))
        return [(k[:, start:start + len(tokens)], v[:, start:start + len(tokens)]) for k, v in kv]
    return recompute


def open_backend(kind, server, address=None, retry=RETRY):
    """A Redis or S3 byte store on ``server``, through ``address`` (a proxy) if given."""
    if kind == "redis":
        url = server if address is None else f"redis://{address}/0"
        return RedisStore.from_url(url, retry=retry, socket_timeout=0.3, socket_connect_timeout=0.5)
    options = server.storage_options()
    if address is not None:
        options["endpoint_url"] = f"http://{address}"
    options["config_kwargs"] = {"read_timeout": 0.5, "connect_timeout": 0.5}
    return FsspecStore.from_url(server.url, retry=retry, **options)


@contextlib.asynccontextmanager
async def proxied(kind, server, schedule=None, retry=RETRY, kv=KV):
    """(proxy, direct KVStore, KVStore through the proxy) with ``kv`` stored over the direct one."""
    target = urlsplit(server if kind == "redis" else server.endpoint_url)
    namespace = f"faults-{uuid.uuid4().hex[:10]}"
    async with FaultProxy(target.hostname, target.port, protocol="resp" if kind == "redis" else "http") as proxy:
        direct = KVStore(open_backend(kind, server), chunk_tokens=CHUNK, namespace=namespace)
        faulty = KVStore(open_backend(kind, server, proxy.address, retry), chunk_tokens=CHUNK, namespace=namespace)
        try:
            if kv is not None:
                await direct.put(MODEL, TOKENS, kv)
            proxy.schedule = schedule or NoFaults()
            yield proxy, direct, faulty
        finally:
            await faulty.close()
            await direct.close()


@pytest.fixture(params=["redis", "s3"])
def backend(request):
    """("redis", url) or ("s3", S3Server) of the session's servers."""
    fixture = "redis_url" if request.param == "redis" else "moto_s3"
    return request.param, request.getfixturevalue(fixture)


# -- each fault kind on each backend --------------------------------------------------

RETRIED = [
    Fault("reset", where=0.5, **CHUNK_GET),
    Fault("truncate", where=0.3, **CHUNK_GET),
    Fault("stall", where=0.5, seconds=1.0, **CHUNK_GET),  # longer than the client's read timeout
    Fault("reset", stage="request", match=rb"GET"),
    Fault("truncate", stage="request", where=0.5, match=rb"GET"),
]


@pytest.mark.parametrize("fault", RETRIED, ids=lambda f: f"{f.kind}-{f.stage}")
async def test_connection_faults_are_retried_and_the_kv_is_exact(backend, fault):
    kind, server = backend
    async with proxied(kind, server, ScriptedFaults([fault])) as (proxy, _, faulty):
        with count_retries() as retries:
            kv = await faulty.get(MODEL, TOKENS)
        assert kv_identical(kv, KV)
        assert proxy.injected == {fault.kind: 1}
        assert retries.gave_up == 0
        # aiohttp itself resends a request whose pooled connection died before any answer
        assert retries.retries >= 1 or (kind == "s3" and fault.stage == "request")


@pytest.mark.parametrize("status", [503, 500])
async def test_s3_slowdown_and_internal_error_are_retried(moto_s3, status):
    faults = [Fault("http_error", status=status, match=rb"^GET .*/chunks/")] * 2
    async with proxied("s3", moto_s3, ScriptedFaults(faults)) as (proxy, _, faulty):
        with count_retries() as retries:
            assert kv_identical(await faulty.get(MODEL, TOKENS), KV)
        assert proxy.injected == {"http_error": 2} and retries.retries == 2


async def test_s3_corrupt_body_fails_the_transport_checksum_and_is_read_again(moto_s3):
    async with proxied("s3", moto_s3, ScriptedFaults([Fault("corrupt", where=0.6, nbytes=3, **CHUNK_GET)])) as (
        proxy, _, faulty
    ):
        with count_retries() as retries:
            assert kv_identical(await faulty.get(MODEL, TOKENS), KV)
        assert proxy.injected == {"corrupt": 1} and retries.retries == 1


async def test_redis_corrupt_payload_is_caught_and_read_again(redis_url):
    """Redis has no checksum on the wire: the container's catches the damage, get reads the chunk once more."""
    async with proxied("redis", redis_url, ScriptedFaults([Fault("corrupt", where=0.6, **CHUNK_GET)])) as (
        proxy, _, faulty
    ):
        assert kv_identical(await faulty.get(MODEL, TOKENS), KV)
        assert proxy.injected == {"corrupt": 1}


async def test_redis_payload_corrupt_twice_is_a_checksum_error(redis_url):
    schedule = ScriptedFaults()
    async with proxied("redis", redis_url, schedule) as (proxy, direct, faulty):
        key = (await direct.manifest(MODEL, TOKENS)).chunks[1].objects[0].key
        schedule.pending.extend(Fault("corrupt", where=0.6, match=re.escape(key).encode(), **CHUNK_GET) for _ in range(2))
        with pytest.raises(ChecksumError):
            await faulty.get(MODEL, TOKENS)
        assert proxy.injected == {"corrupt": 2}
        assert kv_identical(await faulty.get(MODEL, TOKENS), KV)


@pytest.mark.parametrize("delta", [-1, +1], ids=["shorter", "longer"])
async def test_redis_corrupt_bulk_length_never_poisons_the_connection(redis_url, delta):
    """``$33024`` -> ``$23024`` or ``$43024``: a short read must not leave the rest of the
    reply in the connection for the next command, a long one must time out and retry."""
    async with proxied("redis", redis_url) as (proxy, direct, faulty):
        chunk_key = (await direct.manifest(MODEL, TOKENS)).chunks[1].objects[0].key
        size = len(await direct.store.get(chunk_key))
        digit = str(size)[0]
        mask = ord(digit) ^ ord(str(int(digit) + delta))
        proxy.schedule = ScriptedFaults([Fault("corrupt", offset=1, mask=mask, **CHUNK_GET)])
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(kv_identical(await faulty.get(MODEL, TOKENS), KV))
            except KVStoreError as exc:
                outcomes.append("format error" if isinstance(exc, FormatError) else repr(exc))
        assert proxy.injected == {"corrupt": 1}
        # shorter: the cut value fails its manifest entry and get reads it again; longer: the read
        # times out and is retried
        assert outcomes == [True, True, True]


async def test_unanswered_request_ends_at_the_deadline(moto_s3):
    """aiohttp waits for ``100 Continue`` without a timeout: the retry deadline cuts it off."""
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, deadline=1.0)
    stall = Fault("stall", stage="request", seconds=5.0, match=rb"^PUT ")
    async with proxied("s3", moto_s3, ScriptedFaults([stall] * 3), retry=policy, kv=None) as (_, direct, faulty):
        started = time.monotonic()
        with pytest.raises(TransientBackendError, match="deadline"):
            await faulty.store.put("some/key", b"x" * 1000)
        assert time.monotonic() - started < 2.5
        assert await direct.store.get("some/key") is None


# -- writes that fail midway ------------------------------------------------------------


class FailWritesAfter:
    """Let the first ``ok`` writes through, then drop every later one unsent."""

    def __init__(self, ok, fault):
        self.ok, self.fault = ok, fault

    def on_connect(self):
        return None

    def on_request(self, head):
        if not re.search(rb"\$3\r\nSET\r\n|^PUT ", head):
            return None
        self.ok -= 1
        return self.fault if self.ok < 0 else None

    def release(self, fault):
        pass


async def test_a_put_failing_midway_leaves_no_manifest(backend):
    kind, server = backend
    drop = Fault("reset", stage="request") if kind == "redis" else Fault("http_error", status=503)
    policy = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, deadline=5)
    async with proxied(kind, server, FailWritesAfter(2, drop), retry=policy, kv=None) as (proxy, direct, faulty):
        with pytest.raises(TransientBackendError):
            await faulty.put(MODEL, TOKENS, KV)
        assert proxy.total_injected >= 2
        assert await direct.manifest(MODEL, TOKENS) is None
        stored = await direct.lookup(MODEL, TOKENS)
        assert stored <= 2 * CHUNK  # at most the chunks that went through
        if stored:  # those are whole, verified chunks: the prefix loads exactly
            assert kv_identical(await direct.get(MODEL, TOKENS[:stored]), KV, 0, stored)
        proxy.schedule = NoFaults()
        await faulty.put(MODEL, TOKENS, KV)  # the retried put completes the context
        assert kv_identical(await direct.get(MODEL, TOKENS), KV)


# -- redis-server killed and restarted mid-load ----------------------------------------


@pytest.fixture
def persistent_redis():
    try:
        with restartable_redis() as server:
            yield server
    except ServerUnavailable as exc:
        pytest.skip(str(exc))


async def test_redis_killed_and_restarted_mid_load(persistent_redis):
    policy = RetryPolicy(attempts=12, base_delay=0.05, max_delay=0.3, deadline=10)
    namespace = f"faults-{uuid.uuid4().hex[:10]}"
    async with KVStore(open_backend("redis", persistent_redis.url, retry=policy), chunk_tokens=CHUNK,
                       namespace=namespace) as kvs:
        await kvs.put(MODEL, TOKENS, KV)
        stop = asyncio.Event()
        results = []

        async def load_until_stopped():
            while not stop.is_set():
                results.append(kv_identical(await kvs.get(MODEL, TOKENS), KV))

        with count_retries() as retries:
            loads = [asyncio.create_task(load_until_stopped()) for _ in range(3)]
            await asyncio.sleep(0.2)
            await restart_redis(persistent_redis, down_s=0.3)
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*loads)
        assert results and all(results)
        assert retries.retries >= 1 and retries.gave_up == 0


# -- the fetcher recomputes what it cannot fetch ---------------------------------------


async def test_fetcher_recomputes_a_chunk_whose_fetch_fails(redis_url):
    corrupt = Fault("corrupt", where=0.5, **CHUNK_GET)
    async with proxied("redis", redis_url, ScriptedFaults([corrupt])) as (proxy, direct, faulty):
        calls = []
        fetcher = AdaptiveFetcher(faulty, recompute=truth_recompute(KV, calls), prior_Bps=1e9)
        result = await fetcher.load(MODEL, TOKENS, deadline_s=30, policy=StaticPolicy(0))
        assert proxy.injected == {"corrupt": 1}
        assert kv_identical(result.kv, KV)
        failed = [d for d in result.decisions if d.action == "recompute"]
        assert len(failed) == 1 and failed[0].reason.startswith("fetch failed (level 0): ChecksumError")
        assert calls == [(failed[0].start, CHUNK)]

        proxy.schedule = ScriptedFaults([corrupt])
        with pytest.raises(ChecksumError):  # without a recompute callback: the clear error
            await AdaptiveFetcher(faulty, prior_Bps=1e9).load(MODEL, TOKENS, deadline_s=30, policy=StaticPolicy(0))

        manifest = await direct.manifest(MODEL, TOKENS)
        await direct.store.delete(manifest.chunks[2].objects[0].key)  # a chunk gone from the store
        result = await AdaptiveFetcher(faulty, recompute=truth_recompute(KV, calls), prior_Bps=1e9).load(
            MODEL, TOKENS, deadline_s=30, policy=StaticPolicy(0))
        assert kv_identical(result.kv, KV)
        assert [d.index for d in result.decisions if d.action == "recompute"] == [2]
        assert "IncompleteContextError" in result.decisions[2].reason


async def test_fetcher_recomputes_through_an_outage(redis_url):
    outage = RandomFaults(1.0, {"reset": 1.0}, match=rb"GET\r\n\$\d+\r\n[^\r]*/chunks/")  # every chunk read fails
    policy = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, deadline=5)
    async with proxied("redis", redis_url, outage, retry=policy) as (proxy, _, faulty):
        calls = []
        result = await AdaptiveFetcher(faulty, recompute=truth_recompute(KV, calls), prior_Bps=1e9).load(
            MODEL, TOKENS, deadline_s=30, policy=StaticPolicy(0))
        assert kv_identical(result.kv, KV)
        assert all(d.reason.startswith("fetch failed (level 0): TransientBackendError") for d in result.decisions), result.table()
        assert proxy.injected["reset"] == 2 * len(result.decisions)


# -- the proxy itself and a small campaign -------------------------------------------------


def test_random_faults_are_deterministic_by_seed():
    def draws(seed):
        schedule = RandomFaults(0.5, seed=seed, request_stage=0.3)
        return [schedule.on_request(b"GET /x") for _ in range(200)]

    assert draws(3) == draws(3) != draws(4)
    kinds = {f.kind for f in draws(3) if f is not None}
    assert kinds == {"reset", "stall", "truncate", "corrupt"}
    with pytest.raises(ValueError):
        Fault("explode")


@pytest.mark.parametrize("kind", ["redis", "s3"])
async def test_small_campaign_never_returns_wrong_kv(kind, request):
    info = {"server": request.getfixturevalue("moto_s3")} if kind == "s3" else {}
    result = await run_fault_campaign(kind, 60, seed=5, workers=3, **info)
    assert set(result) == set(RESULT_KEYS)
    assert result["injected_faults"] >= 60 and result["loads"] > 0 and result["writes"] > 0
    assert result["wrong_kv_returned"] == 0
    assert result["unexpected_errors"] == 0
    assert result["failed_writes_left_partial"] == 0
    assert result["recovered_by_retry"] > 0
