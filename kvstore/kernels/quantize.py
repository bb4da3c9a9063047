"""kvcodec quantization in one GPU pass: fp16/bf16/fp32 keys and values in, uint8 symbols out.

:meth:`kvstore.codecs.kvcodec.KVCodecV1.quantize_tensors` computes a chunk's symbols with
about twenty torch passes over fp32 temporaries (~9 GB of memory traffic for a
Llama-3-8B-shaped 2,048-token chunk: the predicted ~3 ms that would bound the GPU encoder,
``benchmarks/kernels_notes.md``). :func:`quantize_kvcodec_gpu` computes the same symbols
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
(as the torch path does); when a tensor has out-of-range residuals ("patches", rare) their
indices and original values come from torch operations that compute the very same residuals,
so the chunk equals the torch path's. The scale codes may differ from the torch path's in
rare ties: the kernel's ``log2`` and sum of squares are not rounded like torch's; such a chunk
is a valid encoding of the same KV with that token's step a quarter octave apart.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kvstore.codecs.kvcodec import _patches
from kvstore.codecs.kvcodec_profile import SCALE_STEPS_PER_OCTAVE, ZERO, quantize_keys
from kvstore.errors import CodecError
from kvstore.format.container import BufferLike
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
    tl.atomic_add(counts_ptr + 0, tl.sum(tl.sum(kout.to(tl.int32), axis=1), axis=0))
    tl.atomic_add(counts_ptr + 1, tl.sum(tl.sum(vout.to(tl.int32), axis=1), axis=0))
    tl.atomic_add(counts_ptr + 2, nonfinite.to(tl.int32))


def _patches_after_sinks(residuals: torch.Tensor, originals: torch.Tensor, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codec's patches of ``residuals`` once the sink tokens' residuals are zeroed (as its encoder does)."""
    if sinks:
        residuals[:, :, :sinks] = 0
    return _patches(residuals, originals)


def quantize_kvcodec_gpu(
    codec: Any, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0, block_t: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, BufferLike]]:
    """What ``codec.quantize_tensors(keys, values, start=start)`` returns (symbols in the
    codec's stream layout, raw sink and patch buffers), by the fused kernel (module doc).

    ``keys``/``values``: ``[L, H, T, D]`` on a CUDA device (or the CPU under the Triton
    interpreter). ``block_t``: tokens per program (default ``2048 / D``, within 8-64)."""
    if keys.shape != values.shape or keys.ndim != 4 or keys.device != values.device:
        raise CodecError(f"keys {list(keys.shape)} and values {list(values.shape)} must both be [L, H, T, D] on one device")
    if not keys.is_floating_point() or not values.is_floating_point():
        raise CodecError("keys and values must be float tensors")
    codec._check_shape(tuple(keys.shape))
    L, H, T, D = keys.shape
    device = keys.device
    keys, values = keys.contiguous(), values.contiguous()
    from kvstore.kernels.kvcodec_gpu import _profile_cache  # the decoder's tables: the same steps

    cache = _profile_cache(codec, device)
    sinks = max(0, min(T, codec.profile.sink_tokens - start))
    n = L * H * T * D
    k_sym = torch.empty(n, dtype=torch.uint8, device=device)
    v_sym = torch.empty(n, dtype=torch.uint8, device=device)
    codes = torch.empty(L * H * T, dtype=torch.uint8, device=device)
    counts = torch.zeros(3, dtype=torch.int32, device=device)
    if n:
        block_d = triton.next_power_of_2(D)
        bt = block_t if block_t is not None else max(8, min(64, 2048 // block_d))  # 16 at D = 128: 154 registers on sm_90
        kernel_for(_kvcodec_quantize_kernel, device)[(triton.cdiv(T, bt), L * H)](
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
    if k_out:
        k_res = quantize_keys(keys.to(torch.float32, copy=True), cache["bias"].view(L, H, D),
                              cache["scale"].view(L, H, D), inplace=True)  # fmt: skip
        raw["k_patch_index"], raw["k_patch_value"] = _patches_after_sinks(k_res, keys, sinks)
        del k_res
    if v_out:
        steps = cache["vtab"][codes.long()].view(L, H, T, 1)
        v_res = values.to(torch.float32, copy=True).div_(steps).round_()
        raw["v_patch_index"], raw["v_patch_value"] = _patches_after_sinks(v_res, values, sinks)
        del v_res
    spec_k, _, spec_s = codec.streams(T)
    return k_sym.view(spec_k.shape), v_sym.view(spec_k.shape), codes.view(spec_s.shape), raw
