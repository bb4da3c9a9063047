"""kvcodec quantization in one GPU pass: fp16/bf16/fp32 keys and values in, uint8 symbols out.

:meth:`kvstore.codecs.kvcodec.KVCodec.quantize_tensors` computes a chunk's symbols with
about twenty torch passes over fp32 temporaries, whose memory traffic would bound the GPU
encoder (estimate in ``benchmarks/kernels_notes.md``). :func:`quantize_kvcodec_gpu`
computes the same symbols
with one Triton kernel that reads the KV once and writes the symbols once, already in the
stream layout of the codec's version (channel-major ``[L*H*D, T]`` transposed on chip, or
token-major). A program owns one (layer, head) and ``BLOCK_T`` tokens:

* keys: ``round((k - center) / step)`` (IEEE division, ties to even, as torch);
* values: the token's scale code ``round(4 * log2(rms))`` (clamped to the symbol range),
  then ``round(v / step)`` with ``step = vtab[code]``, the table the GPU decoder multiplies
  by (:func:`kvstore.codecs.kvcodec_profile.value_steps` of every code);
* sink tokens code as zero residuals; residuals outside the symbol range are clamped and
  counted, non-finite inputs are counted.

One synchronization reads the counts. Non-finite KV raises :class:`~kvstore.errors.CodecError`
(as the torch path does). When a tensor has out-of-range residuals ("patches", rare), their
clamped symbols (0 or 255) locate the candidates, and torch recomputes the residuals of those
elements only, with the torch path's arithmetic: the same patches (the count must match the
kernel's, or the chunk is refused). The scale codes may differ from the torch path's in rare
ties: the kernel sums the squares in another order, and torch's CUDA ``mean`` multiplies by
``1/D`` where the kernel divides (the same when D is a power of two); such a chunk is a valid
encoding of the same KV with that token's step a quarter octave apart.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kvstore.codecs.kvcodec_profile import SCALE_STEPS_PER_OCTAVE, ZERO
from kvstore.codecs.rans import MAX_SYMBOLS
from kvstore.errors import CodecError
from kvstore.format.container import BufferLike
from kvstore.kernels.support import cdiv, next_power_of_2
from kvstore.kernels.kvcodec_decode import profile_tensors
from kvstore.kernels.rans_decode import kernel_for

__all__ = ["quantize_kvcodec_gpu"]

#: fp32 rounding to an integer by adding and subtracting 1.5 * 2**23 (ties to even); exact for
#: |x| < 2**22, and beyond that still far outside the symbol range (a patch either way)
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _rint(x):
    return (x + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _kvcodec_quantize_kernel(
    k_ptr, v_ptr, center_ptr, step_ptr, vtab_ptr, ksym_ptr, vsym_ptr, codes_ptr, counts_ptr, T, sinks,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ZERO_SYM: tl.constexpr,
    SCALE_STEPS: tl.constexpr, CHANNEL_MAJOR: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    lh = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tm = t < T
    dm = d < D
    mask = tm[:, None] & dm[None, :]  # [BT, BD]
    base = lh * T * D  # this (layer, head)'s first element, in the KV and in either symbol layout
    src = t[:, None] * D + d[None, :]
    k = tl.load(k_ptr + base + src, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + src, mask=mask, other=0.0).to(tl.float32)
    sink = (t < sinks)[:, None]
    inf = float("inf")
    nonfinite = tl.sum(tl.sum(((tl.abs(k) == inf) | (k != k) | (tl.abs(v) == inf) | (v != v)) & mask, axis=1), axis=0)

    # keys: round((k - center) / step)
    center = tl.load(center_ptr + lh * D + d, mask=dm, other=0.0)
    step = tl.load(step_ptr + lh * D + d, mask=dm, other=1.0)
    kr = _rint(tl.math.div_rn(k - center[None, :], step[None, :]))
    kr = tl.where(sink, 0.0, kr)
    kout = ((kr < -ZERO_SYM) | (kr > 255 - ZERO_SYM)) & mask
    ks = (tl.minimum(tl.maximum(kr, -ZERO_SYM), 255 - ZERO_SYM) + ZERO_SYM).to(tl.uint8)

    # values: the token's scale code, then round(v / vtab[code])
    ms = tl.math.div_rn(tl.sum(v * v, axis=1), D * 1.0)
    rms = tl.maximum(tl.sqrt_rn(ms), 2.0**-24)
    code = tl.minimum(tl.maximum(_rint(tl.log2(rms) * SCALE_STEPS), -ZERO_SYM), 255 - ZERO_SYM)
    code = tl.where(rms == rms, code, 0.0)  # NaN values: counted above, any code will do
    ci = (code + ZERO_SYM).to(tl.int32)
    vstep = tl.load(vtab_ptr + ci, mask=tm, other=1.0)
    vr = _rint(tl.math.div_rn(v, vstep[:, None]))
    vr = tl.where(sink, 0.0, vr)
    vout = ((vr < -ZERO_SYM) | (vr > 255 - ZERO_SYM)) & mask
    vs = (tl.minimum(tl.maximum(vr, -ZERO_SYM), 255 - ZERO_SYM) + ZERO_SYM).to(tl.uint8)

    if CHANNEL_MAJOR:  # [L*H*D, T]: each (layer, head, channel) row of T tokens
        dst = d[:, None] * T + t[None, :]
        tmask = dm[:, None] & tm[None, :]
        tl.store(ksym_ptr + base + dst, tl.trans(ks), mask=tmask)
        tl.store(vsym_ptr + base + dst, tl.trans(vs), mask=tmask)
    else:
        tl.store(ksym_ptr + base + src, ks, mask=mask)
        tl.store(vsym_ptr + base + src, vs, mask=mask)
    tl.store(codes_ptr + lh * T + t, ci.to(tl.uint8), mask=tm)
    # counts, almost always 0: an atomic only where there is something to count
    n_k = tl.sum(tl.sum(kout.to(tl.int32), axis=1), axis=0)
    n_v = tl.sum(tl.sum(vout.to(tl.int32), axis=1), axis=0)
    n_bad = nonfinite.to(tl.int32)
    tl.atomic_add(counts_ptr + 0, n_k, mask=n_k > 0, sem="relaxed")
    tl.atomic_add(counts_ptr + 1, n_v, mask=n_v > 0, sem="relaxed")
    tl.atomic_add(counts_ptr + 2, n_bad, mask=n_bad > 0, sem="relaxed")


def _patches_from_symbols(
    sym: torch.Tensor, originals: torch.Tensor, residual_at, shape: tuple[int, int, int, int], sinks: int,
    channel_major: bool, expected: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The codec's patches (sorted flat ``[L, H, T, D]`` indices, int32, and original values):
    a clamped residual has symbol 0 or 255, so only those elements get their residual
    recomputed in torch (``residual_at(flat_indices)``, the torch path's arithmetic) and
    are kept when it lies outside the symbol range; sink tokens are never patched."""
    _, _, T, D = shape
    cand = ((sym == 0) | (sym == 255)).view(-1).nonzero().squeeze(1)
    if channel_major:  # symbol (lh*D + d)*T + t -> element (lh*T + t)*D + d
        lhd, t = cand // T, cand % T
        cand = ((lhd // D) * T + t) * D + lhd % D
    flat = cand.sort().values
    flat = flat[(flat // D) % T >= sinks]
    res = residual_at(flat)
    index = flat[(res < -ZERO) | (res > 255 - ZERO)]
    if index.numel() != expected:  # the kernel and torch disagree on a residual: never store such a chunk
        raise CodecError(f"internal error: the quantization kernel counted {expected} patches, torch finds "
                         f"{index.numel()}")  # fmt: skip
    return index.to(torch.int32), originals.reshape(-1)[index]


def quantize_kvcodec_gpu(
    codec: Any, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0, block_t: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, BufferLike]]:
    """What ``codec.quantize_tensors(keys, values, start=start)`` returns (symbols in the
    codec's stream layout, raw sink and patch buffers), by the fused kernel (module doc).

    ``keys``/``values``: ``[L, H, T, D]`` on a CUDA device (or the CPU under the Triton
    interpreter). ``block_t``: tokens per program, a power of two (default ``2048 / D`` with D
    rounded up to a power of two, within 8-64)."""
    if keys.shape != values.shape or keys.ndim != 4 or keys.device != values.device:
        raise CodecError(f"keys {list(keys.shape)} and values {list(values.shape)} must both be [L, H, T, D] on one device")
    if not keys.is_floating_point() or not values.is_floating_point():
        raise CodecError("keys and values must be float tensors")
    codec.check_shape(tuple(keys.shape))
    L, H, T, D = keys.shape
    if L * H * T * D > MAX_SYMBOLS:
        raise CodecError(f"a chunk of {L * H * T * D} elements per tensor is more than one rANS stream holds")
    if L * H > 65535:
        raise CodecError(f"{L * H} (layer, head) pairs: more than the kernel's grid allows (65,535)")
    if block_t is not None and (not isinstance(block_t, int) or block_t < 1 or block_t & (block_t - 1)):
        raise CodecError(f"block_t must be a power of two, got {block_t!r}")
    device = keys.device
    keys, values = keys.contiguous(), values.contiguous()
    cache = profile_tensors(codec, device)  # the decoder's tables: the same steps
    sinks = max(0, min(T, codec.profile.sink_tokens - start))
    n = L * H * T * D
    k_sym = torch.empty(n, dtype=torch.uint8, device=device)
    v_sym = torch.empty(n, dtype=torch.uint8, device=device)
    codes = torch.empty(L * H * T, dtype=torch.uint8, device=device)
    counts = torch.zeros(3, dtype=torch.int32, device=device)
    if n:
        block_d = next_power_of_2(D)
        bt = block_t if block_t is not None else max(8, min(64, 2048 // block_d))  # 16 at D = 128
        kernel_for(_kvcodec_quantize_kernel, device)[(cdiv(T, bt), L * H)](
            keys, values, cache["bias"], cache["scale"], cache["vtab"], k_sym, v_sym, codes, counts, T, sinks,
            D=D, BLOCK_D=block_d, BLOCK_T=bt, ZERO_SYM=ZERO, SCALE_STEPS=SCALE_STEPS_PER_OCTAVE,
            CHANNEL_MAJOR=codec.channel_major, num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
    k_out, v_out, nonfinite = (int(c) for c in counts.cpu())
    if nonfinite:
        raise CodecError("the KV holds NaN or infinite values, which kvcodec cannot quantize")
    raw: dict[str, BufferLike] = {}
    if sinks:
        raw["sink_k"] = keys[:, :, :sinks]
        raw["sink_v"] = values[:, :, :sinks]
    shape = (L, H, T, D)
    if k_out:
        def key_residual(flat: torch.Tensor) -> torch.Tensor:
            model = (flat // (T * D)) * D + flat % D
            k = keys.reshape(-1)[flat].to(torch.float32)
            return torch.round((k - cache["bias"][model]) / cache["scale"][model])

        raw["k_patch_index"], raw["k_patch_value"] = _patches_from_symbols(
            k_sym, keys, key_residual, shape, sinks, codec.channel_major, k_out)  # fmt: skip
    if v_out:
        def value_residual(flat: torch.Tensor) -> torch.Tensor:
            step = cache["vtab"][codes[flat // D].long()]
            return torch.round(values.reshape(-1)[flat].to(torch.float32) / step)

        raw["v_patch_index"], raw["v_patch_value"] = _patches_from_symbols(
            v_sym, values, value_residual, shape, sinks, codec.channel_major, v_out)  # fmt: skip
    spec_k, _, spec_s = codec.streams(T)
    return k_sym.view(spec_k.shape), v_sym.view(spec_k.shape), codes.view(spec_s.shape), raw
