"""Calibrate ``kvcodec``'s levels on a model: each level meets a quality target there.

A level is defined by the perplexity increase it may cost, not by step sizes tuned on
one model. On the model's own calibration contexts (the last ``continuation`` tokens of
each are scored, the rest is the stored prefix), calibration measures the divergence of
the next-token distributions (KL(exact || quantized), nats per token) that quantizing
the prefix's KV causes:

1. *Per-layer key sensitivity*: the keys of one layer at a time, at a reference step.
   Spending bits where the model is sensitive minimises the total size for a given total
   divergence (reverse water-filling: the step of layer ``l`` scales with
   ``1 / sqrt(s_l)``, s_l its measured sensitivity), so each layer's key step is scaled
   by ``sqrt(mean(s) / s_l)`` (clipped to [1/4, 4]). Full-attention layers of hybrid
   models, which attend to every token, typically get finer steps than sliding layers.
2. *Per-level scale*: every level's key and value step factors (in the proportions of
   :data:`~kvstore.codecs.kvcodec_profile.DEFAULT_LEVELS`) are scaled together until the
   divergence of the whole quantized prefix meets the level's target
   (``log(1 + pct / 100)`` nats for a target of ``pct`` percent perplexity), measured,
   not predicted: a few forward passes per level.

The targets apply to the calibration text; quality is then checked on other text
(``kvstore bench codecs --model ...``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvstore.codecs.kvcodec_profile import (
    DEFAULT_LEVELS,
    Level,
    quantize_keys,
    value_scale_codes,
    value_steps,
)
from kvstore.errors import ConfigError
from kvstore.integrations.hf import cache_layout, extract_kv, kv_to_cache, prefill
from kvstore.kv import LinearStates, is_linear

#: target perplexity increase (percent) of each level, best first; level 2 is the default
DEFAULT_TARGETS_PCT = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
REFERENCE = Level(1.5, 1.2)  # the step factors at which per-layer sensitivities are measured
FACTOR_CLIP = 4.0
SCALE_ITERATIONS = 3
MAX_SCALE = 16.0  # a level's steps at most this times their default: a model whose outputs hardly
# depend on its KV (random weights) would otherwise drive them past what a profile can store


@dataclass(frozen=True)
class Calibration:
    """What calibration chose and measured (recorded with the profile's figures)."""

    key_layer_factors: torch.Tensor  # [L]: multiplies each layer's key step
    levels: tuple[Level, ...]
    targets_pct: tuple[float, ...]
    measured_pct: tuple[float, ...]  # exp(KL) - 1 on the calibration text, per level


@dataclass(frozen=True)
class _Context:
    keys: torch.Tensor  # [L, H, T, D] prefix keys of the layers with per-token KV, float32
    values: torch.Tensor
    dtype: torch.dtype
    continuation: torch.Tensor
    exact_logprobs: torch.Tensor  # [n, vocab]
    #: per model layer: None where the layer takes the next row of keys and values, else a
    #: linear-attention layer's states after the prefix (held exact: only KV is quantized)
    states: tuple[LinearStates | None, ...] = ()


def _logprobs(model: object, ctx: _Context, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    rows = ((k.to(ctx.dtype), v.to(ctx.dtype)) for k, v in zip(keys.unbind(0), values.unbind(0)))
    kv = [next(rows) if states is None else states for states in ctx.states] if ctx.states else list(rows)
    logits, _ = prefill(model, ctx.continuation, kv_to_cache(model, kv, num_tokens=keys.shape[2]), logits_to_keep=0)
    return torch.log_softmax(logits.float(), dim=-1)


def _prefix_states(model: object, prefix: torch.Tensor) -> tuple[LinearStates | None, ...]:
    """Per layer of a model with linear-attention layers, their states after ``prefix``
    (``None`` for layers with per-token KV); ``()`` for a model without such layers."""
    if not cache_layout(model).has_linear:
        return ()
    return tuple(entry if is_linear(entry) else None for entry in extract_kv(model, prefix))


def _kl(ctx: _Context, logprobs: torch.Tensor) -> float:
    p = ctx.exact_logprobs
    return float((p.exp() * (p - logprobs)).sum(dim=-1).mean())


def _quantized_keys(keys: torch.Tensor, center: torch.Tensor, step: torch.Tensor, sinks: int) -> torch.Tensor:
    out = quantize_keys(keys, center, step) * step[:, :, None] + center[:, :, None]
    out[:, :, :sinks] = keys[:, :, :sinks]
    return out


def _quantized_values(values: torch.Tensor, gamma: float, sinks: int) -> torch.Tensor:
    steps = value_steps(value_scale_codes(values), gamma)[..., None]
    out = torch.round(values / steps) * steps
    out[:, :, :sinks] = values[:, :, :sinks]
    return out


def calibration_contexts(
    model: object,
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    contexts: Sequence[torch.Tensor],
    *,
    continuation: int = 256,
    sink_tokens: int = 4,
) -> list[_Context]:
    """Each context cut into a stored prefix (its KV, float32, and the states of any
    linear-attention layers after it) and a scored continuation, with the exact next-token
    log-probabilities the divergences are measured against. ``samples``: each context's
    ``(keys, values)`` of the layers with per-token KV."""
    ctxs = []
    for (keys, values), tokens in zip(samples, contexts, strict=True):
        ids = torch.as_tensor(tokens, dtype=torch.long)
        scored = min(continuation, len(ids) // 2)  # short contexts: half of them is scored
        if scored < 2 * sink_tokens:
            raise ConfigError(f"calibration contexts need at least {4 * sink_tokens} tokens, got {len(ids)}")
        cut = len(ids) - scored
        k, v = keys[:, :, :cut].float(), values[:, :, :cut].float()
        states = _prefix_states(model, ids[:cut])
        ctx = _Context(k, v, keys.dtype, ids[cut:], torch.empty(0), states)  # the exact log-probs come next
        exact = _logprobs(model, ctx, k, v)
        ctxs.append(_Context(k, v, keys.dtype, ids[cut:], exact, states))
    return ctxs


def calibrate_levels(
    model: object,
    ctxs: Sequence[_Context],
    roundtrip: Callable[[torch.Tensor, torch.Tensor, Level], tuple[torch.Tensor, torch.Tensor]],
    *,
    start: Sequence[Level] = DEFAULT_LEVELS,
    targets_pct: Sequence[float] = DEFAULT_TARGETS_PCT,
) -> tuple[tuple[Level, ...], tuple[float, ...]]:
    """Scale each level's step factors (in the proportions of ``start``) until the divergence
    of the whole quantized prefix, ``roundtrip(keys, values, level)``, meets the level's target;
    returns the levels and the divergence each measures (percent perplexity)."""
    def divergence(level: Level) -> float:
        total = 0.0
        for ctx in ctxs:
            keys, values = roundtrip(ctx.keys, ctx.values, level)
            total += _kl(ctx, _logprobs(model, ctx, keys, values))
        return total / len(ctxs)

    levels, measured = [], []
    scale = 1.0
    for base, pct in zip(start, targets_pct, strict=True):
        target = math.log1p(pct / 100)
        for _ in range(SCALE_ITERATIONS):  # divergence grows about as the step squared
            kl = divergence(Level(base.beta * scale, base.gamma * scale))
            scale *= min(4.0, max(0.25, math.sqrt(target / max(kl, 1e-12))))
            scale = min(max(scale, 1 / MAX_SCALE), MAX_SCALE)
        level = Level(base.beta * scale, base.gamma * scale)
        kl = divergence(level)
        levels.append(level)
        measured.append(100 * math.expm1(kl))
    return tuple(levels), tuple(measured)


def check_targets(targets_pct: Sequence[float]) -> None:
    """:class:`ConfigError` unless ``targets_pct`` are increasing percentages, one per level."""
    if list(targets_pct) != sorted(targets_pct) or not all(0 < t < 100 for t in targets_pct):
        raise ConfigError(f"level targets must be increasing percentages in (0, 100), got {list(targets_pct)}")
    if len(targets_pct) != len(DEFAULT_LEVELS):
        raise ConfigError(f"give one target per level ({len(DEFAULT_LEVELS)}), got {len(targets_pct)}")


def calibrate(
    model: object,
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    contexts: Sequence[torch.Tensor],
    center: torch.Tensor,
    unit: torch.Tensor,
    *,
    targets_pct: Sequence[float] = DEFAULT_TARGETS_PCT,
    continuation: int = 256,
    sink_tokens: int = 4,
) -> Calibration:
    """Choose per-layer key factors and each level's step factors (see the module doc).

    ``samples``: each context's ``(keys, values)`` ``[L, H, T, D]``; ``contexts``: their token
    ids; ``center`` / ``unit``: the profile's key centers and unit steps ``[L, H, D]``."""
    check_targets(targets_pct)
    ctxs = calibration_contexts(model, samples, contexts, continuation=continuation, sink_tokens=sink_tokens)

    layers = unit.shape[0]
    sensitivity = torch.zeros(layers)
    for ctx in ctxs:
        quantized = _quantized_keys(ctx.keys, center, unit * REFERENCE.beta, sink_tokens)
        for layer in range(layers):
            keys = ctx.keys.clone()
            keys[layer] = quantized[layer]
            sensitivity[layer] += max(_kl(ctx, _logprobs(model, ctx, keys, ctx.values)), 1e-9)
    factors = (sensitivity.mean() / sensitivity).sqrt().clamp(1 / FACTOR_CLIP, FACTOR_CLIP)
    unit = unit * factors[:, None, None]

    def roundtrip(keys: torch.Tensor, values: torch.Tensor, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
        return (_quantized_keys(keys, center, unit * level.beta, sink_tokens),
                _quantized_values(values, level.gamma, sink_tokens))

    levels, measured = calibrate_levels(model, ctxs, roundtrip, targets_pct=targets_pct)
    return Calibration(factors, levels, tuple(targets_pct), measured)
