"""``kvstore bench stream``: the adaptive fetcher against fixed policies on shaped links.

SmolLM2 contexts (pydoc text; 4 x 2,048 tokens, ``--quick`` 1 x 1,024) are
stored at every level (raw, int8, kvcodec3 L0-L5, the store's levels with a model profile
calibrated on 8,192 tokens; ``--quick``: on 2,048) behind a link shaped to a
bandwidth trace. As root with iproute2 and ``redis-server`` the link is the
kernel's: ``redis-server`` in a network namespace behind a veth pair whose
server-to-client direction passes ``tc tbf``, its rate changed on the trace's
schedule (:mod:`tests.tools.netshape`); elsewhere, or with
``KVSTORE_BENCH_LINK=inprocess``, the in-process
:class:`~kvstore.testing.shaping.ShapedStore`. The JSON's ``link`` says which
(``"kernel"`` or ``"in-process (<why>)"``). Traces: steady, a step drop, and
CacheGen's evaluation style (a rate drawn uniformly every interval), all scaled
down so the SLO binds on a CPU decoder: the SLO is a third of the time ``int8``
needs at the trace's median rate. Policies: ``adaptive`` (measured throughput
only), each static level, ``recompute`` (this machine's measured prefill), and
``oracle`` (CacheGen's rule given the true trace). For each: ``ttft_s`` (until
the last chunk is decoded), ``slo_met``, ``ppl_increase_pct`` of the KV
actually delivered, ``link_utilization`` and ``decode_s`` (decode time not
hidden behind the fetch). On a CPU-only machine the CPU decoder is part of the
result.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from kvstore.backends.memory import MemoryStore
from kvstore.codecs.kvcodec3 import DEFAULT_LEVEL, KVCodec3
from eval.corpus import documents
from eval.model import load_model
from eval.perplexity import ppl
from eval.profiles import EVALUATION_SOURCE, transform_profile
from kvstore.fetch import AdaptiveFetcher, PrefillCost
from kvstore.fetch.policy import AdaptivePolicy, OraclePolicy, Policy, StaticPolicy
from kvstore.fetch.timeline import draw_timeline, timeline_of
from kvstore.integrations.hf import extract_kv, make_recompute
from kvstore.store import KVStore
from kvstore.testing.shaping import BandwidthTrace, ShapedStore, link_utilization

MBIT = 1e6 / 8


def traces(quick: bool) -> list[BandwidthTrace]:
    """Link traces in bytes/s (rates chosen for SmolLM2's small KV on a CPU decoder)."""
    out = [
        BandwidthTrace.steady(50 * MBIT),
        BandwidthTrace.step(100 * MBIT, 12.5 * MBIT, at_s=0.3),
        BandwidthTrace.uniform_random(5 * MBIT, 100 * MBIT, interval_s=0.1, duration_s=60, seed=1),
    ]
    return out[:2] if quick else out


def _median_rate(trace: BandwidthTrace, horizon_s: float = 3.0) -> float:
    samples = [trace.rate_at(t * horizon_s / 200) for t in range(200)]
    return statistics.median(samples)


class _InProcessLink:
    """The in-process shaped link (any machine)."""

    detail = "in-process ShapedStore (transfers share the trace's rate equally, 0.5 ms per request)"

    def __init__(self, why: str) -> None:
        self.name = f"in-process ({why})"
        self.shaped = ShapedStore(MemoryStore(), BandwidthTrace.steady(1e12))
        self.byte_store = self.shaped

    async def start(self, trace: BandwidthTrace) -> None:
        self.shaped.reset(trace)

    async def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class _KernelLink:
    """redis-server in a network namespace behind ``tc tbf`` (root only)."""

    name = "kernel"
    detail = "tc tbf on a veth pair into a network namespace running redis-server"

    def __init__(self) -> None:
        from kvstore.backends import open_store
        from tests.tools.netshape import ShapedRedis

        self.server = ShapedRedis(1e9).start()
        self.byte_store = open_store(self.server.url, socket_timeout=120)  # one raw chunk at 12.5 Mbit/s: ~8 s
        self._replay: asyncio.Task[None] | None = None

    async def start(self, trace: BandwidthTrace) -> None:
        await asyncio.to_thread(self.server.set_rate, trace.rates_Bps[0])
        self._replay = asyncio.create_task(self.server.replay(trace))

    async def stop(self) -> None:
        if self._replay is not None:
            self._replay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay
        await asyncio.to_thread(self.server.set_rate, 1e9)

    def close(self) -> None:
        self.server.stop()


def _make_link() -> _InProcessLink | _KernelLink:
    """The kernel link where it can run (``KVSTORE_BENCH_LINK=inprocess`` opts out), else in-process."""
    from tests.tools.netshape import netshape_available

    if os.environ.get("KVSTORE_BENCH_LINK", "").replace("-", "") == "inprocess":
        return _InProcessLink("KVSTORE_BENCH_LINK=inprocess")
    reason = netshape_available()
    if reason is None:
        try:
            return _KernelLink()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            reason = f"kernel link failed to start: {exc}"
    print(f"[stream] {reason}; using the in-process link", file=sys.stderr)
    return _InProcessLink(reason)


async def _run(quick: bool) -> dict[str, Any]:
    n_docs = 1 if quick else 4
    lm = load_model("smollm2")
    profile, _ = transform_profile(lm, contexts=1 if quick else 4, context_tokens=2048)
    docs = documents(lm.tokenizer, sources=[EVALUATION_SOURCE], n=n_docs, seed=3)
    level_names = ["raw", "int8"] + [f"kvcodec3-L{i}" for i in range(len(profile.levels))]
    codecs: list[Any] = ["raw", "int8"] + [KVCodec3(profile, i) for i in range(len(profile.levels))]
    link = _make_link()
    try:
        return await _measure(quick, lm, profile, docs, level_names, codecs, link)
    finally:
        link.close()


async def _measure(quick: bool, lm: Any, profile: Any, docs: list[Any], level_names: list[str],
                   codecs: list[Any], link: _InProcessLink | _KernelLink) -> dict[str, Any]:
    context_tokens, continuation = (1024, 128) if quick else (2048, 256)
    adaptive_levels = list(range(2, len(level_names)))  # the fetcher chooses among kvcodec3 levels
    recompute_fn = make_recompute(lm.model)
    runs: list[dict[str, Any]] = []
    timeline: dict[str, Any] | None = None
    prefill_cost: PrefillCost | None = None
    for doc in docs:
        context = doc.tokens[:context_tokens]
        cont = doc.tokens[context_tokens:context_tokens + continuation]
        kv32 = extract_kv(lm.model, context)
        kv16 = [(k.half(), v.half()) for k, v in kv32]
        base = ppl(lm.model, context, cont, kv16)
        store = KVStore(link.byte_store, levels=codecs, namespace=f"bench{os.getpid()}")
        manifest = await store.put(lm.model_id, context, kv16)
        await store.load_profiles(manifest)  # once per process and model, as a server would
        if prefill_cost is None:  # the application's recompute, timed once as a server would at start-up
            chunk = manifest.chunks[0].stop - manifest.chunks[0].start
            prefill_cost = PrefillCost.measure(recompute_fn, context, chunk_tokens=chunk)
        ppl_cache: dict[tuple[int | None, ...], float] = {}

        def quality(levels: list[int | None], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
            key = tuple(levels)
            if key not in ppl_cache:
                ppl_cache[key] = 100 * (ppl(lm.model, context, cont, kv) / base - 1)
            return ppl_cache[key]

        for trace in traces(quick):
            median = _median_rate(trace)
            deadline = manifest.level_bytes(1) / median / 3
            policies: list[tuple[str, Policy, list[int] | None]] = [
                ("adaptive", AdaptivePolicy(), adaptive_levels),
                ("oracle", OraclePolicy(trace.mean_rate), adaptive_levels),
            ]
            policies += [(name, StaticPolicy(i), None) for i, name in enumerate(level_names)]
            for name, policy, levels in policies:
                fetcher = AdaptiveFetcher(store, recompute=recompute_fn, prefill_cost=prefill_cost)
                await link.start(trace)
                try:
                    result = await fetcher.load(lm.model_id, context, deadline_s=deadline, policy=policy, levels=levels)
                finally:
                    await link.stop()
                transfers = [(d.fetch_start, d.fetch_end, d.nbytes) for d in result.decisions if d.fetch_start is not None]
                runs.append({
                    "document": doc.name, "trace": trace.name, "policy": name, "deadline_s": deadline,
                    "ttft_s": result.ttft_s, "slo_met": result.slo_met,
                    "ppl_increase_pct": quality(result.levels(), result.kv),
                    "link_utilization": link_utilization(trace, transfers),
                    "decode_s": result.decode_exposed_s,
                    "bytes": result.bytes_fetched,
                    "levels": result.levels(),
                })
                print(f"[stream] {doc.name} {trace.name:>7} {name:>12}: ttft {result.ttft_s:6.3f}s "
                      f"(slo {deadline:.3f}s {'met' if result.slo_met else 'missed'}) "
                      f"ppl {runs[-1]['ppl_increase_pct']:+.2f}%", file=sys.stderr, flush=True)
                if name == "adaptive" and trace.name == "random" and timeline is None:
                    timeline = timeline_of(result, trace.times, trace.rates_Bps, deadline, level_names)
            started = time.perf_counter()
            recomputed = recompute_fn(context, None)
            recompute_s = time.perf_counter() - started
            runs.append({"document": doc.name, "trace": trace.name, "policy": "recompute", "deadline_s": deadline,
                         "ttft_s": recompute_s, "slo_met": recompute_s <= deadline,
                         "ppl_increase_pct": quality([None] * len(manifest.chunks), [(k.half(), v.half()) for k, v in recomputed]),
                         "link_utilization": None, "decode_s": 0.0, "bytes": 0, "levels": []})
        for key in [k async for k in store.store.list(f"bench{os.getpid()}/")]:
            await store.store.delete(key)
    await link.byte_store.close()
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["policy"] for r in runs):
        rows = [r for r in runs if r["policy"] == name]
        utils = [r["link_utilization"] for r in rows if r["link_utilization"] is not None]
        summary[name] = {
            "ttft_s": statistics.mean(r["ttft_s"] for r in rows),
            "slo_met": sum(r["slo_met"] for r in rows) / len(rows),
            "ppl_increase_pct": statistics.mean(r["ppl_increase_pct"] for r in rows),
            "link_utilization": statistics.mean(utils) if utils else None,
            "decode_s": statistics.mean(r["decode_s"] for r in rows),
        }
    feasible = [(r, o) for r, o in zip((r for r in runs if r["policy"] == "adaptive"),
                                      (r for r in runs if r["policy"] == "oracle")) if o["slo_met"]]
    steady = [r for r in runs if r["trace"] == "steady" and r["policy"] == "adaptive"]
    default = f"kvcodec3-L{DEFAULT_LEVEL}"
    return {
        "model": lm.model_id,
        "context_tokens": context_tokens,
        "link": link.name,
        "link_detail": link.detail,
        "decoder": "cpu" if not torch.cuda.is_available() else "cuda",
        "prefill_cost": None if prefill_cost is None else {
            "per_token_s": prefill_cost.per_token_s, "per_token_pair_s": prefill_cost.per_token_pair_s},
        "runs": runs,
        "summary": summary,
        "adaptive_slo_met_on_feasible": (sum(r["slo_met"] for r, _ in feasible) / len(feasible)) if feasible else None,
        "ttft_ratio_int8_over_adaptive": summary["int8"]["ttft_s"] / summary["adaptive"]["ttft_s"],
        "ttft_ratio_int8_over_default_level": summary["int8"]["ttft_s"] / summary[default]["ttft_s"],
        "ppl_adaptive_minus_oracle_pct": summary["adaptive"]["ppl_increase_pct"] - summary["oracle"]["ppl_increase_pct"],
        "steady_link_utilization_adaptive": statistics.mean(r["link_utilization"] for r in steady) if steady else None,
        "timeline": timeline,
    }


def run(quick: bool) -> dict[str, Any]:
    """Measure; ``quick``: one 1,024-token context, two traces."""
    return asyncio.run(_run(quick))


def plot_timeline(result: dict[str, Any], path: str) -> None:
    """One adaptive load: the true bandwidth, the fetcher's estimate, each chunk's transfer and level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    if timeline is None:
        raise ValueError("this result holds no timeline (run the full benchmark)")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    draw_timeline(ax1, ax2, timeline, f"adaptive load, random trace; SLO {timeline['deadline_s']:.2f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
