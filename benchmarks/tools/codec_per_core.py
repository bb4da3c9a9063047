"""kvcodec's encode and decode per core on one real 2,048-token SmolLM2 context, for comparing
checkouts: each ``--root`` (a checkout of this project; default: this one) runs in its own
process, in turn, ``--rounds`` times, so that old and new code meet the same machine state.

The path of ``kvstore bench codecs`` (256-token chunk objects, decoded into fresh tensors as
``get`` does), with the entropy coder and torch on one thread. Rates are fp16 bytes of KV per
second. Run from a checkout: ``PYTHONPATH=. python -m benchmarks.tools.codec_per_core
--root /path/to/old/checkout --root .``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

_MEASURE = """
import statistics, sys, torch
from benchmarks.codecs import CHUNK_TOKENS, CONTEXT_TOKENS, _decode_context, _encode_context
from eval.corpus import documents
from eval.model import load_model
from eval.profiles import EVALUATION_SOURCE, model_profile
from kvstore.codecs import rans
from kvstore.codecs.kvcodec import KVCodec
from kvstore.integrations.hf import extract_kv

lm = load_model("smollm2")
profile = model_profile(lm, contexts=2, context_tokens=CONTEXT_TOKENS)
context = documents(lm.tokenizer, sources=[EVALUATION_SOURCE], n=1, seed=0)[0].tokens[:CONTEXT_TOKENS]
kv16 = [(k.half(), v.half()) for k, v in extract_kv(lm.model, context)]
fp16 = 2 * sum(k.numel() + v.numel() for k, v in kv16)
torch.set_num_threads(1)
rans.limit_threads(1)
codec = KVCodec(profile, level=int(sys.argv[1]))
objects, _ = _encode_context(codec, kv16, context, CHUNK_TOKENS)
_decode_context(codec, objects, kv16)
encode = [_encode_context(codec, kv16, context, CHUNK_TOKENS)[1] for _ in range(5)]
decode = [_decode_context(codec, objects, kv16)[1] for _ in range(5)]
print(f"encode {fp16 / statistics.median(encode) / 1e9:.3f} GB/s, decode {fp16 / statistics.median(decode) / 1e9:.3f}"
      f" GB/s per core, {sum(map(len, objects)) / fp16:.3f} of fp16")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", action="append", help="a checkout to measure (repeatable)")
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    roots = [os.path.abspath(r) for r in (args.root or ["."])]
    for _ in range(args.rounds):
        for root in roots:
            env = {**os.environ, "PYTHONPATH": root}
            done = subprocess.run([sys.executable, "-c", _MEASURE, str(args.level)], cwd=root, env=env,
                                  capture_output=True, text=True, check=True)  # fmt: skip
            print(f"{root}: level {args.level}: {done.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
