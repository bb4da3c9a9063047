"""Synthetic KV with the structure transform codecs exploit: keys and values of every layer
and head driven by a few shared latent factors, keys rotated by RoPE at their positions."""

import torch

from kvstore.codecs.kvcodec3_profile import fit_transform, transform_groups, with_levels
from kvstore.codecs.kvcodec_profile import Level
from kvstore.codecs.rope import RotaryTable, rotate

L, H, D = 4, 2, 16
FACTORS = 6


def rope_table(layers: int = L, dim: int = D) -> RotaryTable:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return RotaryTable(inv.repeat(layers, 1).contiguous(), torch.ones(layers))


def correlated_kv(tokens: int, seed: int, *, start: int = 0, dtype: torch.dtype = torch.float32,
                  shape: tuple[int, int, int] = (L, H, D), scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` ``[L, H, T, D]``: low-rank across layers and heads (factors times
    ``scale``) plus a little noise, a sink-like first context token, keys rotated at positions
    ``start ..``."""
    layers, heads, dim = shape
    mix = torch.Generator().manual_seed(1234)  # the same mixing in every context: a model's structure
    key_mix = torch.randn(FACTORS, layers * heads * dim, generator=mix)
    value_mix = torch.randn(FACTORS, layers * heads * dim, generator=mix)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, FACTORS, generator=g) * torch.linspace(3, 0.5, FACTORS) * scale
    keys = (z @ key_mix + 0.002 * torch.randn(tokens, layers * heads * dim, generator=g)).view(tokens, layers, heads, dim)
    values = (z @ value_mix + 0.002 * torch.randn(tokens, layers * heads * dim, generator=g)).view(tokens, layers, heads, dim)
    keys, values = keys.permute(1, 2, 0, 3).contiguous(), values.permute(1, 2, 0, 3).contiguous()
    if start == 0:
        keys[:, :, 0] *= 30
    keys = rotate(keys, rope_table(layers, dim), start)
    return keys.to(dtype), values.to(dtype)


LEVELS = (Level(0.05, 0.02), Level(0.1, 0.05), Level(0.2, 0.1), Level(0.4, 0.2), Level(0.8, 0.4), Level(1.6, 0.8))


def transform_profile(group_layers: int = 2, kinds: tuple = ("full",) * L):
    """A kvcodec3 profile fitted to three 200-token synthetic contexts."""
    samples = [correlated_kv(200, s) for s in range(3)]
    fitted = fit_transform(samples, rope=rope_table(), key_weight=torch.ones(L, H, D),
                           groups=transform_groups(kinds, group_layers))
    return with_levels(fitted, samples, LEVELS)
