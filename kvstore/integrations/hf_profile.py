"""Profile a Hugging Face model for the ``kvcodec`` codec: its KV and its queries.

``kvcodec`` sizes each key channel's quantization step by how strongly the
model's queries read that channel (``E[q_c^2]`` after RoPE, averaged over the
query heads that share a KV head). The queries are captured by wrapping the
``apply_rotary_pos_emb`` function of the model's modeling module during a
prefill: the same function the model uses, so the captured queries are exactly
those that meet the keys. Llama, Mistral, Qwen, Gemma and most HF decoders use it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kvstore.codecs.kvcodec_profile import DEFAULT_LEVELS, KVCodecProfile, Level, build_profile
from kvstore.errors import ConfigError
from kvstore.integrations.hf import Tokens, cache_layout, extract_kv, kv_layout
from kvstore.integrations.hf_calibrate import DEFAULT_TARGETS_PCT, calibrate


def _attention_modules(model: Any) -> list[Any]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")]


@contextlib.contextmanager
def _capture_queries(model: Any) -> Iterator[list[torch.Tensor]]:
    """Record the post-RoPE query energy of each attention call, in call order."""
    attention = _attention_modules(model)
    if not attention:
        raise ConfigError(f"{type(model).__name__}: no attention modules with q_proj found")
    module = sys.modules[type(attention[0]).__module__]
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None:
        raise ConfigError(f"{module.__name__} has no apply_rotary_pos_emb to observe queries through")
    captured: list[torch.Tensor] = []

    def observed(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        q_rot, k_rot = original(q, k, *args, **kwargs)
        captured.append(q_rot.detach().float().pow(2).sum(dim=(0, 2)).cpu())  # [q_heads, D] summed over batch, T
        return q_rot, k_rot

    module.apply_rotary_pos_emb = observed
    try:
        yield captured
    finally:
        module.apply_rotary_pos_emb = original


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
        calls = len(captured)
        if calls == 0 or calls % layout.layers:
            raise ConfigError(f"captured {calls} attention calls for {layout.layers} layers: unsupported architecture")
        per_layer = torch.stack([sum(captured[i::layout.layers]) for i in range(layout.layers)])
        q_heads = per_layer.shape[1]
        if q_heads % layout.kv_heads:
            raise ConfigError(f"{q_heads} query heads do not group onto {layout.kv_heads} KV heads")
        energy += per_layer.view(layout.layers, layout.kv_heads, q_heads // layout.kv_heads, -1).mean(dim=2)
        positions += kv[0][0].shape[1]
        samples.append((torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])))
    energy /= positions
    if targets_pct is None:
        return build_profile(samples, query_energy=energy, levels=levels, sink_tokens=sink_tokens)
    first = build_profile(samples, query_energy=energy, levels=levels[:1], sink_tokens=sink_tokens)  # centers, units
    result = calibrate(model, samples, contexts, first.key_center, first.key_unit, targets_pct=targets_pct,
                       sink_tokens=sink_tokens)
    energy = energy / result.key_layer_factors[:, None, None] ** 2  # unit = 1 / sqrt(energy)
    return build_profile(samples, query_energy=energy, levels=result.levels, sink_tokens=sink_tokens,
                         calibration=result)
