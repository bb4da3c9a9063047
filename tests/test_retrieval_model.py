"""Retrieval attention on SmolLM2: exact at full budget, recall on real KV, decoding from the store."""

import asyncio

import pytest
import torch

from kvstore import KVStore
from eval.perplexity import continuation_nll
from kvstore.integrations.hf import extract_kv, generate_greedy
from kvstore.retrieval import pq
from kvstore.retrieval.attention import RetrievalConfig
from kvstore.retrieval.hf import (
    RetrievalSession,
    generate_retrieval,
    retrieval_attention,
)
from kvstore.retrieval.sources import StoreSource
from kvstore.retrieval.store import get_pq, put_pq

pytestmark = pytest.mark.model

CONTEXT, CONTINUATION = 512, 16
PQ_CONFIG = pq.PQConfig(iters=8)


@pytest.fixture(scope="module")
def sample(smollm2, smollm2_docs):
    tokens = smollm2_docs[0].tokens
    ctx, cont = tokens[:CONTEXT], tokens[CONTEXT:CONTEXT + CONTINUATION]
    kv = extract_kv(smollm2.model, ctx)
    return ctx, cont, kv, pq.build_index([k for k, _ in kv], PQ_CONFIG)


def test_full_budget_equals_full_attention(smollm2, sample):
    ctx, cont, kv, index = sample
    full = continuation_nll(smollm2.model, ctx, cont, kv)
    session = RetrievalSession(index, RetrievalConfig(budget=1.0), collect=True)
    with retrieval_attention(smollm2.model, session):
        retrieved = continuation_nll(smollm2.model, ctx, cont, kv)
    assert torch.allclose(retrieved, full, atol=1e-4)
    assert session.stats.attention_rel_error() < 1e-5 and session.stats.recall() == 1.0
    assert smollm2.model.config._attn_implementation != "kvstore_retrieval"  # restored
    tokens, _ = generate_retrieval(smollm2.model, ctx, 4, kv=kv, session=RetrievalSession(index, RetrievalConfig(1.0)))
    assert tokens == generate_greedy(smollm2.model, ctx, kv, 4)


def test_recall_on_real_kv_is_far_above_random(smollm2, sample):
    ctx, cont, kv, index = sample
    config = RetrievalConfig(budget=0.2)
    session = RetrievalSession(index, config, collect=True)
    with retrieval_attention(smollm2.model, session):
        continuation_nll(smollm2.model, ctx, cont, kv)
    sinks, window, k = config.plan(CONTEXT)
    random_recall = k / (CONTEXT - sinks - window)
    assert session.stats.recall() > 2.5 * random_recall
    assert 0.15 < session.stats.attended / session.stats.visible < 0.25
    assert session.stats.attention_rel_error() < 0.3


def test_decoding_gathers_from_the_store(smollm2, sample):
    ctx, _, kv, index = sample
    kvs = KVStore("memory://", chunk_tokens=128)
    asyncio.run(kvs.put(smollm2.model_id, ctx, kv))
    asyncio.run(put_pq(kvs, smollm2.model_id, ctx, index))
    loaded = asyncio.run(get_pq(kvs, smollm2.model_id, ctx, PQ_CONFIG))
    source = asyncio.run(StoreSource.open(kvs, smollm2.model_id, ctx))
    config = RetrievalConfig(budget=0.2)
    try:
        from_store, _ = generate_retrieval(
            smollm2.model, ctx, 3, kv=kv, session=RetrievalSession(loaded, config, source=source))
        from_cache, _ = generate_retrieval(smollm2.model, ctx, 3, kv=kv, session=RetrievalSession(loaded, config))
        assert from_store == from_cache
        assert 0 < source.chunks_fetched <= CONTEXT // 128
    finally:
        source.close()


def test_reused_session_never_scores_with_stale_codes(smollm2, sample):
    ctx, cont, kv, index = sample
    config = RetrievalConfig(budget=0.2, window=8)
    other = torch.flip(cont, [0])
    session = RetrievalSession(index, config)
    with retrieval_attention(smollm2.model, session):
        continuation_nll(smollm2.model, ctx, cont, kv)
        reused = continuation_nll(smollm2.model, ctx, other, kv)
    with retrieval_attention(smollm2.model, RetrievalSession(index, config)):
        fresh = continuation_nll(smollm2.model, ctx, other, kv)
    assert torch.equal(reused, fresh)
