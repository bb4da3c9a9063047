"""The KV convention at the API: per layer, ``(key, value)`` each ``[kv_heads, tokens, dim]``.

Key and value widths may differ (MLA), and so may heads and widths across layers
(see :class:`~kvstore.format.layout.CacheLayout`). KV given to a store covers every
token in every layer; KV loaded for a prefix may hold, in a sliding-window layer,
only the *last* tokens of the prefix (at least the window the next token attends).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import torch

from kvstore.errors import ConfigError
from kvstore.format.layout import CacheLayout

KV: TypeAlias = list[tuple[torch.Tensor, torch.Tensor]]
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PrefixKV(list):  # type: ignore[type-arg]
    """KV loaded for a context of ``num_tokens`` tokens: a plain per-layer list that also
    says how many tokens it describes (its sliding-window layers may hold fewer)."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], num_tokens: int) -> None:
        super().__init__(layers)
        self.num_tokens = num_tokens


def check_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], num_tokens: int, layout: CacheLayout) -> torch.Tensor:
    """Validate ``kv`` (every layer covering ``num_tokens`` tokens) against ``layout`` (layer
    count, heads and widths per layer); return its first tensor, whose dtype and device every
    other tensor shares."""
    if not isinstance(kv, Sequence) or len(kv) == 0:
        raise ConfigError("kv must be a non-empty sequence of (key, value) pairs, one per layer")
    if len(kv) != layout.num_layers:
        raise ConfigError(f"the layout has {layout.num_layers} layers but the KV has {len(kv)}")
    first = None
    for i, pair in enumerate(kv):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise ConfigError(f"kv[{i}] must be a (key, value) pair")
        spec = layout.layers[i]
        for name, t in zip(("key", "value"), pair):
            if not isinstance(t, torch.Tensor) or t.ndim != 3:
                raise ConfigError(f"kv[{i}] {name} must be a 3-D tensor [kv_heads, tokens, dim]")
            if t.dtype not in KV_DTYPES:
                raise ConfigError(f"kv[{i}] {name} has dtype {t.dtype}; supported: {KV_DTYPES}")
            if first is None:
                first = t
            if t.dtype != first.dtype or t.device != first.device:
                raise ConfigError(f"kv[{i}] {name} is {t.dtype} on {t.device}; every tensor must match "
                                  f"kv[0] key, {first.dtype} on {first.device}")
            if t.shape[1] != num_tokens:
                raise ConfigError(f"kv[{i}] {name} covers {t.shape[1]} tokens but {num_tokens} token ids were given")
            want = (spec.kv_heads, spec.key_dim if name == "key" else spec.value_dim)
            if (t.shape[0], t.shape[2]) != want:
                raise ConfigError(f"kv[{i}] {name} is {list(t.shape)}; the layout expects "
                                  f"[{want[0]}, tokens, {want[1]}]")
    assert first is not None
    return first


def stack_span(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int = 0, stop: int | None = None,
               layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens ``[start, stop)`` (default: every token) of ``layers`` (all by
    default), stacked as ``[layers, kv_heads, stop - start, dim]``."""
    picked = [kv[i] for i in layers] if layers is not None else kv
    keys = torch.stack([k[:, start:stop] for k, _ in picked])
    values = torch.stack([v[:, start:stop] for _, v in picked])
    return keys, values

