"""Fault campaigns: load and store KV through a :class:`FaultProxy` and check the guarantees.

The guarantees under network faults and server crashes (issue #9):

- a load returns KV byte-for-byte equal to what was stored, or recomputes the
  chunks it could not fetch through the application's callback, or raises a
  :class:`~kvstore.errors.KVStoreError`; never wrong KV, never a foreign exception;
- transient faults are retried with capped backoff under a deadline;
- a write that fails midway leaves no manifest pointing at missing or partial chunks.

:func:`run_fault_campaign` measures them against a real redis-server or S3 API
(moto): it stores a few small synthetic contexts, then loads them (with
``KVStore.get`` and with the ``AdaptiveFetcher`` and a recompute callback) and
writes new ones through the proxy under random faults, plus, on Redis, kills and
restarts the server mid-load. Every returned tensor is compared byte for byte;
every failed write is checked through a fault-free connection.
:func:`restartable_redis` and :func:`restart_redis` are the crash helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from kvstore.backends.base import Store
from kvstore.backends.fsspec import FsspecStore
from kvstore.backends.redis import RedisStore
from kvstore.backends.retry import RetryPolicy, count_retries
from kvstore.errors import ConfigError, KVStoreError
from kvstore.fetch import AdaptiveFetcher
from kvstore.fetch.policy import StaticPolicy
from kvstore.kv import KV
from kvstore.store import KVStore
from tests.tools.faultproxy import FaultProxy, NoFaults, RandomFaults
from tests.tools.servers import RedisServer, S3Server, ServerUnavailable, free_port, moto_server

log = logging.getLogger("tests.tools.faults")

MODEL = "fault-campaign"
LAYERS, HEADS, HEAD_DIM, CHUNK = 4, 2, 64, 32
LEVELS = ("raw", "int8")
RESULT_KEYS = (
    "injected_faults", "loads", "wrong_kv_returned", "recovered_by_retry", "recovered_by_recompute",
    "clear_errors", "unexpected_errors", "writes", "failed_writes_left_partial",
)  # fmt: skip
#: retries for the faulty client: enough to ride out a redis-server restart (about 1.5 s of backoff)
CAMPAIGN_RETRY = RetryPolicy(attempts=6, base_delay=0.05, max_delay=0.5, deadline=5.0)


# -- crash helpers -----------------------------------------------------------------


@contextlib.contextmanager
def restartable_redis(tries: int = 5) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port whose data survives :func:`restart_redis`
    (append-only file, fsync before every reply), so a crash loses no acknowledged write."""
    with tempfile.TemporaryDirectory(prefix="kvstore-faults-redis-") as tmp:
        for attempt in range(tries):
            server = RedisServer(
                port=free_port(),
                workdir=Path(tmp),
                extra_args=("--appendonly", "yes", "--appendfsync", "always"),
            )
            try:
                server.start()
                break
            except ServerUnavailable:  # most likely the port was taken meanwhile
                server.kill()
                if attempt == tries - 1:
                    raise
        try:
            yield server
        finally:
            server.kill()


async def restart_redis(server: RedisServer, down_s: float = 0.2) -> None:
    """Kill ``server`` (SIGKILL, as a crash), leave it down ``down_s`` seconds, start it again."""
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(server.start)


# -- the campaign -------------------------------------------------------------------


@dataclass
class _Context:
    tokens: list[int]
    kv: KV
    expected: list[KV]  # per level, as a fault-free read returns it


@dataclass
class _Tally:
    loads: int = 0
    wrong_kv_returned: int = 0
    recovered_by_retry: int = 0
    recovered_by_recompute: int = 0
    clear_errors: int = 0
    unexpected_errors: int = 0
    writes: int = 0
    failed_writes_left_partial: int = 0
    restarts: int = 0


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def kv_identical(a: KV, b: KV, start: int = 0, stop: int | None = None) -> bool:
    """Whether tokens ``[start, stop)`` of two KVs are byte-for-byte equal (``b`` may be longer)."""
    if len(a) != len(b):
        return False
    return all(
        _same_bytes(ka[:, start:stop], kb[:, start:stop]) and _same_bytes(va[:, start:stop], vb[:, start:stop])
        for (ka, va), (kb, vb) in zip(a, b)
    )


