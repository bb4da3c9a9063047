"""``kivi2``: KIVI (Liu et al., ICML 2024, arXiv 2402.02750) asymmetric low-bit quantization.

Keys are quantized *per channel*: for every (layer, kv head, channel) the
tokens are cut into groups of ``group_size`` consecutive tokens; values *per
token*: for every (layer, kv head, token) the ``head_dim`` channels are cut into
groups of ``group_size`` channels. A group stores a zero point ``z`` (its
minimum, rounded down) and a scale ``s = (max - z) / (2**bits - 1)`` (rounded
up), both fp16 (fp32 only if the chunk exceeds fp16's range); a value codes as
``round((x - z) / s)`` in ``[0, 2**bits - 1]``, so its error is at most
``s / 2``. The last group along an axis may be shorter (token counts or
``head_dim`` not a multiple of ``group_size``). Codes are bit-packed, ``8 / bits``
per byte for 1, 2, 4 and 8 bits, as a plain bit stream for other widths.

Size at 2 bits and groups of 32: ``2 + 2 * 16 / 32 = 3`` bits per element.

Not implemented: KIVI keeps the most recent ``R`` tokens (a residual of up to
128) in full precision while generating and quantizes them only once a group
is full. A stored chunk has no "recent" tokens, so every token is quantized.

Buffers: ``k``/``v`` packed uint8 codes (``[layers, kv_heads, tokens, head_dim]``
flattened in C order), ``k_scale``/``k_zero`` ``[layers, kv_heads, ceil(tokens /
group_size), head_dim]`` and ``v_scale``/``v_zero`` ``[layers, kv_heads, tokens,
ceil(head_dim / group_size)]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from kvstore.codecs import _quant as q
from kvstore.codecs.base import Codec, kv_shapes, register_codec
from kvstore.format.container import BufferLike, Container

#: the axis each tensor is grouped along in ``[layers, kv_heads, tokens, head_dim]``
AXES = {"k": 2, "v": 3}


def _segments(n: int, group: int) -> Iterator[tuple[int, int, int, int]]:
    """``(start, length, first_group, groups)`` of the full groups, then of the partial last one."""
    full = n // group
    if full:
        yield 0, full * group, 0, full
    if n % group:
        yield full * group, n % group, full, 1


def _split(t: torch.Tensor, axis: int, start: int, length: int, groups: int) -> torch.Tensor:
    """The slice ``[start, start + length)`` of ``axis``, viewed as ``(groups, length // groups)``."""
    return t.narrow(axis, start, length).unflatten(axis, (groups, length // groups))


def quantize(x: torch.Tensor, axis: int, group: int, bits: int, what: str) -> tuple[torch.Tensor, ...]:
    """Group-wise asymmetric quantization along ``axis``: (uint8 codes, scale, zero point)."""
    xf = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    n, levels = xf.shape[axis], (1 << bits) - 1
    mins, maxs = [], []
    for start, length, _, groups in _segments(n, group):
        lo, hi = torch.aminmax(_split(xf, axis, start, length, groups), dim=axis + 1)
        mins.append(lo)
        maxs.append(hi)
    lo, hi = torch.cat(mins, axis), torch.cat(maxs, axis)
    q.check_finite(lo, what)
    q.check_finite(hi, what)
    pdt = q.param_dtype(lo, hi, (hi - lo) / levels)
    zero = q.round_down(lo, pdt)
    scale = q.round_up((hi - zero.float()) / levels, pdt)
    step, zf = q.safe_divisor(scale.float()), zero.float()
    for start, length, g0, groups in _segments(n, group):
        s = step.narrow(axis, g0, groups).unsqueeze(axis + 1)
        z = zf.narrow(axis, g0, groups).unsqueeze(axis + 1)
        _split(xf, axis, start, length, groups).sub_(z).div_(s).round_().clamp_(0, levels)
    return xf.to(torch.uint8), scale, zero


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """``codes * scale + zero`` per group (fp32 arithmetic), as ``dtype``."""
    out = codes.to(torch.float32)
    scale, zero = scale.float(), zero.float()
    for start, length, g0, groups in _segments(codes.shape[axis], group):
        s = scale.narrow(axis, g0, groups).unsqueeze(axis + 1)
        z = zero.narrow(axis, g0, groups).unsqueeze(axis + 1)
        _split(out, axis, start, length, groups).mul_(s).add_(z)
    return out.to(dtype)


def param_shape(shape: tuple[int, int, int, int], axis: int, group: int) -> tuple[int, int, int, int]:
    """Shape of the scale / zero buffers of a tensor grouped along ``axis``."""
    dims = list(shape)
    dims[axis] = -(-dims[axis] // group)
    return tuple(dims)  # type: ignore[return-value]


@register_codec
class KIVICodec(Codec):
    """KIVI: per-channel keys, per-token values, asymmetric ``bits``-bit groups of ``group_size``."""

    name = "kivi2"

    def __init__(self, bits: int = 2, group_size: int = 32) -> None:
        self.bits = q.check_int(bits, "kivi bits", 1, 8)
        self.group_size = q.check_int(group_size, "kivi group_size", 1, 1 << 16)

    @property
    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Codec:
        return q.build(cls, params)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        """Encode a chunk (``start``, its position in the context, is not used)."""
        q.check_kv(keys, values)
        out: dict[str, BufferLike] = {}
        for name, x in (("k", keys), ("v", values)):
            codes, scale, zero = quantize(x, AXES[name], self.group_size, self.bits, f"kivi {name}")
            out[name] = q.pack_codes(codes, self.bits)
            out[f"{name}_scale"] = scale
            out[f"{name}_zero"] = zero
        return out

    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
        *, value_dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for name, shape in zip(("k", "v"), kv_shapes(shape, value_dim)):
            count = math.prod(shape)
            axis = AXES[name]
            pshape = param_shape(shape, axis, self.group_size)
            packed = q.read(obj, name, (torch.uint8,), (q.packed_bytes(count, self.bits),))
            scale = q.read_params(obj, f"{name}_scale", pshape, nonneg=True)
            zero = q.read_params(obj, f"{name}_zero", pshape, nonneg=False)
            codes = q.unpack_codes(packed.to(device), self.bits, count).view(shape)
            out.append(dequantize(codes, scale.to(device), zero.to(device), axis, self.group_size, dtype))
        return out[0], out[1]
