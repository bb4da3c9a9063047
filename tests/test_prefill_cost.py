"""The fetcher's model of recompute cost, and the recompute-or-fetch choice it drives."""

import pytest
import torch

from kvstore.errors import ConfigError
from kvstore.fetch import AdaptiveFetcher, PrefillCost
from kvstore.fetch.policy import FETCH, RECOMPUTE_REST, AdaptivePolicy, DecisionContext


def test_seconds_grows_with_the_prefix():
    cost = PrefillCost(per_token_s=2e-3, per_token_pair_s=1e-6)
    assert cost.seconds(256, 0) == pytest.approx(256 * (2e-3 + 1e-6 * 128))
    assert cost.seconds(256, 1792) == pytest.approx(256 * (2e-3 + 1e-6 * (1792 + 128)))
    assert cost.seconds(256, 1792) > cost.seconds(256, 0)
    assert PrefillCost.from_rate(500).seconds(1000, 5000) == pytest.approx(2.0)  # flat: the prefix is free


def test_fit_recovers_both_terms_and_falls_back_to_a_flat_rate():
    truth = PrefillCost(per_token_s=1.5e-3, per_token_pair_s=7e-7)
    samples = [(n, p, truth.seconds(n, p)) for n, p in [(256, 0), (2048, 0), (256, 1792), (512, 512)]]
    fitted = PrefillCost.fit(samples)
    assert fitted.per_token_s == pytest.approx(truth.per_token_s, rel=1e-6)
    assert fitted.per_token_pair_s == pytest.approx(truth.per_token_pair_s, rel=1e-6)
    flat = PrefillCost.fit([(100, 0, 0.5)])  # one sample cannot separate the terms
    assert flat == PrefillCost(5e-3)
    shrinking = PrefillCost.fit([(100, 0, 1.0), (100, 1000, 0.5)])  # attention "negative": flat instead
    assert shrinking.per_token_pair_s == 0 and shrinking.per_token_s == pytest.approx(1.5 / 200)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bad_costs_are_refused(bad):
    with pytest.raises(ConfigError):
        PrefillCost.from_rate(bad)
    with pytest.raises(ConfigError):
        PrefillCost(per_token_s=bad)
    with pytest.raises(ConfigError):
        PrefillCost.fit([(0, 0, 1.0), (10, 0, 0.0)])


def test_measure_times_the_hook_at_two_prefix_lengths(monkeypatch):
    """A recompute hook whose cost follows a known model on a fake clock: measure recovers it."""
    truth = PrefillCost(per_token_s=1e-3, per_token_pair_s=5e-7)
    clock = [0.0]
    calls = []
    monkeypatch.setattr("kvstore.fetch.prefill.time.perf_counter", lambda: clock[0])
    kv_full = [(torch.randn(2, 1024, 8), torch.randn(2, 1024, 8))]

    def recompute(tokens, prefix):
        start = 0 if prefix is None else prefix[0][0].shape[1]
        calls.append((start, len(tokens)))
        clock[0] += truth.seconds(len(tokens), start)
        return [(k[:, start:start + len(tokens)], v[:, start:start + len(tokens)]) for k, v in kv_full]

    fitted = PrefillCost.measure(recompute, list(range(1024)), chunk_tokens=128)
    assert calls == [(0, 128), (0, 128), (0, 1024), (896, 128)]  # warm-up, chunk, whole, last after the rest
    assert fitted.per_token_s == pytest.approx(truth.per_token_s, rel=1e-6)
    assert fitted.per_token_pair_s == pytest.approx(truth.per_token_pair_s, rel=1e-6)
    with pytest.raises(ConfigError):
        PrefillCost.measure(recompute, list(range(100)), chunk_tokens=100)


def context(*, pending, prefill, now=1.058, prefix=1792):
    """The bench's missed load at its last decision: deadline 0.32 s away, a slow estimate,
    two chunks (2.4 MB) still counted in flight, 256 tokens left."""
    return DecisionContext(index=7, now=now, deadline=1.383, remaining_sizes=[[1_200_000, 600_000, 400_000]],
                           remaining_tokens=[256], prefix_tokens=prefix, candidates=[3, 5, 7],
                           throughput_Bps=2.25e6 / 0.9, pending_bytes=pending, decode_tail_s=0.03,
                           prefill=prefill)


def test_bytes_in_flight_do_not_count_against_fetching_the_rest():
    """Recomputing waits for the chunks in flight too (they are its prefix): comparing a
    recompute against fetching *plus* the pending bytes picked a 0.9 s recompute over a
    0.2 s fetch."""
    rate = PrefillCost.from_rate(2048 / 5.0)  # 256 tokens: 0.63 s
    choice = AdaptivePolicy().choose(context(pending=2_400_000, prefill=rate))
    assert choice.action == FETCH and choice.level == 7, choice
    assert "deadline out of reach" in choice.reason


def test_the_prefix_makes_a_last_chunk_dearer_to_recompute():
    flat = PrefillCost.from_rate(256 / 0.15)  # 0.15 s for 256 tokens anywhere
    with_attention = PrefillCost(per_token_s=0.15 / 256 - 128 * 2e-6, per_token_pair_s=2e-6)
    assert with_attention.seconds(256, 0) == pytest.approx(0.15)
    assert with_attention.seconds(256, 1792) > 0.9
    late = 1.25  # 0.13 s left: even the smallest level (0.18 s + decode) misses
    assert AdaptivePolicy().choose(context(pending=0, prefill=flat, now=late)).action == RECOMPUTE_REST
    assert AdaptivePolicy().choose(context(pending=0, prefill=with_attention, now=late)).action == FETCH
    assert AdaptivePolicy().choose(context(pending=0, prefill=with_attention, now=late, prefix=0)).action == RECOMPUTE_REST


def test_fetcher_takes_one_prefill_figure():
    with pytest.raises(ConfigError):
        AdaptiveFetcher(None, prefill_cost=PrefillCost(1e-3), prefill_tokens_per_s=1000)  # type: ignore[arg-type]
    assert AdaptiveFetcher(None, prefill_tokens_per_s=1000).prefill_cost == PrefillCost(1e-3)  # type: ignore[arg-type]
