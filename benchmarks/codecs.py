"""``kvstore bench codecs``: rate against quality of every codec, on the real model.

SmolLM2-135M-Instruct (or ``--model``, e.g. ``gemma3-270m``), 2,048-token contexts from
the Python documentation (one window per document; 8 documents, 512 continuation tokens;
``--quick``: 2 and 128). The profiles are calibrated on the license texts (4 contexts of
2,048 tokens; ``--quick``: 1), never on the evaluation text. Each context's fp16 KV is cut into 256-token chunks, each
chunk encoded as a full chunk object (container header, token ids, tables:
every stored byte counts), decoded, and the continuation's perplexity measured
with the decoded KV. Rows, one per codec and level:

- ``bits_per_element``: stored bits over the number of K and V elements;
- ``size_ratio_vs_int8``; ``ppl_increase_pct`` with its 95% t-interval over documents;
- ``entropy_efficiency``: ideal code length under the stored model over the coded bytes
  (``kvcodec``: its rANS streams; others: null);
- ``kvtc_ref`` at several bit budgets and ``kvcodec3`` at every level, with their profiles'
  bytes and profiling seconds (``kvcodec3_profile``, ``kvtc_ref_profile``) beside the model's
  weight bytes, and ``vs_kvtc``: each kvcodec/kvcodec3 level's size over ``kvtc_ref``'s
  interpolated at the same perplexity increase;
- ``encode_MBps`` / ``decode_MBps``: fp16 bytes per second, CPU, one process (every core);
  ``..._one_thread``: the same with the entropy coder and torch on one thread (per core).

``kvcodec_fixed``: the default level with SmolLM2-tuned fixed steps (no per-model
calibration), for the calibration's effect within one run. Also ``chunk_sizes``: bits per element of ``kvcodec`` and ``cachegen_ref`` at
chunk sizes from 256 tokens up, and ``vs_cachegen``: each kvcodec level's size
over ``cachegen_ref``'s interpolated at the same perplexity increase.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvstore.codecs import rans
from kvstore.codecs.base import Codec, get_codec
from kvstore.codecs.kvcodec import DEFAULT_LEVEL, KVCodec
from kvstore.codecs.kvcodec3 import KVCodec3
from kvstore.codecs.kvtc_ref import KVTCRefCodec
from eval.corpus import documents, samples
from eval.model import load_model
from eval.perplexity import mean_ci, ppl
from eval.profiles import EVALUATION_SOURCE, kvtc_profile, model_profile, transform_profile
from kvstore.format import container
from kvstore.format.chunk import ChunkIdentity, encode_chunk
from kvstore.format.keys import chunk_bounds, chunk_hashes, model_fingerprint
from kvstore.integrations.hf import extract_kv
from kvstore.kv import KV

CONTEXT_TOKENS = 2048
CHUNK_TOKENS = 256
#: license contexts every profile is calibrated on: 8,192 tokens (full), 2,048 (quick). A
#: transform's bases need the larger set: fitted on 4,096 tokens, kvcodec3's default level
#: cost 5x more perplexity on held-out text (benchmarks/RESULTS.md)
CALIBRATION_CONTEXTS = 4
CALIBRATION_CONTEXTS_QUICK = 1


KVTC_BUDGETS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
KVTC_BUDGETS_QUICK = (0.75, 1.5)


def _configs(profile: Any, fixed: Any, quick: bool, transform: Any = None,
             kvtc: Any = None) -> list[tuple[str, str, Callable[[], Codec]]]:
    cachegen = [("default", {}), ("bins=16", {"bins": 16}), ("bins=32", {"bins": 32}), ("bins=64", {"bins": 64})]
    rows: list[tuple[str, str, Callable[[], Codec]]] = [
        ("int8", "-", lambda: get_codec("int8")),
        ("kivi2", "-", lambda: get_codec("kivi2")),
    ]
    rows += [("cachegen_ref", label, lambda p=params: get_codec("cachegen_ref", p)) for label, params in cachegen]
    rows += [("kvcodec", str(i), lambda i=i: KVCodec(profile, i)) for i in range(len(profile.levels))]
    rows += [("kvcodec_fixed", str(DEFAULT_LEVEL), lambda: KVCodec(fixed, DEFAULT_LEVEL))]
    if kvtc is not None:
        rows += [("kvtc_ref", f"bits={b}", lambda b=b: KVTCRefCodec(kvtc, b))
                 for b in (KVTC_BUDGETS_QUICK if quick else KVTC_BUDGETS)]
    if transform is not None:
        rows += [("kvcodec3", str(i), lambda i=i: KVCodec3(transform, i)) for i in range(len(transform.levels))]
    return rows


def _chunks(kv16: KV, chunk_tokens: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    keys = torch.stack([k for k, _ in kv16])
    values = torch.stack([v for _, v in kv16])
    return [(s, keys[:, :, s:e].contiguous(), values[:, :, s:e].contiguous())
            for s, e in chunk_bounds(keys.shape[2], chunk_tokens)]


def _encode_context(codec: Codec, kv16: KV, tokens: torch.Tensor, chunk_tokens: int) -> tuple[list[bytes], float]:
    """Every chunk as a stored chunk object; returns the objects and the encode seconds."""
    fingerprint = model_fingerprint("bench")
    ids = tokens.numpy().astype("<i4")
    hashes = chunk_hashes(fingerprint, ids, chunk_tokens)
    layers, (heads, _, dim) = len(kv16), kv16[0][0].shape
    objects = []
    started = time.perf_counter()
    for i, (start, k, v) in enumerate(_chunks(kv16, chunk_tokens)):
        ident = ChunkIdentity(fingerprint, hashes[i], start, ids[start:start + k.shape[2]],
                              layers, heads, dim, torch.float16)
        objects.append(encode_chunk(codec, ident, k, v))
    return objects, time.perf_counter() - started


def _decode_context(codec: Codec, objects: list[bytes], kv16: KV) -> tuple[KV, float]:
    layers, (heads, tokens, dim) = len(kv16), kv16[0][0].shape
    keys = torch.empty(layers, heads, tokens, dim, dtype=torch.float16)
    values = torch.empty_like(keys)
    started = time.perf_counter()
    position = 0
    for data in objects:
        obj = container.decode(data)
        n = obj.header.meta["stop"] - obj.header.meta["start"]
        codec.decode_into(obj, keys[:, :, position:position + n], values[:, :, position:position + n])  # as get does
        position += n
    seconds = time.perf_counter() - started
    return list(zip(keys.unbind(0), values.unbind(0))), seconds


def _entropy_efficiency(codec: Codec, kv16: KV) -> float | None:
    if not isinstance(codec, KVCodec):
        return None
    ideal = coded = 0.0
    for start, k, v in _chunks(kv16, CHUNK_TOKENS):
        q = codec.quantize(k, v, start=start)
        ideal += codec.ideal_bits(q)
        buffers = codec.encode(k, v, start=start)
        coded += 8 * sum(len(buffers[name]) for name in ("k", "v", "scales"))
    return ideal / coded


def _interpolate_bits(curve: list[tuple[float, float]], ppl_pct: float) -> float | None:
    """cachegen_ref's bits at ``ppl_pct`` on its (bits, ppl) curve (None outside its range)."""
    pts = sorted(curve, key=lambda p: p[1])
    for (b0, p0), (b1, p1) in zip(pts, pts[1:]):
        if p0 <= ppl_pct <= p1:
            return b0 if p1 == p0 else b0 + (b1 - b0) * (ppl_pct - p0) / (p1 - p0)
    return None


