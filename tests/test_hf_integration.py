"""KV out of and into transformers caches, on the real SmolLM2 (CPU, short contexts)."""

from __future__ import annotations

import pytest
import torch

from kvstore.errors import ConfigError
from kvstore.integrations.hf import (
    KVLayout,
    KVMismatchError,
    cache_to_kv,
    check_model_kv,
    extract_kv,
    hf_model_id,
    kv_layout,
    kv_to_cache,
    make_recompute,
    prefill,
    recompute,
)

pytestmark = pytest.mark.model

CTX, CONT = 256, 48


@pytest.fixture(scope="module")
def tokens(smollm2_docs):
    doc = smollm2_docs[0].tokens
    return doc[1000 : 1000 + CTX], doc[1000 + CTX : 1000 + CTX + CONT]


@pytest.fixture(scope="module")
def full(smollm2, tokens):
    """Logits and KV of one forward pass over context + continuation (the reference)."""
    ctx, cont = tokens
    logits, cache = prefill(smollm2.model, torch.cat([ctx, cont]), logits_to_keep=0)
    return logits, cache_to_kv(cache)


@pytest.fixture(scope="module")
def ctx_kv(smollm2, tokens):
    return extract_kv(smollm2.model, tokens[0])


def test_layout(smollm2):
    layout = kv_layout(smollm2.model)
    assert layout == KVLayout(layers=30, kv_heads=3, head_dim=64)
    assert layout.bytes_per_token(torch.float16) == 2 * 30 * 3 * 64 * 2


def test_extracted_kv_shape_and_values(smollm2, ctx_kv, full):
    assert len(ctx_kv) == 30
    for (k, v), (fk, fv) in zip(ctx_kv, full[1]):
        assert k.shape == v.shape == (3, CTX, 64)
        assert k.dtype == torch.float32
        # The context's KV does not depend on what follows it (causal attention).
        torch.testing.assert_close(k, fk[:, :CTX], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(v, fv[:, :CTX], atol=2e-4, rtol=1e-4)


def test_injected_kv_gives_full_forward_logits(smollm2, tokens, ctx_kv, full):
    cont = tokens[1]
    logits, cache = prefill(smollm2.model, cont, kv_to_cache(smollm2.model, ctx_kv), logits_to_keep=0)
    assert cache.get_seq_length() == CTX + CONT
    torch.testing.assert_close(logits, full[0][CTX:], atol=2e-3, rtol=1e-3)


def test_recompute_continues_from_prefix(smollm2, tokens, ctx_kv, full):
    fn = make_recompute(smollm2.model)
    tail = fn(tokens[1], ctx_kv)
    assert len(tail) == 30 and tail[0][0].shape == (3, CONT, 64)
    for (k, v), (fk, fv) in zip(tail, full[1]):
        torch.testing.assert_close(k, fk[:, CTX:], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(v, fv[:, CTX:], atol=2e-4, rtol=1e-4)


def test_chunked_prefill_matches(smollm2, tokens, ctx_kv, full):
    chunked = recompute(smollm2.model, tokens[0][:128], chunk_tokens=48)
    for (k, v), (rk, rv) in zip(chunked, ctx_kv):
        torch.testing.assert_close(k, rk[:, :128], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(v, rv[:, :128], atol=2e-4, rtol=1e-4)
    # Logits of the last 40 tokens, which span three 16-token chunks.
    logits, cache = prefill(smollm2.model, tokens[1], kv_to_cache(smollm2.model, ctx_kv), chunk_tokens=16,
                            logits_to_keep=40)
    assert logits.shape == (40, smollm2.model.config.vocab_size) and cache.get_seq_length() == CTX + CONT
    torch.testing.assert_close(logits, full[0][-40:], atol=2e-3, rtol=1e-3)
    with pytest.raises(ConfigError):
        prefill(smollm2.model, tokens[1], chunk_tokens=0)


def test_incoming_kv_converted_to_model_dtype(smollm2, ctx_kv):
    half = [(k.half(), v.half()) for k, v in ctx_kv]
    cache = kv_to_cache(smollm2.model, half)
    back = cache_to_kv(cache)
    assert back[0][0].dtype == torch.float32 and back[0][0].device == smollm2.device
    torch.testing.assert_close(back[5][1], ctx_kv[5][1], atol=1e-2, rtol=1e-2)
    assert half[0][0].dtype == torch.float16  # the caller's tensors are untouched


def test_empty_cache_for_none(smollm2):
    assert kv_to_cache(smollm2.model, None).get_seq_length() == 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda kv: kv[:-1], "30 layers but the KV has 29"),
        (lambda kv: kv + kv[:1], "30 layers but the KV has 31"),
        (lambda kv: [(k[:2], v[:2]) for k, v in kv], "expects [3, tokens, 64]"),
        (lambda kv: [(k[..., :32], v[..., :32]) for k, v in kv], "expects [3, tokens, 64]"),
        (lambda kv: [(k[None], v[None]) for k, v in kv], "must be [kv_heads, tokens, head_dim]"),
        (lambda kv: [(k, v[:, :-1]) for k, v in kv], "covers 255 tokens"),
        (lambda kv: [(k, v) if i != 7 else (k[:, :-1], v[:, :-1]) for i, (k, v) in enumerate(kv)], "covers 255"),
        (lambda kv: [(k.to(torch.int8), v) for k, v in kv], "non-float"),
        (lambda kv: [(k,) for k, v in kv], "must be a (key, value) pair"),
    ],
)
def test_mismatched_kv_refused(smollm2, ctx_kv, mutate, message):
    bad = mutate(list(ctx_kv))
    with pytest.raises(KVMismatchError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        kv_to_cache(smollm2.model, bad)
    with pytest.raises(ConfigError):
        recompute(smollm2.model, [1, 2, 3], bad)


def test_check_model_kv_counts_tokens(smollm2, ctx_kv):
    assert check_model_kv(smollm2.model, ctx_kv) == CTX


def test_batched_cache_refused(smollm2, ctx_kv):
    cache = kv_to_cache(smollm2.model, ctx_kv[:30])
    cache.batch_repeat_interleave(2)
    with pytest.raises(ConfigError, match="batch size 2"):
        cache_to_kv(cache)


def test_bad_tokens_refused(smollm2):
    with pytest.raises(ConfigError):
        extract_kv(smollm2.model, [])
    with pytest.raises(ConfigError):
        extract_kv(smollm2.model, torch.zeros(2, 3, dtype=torch.long))


def test_model_id(smollm2):
    config = smollm2.model.config
    mid = hf_model_id(config, "abc")
    assert mid.startswith("llama-30L-3x64-")
    assert hf_model_id(config, "abc") == mid
    assert hf_model_id(config, "abd") != mid
    other = config.__class__.from_dict({**config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert hf_model_id(other, "abc") != mid
    # Bookkeeping entries do not change it.
    renamed = config.__class__.from_dict({**config.to_dict(), "_name_or_path": "elsewhere", "dtype": "bfloat16"})
    assert hf_model_id(renamed, "abc") == mid
    with pytest.raises(ConfigError):
        hf_model_id(config)
