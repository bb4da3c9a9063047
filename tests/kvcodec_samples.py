"""Synthetic KV with the statistics kvcodec is built for, shared by the kernel tests."""

import torch

from kvstore.codecs.kvcodec_profile import build_profile

L, H, D = 2, 2, 32


def synthetic_kv(tokens: int, seed: int, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with per-channel offsets and scales and a sink-like first token; values with
    per-token scales (``[L, H, tokens, D]`` each)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, H, tokens, D, generator=g) * (1 + torch.arange(D) % 5) + torch.linspace(-3, 3, D)
    keys[:, :, 0] *= 40  # a sink-like first token: patches
    values = torch.randn(L, H, tokens, D, generator=g) * torch.exp(torch.randn(L, H, tokens, 1, generator=g))
    return keys.to(dtype), values.to(dtype)


def small_profile():
    """A kvcodec profile fitted to two 96-token synthetic contexts."""
    return build_profile([synthetic_kv(96, s) for s in range(2)])
