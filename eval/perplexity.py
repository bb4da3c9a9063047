"""Continuation perplexity with substituted KV, and the project's quality metric.

:func:`ppl` scores a continuation given a context whose KV is injected into the
model's cache, exactly as a serving engine would use KV loaded from a store:
the KV of all context tokens but the last is injected, the last context token
is fed again (engines recompute it to get the first logits) followed by the
continuation, and every continuation token is scored.

The quality metric of a lossy KV codec is the relative perplexity increase
when the context's KV is replaced by its decoded version:
``ppl(decoded) / ppl(own) - 1``, averaged over documents (samples of one
document are averaged first, as they are not independent), with a t-interval
or a percentile bootstrap interval over the per-document increases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

from kvstore.errors import ConfigError
from eval.corpus import Sample
from kvstore.integrations.hf import check_model_kv, extract_kv, kv_to_cache, prefill
from kvstore.kv import KV

Transform: TypeAlias = Callable[[KV, torch.Tensor], KV]
"""``transform(kv, context_tokens) -> kv``: e.g. encode + decode, or a store round trip."""


def _hf(model: Any) -> Any:
    return getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model


def _ids(tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    return ids


def continuation_nll(
    model: Any,
    context_tokens: Sequence[int] | torch.Tensor,
    continuation_tokens: Sequence[int] | torch.Tensor,
    kv: KV | None = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood (nats, fp64 on CPU) of the continuation given the context.

    ``model`` is a transformers model or a :class:`~eval.model.LoadedModel`;
    ``kv`` is the context's KV (any dtype/device; the model's own when None).
    """
    model = _hf(model)
    ctx, cont = _ids(context_tokens), _ids(continuation_tokens)
    if len(ctx) == 0 or len(cont) == 0:
        raise ConfigError("ppl needs a non-empty context and continuation")
    if kv is None:
        kv = extract_kv(model, ctx[:-1]) if len(ctx) > 1 else None
    else:
        covered = check_model_kv(model, kv)
        if covered != len(ctx):
            raise ConfigError(f"kv covers {covered} tokens but the context has {len(ctx)}")
        kv = [(k[:, :-1], v[:, :-1]) for k, v in kv] if len(ctx) > 1 else None
    inputs = torch.cat([ctx[-1:], cont[:-1]])
    logits, _ = prefill(model, inputs, kv_to_cache(model, kv), logits_to_keep=0)
    targets = cont.to(logits.device)
    return F.cross_entropy(logits.float(), targets, reduction="none").double().cpu()


def ppl(
    model: Any,
    context_tokens: Sequence[int] | torch.Tensor,
    continuation_tokens: Sequence[int] | torch.Tensor,
    kv: KV | None = None,
) -> float:
    """Perplexity of ``continuation_tokens`` following ``context_tokens`` whose KV is ``kv``.

    With ``kv=None`` the model's own KV of the context is used (the baseline); pass a
    decoded or loaded KV to measure what a codec or a store round trip costs.
    """
    return math.exp(continuation_nll(model, context_tokens, continuation_tokens, kv).mean().item())


def _t_cdf(x: float, df: float, steps: int = 4096) -> float:
    """Student t CDF for x >= 0 by Simpson integration of the density (ample for CIs)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    u = np.linspace(0.0, x, steps + 1)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(u * u / df))
    weights = np.ones(steps + 1)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return 0.5 + float(density @ weights) * (x / steps) / 3


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0.5 <= p < 1) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 <= p < 1 or df <= 0:
        raise ConfigError(f"t_quantile needs 0.5 <= p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval ``[low, high]`` (NaN bounds with fewer than 2 values)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    method: str


def mean_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    method: str = "t",
    *,
    resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Mean of ``values`` with a ``t`` interval or a percentile ``bootstrap`` interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ConfigError("mean_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, int(x.size), confidence, method)
    if method == "t":
        half = t_quantile(0.5 + confidence / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
        return Interval(mean, mean - half, mean + half, int(x.size), confidence, method)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
        alpha = (1 - confidence) / 2
        low, high = np.quantile(means, [alpha, 1 - alpha])
        return Interval(mean, float(low), float(high), int(x.size), confidence, method)
    raise ConfigError(f"unknown CI method {method!r}; use 't' or 'bootstrap'")


@dataclass(frozen=True)
class PplComparison:
    """Perplexities with the model's own KV and with substituted KV, per sample and in summary.

    ``increase`` is over per-document relative increases ``ppl_sub / ppl_own - 1``
    (0.01 = +1%); ``baseline`` summarises the own-KV perplexities per document.
    """

    documents: list[str]
    baseline_ppl: list[float]
    substituted_ppl: list[float]
    increase: Interval
    baseline: Interval

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "samples": len(self.baseline_ppl),
            "documents": self.increase.n,
            "ppl_baseline": self.baseline.mean,
            "ppl_substituted": float(np.mean(self.substituted_ppl)),
            "increase_mean": self.increase.mean,
            "increase_ci": [self.increase.low, self.increase.high],
            "confidence": self.increase.confidence,
            "ci_method": self.increase.method,
        }


def _per_document(names: Sequence[str], values: Sequence[float]) -> list[float]:
    groups: dict[str, list[float]] = {}
    for name, value in zip(names, values):
        groups.setdefault(name, []).append(value)
    return [float(np.mean(v)) for v in groups.values()]


def compare_kv(
    model: Any,
    samples: Sequence[Sample],
    transforms: Mapping[str, Transform],
    *,
    confidence: float = 0.95,
    method: str = "t",
    kvs: Sequence[KV] | None = None,
) -> dict[str, PplComparison]:
    """For each named transform, the perplexity cost of replacing each sample's context KV by
    ``transform(kv, context_tokens)``; the own KV and baseline are computed once per sample
    (``kvs``, when given, are the samples' own KVs already computed)."""
    if not samples:
        raise ConfigError("compare_kv needs at least one sample")
    if kvs is not None and len(kvs) != len(samples):
        raise ConfigError(f"{len(kvs)} KVs given for {len(samples)} samples")
    hf = _hf(model)
    names = [s.document for s in samples]
    base: list[float] = []
    subs: dict[str, list[float]] = {name: [] for name in transforms}
    for i, sample in enumerate(samples):
        own = extract_kv(hf, sample.context) if kvs is None else kvs[i]
        base.append(ppl(hf, sample.context, sample.continuation, own))
        for name, fn in transforms.items():
            subs[name].append(ppl(hf, sample.context, sample.continuation, fn(own, sample.context)))
    baseline = mean_ci(_per_document(names, base), confidence, method)
    out = {}
    for name, values in subs.items():
        rel = [s / b - 1 for s, b in zip(values, base)]
        out[name] = PplComparison(
            documents=names,
            baseline_ppl=base,
            substituted_ppl=values,
            increase=mean_ci(_per_document(names, rel), confidence, method),
            baseline=baseline,
        )
    return out


def relative_ppl_increase(
    model: Any,
    samples: Sequence[Sample],
    transform: Transform,
    *,
    confidence: float = 0.95,
    method: str = "t",
) -> PplComparison:
    """The project's quality metric for one transform: see :func:`compare_kv`."""
    return compare_kv(model, samples, {"kv": transform}, confidence=confidence, method=method)["kv"]
