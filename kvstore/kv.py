"""The KV convention at the API: per layer, ``(key, value)`` each ``[kv_heads, tokens, head_dim]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import torch

from kvstore.errors import ConfigError

KV: TypeAlias = list[tuple[torch.Tensor, torch.Tensor]]
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], num_tokens: int) -> torch.Tensor:
    """Validate ``kv`` against ``num_tokens``; return its first tensor (whose shape, dtype
    and device every other tensor shares)."""
    if not isinstance(kv, Sequence) or len(kv) == 0:
        raise ConfigError("kv must be a non-empty sequence of (key, value) pairs, one per layer")
    first = None
    for i, pair in enumerate(kv):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise ConfigError(f"kv[{i}] must be a (key, value) pair")
        for name, t in zip(("key", "value"), pair):
            if not isinstance(t, torch.Tensor) or t.ndim != 3:
                raise ConfigError(f"kv[{i}] {name} must be a 3-D tensor [kv_heads, tokens, head_dim]")
            if t.dtype not in KV_DTYPES:
                raise ConfigError(f"kv[{i}] {name} has dtype {t.dtype}; supported: {KV_DTYPES}")
            if first is None:
                first = t
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ConfigError(
                    f"kv[{i}] {name} is {t.dtype}{list(t.shape)} on {t.device}; every tensor must match "
                    f"kv[0] key {first.dtype}{list(first.shape)} on {first.device}"
                )
    assert first is not None
    if first.shape[1] != num_tokens:
        raise ConfigError(f"kv covers {first.shape[1]} tokens but {num_tokens} token ids were given")
    return first


def stack_span(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens ``[start, stop)`` as ``[layers, kv_heads, stop - start, head_dim]``."""
    keys = torch.stack([k[:, start:stop] for k, _ in kv])
    values = torch.stack([v[:, start:stop] for _, v in kv])
    return keys, values


def unstack_kv(keys: torch.Tensor, values: torch.Tensor) -> KV:
    """Split ``[layers, ...]`` keys and values into the per-layer list."""
    return list(zip(keys.unbind(0), values.unbind(0)))
