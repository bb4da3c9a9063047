"""Profile a Hugging Face model for the ``kvcodec`` codec: its KV and its queries.

``kvcodec`` sizes each key channel's quantization step by how strongly the
model's queries read that channel (``E[q_c^2]`` after RoPE, averaged over the
query heads that share a KV head). The queries are observed where they meet the
keys: as the model's attention function receives them during a prefill
(:mod:`kvstore.integrations.hf_attention`), whatever the architecture does before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kvstore.codecs.kvcodec3_profile import (
    DEFAULT_GROUP_LAYERS,
    SINK_TOKENS,
    TransformProfile,
    fit_transform,
    pair_weights,
    transform_groups,
    with_levels,
)
from kvstore.codecs.kvcodec_profile import DEFAULT_LEVELS, KVCodecProfile, Level, build_profile
from kvstore.errors import ConfigError
from kvstore.integrations.hf import Tokens, cache_layout, extract_kv, kv_layout
from kvstore.integrations.hf_attention import own_attention, use_attention
from kvstore.integrations.hf_calibrate import (
    DEFAULT_TARGETS_PCT,
    calibrate,
    calibrate_levels,
    calibration_contexts,
    check_targets,
)
from kvstore.integrations.hf_rope import rotary_table
from kvstore.kv import stack_span


CAPTURE_NAME = "kvstore_capture_queries"
#: calibration tokens a ``kvcodec3`` profile needs: bases fitted on fewer under-estimate their
#: trailing components' spread on other text (measured on SmolLM2: benchmarks/RESULTS.md)
MIN_TRANSFORM_TOKENS = 8192


@contextlib.contextmanager
def _capture_queries(model: Any) -> Iterator[dict[int, torch.Tensor]]:
    """Record, per layer, the energy of the queries each attention call receives (after
    RoPE and any QK-norm: what meets the keys), summed over tokens: ``{layer: [q_heads, D]}``.
    Observed through the attention interface, so every architecture (fused projections,
    layers without RoPE) is seen alike; the model's own attention computes the outputs."""
    captured: dict[int, torch.Tensor] = {}
    own: list[str] = []

    def observe(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        energy = query.detach().float().pow(2).sum(dim=(0, 2)).cpu()  # [q_heads, D] over batch and tokens
        layer = module.layer_idx
        captured[layer] = captured[layer] + energy if layer in captured else energy
        return own_attention(module, own[0])(module, query, *args, **kwargs)

    with use_attention(model, CAPTURE_NAME, observe) as previous:
        own.append(previous)
        yield captured


def profile_model(
    model: Any,
    contexts: Sequence[Tokens],
    *,
    levels: Sequence[Level] = DEFAULT_LEVELS,
    sink_tokens: int = 4,
    chunk_tokens: int | None = None,
    targets_pct: Sequence[float] | None = DEFAULT_TARGETS_PCT,
) -> KVCodecProfile:
    """Prefill calibration ``contexts`` (a few thousand tokens of typical text are
    enough), capturing their KV and query statistics, and build a ``kvcodec`` profile.

    ``targets_pct``: each level's perplexity-increase target on this model; the levels'
    steps (and each layer's key step) are calibrated to meet them on the contexts
    (:mod:`kvstore.integrations.hf_calibrate`). ``None`` keeps ``levels`` as given."""
    if not contexts:
        raise ConfigError("profile_model needs at least one calibration context")
    cache = cache_layout(model)
    if len({(s.kv_heads, s.key_dim, s.value_dim, s.slots) for s in cache.layers}) != 1 or cache.layers[0].slots != "kv":
        raise ConfigError(f"kvcodec profiles cover models whose layers all cache one shape; "
                          f"this model's layers are {cache.describe()}")
    layout = kv_layout(model)
    energy = torch.zeros(layout.layers, layout.kv_heads, layout.head_dim)
    positions = 0
    samples = []
    for tokens in contexts:
        with _capture_queries(model) as captured:
            kv = extract_kv(model, tokens, chunk_tokens=chunk_tokens)  # every token, sliding layers included
        if sorted(captured) != list(range(layout.layers)):
            raise ConfigError(f"observed queries of layers {sorted(captured)} of {layout.layers}: unsupported architecture")
        per_layer = torch.stack([captured[i] for i in range(layout.layers)])
        q_heads = per_layer.shape[1]
        if q_heads % layout.kv_heads:
            raise ConfigError(f"{q_heads} query heads do not group onto {layout.kv_heads} KV heads")
        energy += per_layer.view(layout.layers, layout.kv_heads, q_heads // layout.kv_heads, -1).mean(dim=2)
        positions += kv[0][0].shape[1]
        samples.append(stack_span(kv))
    energy /= positions
    if targets_pct is None:
        return build_profile(samples, query_energy=energy, levels=levels, sink_tokens=sink_tokens)
    first = build_profile(samples, query_energy=energy, levels=levels[:1], sink_tokens=sink_tokens)  # centers, units
    result = calibrate(model, samples, contexts, first.key_center, first.key_unit, targets_pct=targets_pct,
                       sink_tokens=sink_tokens)
    energy = energy / result.key_layer_factors[:, None, None] ** 2  # unit = 1 / sqrt(energy)
    return build_profile(samples, query_energy=energy, levels=result.levels, sink_tokens=sink_tokens,
                         calibration=result)


def transform_profile_model(
    model: Any,
    contexts: Sequence[Tokens],
    *,
    base: KVCodecProfile | None = None,
    group_layers: int = DEFAULT_GROUP_LAYERS,
    sink_tokens: int = SINK_TOKENS,
    targets_pct: Sequence[float] = DEFAULT_TARGETS_PCT,
) -> TransformProfile:
    """A ``kvcodec3`` profile of ``model`` from calibration ``contexts``: key weights from the
    queries (those of ``base``, a ``kvcodec`` profile of the model, else one profiled now),
    learned bases per transform group of ``group_layers`` layers of one attention kind, and
    levels calibrated to ``targets_pct`` with the transform's own quantization."""
    if not contexts:
        raise ConfigError("transform_profile_model needs at least one calibration context")
    if base is None:
        base = profile_model(model, contexts, targets_pct=targets_pct)
    check_targets(targets_pct)
    samples = []
    for tokens in contexts:
        kv = extract_kv(model, tokens)
        samples.append(stack_span(kv))
    L, H, _, D = samples[0][0].shape
    if (L, H, D) != base.shape:
        raise ConfigError(f"the kvcodec profile's shape {base.shape} is not the model's KV")
    groups = transform_groups([(s.kind, s.window) for s in cache_layout(model).layers], group_layers)
    fitted = fit_transform(samples, rope=rotary_table(model), key_weight=pair_weights(base.key_unit), groups=groups,
                           sink_tokens=sink_tokens)
    ctxs = calibration_contexts(model, samples, contexts, sink_tokens=sink_tokens)
    levels, measured = calibrate_levels(model, ctxs, fitted.roundtrip, start=base.levels, targets_pct=targets_pct)
    record = {"targets_pct": [float(t) for t in targets_pct], "measured_pct": [round(m, 4) for m in measured],
              "calibration_tokens": sum(len(torch.as_tensor(t)) for t in contexts), "group_layers": group_layers}
    return with_levels(fitted, samples, levels, calibration=record)
