"""A deterministic in-process link: any byte store's reads shaped to a bandwidth trace.

``ShapedStore`` delays each ``get`` until its bytes would have crossed a link
whose rate follows a :class:`BandwidthTrace` (piecewise constant), one transfer
after another (FIFO, as one saturated connection delivers them), plus a fixed
per-request latency. Writes and metadata calls pass through unshaped. For unit
tests of the fetcher and for benchmarks on machines without root (the real
kernel shaping is in :mod:`kvstore.testing.netshape`).
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kvstore.backends.base import ByteRequest, BytesLike, Store


@dataclass(frozen=True)
class BandwidthTrace:
    """``rates_Bps[i]`` bytes per second from ``times[i]`` (seconds) on; the last rate holds forever."""

    times: tuple[float, ...]
    rates_Bps: tuple[float, ...]
    name: str = "trace"

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.rates_Bps) or self.times[0] != 0:
            raise ValueError("a trace needs matching times and rates, starting at time 0")
        if any(b <= a for a, b in zip(self.times, self.times[1:])) or min(self.rates_Bps) <= 0:
            raise ValueError("trace times must increase and rates be positive")

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


class ShapedStore(Store):
    """``inner``'s values, read over a link that follows ``trace`` (FIFO, ``latency_s`` per request)."""

    def __init__(self, inner: Store, trace: BandwidthTrace, *, latency_s: float = 0.0005) -> None:
        self.inner = inner
        self.trace = trace
        self.latency_s = latency_s
        self.url = f"shaped+{inner.url}"
        self.reset()

    def reset(self, trace: BandwidthTrace | None = None) -> None:
        """Restart the trace's clock now (optionally with a new trace)."""
        if trace is not None:
            self.trace = trace
        self.t0 = time.perf_counter()
        self._link_free = 0.0
        self.bytes_carried = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        value = await self.inner.get(key, byte_range)
        start = max(self.now() + self.latency_s, self._link_free)
        size = 0 if value is None else len(value)
        end = self.trace.finish_time(start, size)
        self._link_free = end
        self.bytes_carried += size
        await asyncio.sleep(max(0.0, end - self.now()))
        return value

    async def put(self, key: str, value: BytesLike, *, ttl: float | None = None, create_only: bool = False) -> bool:
        return await self.inner.put(key, value, ttl=ttl, create_only=create_only)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

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
