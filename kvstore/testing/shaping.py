"""A deterministic in-process link: any byte store's reads shaped to a bandwidth trace.

``ShapedStore`` delays each ``get`` until its bytes would have crossed a link
whose rate follows a :class:`BandwidthTrace` (piecewise constant), after a fixed
per-request latency. Transfers in flight together share the link equally, as
parallel connections through one bottleneck do (processor sharing; the kernel
link shows the same within the unfairness of TCP). Writes and metadata calls pass
through unshaped. For unit tests of the fetcher and for benchmarks on machines
without root (the real kernel shaping is in :mod:`tests.tools.netshape`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from kvstore.backends.base import ByteRequest, BytesLike, Store
from kvstore.errors import BackendError, ConfigError


@dataclass(frozen=True)
class BandwidthTrace:
    """``rates_Bps[i]`` bytes per second from ``times[i]`` (seconds) on; the last rate holds forever."""

    times: tuple[float, ...]
    rates_Bps: tuple[float, ...]
    name: str = "trace"

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.rates_Bps) or self.times[0] != 0:
            raise ConfigError("a trace needs matching times and rates, starting at time 0")
        if any(b <= a for a, b in zip(self.times, self.times[1:])) or min(self.rates_Bps) <= 0:
            raise ConfigError("trace times must increase and rates be positive")

    @classmethod
    def steady(cls, rate_Bps: float) -> BandwidthTrace:
        return cls((0.0,), (rate_Bps,), "steady")

    @classmethod
    def step(cls, before_Bps: float, after_Bps: float, at_s: float) -> BandwidthTrace:
        return cls((0.0, at_s), (before_Bps, after_Bps), "step")

    @classmethod
    def uniform_random(cls, low_Bps: float, high_Bps: float, interval_s: float, duration_s: float,
                       seed: int = 0) -> BandwidthTrace:
        """CacheGen's evaluation style: a rate drawn uniformly from [low, high] every interval."""
        rng = random.Random(seed)
        count = max(1, int(duration_s / interval_s) + 1)
        return cls(tuple(i * interval_s for i in range(count)),
                   tuple(rng.uniform(low_Bps, high_Bps) for _ in range(count)), "random")

    def scaled(self, factor: float) -> BandwidthTrace:
        return BandwidthTrace(self.times, tuple(r * factor for r in self.rates_Bps), self.name)

    def rate_at(self, t: float) -> float:
        return self.rates_Bps[max(0, bisect.bisect_right(self.times, t) - 1)]

    def bytes_between(self, t0: float, t1: float) -> float:
        """Bytes the link can carry between two times."""
        if t1 <= t0:
            return 0.0
        total, t = 0.0, t0
        i = max(0, bisect.bisect_right(self.times, t0) - 1)
        while t < t1:
            end = self.times[i + 1] if i + 1 < len(self.times) else t1
            seg_end = min(end, t1)
            total += (seg_end - t) * self.rates_Bps[i]
            t = seg_end
            i += 1
        return total

    def mean_rate(self, t0: float, t1: float) -> float:
        return self.bytes_between(t0, t1) / (t1 - t0) if t1 > t0 else self.rate_at(t0)

    def finish_time(self, start: float, nbytes: float) -> float:
        """When a transfer of ``nbytes`` starting at ``start`` completes."""
        t, left = start, float(nbytes)
        i = max(0, bisect.bisect_right(self.times, start) - 1)
        while True:
            rate = self.rates_Bps[i]
            end = self.times[i + 1] if i + 1 < len(self.times) else float("inf")
            can = (end - t) * rate
            if can >= left:
                return t + left / rate
            left -= can
            t = end
            i += 1


@dataclass(eq=False)
class _Transfer:
    remaining: float  # bytes still to cross the link
    done: asyncio.Future[None] = field(repr=False)


