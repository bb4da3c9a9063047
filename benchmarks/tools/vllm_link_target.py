"""The two configurations of ``kvstore bench vllm`` that decide its link target, at 8K only
(ExampleConnector on local disk, kvstore's default level over the 200 Mbit/s link), with
the benchmark's own engine runner: about 4 minutes instead of the full run's 15.

Run in the vLLM environment: ``PYTHONPATH=. .venv-vllm/bin/python -m benchmarks.tools.vllm_link_target``.
"""
import json, tempfile
from pathlib import Path
from transformers import AutoTokenizer
from benchmarks import vllm as bv
from eval.corpus import documents
from eval.model import ensure_converted, smollm2_gguf_path, load_model
from eval.profiles import EVALUATION_SOURCE, model_profile
from kvstore.integrations.vllm import model_id_of
from tests.tools.netshape import shaped_redis
if __name__ == "__main__":
    folder = str(ensure_converted(smollm2_gguf_path())[0])
    tok = AutoTokenizer.from_pretrained(folder)
    docs = documents(tok, sources=[EVALUATION_SOURCE], min_tokens=bv.LONG_CONTEXT + 1, n=3, seed=22)
    prompts = {bv.LONG_CONTEXT: docs[1].tokens[:bv.LONG_CONTEXT].tolist()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        profile = work / "p.kvprofile"; profile.write_bytes(model_profile(load_model("smollm2")).to_bytes())
        base = {"folder": folder, "model_id": model_id_of(folder), "prompts": prompts, "warmup": docs[-1].tokens[:300].tolist(),
                "repeats": 3, "max_len": bv.MAX_MODEL_LEN}
        out = {"example": bv._child({**base, "connector": "ExampleConnector", "extra": {"shared_storage_path": str(work / "ex")}})}
        with shaped_redis(bv.LINK_RATE_BPS) as server:
            out["default_shaped"] = bv._child({**base, "connector": "KVStoreConnector", "extra": {
                "url": server.url, "storage_options": {"socket_timeout": 120}, "levels": [["kvcodec", {}]], "profile": str(profile)}})
    print("RESULT", json.dumps(out))
