"""Synthetic KV with the statistics kvcodec is built for, shared by the kernel tests."""

import torch

from kvstore.codecs.kvcodec_profile import build_profile

L, H, D = 2, 2, 32


def synthetic_kv(tokens: int, seed: int, dtype: torch.dtype = torch.float16, *,
                 shape: tuple[int, int, int] = (L, H, D)) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with per-channel offsets and scales and a sink-like first token; values with
    per-token scales (``[layers, heads, tokens, dim]`` each, ``shape`` = (layers, heads, dim))."""
    layers, heads, dim = shape
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, heads, tokens, dim, generator=g) * (1 + torch.arange(dim) % 5) + torch.linspace(-3, 3, dim)
    keys[:, :, 0] *= 40  # a sink-like first token: patches
    values = torch.randn(layers, heads, tokens, dim, generator=g) * torch.exp(torch.randn(layers, heads, tokens, 1, generator=g))
    return keys.to(dtype), values.to(dtype)


def small_profile(shape: tuple[int, int, int] = (L, H, D)):
    """A kvcodec profile fitted to two 96-token synthetic contexts of ``shape`` (layers, heads, dim)."""
    return build_profile([synthetic_kv(96, s, shape=shape) for s in range(2)])
