"""What recomputing tokens from text costs: the fetcher's model of the application's prefill.

Prefilling ``n`` tokens on top of a prefix of ``p`` tokens costs a part per token
(projections, MLP) and an attention part that grows with the context each token
attends to, on average ``p + n / 2``::

    seconds(n, p) = n * (per_token_s + per_token_pair_s * (p + n / 2))

A single tokens-per-second rate (``per_token_pair_s = 0``) undercharges the last
chunks of a long context, whose tokens attend to a long prefix: a fetcher relying on
it would recompute last chunks it should fetch (measurements in
``benchmarks/RESULTS.md``).
:meth:`PrefillCost.measure` times the application's own recompute at two prefix
lengths and fits both terms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstore.errors import ConfigError

__all__ = ["PrefillCost"]


@dataclass(frozen=True, slots=True)
class PrefillCost:
    """Seconds to recompute ``n`` tokens after ``p`` (see the module docstring)."""

    per_token_s: float
    per_token_pair_s: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.per_token_s) and self.per_token_s > 0):
            raise ConfigError(f"per_token_s must be positive and finite, got {self.per_token_s!r}")
        if not (np.isfinite(self.per_token_pair_s) and self.per_token_pair_s >= 0):
            raise ConfigError(f"per_token_pair_s must be non-negative and finite, got {self.per_token_pair_s!r}")

    @classmethod
    def from_rate(cls, tokens_per_s: float) -> PrefillCost:
        """A flat rate: every token costs ``1 / tokens_per_s`` whatever its position."""
        if not (np.isfinite(tokens_per_s) and tokens_per_s > 0):
            raise ConfigError(f"a prefill rate must be positive and finite, got {tokens_per_s!r}")
        return cls(1.0 / tokens_per_s)

    def seconds(self, tokens: int, prefix_tokens: int = 0) -> float:
        """Predicted seconds to prefill ``tokens`` tokens after ``prefix_tokens``."""
        return tokens * (self.per_token_s + self.per_token_pair_s * (prefix_tokens + tokens / 2))

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> PrefillCost:
        """Least-squares fit to ``(tokens, prefix_tokens, seconds)`` samples (a flat rate
        when they cannot tell the attention term apart, or it comes out negative)."""
        rows = [(n, p, s) for n, p, s in samples if n > 0 and s > 0]
        if not rows:
            raise ConfigError("PrefillCost.fit needs at least one sample with tokens > 0 and seconds > 0")
        n = np.array([r[0] for r in rows], dtype=np.float64)
        p = np.array([r[1] for r in rows], dtype=np.float64)
        s = np.array([r[2] for r in rows], dtype=np.float64)
        flat = cls(float(s.sum() / n.sum()))
        design = np.stack([n, n * (p + n / 2)], axis=1)
        if np.linalg.matrix_rank(design) < 2:
            return flat
        (a, b), *_ = np.linalg.lstsq(design, s, rcond=None)
        if a <= 0 or b < 0:
            return flat
        return cls(float(a), float(b))

    @classmethod
    def measure(
        cls,
        recompute: Callable[[torch.Tensor, Any], Any],
        tokens: Sequence[int] | torch.Tensor,
        *,
        chunk_tokens: int,
        repeats: int = 1,
    ) -> PrefillCost:
        """Time ``recompute(tokens, prefix_kv)`` (the fetcher's hook) on ``tokens``: a
        chunk from position 0, the whole context, and the last chunk after the rest as
        prefix; fit both terms. One untimed warm-up call comes first."""
        ids = torch.as_tensor(tokens, dtype=torch.long)
        total = len(ids)
        if not 0 < chunk_tokens < total:
            raise ConfigError(f"chunk_tokens must be in (0, {total}), got {chunk_tokens}")
        def timed(tokens: torch.Tensor, prefix: Any) -> tuple[Any, float]:
            started = time.perf_counter()
            kv = recompute(tokens, prefix)
            if torch.cuda.is_available() and kv and kv[0][0].is_cuda:  # the work, not its launch
                torch.cuda.synchronize(kv[0][0].device)
            return kv, time.perf_counter() - started

        timed(ids[:chunk_tokens], None)  # warm-up (allocator, kernels picked on first use)
        samples: list[tuple[int, int, float]] = []
        prefix_start = total - chunk_tokens
        for _ in range(repeats):
            samples.append((chunk_tokens, 0, timed(ids[:chunk_tokens], None)[1]))
            kv, seconds = timed(ids, None)
            samples.append((total, 0, seconds))
            prefix = [(k[:, :prefix_start], v[:, :prefix_start]) for k, v in kv]
            samples.append((chunk_tokens, prefix_start, timed(ids[prefix_start:], prefix)[1]))
        return cls.fit(samples)
