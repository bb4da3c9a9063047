"""Dequantization of decoded symbols into the KV layout: Triton kernels and launchers.

The rANS kernel (:mod:`kvstore.kernels.rans_decode`) already dequantizes keys as
it decodes them (``MODE_AFFINE``) and values when their scale codes are known
beforehand (``MODE_ROWSCALE``). When a chunk's scale stream is as long (in
steps per lane) as its value stream, decoding it first would double the decode
time, so the values are decoded to uint8 symbols in the same launch as keys and
scales, and this module's :func:`dequantize_rowscale` turns them into fp16/bf16
in one pass afterwards (read 1 byte + 1/C code byte, write 2 bytes per element).

:func:`dequantize_kv_channel_major` serves the *channel-major* symbol layout (each
(layer, head, channel) row of ``T`` tokens consecutive: ``[L*H*D, T, 1]`` streams, so that
the 32 lanes of a warp share one model and its table lines): it reads the uint8 key and
value symbols ``[L*H, D, T]`` and writes fp16/bf16 keys and values ``[L, H, T, D]``,
transposing tiles on chip.

The first two functions take the output tensor (contiguous, fp16/bf16/fp32) and write
``out.view(-1)[:n]``; references with the same signatures are in
:mod:`kvstore.kernels.torch_ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstore.errors import ConfigError
from kvstore.kernels.support import cdiv, next_power_of_2
from kvstore.kernels.rans_decode import ZERO, kernel_for

__all__ = ["dequantize_affine", "dequantize_kv_channel_major", "dequantize_rowscale"]

BLOCK = 4096


@triton.jit
def _rowscale_kernel(sym_ptr, codes_ptr, vtab_ptr, out_ptr, n, ROW: tl.constexpr, ZERO_SYM: tl.constexpr,
                     BLOCK_C: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < n
    s = tl.load(sym_ptr + offs, mask=m, other=ZERO_SYM).to(tl.int32)
    code = tl.load(codes_ptr + offs // ROW, mask=m, other=0).to(tl.int32)
    step = tl.load(vtab_ptr + code, mask=m, other=0.0)
    val = (s - ZERO_SYM).to(tl.float32) * step
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _affine_kernel(sym_ptr, scale_ptr, bias_ptr, out_ptr, n, block_len, ROW: tl.constexpr, ZERO_SYM: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < n
    s = tl.load(sym_ptr + offs, mask=m, other=ZERO_SYM).to(tl.int32)
    model = (offs // block_len) * ROW + offs % ROW
    sc = tl.load(scale_ptr + model, mask=m, other=0.0)
    bi = tl.load(bias_ptr + model, mask=m, other=0.0)
    val = (s - ZERO_SYM).to(tl.float32) * sc + bi
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=m)


def _check(sym: torch.Tensor, out: torch.Tensor) -> int:
    if sym.dtype != torch.uint8 or not sym.is_contiguous() or not out.is_contiguous():
        raise ConfigError("sym must be contiguous uint8 and out contiguous")
    n = sym.numel()
    if out.numel() < n or out.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"out must hold {n} fp16/bf16/fp32 elements")
    return n


def dequantize_rowscale(
    sym: torch.Tensor, codes: torch.Tensor, vtab: torch.Tensor, row_len: int, out: torch.Tensor, zero: int = ZERO
) -> torch.Tensor:
    """``out[p] = (sym[p] - zero) * vtab[codes[p // row_len]]``: values from symbols and per-row
    scale codes (kvcodec: rows are (layer, head, token), ``vtab[c] = gamma * 2**((c - 128) / 4)``)."""
    n = _check(sym, out)
    if n:
        kernel_for(_rowscale_kernel, sym.device)[(cdiv(n, BLOCK),)](
            sym, codes, vtab, out, n, ROW=int(row_len), ZERO_SYM=zero, BLOCK_C=BLOCK, num_warps=8,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out


def dequantize_affine(
    sym: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, row_len: int, rows_per_block: int,
    out: torch.Tensor, zero: int = ZERO,
) -> torch.Tensor:  # fmt: skip
    """``out[p] = (sym[p] - zero) * scale[m] + bias[m]``, ``m = (p // (rows_per_block * row_len)) * row_len
    + p % row_len``: kvcodec keys ``[L*H, T, D]`` with ``scale = step_k``, ``bias = center`` per (l, h, d)."""
    n = _check(sym, out)
    if n:
        kernel_for(_affine_kernel, sym.device)[(cdiv(n, BLOCK),)](
            sym, scale, bias, out, n, int(rows_per_block) * int(row_len), ROW=int(row_len), ZERO_SYM=zero,
            BLOCK_C=BLOCK, num_warps=8, enable_fp_fusion=False,
        )  # fmt: skip
    return out


@triton.jit
def _kv_channel_major_kernel(
    sym_ptr, codes_ptr, scale_ptr, bias_ptr, vtab_ptr, out_ptr, T, D, n,
    ZERO_SYM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    lh = tl.program_id(1).to(tl.int64)
    which = tl.program_id(2)  # 0 keys, 1 values
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tm = t < T
    dm = d < D
    mask = dm[:, None] & tm[None, :]  # [BD, BT]
    base = which.to(tl.int64) * n
    s = tl.load(sym_ptr + base + (lh * D + d[:, None]) * T + t[None, :], mask=mask, other=ZERO_SYM).to(tl.int32)
    r = (s - ZERO_SYM).to(tl.float32)
    if which == 0:
        m = lh * D + d
        sc = tl.load(scale_ptr + m, mask=dm, other=0.0)
        bi = tl.load(bias_ptr + m, mask=dm, other=0.0)
        val = r * sc[:, None] + bi[:, None]
    else:
        code = tl.load(codes_ptr + lh * T + t, mask=tm, other=0).to(tl.int32)
        step = tl.load(vtab_ptr + code, mask=tm, other=0.0)
        val = r * step[None, :]
    out = tl.trans(val).to(out_ptr.dtype.element_ty)  # [BT, BD]
    dst = out_ptr + base + (lh * T + t[:, None]) * D + d[None, :]
    tl.store(dst, out, mask=tm[:, None] & dm[None, :])


def dequantize_kv_channel_major(
    sym: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, vtab: torch.Tensor,
    out: torch.Tensor, zero: int = ZERO,
) -> torch.Tensor:  # fmt: skip
    """Keys and values ``out [2, L, H, T, D]`` from channel-major symbols ``sym [2, L*H, D, T]``
    (uint8; keys then values): ``out[0, l, h, t, d] = (sym[0, lh, d, t] - zero) * scale[lh*D + d]
    + bias[lh*D + d]``, ``out[1, l, h, t, d] = (sym[1, lh, d, t] - zero) * vtab[codes[lh, t]]``."""
    two, LH, D, T = sym.shape
    if two != 2 or sym.dtype != torch.uint8 or not sym.is_contiguous() or not out.is_contiguous():
        raise ConfigError("sym must be contiguous uint8 [2, L*H, D, T] and out contiguous")
    if out.numel() != sym.numel() or out.shape[-2:] != (T, D):
        raise ConfigError(f"out must be [2, L, H, {T}, {D}]")
    if sym.numel():
        block_d = next_power_of_2(D)
        block_t = max(16, min(128, 8192 // block_d))
        kernel_for(_kv_channel_major_kernel, sym.device)[(cdiv(T, block_t), LH, 2)](
            sym, codes, scale, bias, vtab, out, T, D, LH * D * T, ZERO_SYM=zero, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=8, enable_fp_fusion=False,
        )  # fmt: skip
    return out
