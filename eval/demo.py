"""``kvstore demo``: what the library does, on a real model, in a few minutes on a CPU.

It loads SmolLM2-135M-Instruct, takes a long document, stores the document's KV
at every level (raw, int8 and the six levels of ``kvcodec3``, the transform codec) with its PQ codes in a
store (a local directory by default), loads it back, and answers a question
about the document from the loaded cache (prefix reuse: the stored document
plus the question's tokens, recomputed), also with retrieval attention over the
stored PQ codes. It streams the context back with the adaptive fetcher over a
shaped link whose bandwidth drops mid-load. It prints a table of sizes, load
times and perplexity changes, and writes a PNG of the rate-quality curve, load
times against recompute, and the streaming timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvstore.codecs.kvcodec3 import DEFAULT_LEVEL, KVCodec3
from eval.corpus import documents
from eval.model import cache_root, load_model
from eval.perplexity import ppl
from eval.profiles import EVALUATION_SOURCE, transform_profile
from kvstore.fetch import AdaptiveFetcher
from kvstore.fetch.timeline import draw_timeline, timeline_of
from kvstore.integrations.hf import extract_kv, generate_greedy, make_recompute, recompute
from kvstore.kv import KV
from kvstore.retrieval import PQConfig, RetrievalConfig
from kvstore.retrieval.hf import RetrievalSession, retrieval_attention
from kvstore.store import KVStore
from kvstore.testing.shaping import BandwidthTrace, ShapedStore

LINK_MBIT = 100
DROP_TO = 0.5  # the link's rate after its drop, as a fraction
DEADLINE_VS_INT8 = 0.5  # the streaming deadline, as a fraction of int8's transfer time on the full link
MBIT = 1e6 / 8
QUESTION = "\n\nQuestion: In one sentence, what is the text above about?\nAnswer:"
#: license contexts of 2,048 tokens the full demo's profile is calibrated on (as ``bench codecs``)
CALIBRATION_CONTEXTS = 4


@dataclass
class LevelResult:
    """One stored level of the demo context."""

    name: str
    bits_per_element: float
    stored_bytes: int
    load_s: float
    ppl: float
    ppl_increase_pct: float


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_store_url() -> str:
    """The embedded default: a local directory under the kvstore cache."""
    return (cache_root() / "demo-store").absolute().as_uri()


async def _demo(store_url: str, quick: bool, storage_options: dict[str, Any]) -> dict[str, Any]:
    context_tokens, continuation_tokens, answer_tokens = (1024, 128, 16) if quick else (2048, 256, 24)
    _say("loading SmolLM2-135M-Instruct (converted and cached on the first run)...")
    lm = load_model("smollm2")
    _say("calibrating the codec profile on other text (minutes on the first run; cached after)...")
    profile, _ = transform_profile(lm, contexts=1 if quick else CALIBRATION_CONTEXTS, context_tokens=context_tokens)
    doc = documents(lm.tokenizer, sources=[EVALUATION_SOURCE], n=1, seed=7)[0]
    context = doc.tokens[:context_tokens]
    continuation = doc.tokens[context_tokens:context_tokens + continuation_tokens]
    question = torch.tensor(lm.tokenizer.encode(QUESTION, add_special_tokens=False))

    _say(f"prefilling a {context_tokens}-token context of {doc.name} (what a cache miss costs)...")
    started = time.perf_counter()
    kv = [(k.half(), v.half()) for k, v in extract_kv(lm.model, context)]  # what a serving engine keeps
    recompute_s = time.perf_counter() - started
    fp16_bytes = 2 * sum(k.numel() + v.numel() for k, v in kv)

    names = ["raw", "int8"] + [f"kvcodec3-L{i}" for i in range(len(profile.levels))]
    codecs: list[Any] = ["raw", "int8"] + [KVCodec3(profile, i) for i in range(len(profile.levels))]
    default = names.index(f"kvcodec3-L{DEFAULT_LEVEL}")
    chunk_tokens = context_tokens // 8  # 8 chunks: enough decisions for the fetcher to adapt in the quick run too
    async with KVStore(store_url, levels=codecs, chunk_tokens=chunk_tokens, storage_options=storage_options) as store:
        _say(f"storing it at {len(codecs)} levels, with PQ codes, in {store.store.url} ...")
        started = time.perf_counter()
        manifest = await store.put(lm.model_id, context, kv, pq=PQConfig())
        put_s = time.perf_counter() - started
        assert manifest.pq is not None
        started = time.perf_counter()
        index = await store.get_pq(lm.model_id, context)
        pq_load_s = time.perf_counter() - started
        assert index is not None
        base_ppl = ppl(lm.model, context, continuation, kv)
        results = []
        loaded_default: KV | None = None
        for level, name in enumerate(tqdm(names, desc="load + score each level", unit="level", file=sys.stderr)):
            started = time.perf_counter()
            loaded = await store.get(lm.model_id, context, level=level)
            load_s = time.perf_counter() - started
            if level == default:
                loaded_default = loaded
            level_ppl = ppl(lm.model, context, continuation, loaded)
            size = manifest.level_bytes(level)
            results.append(LevelResult(name, 8 * size / (fp16_bytes / 2), size, load_s, level_ppl,
                                       100 * (level_ppl / base_ppl - 1)))
        assert loaded_default is not None
        raw_loaded = await store.get(lm.model_id, context, level=0)

        # Stream it as a server would: over a shaped link that drops to half its rate a quarter of
        # the way to a deadline of half what int8 needs on the full link, the fetcher choosing
        # among the kvcodec3 levels chunk by chunk (int8 alone would miss it).
        deadline = manifest.level_bytes(names.index("int8")) / (LINK_MBIT * MBIT) * DEADLINE_VS_INT8
        drop_at = round(deadline / 4, 3)
        trace = BandwidthTrace.step(LINK_MBIT * MBIT, LINK_MBIT * MBIT * DROP_TO, at_s=drop_at)
        _say(f"streaming it back over a {LINK_MBIT} Mbit/s link that drops to {DROP_TO:.0%} at {drop_at} s, "
             f"deadline {deadline:.2f} s ...")
        shaped = KVStore(ShapedStore(store.store, trace), levels=codecs, chunk_tokens=chunk_tokens)
        await shaped.load_profiles(manifest)
        # two chunks out at a time: they share the link, so more in flight adds no bandwidth, and
        # each level is then chosen knowing how the one before it went
        fetcher = AdaptiveFetcher(shaped, recompute=make_recompute(lm.model),
                                  prefill_tokens_per_s=context_tokens / recompute_s, max_in_flight=2)
        shaped.store.reset()
        streamed = await fetcher.load(lm.model_id, context, deadline_s=deadline,
                                      levels=list(range(names.index("kvcodec3-L0"), len(names))))
        print(streamed.table(), file=sys.stderr)
        timeline = timeline_of(streamed, trace.times, trace.rates_Bps, deadline, names)
        streamed_ppl = ppl(lm.model, context, continuation, streamed.kv)

    _say("answering a question from the stored context (prefix reuse + the question's tokens)...")
    prompt = torch.cat([context, question])

    def answer(prefix: KV | None, retrieval: RetrievalConfig | None = None) -> list[int]:
        if prefix is None:
            return generate_greedy(lm.model, prompt, None, answer_tokens)
        tail = recompute(lm.model, question, prefix)
        joined = [(torch.cat([pk, tk], 1), torch.cat([pv, tv], 1)) for (pk, pv), (tk, tv) in zip(prefix, tail)]
        sparse = (retrieval_attention(lm.model, RetrievalSession(index, retrieval)) if retrieval is not None
                  else contextlib.nullcontext())
        with sparse:
            return generate_greedy(lm.model, prompt, joined, answer_tokens)

    steps = tqdm(total=5, desc="answer from fresh / stored / streamed KV", unit="answer", file=sys.stderr)
    fresh = answer(None)
    steps.update()
    from_raw = answer(raw_loaded)
    steps.update()
    started = time.perf_counter()
    from_default = answer(loaded_default)
    answer_s = time.perf_counter() - started
    steps.update()
    from_streamed = answer(streamed.kv)
    steps.update()
    from_retrieval = answer(loaded_default, RetrievalConfig(budget=0.2))
    steps.update()
    steps.close()
    int8 = results[1]
    return {
        "model": lm.model_id,
        "model_name": lm.name,
        "continuation_tokens": continuation_tokens,
        "store": store_url,
        "document": doc.name,
        "context_tokens": context_tokens,
        "fp16_bytes": fp16_bytes,
        "ppl_baseline": base_ppl,
        "levels": [asdict(r) | {"size_ratio_vs_int8": int8.stored_bytes / r.stored_bytes,
                                "size_ratio_vs_raw": results[0].stored_bytes / r.stored_bytes} for r in results],
        "default_level": names[default],
        "put_s": put_s,
        "ttft_s": streamed.ttft_s + answer_s / answer_tokens,
        "stream": {
            "link_mbit": LINK_MBIT, "drop_at_s": drop_at, "deadline_s": deadline, "load_s": streamed.ttft_s, "slo_met": streamed.slo_met,
            "levels": [None if lv is None else names[lv] for lv in streamed.levels()],
            "bytes": streamed.bytes_fetched, "ppl_increase_pct": 100 * (streamed_ppl / base_ppl - 1),
            "int8_transfer_s": manifest.level_bytes(names.index("int8")) / (LINK_MBIT * MBIT),
        },
        "timeline": timeline,
        "pq": {"config": manifest.pq.config, "bytes": manifest.pq.total_bytes, "load_s": pq_load_s,
               "fraction_of_default_level": manifest.pq.total_bytes / manifest.level_bytes(default)},
        "recompute_s": recompute_s,
        "answer_fresh": lm.tokenizer.decode(fresh),
        "answer_default_level": lm.tokenizer.decode(from_default),
        "answer_matches_full_kv": from_raw == fresh,
        "answer_default_matches_full_kv": from_default == fresh,
        "answer_streamed": lm.tokenizer.decode(from_streamed),
        "answer_retrieval": lm.tokenizer.decode(from_retrieval),
        "answer_retrieval_matches_default": from_retrieval == from_default,
    }


def print_table(result: dict[str, Any]) -> None:
    """The demo's summary, for people."""
    print(f"\n{result['context_tokens']}-token context of {result['document']}, model {result['model']}")
    print(f"{'level':>12} {'bits/elem':>9} {'stored':>10} {'vs raw':>7} {'vs int8':>8} {'load s':>7} {'ppl change':>11}")
    for r in result["levels"]:
        print(f"{r['name']:>12} {r['bits_per_element']:9.2f} {r['stored_bytes'] / 1e6:8.2f}MB "
              f"{r['size_ratio_vs_raw']:6.2f}x {r['size_ratio_vs_int8']:7.2f}x {r['load_s']:7.2f} "
              f"{r['ppl_increase_pct']:+10.2f}%")
    p = result["pq"]
    print(f"{'PQ codes':>12} {'':>9} {p['bytes'] / 1e6:8.2f}MB  ({100 * p['fraction_of_default_level']:.1f}% of "
          f"{result['default_level']}; loaded in {p['load_s']:.2f} s without any KV)")
    st = result["stream"]
    print(f"\nstreamed over a {st['link_mbit']} Mbit/s link ({DROP_TO:.0%} from {st['drop_at_s']} s): loaded in {st['load_s']:.2f} s "
          f"(deadline {st['deadline_s']:.2f} s, {'met' if st['slo_met'] else 'missed'}; int8 alone needs "
          f"{st['int8_transfer_s']:.2f} s of transfer), levels {st['levels']}, ppl change {st['ppl_increase_pct']:+.2f}%")
    print(f"recompute (prefill on this machine): {result['recompute_s']:.2f} s; "
          f"time to first token from the stream: {result['ttft_s']:.2f} s")
    print(f"answer from freshly computed KV:  {result['answer_fresh']!r}")
    print(f"answer from stored KV ({result['default_level']}): {result['answer_default_level']!r}")
    print(f"answer from the streamed KV:      {result['answer_streamed']!r}")
    print(f"answer with retrieval attention (1/5 of the tokens, PQ codes): {result['answer_retrieval']!r}")
    print(f"answer from stored raw KV matches fresh KV: {result['answer_matches_full_kv']}")


