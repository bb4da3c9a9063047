"""The adaptive fetcher on a shaped in-process link: level choice, recompute, pipelining, errors."""

import asyncio
import gc
import logging

import pytest
import torch

from kvstore import KVStore
from kvstore.backends.memory import MemoryStore
from kvstore.errors import BackendError, ChecksumError, ConfigError, ContextNotFoundError, IncompleteContextError
from kvstore.fetch import AdaptiveFetcher
from kvstore.fetch.policy import FETCH, RECOMPUTE_CHUNK, RECOMPUTE_REST, Choice, OraclePolicy, Policy, RecomputePolicy, StaticPolicy
from kvstore.fetch.throughput import ThroughputEstimator
from kvstore.testing.shaping import BandwidthTrace, ShapedStore, link_utilization

MODEL = "fetch-test"
L, H, T, D, CHUNK = 4, 2, 512, 64, 64
MB = 1e6


def make_kv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(H, T, D, generator=g).half(), torch.randn(H, T, D, generator=g).half()) for _ in range(L)]


TOKENS = list(range(1000, 1000 + T))
KV = make_kv()


@pytest.fixture
async def shaped():
    link = ShapedStore(MemoryStore(), BandwidthTrace.steady(10 * MB))
    store = KVStore(link, chunk_tokens=CHUNK, levels=["raw", "int8", ("kivi2", {})])
    manifest = await store.put(MODEL, TOKENS, KV)
    yield link, store, manifest
    await store.close()


def truth_recompute(calls):
    def recompute(tokens, prefix):
        start = 0 if prefix is None else prefix[0][0].shape[1]
        calls.append((start, len(tokens)))
        return [(k[:, start:start + len(tokens)], v[:, start:start + len(tokens)]) for k, v in KV]
    return recompute


def assert_kv_equal(a, b):
    for (ka, va), (kb, vb) in zip(a, b):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


async def test_fast_link_gets_the_best_level(shaped):
    link, store, manifest = shaped
    link.reset(BandwidthTrace.steady(20 * MB))
    result = await AdaptiveFetcher(store, prior_Bps=20 * MB).load(MODEL, TOKENS, deadline_s=2.0)
    assert result.levels() == [0] * 8
    assert result.slo_met
    assert_kv_equal(result.kv, KV)
    assert "met" in result.table()


async def test_a_load_into_an_earlier_loads_output(shaped):
    link, store, manifest = shaped
    link.reset(BandwidthTrace.steady(1000 * MB))
    fetcher = AdaptiveFetcher(store, prior_Bps=1000 * MB)
    first = await fetcher.load(MODEL, TOKENS, deadline_s=60, levels=[2])
    second = await fetcher.load(MODEL, TOKENS, deadline_s=60, levels=[0], out=first.kv)
    assert [k.data_ptr() for k, _ in second.kv] == [k.data_ptr() for k, _ in first.kv]
    assert_kv_equal(second.kv, KV)
    with pytest.raises(ConfigError, match="earlier get"):
        await fetcher.load(MODEL, TOKENS, deadline_s=60, out=KV)


async def test_slow_link_picks_smaller_levels_and_meets_the_deadline(shaped):
    link, store, manifest = shaped
    link.reset(BandwidthTrace.steady(1 * MB))
    deadline = 0.6  # raw needs ~1.05 s, int8 ~0.54 s (too close with the safety margin), kivi2 ~0.2 s
    result = await AdaptiveFetcher(store).load(MODEL, TOKENS, deadline_s=deadline)
    assert result.slo_met, result.table()
    levels = result.levels()
    assert levels[0] == 1  # no measurement yet: a middle level
    assert result.decisions[1].fetch_start >= result.decisions[0].fetch_end  # waited for a measurement
    assert result.bytes_fetched < manifest.level_bytes(1)
    expected = await store.get(MODEL, TOKENS, level=2)
    for d, ((k, _), (ek, _)) in zip(result.decisions, zip(result.kv, expected)):
        if d.level == 2:
            assert torch.equal(k[:, d.start:d.stop], ek[:, d.start:d.stop])


