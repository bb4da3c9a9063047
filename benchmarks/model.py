"""``kvstore bench model``: the real model's KV shape, CPU prefill speed and perplexity baselines.

Loads SmolLM2-135M-Instruct (converting it on the first run), takes 2,048-token
contexts from the corpus (2 documents with ``--quick``, 6 otherwise; one
window each, seed 0) and measures:

- ``prefill_tokens_per_s``: context tokens per second of prefill on the CPU;
- ``ppl_baseline``: continuation perplexity with the model's own KV
  (128 continuation tokens with ``--quick``, 512 otherwise), mean over documents;
- ``ppl_roundtrip_raw``: the same after a raw ``KVStore`` round trip
  (``memory://``), which must equal the baseline to float tolerance;
- ``ppl_fp16``: with the KV cast to fp16 and back, for scale.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from eval.corpus import documents, samples
from eval.model import load_model
from eval.perplexity import compare_kv
from kvstore.integrations.hf import extract_kv
from kvstore.kv import KV

CONTEXT_TOKENS = 2048


def run(quick: bool) -> dict[str, Any]:
    """Measure; ``quick`` takes about a minute on two idle cores."""
    from kvstore.sync import SyncKVStore

    n_docs, continuation = (2, 128) if quick else (6, 512)
    lm = load_model("smollm2")
    layout = lm.layout
    picks = samples(
        documents(lm.tokenizer, n=n_docs, seed=0),
        context_tokens=CONTEXT_TOKENS,
        continuation_tokens=continuation,
        seed=0,
    )

    kvs: list[KV] = []
    prefill_s = 0.0
    for sample in picks:
        started = time.perf_counter()
        kvs.append(extract_kv(lm.model, sample.context))
        prefill_s += time.perf_counter() - started

    timings = {"put": 0.0, "get": 0.0}
    with SyncKVStore("memory://") as store:

        def roundtrip(kv: KV, tokens: torch.Tensor) -> KV:
            started = time.perf_counter()
            store.put(lm.model_id, tokens, kv)
            timings["put"] += time.perf_counter() - started
            started = time.perf_counter()
            out = store.get(lm.model_id, tokens)
            timings["get"] += time.perf_counter() - started
            return out

        def fp16(kv: KV, tokens: torch.Tensor) -> KV:
            return [(k.half(), v.half()) for k, v in kv]

        result = compare_kv(lm, picks, {"raw": roundtrip, "fp16": fp16}, kvs=kvs)

    raw, half = result["raw"], result["fp16"]
    kv_bytes = sum(k.nbytes + v.nbytes for kv in kvs for k, v in kv)
    figures: dict[str, Any] = {
        "model": lm.name,
        "model_id": lm.model_id,
        "layers": layout.layers,
        "kv_heads": layout.kv_heads,
        "head_dim": layout.head_dim,
        "kv_bytes_per_token_fp16": layout.bytes_per_token(torch.float16),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "load_s": round(lm.load_seconds, 3),
        "documents": [s.document for s in picks],
        "context_tokens": CONTEXT_TOKENS,
        "continuation_tokens": continuation,
        "prefill_tokens_per_s": round(len(picks) * CONTEXT_TOKENS / prefill_s, 1),
        "ppl_baseline": raw.baseline.mean,
        "ppl_baseline_ci95": [raw.baseline.low, raw.baseline.high],
        "ppl_baseline_per_document": raw.baseline_ppl,
        "ppl_roundtrip_raw": float(sum(raw.substituted_ppl) / len(raw.substituted_ppl)),
        "ppl_roundtrip_raw_max_rel_diff": max(abs(s / b - 1) for s, b in zip(raw.substituted_ppl, raw.baseline_ppl)),
        "roundtrip": "KVStore memory:// raw codec",
        "store_put_MBps": round(kv_bytes / timings["put"] / 1e6, 1) if timings["put"] else None,
        "store_get_MBps": round(kv_bytes / timings["get"] / 1e6, 1) if timings["get"] else None,
        "ppl_fp16": float(sum(half.substituted_ppl) / len(half.substituted_ppl)),
        "ppl_fp16_increase": half.increase.mean,
        "ppl_fp16_increase_ci95": [half.increase.low, half.increase.high],
    }
    figures = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in figures.items()}
    print(
        f"{lm.name}: {layout.layers} layers x {layout.kv_heads} KV heads x {layout.head_dim}; "
        f"prefill {figures['prefill_tokens_per_s']} tok/s on {figures['torch_threads']} threads; "
        f"ppl {figures['ppl_baseline']:.3f} own KV, {figures['ppl_roundtrip_raw']:.3f} after raw store "
        f"round trip, {figures['ppl_fp16']:.3f} fp16 ({len(picks)} x {CONTEXT_TOKENS}+{continuation} tokens)",
        file=sys.stderr,
    )
    return figures
