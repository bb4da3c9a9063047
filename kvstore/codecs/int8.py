"""``int8``: symmetric 8-bit quantization per token, CacheGen's "8-bit quantization" baseline.

For every (layer, kv head, token) the ``head_dim`` values share one scale
``absmax / 127``, stored as fp16 (rounded up, so no code clips; fp32 if the
chunk's values exceed fp16's range); codes are ``round(x / scale)`` in
``[-127, 127]``. Error per value is at most ``scale / 2`` (before the final
rounding to the KV dtype). Size: ``8 + 16 / head_dim`` bits per element
(8.25 at head_dim 64) plus the container's header.

Buffers: ``k``/``v`` int8 ``[layers, kv_heads, tokens, head_dim]``,
``k_scale``/``v_scale`` fp16 (or fp32) ``[layers, kv_heads, tokens]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvstore.codecs import _quant as q
from kvstore.codecs.base import Codec, kv_shapes, register_codec
from kvstore.format.container import BufferLike, Container

QMAX = 127


def quantize(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., head_dim]`` -> (int8 codes, scales ``[...]`` fp16/fp32) on ``x``'s device."""
    xf = x.to(torch.float32, copy=True)
    step = q.abs_max(xf, -1) / QMAX
    q.check_finite(step, what)
    scale = q.round_up(step, q.param_dtype(step))
    xf.div_(q.safe_divisor(scale.float()).unsqueeze(-1)).round_().clamp_(-QMAX, QMAX)
    return xf.to(torch.int8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes ``[..., head_dim]`` times scales ``[...]``, rounded once to ``dtype``.

    With fp16 output and fp16 scales the product is formed in fp16 directly: codes
    (<= 127) and scales are exact there and one IEEE multiplication rounds the
    exact product once, as the fp32 route would.
    """
    if dtype == torch.float16 and scale.dtype == torch.float16:
        return codes.to(torch.float16).mul_(scale.unsqueeze(-1))
    return codes.to(torch.float32).mul_(scale.float().unsqueeze(-1)).to(dtype)


@register_codec
class Int8Codec(Codec):
    """Symmetric per-token int8 (one fp16 absmax scale per layer, head and token)."""

    name = "int8"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Codec:
        return q.build(cls, params)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        """Encode a chunk (``start``, its position in the context, is not used)."""
        q.check_kv(keys, values)
        k, k_scale = quantize(keys, "int8 keys")
        v, v_scale = quantize(values, "int8 values")
        return {"k": k, "k_scale": k_scale, "v": v, "v_scale": v_scale}

    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
        *, value_dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for name, shape in zip(("k", "v"), kv_shapes(shape, value_dim)):
            codes = q.read(obj, name, (torch.int8,), shape)
            scale = q.read_params(obj, f"{name}_scale", shape[:3], nonneg=True)
            out.append(dequantize(codes.to(device), scale.to(device), dtype))
        return out[0], out[1]

    def decode_into(self, obj: Container, out_keys: torch.Tensor, out_values: torch.Tensor) -> None:
        """Written straight into the caller's views, the same values as :meth:`decode`: the
        product of a code and a scale is exact in fp32 and rounded once to the output dtype
        (two vectorized passes; fp16 arithmetic on the CPU is slower than both)."""
        for name, out in (("k", out_keys), ("v", out_values)):
            codes = q.read(obj, name, (torch.int8,), tuple(out.shape))
            scale = q.read_params(obj, f"{name}_scale", tuple(out.shape[:3]), nonneg=True)
            out.copy_(torch.mul(codes.to(out.device), scale.to(out.device).float().unsqueeze(-1)))