async def test_bandwidth_drop_lowers_later_levels(shaped):
    link, store, _ = shaped
    link.reset(BandwidthTrace.step(4 * MB, 0.4 * MB, at_s=0.15))
    result = await AdaptiveFetcher(store, prior_Bps=4 * MB, max_in_flight=2).load(MODEL, TOKENS, deadline_s=1.2)
    levels = result.levels()
    assert levels[0] == 0 and levels[-1] > 0, result.table()  # smaller once the drop is measured
    assert result.slo_met, result.table()


async def test_infeasible_deadline_recomputes_instead(shaped):
    link, store, _ = shaped
    link.reset(BandwidthTrace.steady(0.05 * MB))
    calls = []
    fetcher = AdaptiveFetcher(store, recompute=truth_recompute(calls), prefill_tokens_per_s=1e5,
                              prior_Bps=0.05 * MB)
    result = await fetcher.load(MODEL, TOKENS, deadline_s=0.3)
    assert calls == [(0, T)]
    assert result.levels() == [None] * 8 and result.bytes_fetched == 0
    assert result.slo_met
    assert_kv_equal(result.kv, KV)


async def test_recompute_rest_after_measuring_a_slow_link(shaped):
    link, store, _ = shaped
    link.reset(BandwidthTrace.steady(0.2 * MB))
    calls = []
    fetcher = AdaptiveFetcher(store, recompute=truth_recompute(calls), prefill_tokens_per_s=1e5)
    result = await fetcher.load(MODEL, TOKENS, deadline_s=0.25)
    first_fetched = [d.index for d in result.decisions if d.action == "fetch"]
    assert first_fetched and first_fetched == list(range(len(first_fetched))), result.table()
    assert calls and calls[-1][0] + calls[-1][1] == T
    assert calls[0][0] == len(first_fetched) * CHUNK  # recomputed on top of the fetched prefix


async def test_without_recompute_the_smallest_level_and_a_missed_slo(shaped):
    link, store, _ = shaped
    link.reset(BandwidthTrace.steady(0.1 * MB))
    result = await AdaptiveFetcher(store, prior_Bps=0.1 * MB).load(MODEL, TOKENS, deadline_s=0.2)
    assert result.levels() == [2] * 8
    assert not result.slo_met and "MISSED" in result.table()


async def test_static_oracle_and_recompute_policies(shaped):
    link, store, manifest = shaped
    trace = BandwidthTrace.steady(1 * MB)
    link.reset(trace)
    fetcher = AdaptiveFetcher(store, recompute=truth_recompute([]), prefill_tokens_per_s=1e5)
    static = await fetcher.load(MODEL, TOKENS, deadline_s=5, policy=StaticPolicy(1))
    assert static.levels() == [1] * 8 and static.bytes_fetched == manifest.level_bytes(1)
    link.reset(trace)
    oracle = await fetcher.load(MODEL, TOKENS, deadline_s=0.6, policy=OraclePolicy(trace.mean_rate))
    assert oracle.levels()[0] in (1, 2) and oracle.slo_met, oracle.table()
    recomputed = await fetcher.load(MODEL, TOKENS, deadline_s=5, policy=RecomputePolicy())
    assert recomputed.bytes_fetched == 0
    assert_kv_equal(recomputed.kv, KV)


async def test_fetch_overlaps_decode_and_uses_the_link(shaped):
    link, store, manifest = shaped
    trace = BandwidthTrace.steady(2 * MB)
    link.reset(trace)
    result = await AdaptiveFetcher(store).load(MODEL, TOKENS, deadline_s=60, levels=[0])
    d = result.decisions
    assert all(d[i + 1].fetch_start < d[i].ready_at for i in range(len(d) - 1))  # pipelined
    transfers = [(x.fetch_start + link.latency_s, x.fetch_end, x.nbytes) for x in d]
    assert link_utilization(trace, transfers) > 0.8
    assert result.bytes_fetched == manifest.level_bytes(0)


