"""How the logs beside this script were made (2026-12-06): kvcodec levels 0-5 of a model, bits
per element and continuation perplexity increase, 4 pydoc documents x 2,048-token contexts,
256 continuation tokens, profile calibrated on 2 license-text contexts.

    python measure.py MODEL 4            # calibrated levels (quality targets): *-calibrated.log
    python measure.py MODEL 4 --fixed    # SmolLM2's fixed step factors: gemma3-fixed-steps.log

(`kvstore bench codecs --model MODEL` now measures both in one run: `kvcodec` and `kvcodec_fixed`.)
"""
import sys, time

import numpy as np

from benchmarks.codecs import _decode_context, _encode_context
from kvstore.codecs.kvcodec import KVCodecV1
from eval.corpus import documents, samples
from eval.model import load_model
from eval.perplexity import ppl
from eval.profiles import EVALUATION_SOURCE, calibration_contexts
from kvstore.integrations.hf import extract_kv
from kvstore.integrations.hf_profile import profile_model

name, ndocs, fixed = sys.argv[1], int(sys.argv[2]), "--fixed" in sys.argv
lm = load_model(name)
t = time.time()
options = {"targets_pct": None} if fixed else {}  # else the default targets
prof = profile_model(lm.model, calibration_contexts(lm.tokenizer, 2, 2048), **options)
print("profile", time.time() - t, prof.calibration, [(round(l.beta, 3), round(l.gamma, 3)) for l in prof.levels], flush=True)
docs = documents(lm.tokenizer, sources=[EVALUATION_SOURCE], n=ndocs, seed=0)
picks = samples(docs, context_tokens=2048, continuation_tokens=256, seed=0)
res = {i: ([], 0, 0) for i in range(6)}
for s in picks:
    kv16 = [(k.half(), v.half()) for k, v in extract_kv(lm.model, s.context)]
    base = ppl(lm.model, s.context, s.continuation, kv16)
    el = 2 * sum(k.numel() for k, _ in kv16)
    for i in range(6):
        c = KVCodecV1(prof, i)
        objs, _ = _encode_context(c, kv16, s.context, 256)
        dec, _ = _decode_context(c, objs, kv16)
        r = 100 * (ppl(lm.model, s.context, s.continuation, dec) / base - 1)
        rel, b, e = res[i]
        rel.append(r)
        res[i] = (rel, b + 8 * sum(map(len, objs)), e + el)
    print(s.document, base, [round(res[i][0][-1], 2) for i in range(6)], flush=True)
for i in range(6):
    rel, b, e = res[i]
    print(i, "bits", round(b / e, 3), "ppl%", round(float(np.mean(rel)), 2), [round(x, 2) for x in rel])
