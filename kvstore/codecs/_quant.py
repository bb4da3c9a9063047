"""Shared helpers of the quantizing baseline codecs (``int8``, ``kivi2``, ``cachegen_ref``).

Quantization parameters (scales, zero points) are stored as fp16 buffers, fp32
only when a chunk holds values beyond fp16's range. They are rounded in a
chosen direction (up for scales, down for zero points) and the codes are then
computed with the *stored* values, so the usual bounds hold exactly for what
a reader sees: no clipping, error at most half a step. Also: input checks,
validated buffer reads, sub-byte code packing and ``from_params`` that turns
bad stored parameters into :class:`~kvstore.errors.FormatError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from kvstore.errors import CodecError, FormatError
from kvstore.format.container import Container

FP16_MAX = 65504.0
PARAM_DTYPES = (torch.float16, torch.float32)


def check_kv(keys: torch.Tensor, values: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate encoder input: two 4-D float tensors on one device whose shapes agree except
    perhaps in the last axis (value width); returns the keys' shape."""
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_floating_point():
            raise CodecError(f"{name} must be a 4-D float tensor [layers, kv_heads, tokens, head_dim]")
    if 0 in keys.shape:
        raise CodecError(f"cannot encode an empty chunk of shape {list(keys.shape)}")
    if keys.shape[:3] != values.shape[:3] or keys.device != values.device:
        raise CodecError(f"keys {list(keys.shape)} on {keys.device} and values {list(values.shape)} "
                         f"on {values.device} must match")
    return tuple(keys.shape)  # type: ignore[return-value]


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`CodecError` if ``t`` (a reduction such as absmax) is not finite."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise CodecError(f"{what}: the KV holds NaN or infinite values, which cannot be quantized")


def param_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp16 if every magnitude in ``tensors`` (fp32 estimates of the parameters to store) stays
    finite in fp16 with a margin for directed rounding, else fp32."""
    peak = max((float(t.abs().amax()) for t in tensors if t.numel()), default=0.0)
    return torch.float16 if peak * (1 + 2**-8) < FP16_MAX else torch.float32


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest ``dtype`` values that are ``>= x`` (``x`` fp32, finite)."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    low = y.float() < x
    return torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest ``dtype`` values that are ``<= x`` (``x`` fp32, finite)."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    high = y.float() > x
    return torch.where(high, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` (fp32) with zeros replaced by 1: all-zero groups then code as 0."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def read(obj: Container, name: str, dtypes: Iterable[torch.dtype], shape: tuple[int, ...]) -> torch.Tensor:
    """Buffer ``name`` (checksum verified) after checking its dtype and shape against the expected ones."""
    t = obj.tensor(name)
    allowed = tuple(dtypes)
    if t.dtype not in allowed or tuple(t.shape) != tuple(shape):
        raise FormatError(
            f"buffer {name!r} is {t.dtype}{list(t.shape)}, expected one of {allowed} with shape {list(shape)}"
        )
    return t


def read_params(obj: Container, name: str, shape: tuple[int, ...], *, nonneg: bool) -> torch.Tensor:
    """A scale (``nonneg``) or zero-point buffer (fp16 or fp32, as stored), checked finite (and >= 0)."""
    t = read(obj, name, PARAM_DTYPES, shape)
    bad = ~torch.isfinite(t) | (t < 0) if nonneg else ~torch.isfinite(t)
    if bool(bad.any()):
        raise FormatError(f"buffer {name!r} holds {'negative or ' if nonneg else ''}non-finite values")
    return t


def abs_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.abs().amax(dim)`` in one pass and without a temporary of ``x``'s size."""
    lo, hi = torch.aminmax(x, dim=dim)
    return torch.maximum(hi, lo.neg_())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (any shape, values < 2**bits) into a flat uint8 tensor.

    Code ``i`` of the flattened input occupies bits ``[i*bits, (i+1)*bits)`` of the
    little-endian bit stream; the unused high bits of the last byte are zero. The
    result has ``ceil(numel * bits / 8)`` bytes.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # whole codes per byte: shift and add
        per = 8 // bits
        pad = -n % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
        return (flat.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat[:, None] >> bit_idx) & 1).reshape(-1)  # one uint8 per bit
    pad = -stream.numel() % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (stream.view(-1, 8) << weights).sum(dim=1, dtype=torch.uint8)


def packed_bytes(count: int, bits: int) -> int:
    """Bytes :func:`pack_codes` produces for ``count`` codes."""
    return -(-count * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` uint8 codes. Non-zero padding bits raise :class:`FormatError`."""
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != packed_bytes(count, bits):
        raise FormatError(f"packed codes: expected {packed_bytes(count, bits)} uint8 bytes, got "
                          f"{packed.dtype}{list(packed.shape)}")
    if bits == 8:
        return packed
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    else:
        weights = torch.arange(8, dtype=torch.uint8, device=packed.device)
        stream = ((packed[:, None] >> weights) & 1).reshape(-1)
        bit_idx = torch.arange(bits, dtype=torch.uint8, device=packed.device)
        codes = (stream[: count * bits].view(count, bits) << bit_idx).sum(dim=1, dtype=torch.uint8)
        if stream[count * bits :].any():
            raise FormatError("packed codes: non-zero padding bits")
        return codes
    if codes[count:].any():
        raise FormatError("packed codes: non-zero padding bits")
    return codes[:count]


def build(cls: type, params: Mapping[str, Any]) -> Any:
    """``cls(**params)`` for a stored header: bad or unknown parameters raise :class:`FormatError`."""
    if not isinstance(params, Mapping):
        raise FormatError(f"codec {cls.name!r}: parameters must be an object")
    try:
        return cls(**params)
    except (TypeError, CodecError) as exc:
        raise FormatError(f"bad parameters for codec {cls.name!r}: {exc}") from None


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """``value`` if it is an int (not bool) in ``[low, high]``, else :class:`CodecError`."""
    if type(value) is not int or not low <= value <= high:
        raise CodecError(f"{what} must be an int in [{low}, {high}], got {value!r}")
    return value