async def test_missing_and_corrupt_chunks_raise(shaped):
    link, store, manifest = shaped
    fetcher = AdaptiveFetcher(store, prior_Bps=100 * MB)
    key = manifest.chunks[3].objects[0].key
    value = await link.inner.get(key)
    corrupt = bytearray(value)
    corrupt[-10] ^= 1
    await link.inner.put(key, bytes(corrupt))
    with pytest.raises(ChecksumError):
        await fetcher.load(MODEL, TOKENS, deadline_s=5, levels=[0])
    await link.inner.delete(key)
    with pytest.raises(IncompleteContextError):
        await fetcher.load(MODEL, TOKENS, deadline_s=5, levels=[0])
    with pytest.raises(ContextNotFoundError):
        await fetcher.load(MODEL, TOKENS[:100], deadline_s=5)
    with pytest.raises(ConfigError):
        await fetcher.load(MODEL, TOKENS, deadline_s=0)
    with pytest.raises(ConfigError):
        await fetcher.load(MODEL, TOKENS, deadline_s=1, levels=[7])


def test_throughput_estimator_serial_transfers_give_their_own_rate():
    est = ThroughputEstimator(window=3)
    assert est.estimate() is None
    est.record(1000, 0.0, 1.0)
    assert est.estimate() == pytest.approx(1000.0)
    est.record(1000, 10.0, 11.0)  # alone on the link after an idle gap: the idle time is not charged
    assert est.estimate() == pytest.approx(1000.0)


def test_throughput_estimator_transfers_sharing_the_link_each_show_its_rate():
    """Three transfers start together on a 3,000 B/s link shared equally: each gets 1,000 B/s
    while all three are on the wire. The first to finish (still with two partners in flight)
    shows the link's rate, not a third of it."""
    est = ThroughputEstimator(window=3)
    a, b, c = est.start(0.0), est.start(0.0), est.start(0.0)
    est.finish(a, 1000, 1.0)  # 1,000 bytes at a third of the link
    assert est.estimate() == pytest.approx(3000)
    est.finish(b, 1000, 1.0)
    est.finish(c, 2500, 1.5)  # alone from t=1: 1,000 + 1,500 bytes
    assert est.estimate() == pytest.approx(3000)


def test_throughput_estimator_unfair_sharing_cancels_in_the_sum():
    """Two connections split a 2,000 B/s link 3:1 and finish at t=1.0 and 1.5: the first
    alone misreads the link, their sum does not."""
    est = ThroughputEstimator(window=2)
    fast, slow = est.start(0.0), est.start(0.0)
    est.finish(fast, 1500, 1.0)  # had 1,500 B/s of the 2,000
    assert est.estimate() == pytest.approx(3000)  # fair share would have given it 1,000 B/s
    est.finish(slow, 1500, 1.5)  # 500 B/s until t=1, then the whole link for 0.5 s
    assert est.estimate() == pytest.approx(2000)  # 3,000 bytes over 1.5 s of busy link


def test_throughput_estimator_a_drop_shows_and_failed_transfers_leave_the_link():
    est = ThroughputEstimator(window=3)
    for i in range(3):
        est.record(1000, float(i), i + 1.0)
    est.record(1000, 3.0, 7.0)  # 250 B/s: the slow transfer's long time dominates the sums
    assert est.estimate() == pytest.approx(3000 / 6.0)
    failed = est.start(8.0)
    est.cancel(failed)
    est.record(1000, 8.0, 9.0)  # not shared with the failed transfer
    assert est._samples[-1] == (1000, pytest.approx(1.0))
    with pytest.raises(ValueError):
        est.record(10, 5.0, 4.0)


