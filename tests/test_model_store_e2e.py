"""End to end on the real model: KV stored in a KVStore and loaded back generates what fresh KV does."""

from __future__ import annotations

import pytest
import torch

from kvstore.integrations.hf import extract_kv, generate_greedy, recompute
from kvstore.store import KVStore
from kvstore.sync import SyncKVStore

pytestmark = pytest.mark.model

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompt(smollm2_docs):
    doc = next(d for d in smollm2_docs if d.source == "pydoc")
    return doc.tokens[2000:2300]  # more than one 256-token chunk, not a multiple of it


@pytest.fixture(scope="module")
def fresh(smollm2, prompt):
    kv = extract_kv(smollm2.model, prompt)
    return kv, generate_greedy(smollm2.model, prompt, kv, NEW_TOKENS)


async def test_generation_from_stored_kv_matches_fresh(smollm2, prompt, fresh):
    kv, expected = fresh
    store = KVStore("memory://")
    try:
        await store.put(smollm2.model_id, prompt, kv)
        assert await store.lookup(smollm2.model_id, prompt) == len(prompt)
        loaded = await store.get(smollm2.model_id, prompt, device="cpu")
    finally:
        await store.close()
    for (k, v), (lk, lv) in zip(kv, loaded):
        assert torch.equal(k, lk) and torch.equal(v, lv)  # raw codec: bit-exact
    assert generate_greedy(smollm2.model, prompt, loaded, NEW_TOKENS) == expected
    # The model prefilling the prompt itself agrees too.
    assert generate_greedy(smollm2.model, prompt, None, NEW_TOKENS) == expected


def test_stored_prefix_plus_recompute_matches_fresh(smollm2, prompt, fresh):
    """A prompt that extends a stored context: load the stored prefix, recompute the rest."""
    kv, expected = fresh
    head = 256
    with SyncKVStore("memory://", chunk_tokens=128) as store:
        store.put(smollm2.model_id, prompt[:head], [(k[:, :head], v[:, :head]) for k, v in kv])
        assert store.lookup(smollm2.model_id, prompt) == head
        assert store.lookup("some-other-model", prompt) == 0
        prefix = store.get(smollm2.model_id, prompt[:head])
    tail = recompute(smollm2.model, prompt[head:], prefix)
    joined = [(torch.cat([pk, tk], 1), torch.cat([pv, tv], 1)) for (pk, pv), (tk, tv) in zip(prefix, tail)]
    assert generate_greedy(smollm2.model, prompt, joined, NEW_TOKENS) == expected
