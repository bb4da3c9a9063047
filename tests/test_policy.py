"""The adaptive policy's level rule: deadline fit, safety margin, limited steps up."""

import pytest

from kvstore.fetch.policy import FETCH, AdaptivePolicy, DecisionContext


def context(previous_level, *, rate=1e6, time_left=10.0):
    """Four candidate levels (0 best); 3 chunks left of 1.0 / 0.6 / 0.3 / 0.1 MB each."""
    sizes = [[1_000_000, 600_000, 300_000, 100_000]] * 3
    return DecisionContext(index=5, now=0.0, deadline=time_left, remaining_sizes=sizes, remaining_tokens=[256] * 3,
                           prefix_tokens=1280, candidates=[0, 1, 2, 3], throughput_Bps=rate, pending_bytes=0,
                           decode_tail_s=0.0, prefill=None, previous_level=previous_level)


def test_quality_rises_one_level_per_chunk_and_drops_at_once():
    policy = AdaptivePolicy()
    assert policy.choose(context(None)).level == 0  # nothing before: the best that fits
    assert policy.choose(context(3)).level == 2  # the link allows level 0, one step up from 3
    assert policy.choose(context(1)).level == 0
    assert policy.choose(context(0, time_left=1.0)).level == 2  # 0.9 MB at 0.9 MB/s: down two at once
    assert AdaptivePolicy(max_step_up=None).choose(context(3)).level == 0
    assert AdaptivePolicy(max_step_up=2).choose(context(3)).level == 1


def test_the_safety_margin_and_bad_settings():
    exact = context(None, time_left=0.95)  # level 2 needs 0.9 s at the full rate, 1.0 s with the margin
    assert AdaptivePolicy(safety=1.0).choose(exact).level == 2
    assert AdaptivePolicy(safety=0.9).choose(exact).level == 3
    choice = AdaptivePolicy().choose(context(None, rate=None))
    assert choice.action == FETCH and choice.level == 2 and "middle" in choice.reason
    with pytest.raises(ValueError):
        AdaptivePolicy(safety=0)
    with pytest.raises(ValueError):
        AdaptivePolicy(max_step_up=-1)