def test_trace_arithmetic():
    trace = BandwidthTrace.step(100.0, 10.0, at_s=1.0)
    assert trace.bytes_between(0.5, 2.0) == pytest.approx(50 + 10)
    assert trace.finish_time(0.5, 60) == pytest.approx(2.0)
    assert trace.mean_rate(0, 2) == pytest.approx(55)
    rnd = BandwidthTrace.uniform_random(1.0, 2.0, 0.5, 3.0, seed=3)
    assert all(1.0 <= r <= 2.0 for r in rnd.rates_Bps) and rnd == BandwidthTrace.uniform_random(1.0, 2.0, 0.5, 3.0, seed=3)


def test_in_flight_bound_falls_while_transfers_stay_on_the_wire():
    from kvstore.fetch.throughput import in_flight_bound

    assert in_flight_bound([], [(100, 1.0)], 2.0) is None
    on_wire = [(1000, 1.0), (1000, 1.5)]  # nothing completed since t=1
    assert in_flight_bound(on_wire, [(500, 0.9)], 1.0) is None  # no time has passed
    assert in_flight_bound(on_wire, [(500, 0.9)], 2.0) == pytest.approx(2000 / 1.0)
    assert in_flight_bound(on_wire, [(500, 0.9)], 5.0) == pytest.approx(2000 / 4.0)  # the longer, the lower
    assert in_flight_bound(on_wire, [(500, 1.2)], 2.0) == pytest.approx(2500 / 1.0)  # completed meanwhile


async def test_recompute_cost_is_learned_when_not_declared(shaped):
    link, store, _ = shaped
    calls = []
    fetcher = AdaptiveFetcher(store, recompute=truth_recompute(calls))
    assert fetcher.prefill_cost is None
    result = await fetcher.load(MODEL, TOKENS, deadline_s=5, policy=RecomputePolicy())
    assert calls == [(0, T)] and result.decisions[0].work_s > 0
    assert fetcher.prefill_cost is not None
    assert fetcher.prefill_cost.seconds(T) == pytest.approx(result.decisions[0].work_s)


async def test_shaped_link_is_shared_equally_by_transfers_in_flight():
    inner = MemoryStore()
    await inner.put("big", b"x" * 100_000)
    await inner.put("small", b"y" * 50_000)
    link = ShapedStore(inner, BandwidthTrace.steady(1 * MB), latency_s=0)

    async def timed(key):
        value = await link.get(key)
        return len(value), link.now()

    link.reset()
    (big, big_end), (small, small_end) = await asyncio.gather(timed("big"), timed("small"))
    assert (big, small) == (100_000, 50_000)
    assert small_end == pytest.approx(0.100, abs=0.015)  # 50 kB at half of 1 MB/s
    assert big_end == pytest.approx(0.150, abs=0.015)  # then alone for its last 50 kB
    link.reset(BandwidthTrace.step(1 * MB, 0.1 * MB, at_s=0.05))
    _, end = await timed("big")  # 50 kB by 0.05 s, the other 50 kB at 100 kB/s
    assert end == pytest.approx(0.55, abs=0.02)
    assert link.bytes_carried == 100_000
    link.reset(BandwidthTrace.steady(0.1 * MB))
    task = asyncio.ensure_future(timed("big"))
    await asyncio.sleep(0.05)
    task.cancel()  # a cancelled transfer leaves the link to the others
    (_, end), = await asyncio.gather(timed("small"))
    assert end == pytest.approx(0.55, abs=0.03)


def test_shaped_link_survives_a_loop_that_ended_mid_transfer():
    """A transfer abandoned when its event loop ended neither shares the link with the next
    run's transfers nor leaves the link's server stranded on the dead loop (a hang)."""
    inner = MemoryStore()
    asyncio.run(inner.put("a", b"x" * 20_000))
    link = ShapedStore(inner, BandwidthTrace.steady(0.1 * MB), latency_s=0)

    async def abandon():
        asyncio.ensure_future(link.get("a"))
        await asyncio.sleep(0.02)

    async def fetch():
        started = link.now()
        value = await asyncio.wait_for(link.get("a"), timeout=2)
        return len(value), link.now() - started

    asyncio.run(abandon())  # asyncio.run cancels the transfer at shutdown
    size, took = asyncio.run(fetch())
    assert size == 20_000 and took == pytest.approx(0.2, abs=0.05)  # alone on the link
    loop = asyncio.new_event_loop()
    loop.run_until_complete(abandon())
    loop.close()  # closed with the transfer and the link's server still pending
    size, took = asyncio.run(fetch())
    assert size == 20_000 and took == pytest.approx(0.2, abs=0.05)
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.disabled = True  # the dead loop's tasks are collected now, not in a later test's log
    try:
        gc.collect()
    finally:
        asyncio_log.disabled = False


