"""Continuation perplexity with substituted KV, and the relative-increase metric with its CI."""

from __future__ import annotations

import math

import pytest
import torch

from kvstore.errors import ConfigError
from eval.corpus import samples
from eval.perplexity import (
    compare_kv,
    continuation_nll,
    mean_ci,
    ppl,
    relative_ppl_increase,
    t_quantile,
)
from kvstore.integrations.hf import extract_kv, prefill

CTX, CONT = 256, 64


@pytest.fixture(scope="module")
def english(smollm2_docs):
    """A context and continuation of English prose (a license text) and its own KV."""
    doc = next(d for d in smollm2_docs if d.source == "licenses")
    return doc.tokens[:CTX], doc.tokens[CTX : CTX + CONT]


@pytest.fixture(scope="module")
def own_kv(smollm2, english):
    return extract_kv(smollm2.model, english[0])


@pytest.fixture(scope="module")
def baseline(smollm2, english, own_kv):
    return ppl(smollm2, *english, own_kv)


@pytest.mark.model
def test_ppl_of_english_is_sane(baseline):
    assert 4 < baseline < 40  # ~18 here (256 tokens of the Apache license)


@pytest.mark.model
def test_ppl_matches_a_plain_forward_pass(smollm2, english, own_kv, baseline):
    ctx, cont = english
    logits, _ = prefill(smollm2.model, torch.cat([ctx, cont]), logits_to_keep=0)
    nll = torch.nn.functional.cross_entropy(logits[CTX - 1 : -1].double(), cont)
    assert baseline == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert ppl(smollm2.model, ctx, cont) == pytest.approx(baseline, rel=1e-5)  # kv=None: own KV


@pytest.mark.model
def test_foreign_context_kv_is_clearly_worse(smollm2, smollm2_docs, english, baseline):
    other = next(d for d in smollm2_docs if d.source == "pydoc").tokens[:CTX]
    foreign = extract_kv(smollm2.model, other)
    assert ppl(smollm2, english[0], english[1], foreign) > 1.5 * baseline  # ~3.4x


@pytest.mark.model
def test_half_precision_kv_costs_almost_nothing(smollm2, english, own_kv, baseline):
    half = [(k.half(), v.half()) for k, v in own_kv]
    assert ppl(smollm2, *english, half) == pytest.approx(baseline, rel=5e-3)


@pytest.mark.model
def test_kv_length_must_match_context(smollm2, english, own_kv):
    with pytest.raises(ConfigError, match="covers 256 tokens but the context has 255"):
        continuation_nll(smollm2, english[0][1:], english[1], own_kv)
    with pytest.raises(ConfigError):
        ppl(smollm2, english[0], english[1][:0])


@pytest.mark.model
def test_compare_kv_metric(smollm2, smollm2_docs):
    docs = [d for d in smollm2_docs][:2]
    picks = samples(docs, context_tokens=64, continuation_tokens=16, per_document=2, seed=0)

    def zero_values(kv, tokens):
        assert len(tokens) == 64
        return [(k, torch.zeros_like(v)) for k, v in kv]

    result = compare_kv(smollm2, picks, {"same": lambda kv, tokens: kv, "zeroed": zero_values})
    same, zeroed = result["same"], result["zeroed"]
    assert same.increase.n == 2 and len(same.baseline_ppl) == 4  # CI over documents, not samples
    assert same.increase.mean == pytest.approx(0, abs=1e-9)
    assert same.substituted_ppl == pytest.approx(same.baseline_ppl, rel=1e-9)
    assert zeroed.increase.mean > 0.1 and zeroed.increase.low <= zeroed.increase.mean <= zeroed.increase.high
    summary = zeroed.as_dict()
    assert summary["documents"] == 2 and summary["samples"] == 4 and len(summary["increase_ci"]) == 2
    single = relative_ppl_increase(smollm2, picks[:1], lambda kv, tokens: kv, method="bootstrap")
    assert single.increase.n == 1 and math.isnan(single.increase.low)


def test_t_quantiles():
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)
    assert t_quantile(0.975, 9) == pytest.approx(2.262, abs=1e-3)
    assert t_quantile(0.95, 30) == pytest.approx(1.697, abs=1e-3)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ConfigError):
        t_quantile(0.2, 3)


def test_mean_ci():
    values = [0.010, 0.012, 0.008, 0.011, 0.009]
    t = mean_ci(values)
    assert t.mean == pytest.approx(0.01) and t.n == 5 and t.method == "t"
    half = 2.776 * torch.tensor(values, dtype=torch.float64).std().item() / math.sqrt(5)
    assert (t.low, t.high) == pytest.approx((0.01 - half, 0.01 + half), abs=1e-5)
    boot = mean_ci(values, method="bootstrap", seed=1)
    assert boot.low < 0.01 < boot.high and boot.high - boot.low < t.high - t.low + 1e-3
    assert mean_ci(values, method="bootstrap", seed=1) == boot
    with pytest.raises(ConfigError):
        mean_ci([])
    with pytest.raises(ConfigError):
        mean_ci(values, method="nope")