def plot(result: dict[str, Any], path: Path) -> None:
    """Rate-quality of the stored levels, load time against recompute, and the streaming timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    fig = plt.figure(figsize=(15, 8))
    grid = fig.add_gridspec(2, 2)
    ax1, ax2 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
    ax_rate = fig.add_subplot(grid[0, 1])
    ax_chunks = fig.add_subplot(grid[1, 1], sharex=ax_rate)
    for r in levels:
        ax1.scatter(r["bits_per_element"], r["ppl_increase_pct"], color="C0" if r["name"].startswith("kvcodec") else "C1")
        ax1.annotate(r["name"], (r["bits_per_element"], r["ppl_increase_pct"]), fontsize=8,
                     xytext=(4, 4), textcoords="offset points")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("stored bits per KV element (log scale)")
    ax1.set_ylabel("continuation perplexity change (%)")
    ax1.set_title(f"size vs quality ({result['continuation_tokens']} scored tokens: ~1% is noise)")
    ax1.axhline(0, color="grey", lw=0.5)
    names = [r["name"] for r in levels] + ["streamed (shaped link)", "recompute"]
    times = [r["load_s"] for r in levels] + [result["stream"]["load_s"], result["recompute_s"]]
    ax2.barh(names, times, color=["C0"] * len(levels) + ["C2", "C3"])
    ax2.set_xlabel("seconds (this machine)")
    ax2.set_title("load from the store vs recompute the context")
    st = result["stream"]
    draw_timeline(ax_rate, ax_chunks, result["timeline"],
                  f"streaming: {st['link_mbit']} Mbit/s dropping to {DROP_TO:.0%} at {st['drop_at_s']} s; "
                  f"deadline {st['deadline_s']:.2f} s "
                  f"({'met' if st['slo_met'] else 'missed'})")
    fig.suptitle(f"kvstore demo: {result['context_tokens']}-token context, {result['model_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(
    *,
    store_url: str | None = None,
    quick: bool = False,
    json_path: str | None = None,
    png_path: str | None = "kvstore-demo.png",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the demo; print the table; write the PNG and (optionally) the JSON."""
    result = asyncio.run(_demo(store_url or default_store_url(), quick, storage_options or {}))
    print_table(result)
    if png_path:
        plot(result, Path(png_path))
        print(f"wrote {png_path}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")
    if not all(math.isfinite(r["ppl"]) for r in result["levels"]):
        raise RuntimeError("a level produced a non-finite perplexity")
    return result