class ScriptedPolicy(Policy):
    """Fetches at ``levels[i]`` ("one": recompute this chunk, ``None``: the rest) and keeps
    what it was shown."""

    def __init__(self, levels):
        self.levels, self.seen = levels, []

    def choose(self, ctx):
        self.seen.append(ctx)
        level = self.levels[ctx.index]
        if level == "one":
            return Choice(RECOMPUTE_CHUNK, None, "scripted")
        return Choice(RECOMPUTE_REST, None, "scripted") if level is None else Choice(FETCH, level, "scripted")


async def test_policy_sees_the_prefix_and_the_latest_fetched_level(shaped):
    link, store, _ = shaped
    calls = []
    policy = ScriptedPolicy([2, 1, "one", 0, 2, 0, None, None])
    fetcher = AdaptiveFetcher(store, recompute=truth_recompute(calls), prior_Bps=10 * MB)
    result = await fetcher.load(MODEL, TOKENS, deadline_s=5, policy=policy)
    assert [c.prefix_tokens for c in policy.seen] == [i * CHUNK for i in range(7)]
    assert [c.previous_level for c in policy.seen] == [None, 2, 1, 1, 0, 2, 0]  # a recompute keeps the last
    assert calls == [(2 * CHUNK, CHUNK), (6 * CHUNK, 2 * CHUNK)]
    samples = list(fetcher._prefill_samples)  # learned: no cost was declared
    assert samples == [(CHUNK, 2 * CHUNK, result.decisions[2].work_s), (2 * CHUNK, 6 * CHUNK, result.decisions[6].work_s)]
    exact = [slice(2 * CHUNK, 4 * CHUNK), slice(5 * CHUNK, 8 * CHUNK)]  # raw and recomputed chunks
    assert_kv_equal([(k[:, s], v[:, s]) for k, v in result.kv for s in exact],
                    [(k[:, s], v[:, s]) for k, v in KV for s in exact])


async def test_a_failed_fetch_leaves_the_throughput_estimate_alone(shaped):
    """A chunk whose fetch fails is recomputed; its transfer must stop counting as sharing the
    link, or every later estimate would read double."""
    link, store, manifest = shaped
    link.reset(BandwidthTrace.steady(2 * MB))
    await link.inner.delete(manifest.chunks[2].objects[0].key)
    fetcher = AdaptiveFetcher(store, recompute=truth_recompute([]), max_in_flight=1)
    result = await fetcher.load(MODEL, TOKENS, deadline_s=60, policy=StaticPolicy(0))
    assert result.levels()[2] is None and "fetch failed" in result.decisions[2].reason
    later = [d.throughput_Bps for d in result.decisions[4:]]
    assert all(0.7 * 2 * MB < rate < 1.1 * 2 * MB for rate in later), later
    assert_kv_equal(result.kv, KV)


async def test_resetting_the_shaped_link_fails_reads_on_it():
    inner = MemoryStore()
    await inner.put("a", b"x" * 10_000)
    link = ShapedStore(inner, BandwidthTrace.steady(0.1 * MB), latency_s=0)
    read = asyncio.ensure_future(link.get("a"))
    await asyncio.sleep(0.02)
    link.reset()
    with pytest.raises(BackendError, match="reset"):
        await asyncio.wait_for(read, timeout=1)
    assert await link.get("a") == b"x" * 10_000
