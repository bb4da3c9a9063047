"""PQ load fraction at 4,096 tokens on the retrieval benchmark's documents.

Stores each context at kvcodec's default level with PQ objects (PQCache's m=2, b=6,
``q4`` centroids) in a memory store and prints the PQ bytes over the KV bytes, per
document and overall, as JSON on the last line. Usage: ``python scripts/pq_load_fraction.py``.
"""

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # the checkout: benchmarks/, eval/
import asyncio
import json

from kvstore import KVStore
from kvstore.codecs.kvcodec import DEFAULT_LEVEL, KVCodec
from eval.corpus import documents, samples
from eval.model import load_model
from eval.profiles import EVALUATION_SOURCE, model_profile
from kvstore.integrations.hf import extract_kv
from kvstore.retrieval import PQConfig


async def measure() -> dict:
    lm = load_model("smollm2")
    profile = model_profile(lm)
    docs = documents(lm.tokenizer, sources=[EVALUATION_SOURCE], min_tokens=4096 + 256, n=4, seed=0)
    rows = []
    for sample in samples(docs, context_tokens=4096, continuation_tokens=256, seed=0):
        kv = [(k.half(), v.half()) for k, v in extract_kv(lm.model, sample.context)]
        async with KVStore("memory://", levels=[KVCodec(profile, DEFAULT_LEVEL)]) as kvs:
            manifest = await kvs.put(lm.model_id, sample.context, kv, pq=PQConfig())
        rows.append({"doc": sample.document, "kv_bytes": manifest.level_bytes(0),
                     "pq_bytes": manifest.pq.total_bytes, "centroids_bytes": manifest.pq.centroids.size})
        print(rows[-1], f"{rows[-1]['pq_bytes'] / rows[-1]['kv_bytes']:.4%}", flush=True)
    kv_bytes, pq_bytes = sum(r["kv_bytes"] for r in rows), sum(r["pq_bytes"] for r in rows)
    return {"rows": rows, "kv_bytes": kv_bytes, "pq_bytes": pq_bytes, "pq_load_fraction": pq_bytes / kv_bytes}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure())))
