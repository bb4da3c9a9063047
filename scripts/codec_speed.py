"""CPU encode/decode speed of every codec on one real 2,048-token SmolLM2 context.

The same code path as ``kvstore bench codecs`` (chunk objects of 256 tokens,
encode + container, container + decode) without the perplexity evaluation, so
it can be re-run quickly on a quiet machine: ``python scripts/codec_speed.py``.
"""

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # the checkout: benchmarks/, eval/
import statistics

from benchmarks.codecs import CHUNK_TOKENS, CONTEXT_TOKENS, _configs, _decode_context, _encode_context
from eval.corpus import documents
from eval.model import load_model
from eval.profiles import EVALUATION_SOURCE, model_profile
from kvstore.integrations.hf import extract_kv

lm = load_model("smollm2")
profile = model_profile(lm, contexts=2, context_tokens=CONTEXT_TOKENS)
context = documents(lm.tokenizer, sources=[EVALUATION_SOURCE], n=1, seed=0)[0].tokens[:CONTEXT_TOKENS]
kv16 = [(k.half(), v.half()) for k, v in extract_kv(lm.model, context)]
fp16_bytes = 2 * sum(k.numel() + v.numel() for k, v in kv16)
for codec_name, level, make in _configs(profile, quick=False):
    codec = make()
    encode_s, decode_s = [], []
    for _ in range(5):
        objects, seconds = _encode_context(codec, kv16, context, CHUNK_TOKENS)
        encode_s.append(seconds)
        decode_s.append(_decode_context(codec, objects, kv16)[1])
    print(f"{codec_name:>13} {level:>8}: encode {fp16_bytes / statistics.median(encode_s) / 1e6:6.0f} MB/s, "
          f"decode {fp16_bytes / statistics.median(decode_s) / 1e6:6.0f} MB/s (fp16 bytes, median of 5)")
