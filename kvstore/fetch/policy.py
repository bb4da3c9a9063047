"""Which level to fetch each chunk at (or whether to recompute it instead).

A policy sees what the fetcher knows when it must start chunk *i*: the sizes of
every remaining chunk at every candidate level, the time left until the
deadline, the bytes still in flight, the throughput estimated from completed
transfers, how long a decode takes, and the application's prefill cost. The
adaptive rule (CacheGen's): take the best level at which *all* remaining chunks
would still arrive in time; if even the smallest cannot, recompute the rest or
this chunk from text, whichever the application's prefill cost says is faster
than fetching. The transfers already in flight count against the deadline but
not in that comparison: a recompute needs their KV as its prefix, so it waits
for them as a fetch would.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.errors import ConfigError
from kvstore.fetch.prefill import PrefillCost

FETCH, RECOMPUTE_CHUNK, RECOMPUTE_REST = "fetch", "recompute_chunk", "recompute_rest"


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """What a policy may use to decide chunk ``index``."""

    index: int
    now: float  # seconds since the load started
    deadline: float  # seconds since the load started
    remaining_sizes: Sequence[Sequence[int]]  # [chunk j >= index][candidate level] bytes
    remaining_tokens: Sequence[int]  # tokens of each remaining chunk
    prefix_tokens: int  # tokens before chunk ``index`` (what a recompute attends to)
    candidates: Sequence[int]  # level indices, best first
    throughput_Bps: float | None
    pending_bytes: int  # bytes of chunks in flight
    decode_tail_s: float  # expected decode time of one chunk after its bytes arrive
    prefill: PrefillCost | None  # None: recompute unavailable
    previous_level: int | None = None  # the level of the latest chunk fetched before ``index`` (None: none yet)


@dataclass(frozen=True, slots=True)
class Choice:
    """A policy's answer: an action, the level for a fetch, and why."""

    action: str
    level: int | None
    reason: str


class Policy(ABC):
    """Chooses, chunk by chunk, a level or recompute."""

    name: str = "policy"

    @abstractmethod
    def choose(self, ctx: DecisionContext) -> Choice:
        """Decide chunk ``ctx.index``."""


class StaticPolicy(Policy):
    """Always the same level (the baselines: each level, int8, raw)."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.name = f"static-{level}"

    def choose(self, ctx: DecisionContext) -> Choice:
        return Choice(FETCH, self.level, f"static level {self.level}")


class RecomputePolicy(Policy):
    """Fetch nothing: prefill the whole context (the no-cache baseline)."""

    name = "recompute"

    def choose(self, ctx: DecisionContext) -> Choice:
        return Choice(RECOMPUTE_REST, None, "recompute policy")


def deadline_choice(ctx: DecisionContext, rate_Bps: float | None, what: str, max_step_up: int | None = None) -> Choice:
    """CacheGen's rule at bandwidth ``rate_Bps``: the best level whose whole remaining
    transfer meets the deadline, else the faster of recompute and the smallest level.
    ``max_step_up``: at most this many levels better than the latest fetched chunk's."""
    levels = list(ctx.candidates)
    if rate_Bps is None or rate_Bps <= 0:
        middle = levels[len(levels) // 2]
        return Choice(FETCH, middle, f"no {what} yet: start at a middle level")
    time_left = ctx.deadline - ctx.now - ctx.decode_tail_s
    first = 0
    if max_step_up is not None and ctx.previous_level in levels:
        first = max(0, levels.index(ctx.previous_level) - max_step_up)
    for column, level in enumerate(levels[first:], start=first):
        need = ctx.pending_bytes + sum(sizes[column] for sizes in ctx.remaining_sizes)
        if need / rate_Bps <= time_left:
            return Choice(FETCH, level, f"{need / rate_Bps:.3f}s of transfer at {what} "
                                        f"{rate_Bps * 8 / 1e6:.1f} Mbit/s fits {time_left:.3f}s left")
    smallest = len(levels) - 1
    rest_bytes = sum(sizes[smallest] for sizes in ctx.remaining_sizes)
    if ctx.prefill is not None:
        # both ways wait for the transfers in flight, so only what follows them is compared
        fetch_rest_s = rest_bytes / rate_Bps + ctx.decode_tail_s
        recompute_rest_s = ctx.prefill.seconds(sum(ctx.remaining_tokens), ctx.prefix_tokens)
        if recompute_rest_s < fetch_rest_s:
            return Choice(RECOMPUTE_REST, None, f"recomputing the rest ({recompute_rest_s:.3f}s) beats "
                                                f"fetching it ({fetch_rest_s:.3f}s)")
        recompute_one_s = ctx.prefill.seconds(ctx.remaining_tokens[0], ctx.prefix_tokens)
        fetch_one_s = ctx.remaining_sizes[0][smallest] / rate_Bps + ctx.decode_tail_s
        if recompute_one_s < fetch_one_s:
            return Choice(RECOMPUTE_CHUNK, None, f"recomputing this chunk ({recompute_one_s:.3f}s) beats "
                                                 f"fetching it ({fetch_one_s:.3f}s)")
    need_s = (ctx.pending_bytes + rest_bytes) / rate_Bps
    return Choice(FETCH, levels[smallest], f"deadline out of reach ({need_s:.3f}s needed, "
                                           f"{time_left:.3f}s left): smallest level")


class AdaptivePolicy(Policy):
    """CacheGen's rule with the throughput measured so far, a safety margin on it, and
    quality raised by at most ``max_step_up`` levels above the latest fetched chunk's.

    The step limit (``None``: none) is the video players' rule: an estimate that reads
    high for a moment would otherwise buy one chunk at a much better level and leave the
    last chunks to pay for it at the worst, and perplexity grows faster than linearly
    as levels get coarser, so a steady level costs less quality than a swing through
    both ends for the same bytes. Drops are never limited.
    """

    name = "adaptive"

    def __init__(self, safety: float = 0.9, max_step_up: int | None = 1) -> None:
        if not 0 < safety <= 1:
            raise ConfigError("safety must be in (0, 1]")
        if max_step_up is not None and max_step_up < 0:
            raise ConfigError("max_step_up must be >= 0 or None")
        self.safety = safety
        self.max_step_up = max_step_up

    def choose(self, ctx: DecisionContext) -> Choice:
        rate = None if ctx.throughput_Bps is None else ctx.throughput_Bps * self.safety
        return deadline_choice(ctx, rate, "measured throughput", self.max_step_up)


class OraclePolicy(Policy):
    """CacheGen's rule given the true future bandwidth (an upper bound no real fetcher has):
    ``mean_rate(t0, t1)`` returns the true mean bytes/s between two load-relative times."""

    name = "oracle"

    def __init__(self, mean_rate: Callable[[float, float], float]) -> None:
        self.mean_rate = mean_rate

    def choose(self, ctx: DecisionContext) -> Choice:
        end = max(ctx.deadline, ctx.now + 1e-3)
        return deadline_choice(ctx, self.mean_rate(ctx.now, end), "true mean bandwidth")
