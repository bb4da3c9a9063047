"""kvstore's connector under vLLM's hybrid allocator, on a tiny random-weight Gemma 3 (three
sliding layers with a 256-token window, one full-attention layer, float32), so that it runs
wherever the vLLM test environment does (``.venv-vllm``); skipped elsewhere. The same
behaviour on the real Gemma 3 270M is in ``test_vllm_sliding.py``."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm", reason="vLLM runs in its own environment (.venv-vllm): see the README's test command")

from kvstore import SyncKVStore, metrics  # noqa: E402
from kvstore.integrations.vllm import model_id_of  # noqa: E402
from vllm_helpers import damage_chunk, generate, make_llm, wait_stored  # noqa: E402

WINDOW = 256
PROMPT_TOKENS = 1100  # 1,024 tokens (8 blocks) load; the window of a continuation from 1,024 is chunk 3
LONGER_TOKENS = 1400


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny-gemma3")
    config = Gemma3TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                              sliding_window=WINDOW, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                              max_position_embeddings=4096)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    url = tmp_path_factory.mktemp("vllm-hybrid").as_uri()
    llm = make_llm(str(folder), url, dtype="float32", skip_tokenizer_init=True)
    prompts = [torch.randint(5, 1000, (LONGER_TOKENS,), generator=torch.Generator().manual_seed(seed)).tolist()
               for seed in (1, 2)]
    yield {"llm": llm, "url": url, "model_id": model_id_of(str(folder)), "prompts": prompts}


def _read_bytes() -> float:
    return metrics.value("kvstore_read_bytes_total", {"level": "0"})


def test_a_load_reads_only_the_chunks_inside_each_window(engine):
    """The hybrid allocator stays on with the connector; a load of 1,024 tokens reads every
    chunk of the full-attention layer and, of the sliding layers, only chunk 3 (the window
    of a continuation from token 1,024)."""
    llm, url, model_id = engine["llm"], engine["url"], engine["model_id"]
    assert llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is False
    ids = engine["prompts"][0][:PROMPT_TOKENS]
    first, cached = generate(llm, ids, 8)
    assert cached == 0
    wait_stored(url, model_id, ids, timeout=60.0)
    with SyncKVStore(url) as kvs:
        manifest = kvs.manifest(model_id, ids)
    groups = manifest.layout.groups
    expected = sum(manifest.object_at(i, 0, g.index).size for i in range(4) for g in groups
                   if g.spec.kind == "full" or i == 3)
    before = _read_bytes()
    second, cached = generate(llm, ids, 8)
    assert cached == 1024
    assert _read_bytes() - before == expected
    assert second[0] == first[0]


def test_a_failed_load_is_computed_from_the_start(engine):
    """With several KV cache groups the load runs in the background; a corrupt window chunk
    fails it, and vLLM computes the request (no crash, the computed tokens)."""
    llm, url, model_id = engine["llm"], engine["url"], engine["model_id"]
    ids = engine["prompts"][1][:PROMPT_TOKENS]
    first, _ = generate(llm, ids, 8)
    wait_stored(url, model_id, ids, timeout=60.0)
    assert damage_chunk(url, model_id, ids, 3)  # the window's chunk
    again, cached = generate(llm, ids, 8)
    assert cached == 0 and again == first


def test_a_prompt_extending_a_stored_one_is_stored_from_its_held_windows(engine):
    """A longer prompt loads the stored 1,024 tokens and computes the rest; its sliding
    layers' blocks before token 768 were never allocated, so it is stored without their
    chunks 0-2, and a third request loads 1,280 tokens of it."""
    llm, url, model_id = engine["llm"], engine["url"], engine["model_id"]
    longer = engine["prompts"][0]  # its first 1,100 tokens were stored by the first test
    wait_stored(url, model_id, longer[:PROMPT_TOKENS], timeout=60.0)
    second, cached = generate(llm, longer, 8)
    assert cached == 1024
    wait_stored(url, model_id, longer, timeout=60.0)
    with SyncKVStore(url) as kvs:
        manifest = kvs.manifest(model_id, longer)
    sliding = [g.index for g in manifest.layout.groups if g.spec.kind == "sliding"]
    held = [all(manifest.object_at(i, 0, g) is not None for g in sliding) for i in range(len(manifest.chunks))]
    assert held == [False, False, False, True, True, True]
    third, cached = generate(llm, longer, 8)
    assert cached == 1280 and third[0] == second[0]