class ShapedStore(Store):
    """``inner``'s values, read over a link that follows ``trace``, shared equally by the
    transfers in flight, ``latency_s`` per request."""

    def __init__(self, inner: Store, trace: BandwidthTrace, *, latency_s: float = 0.0005) -> None:
        self.inner = inner
        self.trace = trace
        self.latency_s = latency_s
        self.url = f"shaped+{inner.url}"
        self._server: asyncio.Task[None] | None = None
        self.reset()

    def reset(self, trace: BandwidthTrace | None = None) -> None:
        """Restart the trace's clock now (optionally with a new trace). Reads still on the
        link fail with :class:`~kvstore.errors.BackendError` (their timing is lost)."""
        if trace is not None:
            self.trace = trace
        for dropped in getattr(self, "_active", []):
            if not dropped.done.done() and not dropped.done.get_loop().is_closed():
                dropped.done.set_exception(BackendError("the shaped link was reset during this read"))
        self.t0 = time.perf_counter()
        self._clock = 0.0  # the link is simulated up to here (seconds since t0)
        self._active: list[_Transfer] = []
        self.bytes_carried = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        value = await self.inner.get(key, byte_range)
        await asyncio.sleep(self.latency_s)
        size = 0 if value is None else len(value)
        self.bytes_carried += size
        if size == 0:
            return value
        loop = asyncio.get_running_loop()
        if self._server is not None and self._server.get_loop() is not loop:
            # a server and transfers left on a closed loop by an earlier run are dropped
            self._active = [x for x in self._active if x.done.get_loop() is loop]
            self._server = None
        self._advance(self.now())
        transfer = _Transfer(float(size), asyncio.get_running_loop().create_future())
        self._active.append(transfer)
        self._wake_server()
        try:
            await transfer.done
        finally:
            if transfer in self._active:  # cancelled mid-transfer: it stops sharing the link
                self._advance(self.now())
                self._active.remove(transfer)
                self._wake_server()
        return value

    def _advance(self, until: float) -> None:
        """Move the simulated link to ``until``, completing the transfers that finish by then."""
        t = max(self._clock, 0.0)
        while self._active and t < until:
            share = len(self._active)
            smallest = min(x.remaining for x in self._active)
            first_done = self._first_completion(t)
            step_end = min(first_done, until)
            carried = self.trace.bytes_between(t, step_end) / share
            finishing = [x for x in self._active if x.remaining == smallest] if step_end >= first_done else []
            for x in self._active:
                x.remaining -= carried
            t = step_end
            for x in finishing + [x for x in self._active if x.remaining <= 1e-6 and x not in finishing]:
                self._active.remove(x)
                if not x.done.done():
                    x.done.set_result(None)
        self._clock = max(self._clock, until)

    def _first_completion(self, t: float) -> float:
        """When the first transfer in flight completes if none arrives or leaves after ``t``
        (each gets ``1/n`` of the link, so the smallest needs ``n`` times its bytes of link)."""
        return self.trace.finish_time(t, min(x.remaining for x in self._active) * len(self._active))

    def _wake_server(self) -> None:
        if self._server is None or self._server.done():
            self._wake = asyncio.Event()
            self._server = asyncio.get_running_loop().create_task(self._serve())
        self._wake.set()

    async def _serve(self) -> None:
        """Sleep until the next transfer completes (or one arrives or leaves), then advance."""
        while self._active:
            self._wake.clear()
            delay = self._first_completion(self._clock) - self.now()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._advance(self.now())

    async def put(self, key: str, value: BytesLike, *, ttl: float | None = None, create_only: bool = False) -> bool:
        return await self.inner.put(key, value, ttl=ttl, create_only=create_only)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def keep(self, key: str, ttl: float | None) -> bool:
        return await self.inner.keep(key, ttl)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        async for key in self.inner.list(prefix):
            yield key

    async def close(self) -> None:
        await self.inner.close()


def link_utilization(trace: BandwidthTrace, transfers: Sequence[tuple[float, float, int]]) -> float:
    """Bytes moved over what the link could carry while at least one transfer was in flight."""
    spans = sorted((s, e) for s, e, _ in transfers)
    if not spans:
        return 0.0
    capacity, (cs, ce) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > ce:
            capacity += trace.bytes_between(cs, ce)
            cs, ce = s, e
        else:
            ce = max(ce, e)
    capacity += trace.bytes_between(cs, ce)
    return sum(n for _, _, n in transfers) / capacity if capacity else 0.0
