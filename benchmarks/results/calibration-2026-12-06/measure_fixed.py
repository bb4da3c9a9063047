import sys, time, torch, numpy as np
from kvstore.eval.model import load_model
from kvstore.eval.profiles import model_profile, EVALUATION_SOURCE
from kvstore.eval.corpus import documents, samples
from kvstore.eval.perplexity import ppl
from kvstore.bench.codecs import _encode_context, _decode_context
from kvstore.codecs.kvcodec import KVCodecV1
from kvstore.integrations.hf import extract_kv
name = sys.argv[1]; ndocs = int(sys.argv[2])
t=time.time(); lm = load_model(name); print("load", time.time()-t, flush=True)
t=time.time(); prof = model_profile(lm, contexts=2, context_tokens=2048); print("profile", time.time()-t, prof.shape, flush=True)
docs = documents(lm.tokenizer, sources=[EVALUATION_SOURCE], n=ndocs, seed=0)
picks = samples(docs, context_tokens=2048, continuation_tokens=256, seed=0)
res = {i: ([], 0, 0) for i in range(6)}
for s in picks:
    kv16 = [(k.half(), v.half()) for k, v in extract_kv(lm.model, s.context)]
    base = ppl(lm.model, s.context, s.continuation, kv16)
    el = 2*sum(k.numel() for k,_ in kv16)
    for i in range(6):
        c = KVCodecV1(prof, i)
        objs, _ = _encode_context(c, kv16, s.context, 256)
        dec, _ = _decode_context(c, objs, kv16)
        r = 100*(ppl(lm.model, s.context, s.continuation, dec)/base-1)
        rel, b, e = res[i]; rel.append(r); res[i] = (rel, b+8*sum(map(len,objs)), e+el)
    print(s.document, base, [round(res[i][0][-1],2) for i in range(6)], flush=True)
for i in range(6):
    rel,b,e = res[i]; print(i, "bits", round(b/e,3), "ppl%", round(float(np.mean(rel)),2), [round(x,2) for x in rel])
