"""Retrieval attention on synthetic tensors: selection rules, equality with full attention at full budget,
the decode (kernel + gather) form against the masked (teacher-forcing) form, re-ranking and recall."""

import pytest
import torch

from kvstore.errors import ConfigError
from kvstore.retrieval import pq
from kvstore.retrieval.attention import (
    RetrievalConfig,
    TensorSource,
    causal_mask,
    decode_step,
    masked_attention,
    retrieval_mask,
    select_tokens,
    topk_recall,
)

KV_HEADS, GROUP, DIM, T = 2, 3, 16, 400
SCALE = DIM ** -0.5


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(KV_HEADS, T, DIM, generator=g) * 2
    values = torch.randn(KV_HEADS, T, DIM, generator=g)
    queries = torch.randn(KV_HEADS * GROUP, 8, DIM, generator=g)
    index = pq.build_index(keys[None], pq.PQConfig(bits=4, sinks=8, iters=6))
    order = index.channel_order()
    approx = pq.decode(index.codes[0], index.centroids[0], order)
    return keys, values, queries, index, order, approx


def test_plan_counts_every_attended_token():
    config = RetrievalConfig(budget=0.2, sinks=32, window=64)
    assert config.plan(4096) == (32, 64, 820 - 96)
    assert config.plan(50) == (32, 18, 0)
    assert config.plan(200) == (32, 64, 0)
    assert RetrievalConfig(budget=1.0).plan(1000) == (32, 64, 904)
    assert RetrievalConfig(budget=0.2, rerank=2).candidates(4096) == 2 * 724
    for bad in ({"budget": 0}, {"budget": 1.5}, {"sinks": -1}, {"rerank": 0.5}):
        with pytest.raises(ConfigError):
            RetrievalConfig(**bad)


def test_full_budget_is_full_attention(setup):
    keys, values, queries, index, order, approx = setup
    config = RetrievalConfig(budget=1.0, sinks=8, window=16, rerank=1.0)
    positions = torch.arange(T - 8, T)
    mask = retrieval_mask(queries, approx, positions, config)
    assert torch.equal(mask, causal_mask(positions, T).expand_as(mask))
    full = masked_attention(queries, keys, values, causal_mask(positions, T), SCALE)
    assert torch.allclose(masked_attention(queries, keys, values, mask, SCALE), full)
    out, indices = decode_step(queries[:, -1], index.centroids[0], index.codes[0], TensorSource([(keys, values)]),
                               0, T, config, SCALE, order)
    assert indices.shape == (KV_HEADS, T) and torch.equal(indices.sort(1).values[0], torch.arange(T))
    assert torch.allclose(out, full[:, -1], atol=1e-5)


@pytest.mark.parametrize("rerank", [1.0, 2.0])
def test_decode_step_matches_masked_form(setup, rerank):
    keys, values, queries, _, _, _ = setup
    # an index whose codes are distinct per token, so no two PQ scores tie
    g = torch.Generator().manual_seed(1)
    config_pq = pq.PQConfig(bits=6, sinks=8)
    tok = torch.arange(T)
    codes = torch.stack([tok % 64, tok // 64], dim=-1).to(torch.uint8).expand(KV_HEADS, -1, -1).contiguous()
    index = pq.PQIndex(config_pq, torch.randn(1, KV_HEADS, 2, 64, DIM // 2, generator=g), codes[None])
    order = index.channel_order()
    approx = pq.decode(index.codes[0], index.centroids[0], order)
    config = RetrievalConfig(budget=0.25, sinks=8, window=16, rerank=rerank)
    visible = T - 3
    q = queries[:, 0]
    out, indices = decode_step(q, index.centroids[0], index.codes[0], TensorSource([(keys, values)]),
                               0, visible, config, SCALE, order)
    sinks, window, k = config.plan(visible)
    assert indices.shape == (KV_HEADS, sinks + window + k)
    mask = retrieval_mask(q[:, None], approx, torch.tensor([visible - 1]), config, keys)
    for h in range(KV_HEADS):
        assert set(indices[h].tolist()) == set(mask[h, 0].nonzero().flatten().tolist())
    expected = masked_attention(q[:, None], keys, values, mask, SCALE)[:, 0]
    assert torch.allclose(out, expected, atol=1e-5)


def test_select_tokens_layout(setup):
    _, _, queries, index, order, _ = setup
    config = RetrievalConfig(budget=0.3, sinks=8, window=16, rerank=1.0)
    idx = select_tokens(queries[:, 0], index.centroids[0], index.codes[0], 300, config, order)
    sinks, window, k = config.plan(300)
    assert torch.equal(idx[:, :sinks], torch.arange(sinks).expand(KV_HEADS, -1))
    assert torch.equal(idx[:, -window:], torch.arange(300 - window, 300).expand(KV_HEADS, -1))
    middle = idx[:, sinks:sinks + k]
    assert int(middle.min()) >= sinks and int(middle.max()) < 300 - window


def test_each_query_attends_causally_within_budget(setup):
    _, _, queries, _, _, approx = setup
    config = RetrievalConfig(budget=0.2, sinks=8, window=16, rerank=1.0)
    positions = torch.arange(T - 8, T)
    mask = retrieval_mask(queries, approx, positions, config)
    assert not (mask & ~causal_mask(positions, T)).any()
    for row, p in enumerate(positions.tolist()):
        s, w, k = config.plan(p + 1)
        assert (mask[:, row].sum(-1) == s + w + k).all()


def test_recall_exact_keys_and_rerank(setup):
    keys, _, queries, _, _, approx = setup
    positions = torch.arange(T - 8, T)
    config = RetrievalConfig(budget=0.2, sinks=8, window=16, rerank=1.0)
    assert torch.equal(topk_recall(queries, keys, keys, positions, config), torch.ones(KV_HEADS * 8))
    pq_recall = topk_recall(queries, keys, approx, positions, config).mean()
    everything = RetrievalConfig(budget=0.2, sinks=8, window=16, rerank=100.0)
    assert torch.equal(topk_recall(queries, keys, approx, positions, everything), torch.ones(KV_HEADS * 8))
    k = config.plan(T)[2]
    assert pq_recall > 1.5 * k / (T - 24)  # far better than a random pick of the middle
