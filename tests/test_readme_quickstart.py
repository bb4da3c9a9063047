"""The README's Quick start runs as written (on a temporary store, with the SmolLM2 weights
the tests have) and does what its comments say."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from kvstore import KVStore
from kvstore.format.keys import KeyScheme, model_fingerprint
from kvstore.integrations.hf import generate_greedy

pytestmark = pytest.mark.model

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(section: str, index: int = 0) -> str:
    text = README.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return text.split("```python")[index + 1].split("```", 1)[0]


def test_quickstart_stores_and_loads_a_prefix(smollm2, tmp_path):
    source = readme_block("Quick start")
    assert len([line for line in source.splitlines() if line.strip()]) <= 10
    assert "file:///var/cache/kv" in source and '"HuggingFaceTB/SmolLM2-135M-Instruct"' in source
    source = source.replace("file:///var/cache/kv", tmp_path.as_uri())
    source = source.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(smollm2.path)))  # offline
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    model = namespace["model"]

    ids = smollm2.tokenizer("A cache stores the keys and values of a long context. " * 30)["input_ids"]
    tokens, more_tokens = ids[:256], ids[256:300]
    asyncio.run(namespace["main"](tokens, more_tokens))

    async def check():
        async with KVStore(tmp_path.as_uri(), model=model) as store:
            assert store.default_level == 2
            key = KeyScheme("kvstore").default_profile_key(model_fingerprint(store.model.model_id))
            assert (tmp_path / key).is_file()  # the profile the first put calibrated
            manifest = await store.manifest(tokens)
            assert [spec.params["level"] for spec in manifest.levels] == list(range(6))
            assert await store.lookup(tokens + more_tokens) == len(tokens)
            return await store.get(tokens)

    kv = asyncio.run(check())
    # level 2 is lossy but the model goes on as from its own KV (this text is predictable)
    assert generate_greedy(model, tokens, kv, max_new_tokens=8) == generate_greedy(model, tokens, max_new_tokens=8)


def test_the_explicit_example_runs(smollm2, tmp_path):
    source = readme_block("Quick start", 1).replace("s3://bucket/kv", tmp_path.as_uri())
    ids = smollm2.tokenizer("A cache stores the keys and values of a long context. " * 30)["input_ids"]
    namespace = {"KVStore": KVStore, "model": smollm2.model, "tokens": ids[:256], "more_tokens": ids[256:300]}
    body = "\n".join("    " + line for line in source.splitlines())
    exec(compile(f"async def example():\n{body}\n    return n, prefix_kv, index", str(README), "exec"), namespace)
    n, prefix_kv, index = asyncio.run(namespace["example"]())
    assert n == 256 and prefix_kv[0][0].shape[1] == 256
    assert index is not None and index.num_tokens == 256 and index.layers == len(prefix_kv)
    assert all(torch.isfinite(k).all() for k, _ in prefix_kv)