def run(quick: bool, model: str = "smollm2") -> dict[str, Any]:
    """Measure every codec configuration; ``quick``: 2 documents, 128 continuation tokens.
    ``model``: a name or path :func:`~eval.model.load_model` takes."""
    n_docs, continuation = (2, 128) if quick else (8, 512)
    contexts = CALIBRATION_CONTEXTS_QUICK if quick else CALIBRATION_CONTEXTS
    lm = load_model(model)
    profile = model_profile(lm, contexts=contexts, context_tokens=CONTEXT_TOKENS)
    docs = documents(lm.tokenizer, sources=[EVALUATION_SOURCE], n=n_docs, seed=0)
    picks = samples(docs, context_tokens=CONTEXT_TOKENS, continuation_tokens=continuation, seed=0)
    fixed = model_profile(lm, targets_pct=None, contexts=contexts, context_tokens=CONTEXT_TOKENS)
    transform, transform_s = transform_profile(lm, contexts=contexts, context_tokens=CONTEXT_TOKENS)
    kvtc, kvtc_s = kvtc_profile(lm, contexts=contexts, context_tokens=CONTEXT_TOKENS)
    configs = _configs(profile, fixed, quick, transform, kvtc)
    stats: dict[str, dict[str, Any]] = {
        f"{c}:{lv}": {"bytes": 0, "elements": 0, "enc_s": 0.0, "dec_s": 0.0, "enc1_s": 0.0, "dec1_s": 0.0, "fp16_bytes": 0, "rel": [], "eff": []}
        for c, lv, _ in configs
    }
    sweep_sizes = (256, 2048) if quick else (256, 512, 1024, 2048)
    sweep: dict[str, dict[int, list[float]]] = {"kvcodec:1": {}, "cachegen_ref:default": {}}
    baselines = []
    for n, sample in enumerate(picks):
        print(f"[codecs] sample {n + 1}/{len(picks)}: {sample.document}", file=sys.stderr, flush=True)
        kv16 = [(k.half(), v.half()) for k, v in extract_kv(lm.model, sample.context)]
        base = ppl(lm.model, sample.context, sample.continuation, kv16)
        baselines.append(base)
        elements = 2 * sum(k.numel() for k, _ in kv16)
        for codec_name, level, make in configs:
            key, codec = f"{codec_name}:{level}", make()
            objects, enc_s = _encode_context(codec, kv16, sample.context, CHUNK_TOKENS)
            decoded, dec_s = _decode_context(codec, objects, kv16)
            previous, torch_threads = rans.limit_threads(1), torch.get_num_threads()
            torch.set_num_threads(1)
            try:  # per core: the entropy coder and torch on one thread
                _, enc1_s = _encode_context(codec, kv16, sample.context, CHUNK_TOKENS)
                _, dec1_s = _decode_context(codec, objects, kv16)
            finally:
                rans.limit_threads(previous)
                torch.set_num_threads(torch_threads)
            s = stats[key]
            s["bytes"] += sum(map(len, objects))
            s["elements"] += elements
            s["enc_s"] += enc_s
            s["dec_s"] += dec_s
            s["enc1_s"] += enc1_s
            s["dec1_s"] += dec1_s
            s["fp16_bytes"] += 2 * elements
            s["rel"].append(100 * (ppl(lm.model, sample.context, sample.continuation, decoded) / base - 1))
            if n == 0:
                eff = _entropy_efficiency(codec, kv16)
                if eff is not None:
                    s["eff"].append(eff)
            if key in sweep and n < 2:
                for size in sweep_sizes:
                    objs, _ = _encode_context(codec, kv16, sample.context, size)
                    sweep[key].setdefault(size, []).append(8 * sum(map(len, objs)) / elements)
    int8_bits = 8 * stats["int8:-"]["bytes"] / stats["int8:-"]["elements"]
    rows = []
    for codec_name, level, _ in configs:
        s = stats[f"{codec_name}:{level}"]
        bits = 8 * s["bytes"] / s["elements"]
        ci = mean_ci(s["rel"])
        rows.append({
            "codec": codec_name,
            "level": level,
            "bits_per_element": bits,
            "size_ratio_vs_int8": int8_bits / bits,
            "ppl_increase_pct": ci.mean,
            "ppl_increase_ci95": [ci.low, ci.high],
            "entropy_efficiency": float(np.mean(s["eff"])) if s["eff"] else None,
            "encode_MBps": s["fp16_bytes"] / s["enc_s"] / 1e6,
            "decode_MBps": s["fp16_bytes"] / s["dec_s"] / 1e6,
            "encode_MBps_one_thread": s["fp16_bytes"] / s["enc1_s"] / 1e6,
            "decode_MBps_one_thread": s["fp16_bytes"] / s["dec1_s"] / 1e6,
        })
    curve = [(r["bits_per_element"], r["ppl_increase_pct"]) for r in rows if r["codec"] == "cachegen_ref"]
    vs_cachegen = []
    for r in rows:
        if r["codec"] == "kvcodec":
            ref = _interpolate_bits(curve, r["ppl_increase_pct"])
            vs_cachegen.append({"level": r["level"], "cachegen_bits_at_same_ppl": ref,
                                "size_ratio": None if ref is None else r["bits_per_element"] / ref})
    kvtc_curve = [(r["bits_per_element"], r["ppl_increase_pct"]) for r in rows if r["codec"] == "kvtc_ref"]
    vs_kvtc = []
    for r in rows:
        if r["codec"] in ("kvcodec3", "kvcodec"):
            ref = _interpolate_bits(kvtc_curve, r["ppl_increase_pct"])
            vs_kvtc.append({"codec": r["codec"], "level": r["level"], "kvtc_bits_at_same_ppl": ref,
                            "size_ratio": None if ref is None else r["bits_per_element"] / ref})
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return {
        "model": lm.model_id,
        "model_name": lm.name,
        "profile_calibration": profile.calibration,
        "calibration_contexts": contexts,
        "context_tokens": CONTEXT_TOKENS,
        "continuation_tokens": continuation,
        "chunk_tokens": CHUNK_TOKENS,
        "documents": [p.document for p in picks],
        "ppl_baseline": float(np.mean(baselines)),
        "profile_bytes": len(profile.to_bytes()),
        "model_weight_bytes": weight_bytes,
        "kvcodec3_profile": {"bytes": len(transform.to_bytes()), "profiling_s": round(transform_s, 1),
                             "groups": [list(g) for g in transform.groups],
                             "key_rank": transform.key_rank, "value_rank": transform.value_rank,
                             "features_per_token": 2 * transform.layers * transform.kv_heads * transform.head_dim,
                             "calibration": transform.calibration},
        "kvtc_ref_profile": {"bytes": len(kvtc.to_bytes()), "profiling_s": round(kvtc_s, 1),
                             "key_rank": kvtc.key_basis.rank, "value_rank": kvtc.value_basis.rank},
        "rows": rows,
        "vs_cachegen": vs_cachegen,
        "vs_kvtc": vs_kvtc,
        "chunk_sizes": {k: {str(size): float(np.mean(v)) for size, v in d.items()} for k, d in sweep.items()},
        "note": "ppl_increase_pct is the mean over documents of ppl(decoded KV)/ppl(fp16 KV) - 1; "
                "kvcodec's per-model profile (profile_bytes) is stored once per model, not per chunk.",
    }


def plot(result: dict[str, Any], path: str) -> None:
    """The rate-quality plot for benchmarks/RESULTS.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, codec in enumerate(["int8", "kivi2", "cachegen_ref", "kvcodec", "kvtc_ref", "kvcodec3"]):
        rows = sorted((r for r in result["rows"] if r["codec"] == codec), key=lambda r: r["bits_per_element"])
        x = [r["bits_per_element"] for r in rows]
        y = [r["ppl_increase_pct"] for r in rows]
        err = [[r["ppl_increase_pct"] - r["ppl_increase_ci95"][0] for r in rows],
               [r["ppl_increase_ci95"][1] - r["ppl_increase_pct"] for r in rows]]
        err = [[0 if math.isnan(e) else e for e in side] for side in err]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=codec, color=f"C{i}",
                    linestyle="-" if len(rows) > 1 else "none")
    ax.set_xscale("log", base=2)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("stored bits per KV element (all bytes, 256-token chunks)")
    ax.set_ylabel("continuation perplexity increase (%), 95% CI")
    ax.set_title(f"{result.get('model_name', 'SmolLM2-135M')}, {result['context_tokens']}-token contexts, "
                 f"{len(result['documents'])} documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