def _make_kv(tokens: int, seed: int) -> KV:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(HEADS, tokens, HEAD_DIM, generator=g).half(), torch.randn(HEADS, tokens, HEAD_DIM, generator=g).half())
        for _ in range(LAYERS)
    ]


def _truth_recompute(kv: KV) -> Any:
    """A recompute callback that returns the stored context's exact KV for the asked tokens."""

    def recompute(tokens: torch.Tensor, prefix: KV | None) -> KV:
        start = 0 if prefix is None else prefix[0][0].shape[1]
        return [(k[:, start : start + len(tokens)], v[:, start : start + len(tokens)]) for k, v in kv]

    return recompute


class _Campaign:
    """One campaign's stores, proxy, contexts and tally."""

    def __init__(self, kind: str, server: Any, n_faults: int, seed: int, *, workers: int = 4,
                 rate: float = 0.1, restarts: int | None = None, max_seconds: float | None = None,
                 contexts: int = 6, own_server: bool = True) -> None:
        self.kind, self.server, self.n_faults, self.seed = kind, server, n_faults, seed
        self.workers, self.rate = workers, rate
        can_restart = kind == "redis" and own_server
        self.restarts = (max(1, n_faults // 200) if restarts is None else restarts) if can_restart else 0
        self.max_seconds = max_seconds if max_seconds is not None else 60 + 1.0 * n_faults
        self.n_contexts = contexts
        self.own_server = own_server
        self._no_restart = asyncio.Lock()  # held while a write is read back, and during a restart
        self.namespace = f"faults-{kind}-{seed}-{uuid.uuid4().hex[:8]}"
        self.tally = _Tally()
        self.proxy: FaultProxy | None = None
        self.contexts: list[_Context] = []
        self.unexpected: list[str] = []
        self._writes = 0

    # -- stores ---------------------------------------------------------------
    def _open(self, address: str | None) -> Store:
        """A byte store on the server, through ``address`` (the proxy) when given."""
        if self.kind == "redis":
            server: RedisServer = self.server
            url = server.url if address is None else f"redis://{address}/0"
            if address is None:
                return RedisStore.from_url(url)
            return RedisStore.from_url(url, retry=CAMPAIGN_RETRY, socket_timeout=0.5,
                                       socket_connect_timeout=0.5, max_connections=16)
        s3: S3Server = self.server
        options = s3.storage_options()
        if address is None:
            return FsspecStore.from_url(s3.url, **options)
        options["endpoint_url"] = f"http://{address}"
        options["config_kwargs"] = {"read_timeout": 1.0, "connect_timeout": 1.0}
        return FsspecStore.from_url(s3.url, retry=CAMPAIGN_RETRY, **options)

    def _kvstore(self, backend: Store) -> KVStore:
        return KVStore(backend, chunk_tokens=CHUNK, levels=LEVELS, namespace=self.namespace)

    def _schedule(self) -> RandomFaults:
        weights = {"reset": 1.0, "stall": 1.0, "truncate": 1.0, "corrupt": 1.5}
        if self.kind == "s3":
            weights["http_error"] = 1.0
        stall = (0.05, 1.0) if self.kind == "redis" else (0.05, 1.5)
        return RandomFaults(self.rate, weights, seed=self.seed, connect_rate=0.02, stall_s=stall,
                            request_stage=0.25)

    @property
    def injected(self) -> int:
        assert self.proxy is not None
        return self.proxy.total_injected + self.tally.restarts

    # -- run ------------------------------------------------------------------
    async def run(self) -> dict[str, int]:
        if self.kind == "redis":
            host, port = self.server.host, self.server.port
        else:
            parts = urlsplit(self.server.endpoint_url)
            host, port = parts.hostname, parts.port
        direct = self._kvstore(self._open(None))
        async with FaultProxy(host, port, protocol="resp" if self.kind == "redis" else "http",
                              seed=self.seed) as proxy:
            self.proxy = proxy
            faulty = self._kvstore(self._open(proxy.address))
            try:
                await self._store_contexts(direct)
                proxy.schedule = self._schedule()
                deadline = time.monotonic() + self.max_seconds
                jobs = [self._worker(w, direct, faulty, deadline) for w in range(self.workers)]
                if self.restarts:
                    jobs.append(self._crasher(deadline))
                await asyncio.gather(*jobs)
                proxy.schedule = NoFaults()
            finally:
                await faulty.close()
                if not self.own_server:
                    await self._clean(direct)
                await direct.close()
        if self.unexpected:
            log.warning("fault campaign: %d unexpected errors, e.g. %s", len(self.unexpected), self.unexpected[:3])
        t = self.tally
        return {
            "injected_faults": self.injected, "loads": t.loads, "wrong_kv_returned": t.wrong_kv_returned,
            "recovered_by_retry": t.recovered_by_retry, "recovered_by_recompute": t.recovered_by_recompute,
            "clear_errors": t.clear_errors, "unexpected_errors": t.unexpected_errors, "writes": t.writes,
            "failed_writes_left_partial": t.failed_writes_left_partial,
        }  # fmt: skip

    async def _store_contexts(self, direct: KVStore) -> None:
        rng = random.Random(self.seed)
        for i in range(self.n_contexts):
            n = CHUNK * rng.randint(3, 5) - rng.choice((0, 7))  # a short last chunk now and then
            tokens = list(range(100_000 * (i + 1), 100_000 * (i + 1) + n))
            kv = _make_kv(n, seed=self.seed * 1000 + i)
            await direct.put(MODEL, tokens, kv)
            expected = [await direct.get(MODEL, tokens, level=lv) for lv in range(len(LEVELS))]
            if not kv_identical(expected[0], kv):
                raise AssertionError("a fault-free raw read does not return the stored KV")
            self.contexts.append(_Context(tokens, kv, expected))

    async def _clean(self, direct: KVStore) -> None:
        """Remove the campaign's objects (the servers may be shared)."""
        with contextlib.suppress(KVStoreError):
            keys = [key async for key in direct.store.list(self.namespace + "/")]
            sem = asyncio.Semaphore(16)

            async def delete(key: str) -> None:
                async with sem:
                    await direct.store.delete(key)

            await asyncio.gather(*map(delete, keys))

    def _done(self, deadline: float) -> bool:
        return self.injected >= self.n_faults or time.monotonic() > deadline

    async def _crasher(self, deadline: float) -> None:
        """Kill and restart redis-server ``restarts`` times, spread over the campaign."""
        for i in range(self.restarts):
            target = self.n_faults * (i + 1) / (self.restarts + 1)
            while self.injected < target and not self._done(deadline):
                await asyncio.sleep(0.05)
            if self._done(deadline):
                return
            async with self._no_restart:
                await restart_redis(self.server, down_s=0.1 + 0.2 * random.Random(self.seed + i).random())
            self.tally.restarts += 1

    async def _worker(self, w: int, direct: KVStore, faulty: KVStore, deadline: float) -> None:
        rng = random.Random(self.seed * 7919 + w)
        while not self._done(deadline):
            op = rng.choices(("get", "fetch", "put"), (0.5, 0.38, 0.12))[0]
            try:
                if op == "put":
                    await self._put(rng, direct, faulty)
                else:
                    await self._load(op, rng, faulty)
            except Exception as exc:  # a failure of the campaign's own checks or a leaked error
                self.tally.unexpected_errors += 1
                self.unexpected.append(f"{op}: {type(exc).__name__}: {exc}")

    async def _load(self, op: str, rng: random.Random, faulty: KVStore) -> None:
        ctx = rng.choice(self.contexts)
        level = rng.randrange(len(LEVELS))
        t = self.tally
        t.loads += 1
        with count_retries() as retries:
            try:
                if op == "get":
                    kv = await faulty.get(MODEL, ctx.tokens, level=level)
                    wrong, recomputed = not kv_identical(kv, ctx.expected[level]), False
                else:
                    fetcher = AdaptiveFetcher(faulty, recompute=_truth_recompute(ctx.kv), prior_Bps=1e9)
                    result = await fetcher.load(MODEL, ctx.tokens, deadline_s=60.0, policy=StaticPolicy(level))
                    wrong, recomputed = False, False
                    for d in result.decisions:
                        truth = ctx.expected[level] if d.action == "fetch" else ctx.kv
                        wrong = wrong or not kv_identical(result.kv, truth, d.start, d.stop)
                        recomputed = recomputed or d.reason.startswith("fetch failed")
            except KVStoreError as exc:
                t.clear_errors += 1
                log.debug("load ended in a clear error: %s", exc)
                return
            except Exception as exc:
                t.unexpected_errors += 1
                self.unexpected.append(f"{op}: {type(exc).__name__}: {exc}")
                return
        if wrong:
            t.wrong_kv_returned += 1
            log.error("WRONG KV returned by %s of a context at level %d", op, level)
        elif recomputed:
            t.recovered_by_recompute += 1
        elif retries.retries:
            t.recovered_by_retry += 1

    async def _put(self, rng: random.Random, direct: KVStore, faulty: KVStore) -> None:
        t = self.tally
        self._writes += 1
        n = CHUNK * rng.randint(2, 4)
        base = 10_000_000 + 10_000 * self._writes + 1_000_000 * rng.randrange(100)
        tokens = list(range(base, base + n))
        kv = _make_kv(n, seed=rng.randrange(1 << 30))
        t.writes += 1
        try:
            await faulty.put(MODEL, tokens, kv)
            failed = False
        except KVStoreError as exc:
            t.clear_errors += 1
            failed = True
            log.debug("write ended in a clear error: %s", exc)
        except Exception as exc:
            t.unexpected_errors += 1
            self.unexpected.append(f"put: {type(exc).__name__}: {exc}")
            failed = True
        async with self._no_restart:
            if not await self._write_is_consistent(direct, tokens, kv, must_exist=not failed):
                t.failed_writes_left_partial += 1
                log.error("a %s write left an inconsistent context", "failed" if failed else "successful")
            with contextlib.suppress(KVStoreError):
                await direct.delete(MODEL, tokens)

    async def _write_is_consistent(self, direct: KVStore, tokens: Sequence[int], kv: KV, *, must_exist: bool) -> bool:
        """Read back a write without faults: a manifest only where every level loads exactly,
        and whatever prefix ``lookup`` reports loads exactly."""
        try:
            manifest = await direct.manifest(MODEL, tokens)
            if manifest is None:
                if must_exist:
                    return False
            else:
                for level in range(len(LEVELS)):
                    got = await direct.get(MODEL, tokens, level=level)
                    if level == 0 and not kv_identical(got, kv):
                        return False
            covered = await direct.lookup(MODEL, tokens)
            if covered:
                prefix = await direct.get(MODEL, tokens[:covered])
                if not kv_identical(prefix, kv, 0, covered):
                    return False
        except KVStoreError as exc:
            log.error("reading back a write failed: %s", exc)
            return False
        return True


async def run_fault_campaign(kind: str, n_faults: int, seed: int = 0, **server_info: Any) -> dict[str, int]:
    """Inject at least ``n_faults`` faults into loads and writes on ``kind`` ("redis" or "s3").

    ``server_info``: ``server`` (a running :class:`RedisServer` or :class:`S3Server`;
    by default the campaign starts its own moto or persistent redis-server, which it
    may also kill and restart), and the tuning knobs ``workers`` (concurrent
    clients, 4), ``rate`` (the chance that an exchange gets a fault, 0.1),
    ``restarts`` (redis-server crashes, one per 200 faults; only on a server the
    campaign started), ``max_seconds`` and ``contexts``.

    Returns the counts :data:`RESULT_KEYS`: ``loads`` (``KVStore.get`` and fetcher
    loads), ``wrong_kv_returned`` (loads that returned KV differing in any byte),
    ``recovered_by_retry`` (correct loads that needed backend retries),
    ``recovered_by_recompute`` (fetcher loads that recomputed a chunk whose fetch
    failed), ``clear_errors`` (loads and writes that raised a ``KVStoreError``),
    ``unexpected_errors`` (any other exception), ``writes`` and
    ``failed_writes_left_partial`` (writes after which a manifest, or the prefix
    ``lookup`` reports, does not load exactly through a fault-free connection).
    """
    if kind not in ("redis", "s3"):
        raise ConfigError(f"kind must be 'redis' or 's3', got {kind!r}")
    if not isinstance(n_faults, int) or n_faults < 1:
        raise ConfigError(f"n_faults must be a positive int, got {n_faults!r}")
    server = server_info.pop("server", None)
    with contextlib.ExitStack() as stack:
        own = server is None
        if own:
            manager = restartable_redis() if kind == "redis" else moto_server("kvstore-faults")
            server = await asyncio.to_thread(stack.enter_context, manager)
        campaign = _Campaign(kind, server, n_faults, seed, own_server=own, **server_info)
        try:
            return await campaign.run()
        finally:
            await asyncio.to_thread(stack.close)
