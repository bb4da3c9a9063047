"""The README's Quick start runs as written (on a temporary store) and does what its comments say."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import kvstore.eval.model
from kvstore import KVStore
from kvstore.integrations.hf import extract_kv

pytestmark = pytest.mark.model

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_source() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_quickstart_stores_and_loads_a_prefix(smollm2, tmp_path, monkeypatch):
    source = quickstart_source()
    assert "file:///var/cache/kv" in source  # the store URL replaced below
    source = source.replace("file:///var/cache/kv", tmp_path.as_uri())
    monkeypatch.setattr(kvstore.eval.model, "load_model", lambda name: smollm2)  # loaded once per session
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)

    ids = smollm2.tokenizer("A cache stores the keys and values of a long context. " * 30)["input_ids"]
    tokens, more_tokens = ids[:256], ids[256:300]
    asyncio.run(namespace["main"](tokens, more_tokens))

    async def check():
        async with KVStore(tmp_path.as_uri(), levels=namespace["levels"]) as store:
            assert await store.lookup(smollm2.model_id, tokens + more_tokens) == len(tokens)
            loaded = await store.get(smollm2.model_id, tokens, level=0)
            index = await store.get_pq(smollm2.model_id, tokens)
        return loaded, index

    loaded, index = asyncio.run(check())
    full = extract_kv(smollm2.model, tokens)
    assert len(loaded) == len(full)
    for (k, v), (k_ref, v_ref) in zip(loaded, full):
        assert k.shape == k_ref.shape and v.shape == v_ref.shape
        assert relative_rms(k, k_ref) < 0.1 and relative_rms(v, v_ref) < 0.1
    assert index is not None and index.layers == len(full) and index.num_tokens == len(tokens)


def relative_rms(a, b) -> float:
    """Level 0 (4.6 bits per element) is lossy but close: about 3% (keys) and 6% (values) on SmolLM2."""
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())
