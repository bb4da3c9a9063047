"""Profile a Hugging Face model for the ``kvcodec`` codec: its KV and its queries.

``kvcodec`` sizes each key channel's quantization step by how strongly the
model's queries read that channel (``E[q_c^2]`` after RoPE, averaged over the
query heads that share a KV head). The queries are observed where they meet the
keys: as the model's attention function receives them during a prefill
(:mod:`kvstore.integrations.hf_attention`), whatever the architecture does before.
An MLA latent is not a key: its channels are weighted by the queries absorbed through
the projection that expands it into keys (``W_uk^T q``); its rotary key, in the value
slot, is coded like values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
from kvstore.integrations.hf import Tokens, cache_layout, extract_kv
from kvstore.integrations.hf_attention import own_attention, use_attention
from kvstore.integrations.hf_calibrate import (
    DEFAULT_TARGETS_PCT,
    calibrate,
    calibrate_levels,
    calibration_contexts,
    check_targets,
)
from kvstore.integrations.hf_rope import rotary_table
from kvstore.kv import stack_span, token_tensor


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
        energy = _key_slot_reads(module, query.detach().float()).pow(2).sum(dim=(0, 2)).cpu()  # [q_heads, D]
        layer = module.layer_idx
        captured[layer] = captured[layer] + energy if layer in captured else energy
        return own_attention(module, own[0])(module, query, *args, **kwargs)

    with use_attention(model, CAPTURE_NAME, observe) as previous:
        own.append(previous)
        yield captured


def _key_slot_reads(module: Any, query: torch.Tensor) -> torch.Tensor:
    """The queries ``[batch, q_heads, tokens, D]`` as they read the cached key slot: as given,
    or for an MLA layer (the slot holds the latent ``c``, expanded to keys by ``kv_b_proj``:
    ``q_nope . (W_uk c) = (W_uk^T q_nope) . c``) absorbed into the latent's ``kv_lora_rank``
    channels."""
    rank = getattr(module, "kv_lora_rank", None)
    if not rank:
        return query
    nope, heads = module.qk_nope_head_dim, query.shape[1]
    weight = module.kv_b_proj.weight.detach().float().view(heads, nope + module.v_head_dim, rank)
    return torch.einsum("bhtn,hnr->bhtr", query[..., :nope], weight[:, :nope])


@dataclass(frozen=True)
class TokenLayers:
    """The layers a codec profile of a model covers: those with per-token KV (a profile's
    rows), all of one shape, ``kv_heads`` x ``head_dim`` keys (an MLA layer's latent; its
    values, the rotary key, may be of another width); linear-attention layers are stored
    exactly beside them."""

    layers: tuple[int, ...]
    kv_heads: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.layers), self.kv_heads, self.head_dim


def token_layers(model: Any) -> TokenLayers:
    """The model's layers a codec profile covers; :class:`ConfigError` unless they all cache
    keys and values of one shape."""
    cache = cache_layout(model)
    spec = cache.token_spec()
    if spec is None:
        raise ConfigError(f"kvcodec profiles cover models whose attention layers all cache keys and values "
                          f"of one shape; this model's layers are {cache.describe()}")
    return TokenLayers(cache.token_layers, spec.kv_heads, spec.key_dim)


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
    rows = token_layers(model)
    L, H, D = rows.shape
    energy = torch.zeros(L, H, D)
    positions = 0
    samples = []
    for tokens in contexts:
        with _capture_queries(model) as captured:
            kv = extract_kv(model, tokens, chunk_tokens=chunk_tokens)  # every token, sliding layers included
        if sorted(captured) != list(rows.layers):
            raise ConfigError(f"observed queries of layers {sorted(captured)}, not of the {L} attention "
                              f"layers {list(rows.layers)}: unsupported architecture")
        per_layer = torch.stack([captured[i] for i in rows.layers])
        q_heads = per_layer.shape[1]
        if q_heads % H:
            raise ConfigError(f"{q_heads} query heads do not group onto {H} KV heads")
        energy += per_layer.view(L, H, q_heads // H, -1).mean(dim=2)
        positions += token_tensor(kv).shape[1]
        samples.append(stack_span(kv, layers=rows.layers))
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
    rows = token_layers(model)
    if rows.shape != base.shape:
        raise ConfigError(f"the kvcodec profile's shape {base.shape} is not the model's KV {rows.shape}")
    samples = [stack_span(extract_kv(model, tokens), layers=rows.layers) for tokens in contexts]
    cache = cache_layout(model)
    groups = transform_groups([(cache.layers[i].kind, cache.layers[i].window) for i in rows.layers], group_layers)
    fitted = fit_transform(samples, rope=rotary_table(model), key_weight=pair_weights(base.key_unit), groups=groups,
                           sink_tokens=sink_tokens)
    ctxs = calibration_contexts(model, samples, contexts, sink_tokens=sink_tokens)
    levels, measured = calibrate_levels(model, ctxs, fitted.roundtrip, start=base.levels, targets_pct=targets_pct)
    record = {"targets_pct": [float(t) for t in targets_pct], "measured_pct": [round(m, 4) for m in measured],
              "calibration_tokens": sum(len(torch.as_tensor(t)) for t in contexts), "group_layers": group_layers}
    return with_levels(fitted, samples, levels, calibration=record)
