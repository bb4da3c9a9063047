"""PQ scores, top-k and gather as Triton kernels, with dispatch to the torch reference.

One layer, one decode step (shapes in :mod:`kvstore.kernels.pq_torch`):

1. ``_pq_lut_kernel``, grid ``(kv_heads, m)``: sums the GQA group's queries over
   one subspace and dots them with that subspace's ``K`` centroids: a ``K``-entry
   lookup table per (KV head, subspace), written to a small scratch buffer.
2. ``_pq_score_kernel``, grid ``(kv_heads, cdiv(n, BLOCK_N))``: each program
   reads ``BLOCK_N`` tokens' ``m`` uint8 codes (contiguous, ``m`` bytes a token)
   and sums their table entries: the only pass over the codes, about ``m`` bytes
   read and 4 written per token and KV head.
3. Top-k is ``torch.topk(sorted=False)`` on the kernel's scores. At 131K tokens
   the top-k, not the scoring, is the larger cost: retrieval attention runs
   :mod:`kvstore.kernels.pq_select` instead, which finds the top-k from the code
   combinations without writing scores (this path remains for codebooks with more
   than 4,096 combinations, and for callers that want the scores).
4. ``_gather_kernel``, grid ``(kv_heads, cdiv(k, BLOCK_S))``: copies the selected
   tokens' key and value rows into ``[kv_heads, k, head_dim]`` outputs.

:func:`pq_topk` and :func:`gather_kv` run the kernels on CUDA tensors and the
torch reference elsewhere; :func:`pq_topk_triton` / :func:`gather_kv_triton`
always run the kernels (on CPU tensors under ``TRITON_INTERPRET=1``, as the
tests do). Works with triton >= 3.6.
"""

from __future__ import annotations

import torch

from kvstore.errors import ConfigError
from kvstore.kernels.support import cdiv, next_power_of_2
from kvstore.kernels.pq_torch import (
    check_k,
    check_pq_shapes,
    check_token_range,
    gather_kv_reference,
    pq_topk_reference,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton use the reference
    triton = None

__all__ = ["gather_kv", "gather_kv_triton", "pq_scores_triton", "pq_topk", "pq_topk_triton", "triton_available"]


def triton_available() -> bool:
    """Whether the Triton kernels can be launched at all (a CUDA device, or the interpreter)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def lut_row(q_ptr, c_ptr, h, j, stride_qh,
                GROUP: tl.constexpr, M: tl.constexpr, K: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr):
        """KV head ``h``'s lookup table for subspace ``j``: its GQA group's queries summed over the
        subspace, dotted with each of the ``K`` centroids (``[K]`` fp32)."""
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < SUB
        qsum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for g in tl.static_range(GROUP):
            qsum += tl.load(q_ptr + (h * GROUP + g) * stride_qh + j * SUB + offs_d, mask=dmask, other=0.0).to(tl.float32)
        offs_k = tl.arange(0, K)
        cent = tl.load(c_ptr + ((h * M + j) * K + offs_k[:, None]) * SUB + offs_d[None, :], mask=dmask[None, :], other=0.0)
        return tl.sum(cent.to(tl.float32) * qsum[None, :], axis=1)

    @triton.jit
    def _pq_lut_kernel(
        q_ptr, c_ptr, lut_ptr,
        stride_qh,
        GROUP: tl.constexpr, M: tl.constexpr, K: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        h = tl.program_id(0)
        j = tl.program_id(1)
        lut = lut_row(q_ptr, c_ptr, h, j, stride_qh, GROUP, M, K, SUB, BLOCK_D)
        tl.store(lut_ptr + (h * M + j) * K + tl.arange(0, K), lut)

    @triton.jit
    def _pq_score_kernel(
        codes_ptr, lut_ptr, out_ptr,
        start, n_out, stride_ch, stride_cn,
        M: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        h = tl.program_id(0)
        pid = tl.program_id(1)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs < n_out
        offs_m = tl.arange(0, BLOCK_M)
        mask = nmask[:, None] & (offs_m[None, :] < M)
        tok = (start + offs).to(tl.int64)
        code = tl.load(codes_ptr + h * stride_ch + tok[:, None] * stride_cn + offs_m[None, :], mask=mask, other=0)
        code = tl.minimum(code.to(tl.int32), K - 1)  # codes >= K (never written) read as K - 1
        entry = tl.load(lut_ptr + (h * M + offs_m[None, :]) * K + code, mask=mask, other=0.0)
        tl.store(out_ptr + h * n_out + offs, tl.sum(entry, axis=1), mask=nmask)

    @triton.jit
    def _gather_kernel(
        k_ptr, v_ptr, idx_ptr, ok_ptr, ov_ptr,
        n_sel, stride_kh, stride_kn, stride_vh, stride_vn,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        h = tl.program_id(0).to(tl.int64)  # heads x tokens x D may pass 2**31 elements
        pid = tl.program_id(1)
        offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = offs_s < n_sel
        idx = tl.load(idx_ptr + h * n_sel + offs_s, mask=smask, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask = smask[:, None] & (offs_d[None, :] < D)
        out = (h * n_sel + offs_s[:, None]).to(tl.int64) * D + offs_d[None, :]
        k_rows = tl.load(k_ptr + h * stride_kh + idx[:, None] * stride_kn + offs_d[None, :], mask=mask)
        tl.store(ok_ptr + out, k_rows, mask=mask)
        v_rows = tl.load(v_ptr + h * stride_vh + idx[:, None] * stride_vn + offs_d[None, :], mask=mask)
        tl.store(ov_ptr + out, v_rows, mask=mask)


def _need_triton() -> None:
    if triton is None:
        raise ConfigError("triton is not installed: use pq_topk / gather_kv, which fall back to torch")


def pq_scores_triton(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    start: int = 0,
    stop: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate scores ``[kv_heads, stop - start]`` fp32 by the Triton kernels (into ``out`` if given)."""
    _need_triton()
    kv_heads, group, m, k, sub = check_pq_shapes(query, centroids, codes)
    stop = check_token_range(codes, start, stop)
    if k & (k - 1):
        raise ConfigError(f"the Triton kernel needs a power-of-two number of centroids, got {k}")
    query = query.contiguous()
    centroids = centroids.contiguous()
    if codes.stride(2) != 1:
        codes = codes.contiguous()
    lut = torch.empty(kv_heads, m, k, device=query.device, dtype=torch.float32)
    _pq_lut_kernel[(kv_heads, m)](
        query, centroids, lut, query.stride(0),
        GROUP=group, M=m, K=k, SUB=sub, BLOCK_D=next_power_of_2(sub),
    )
    n_out = stop - start
    if out is not None and (out.shape != (kv_heads, n_out) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ConfigError(f"out must be a contiguous fp32 [{kv_heads}, {n_out}] tensor")
    scores = torch.empty(kv_heads, n_out, device=query.device, dtype=torch.float32) if out is None else out
    if n_out:
        block_n = 1024 if query.is_cuda else 4096
        _pq_score_kernel[(kv_heads, cdiv(n_out, block_n))](
            codes, lut, scores, start, n_out, codes.stride(0), codes.stride(1),
            M=m, K=k, BLOCK_M=next_power_of_2(m), BLOCK_N=block_n,
        )
    return scores


def pq_topk_triton(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    start: int = 0,
    stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~kvstore.kernels.pq_torch.pq_topk_reference` with the scores from the Triton kernels
    (top-k by ``torch.topk``)."""
    scores = pq_scores_triton(query, centroids, codes, start, stop)
    check_k(k, scores.shape[1])
    return scores.topk(k, dim=1, sorted=False).indices + start, scores


def gather_kv_triton(
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~kvstore.kernels.pq_torch.gather_kv_reference` by the Triton gather kernel.

    ``keys``/``values`` may be strided views (e.g. a cache's ``[0]``) with a contiguous last axis;
    ``out``: contiguous ``[kv_heads, k, head_dim]`` tensors to write into."""
    _need_triton()
    if keys.shape != values.shape or keys.ndim != 3 or indices.ndim != 2 or indices.shape[0] != keys.shape[0]:
        raise ConfigError("expected keys/values [kv_heads, N, D] and indices [kv_heads, k]")
    if keys.stride(2) != 1:
        keys = keys.contiguous()
    if values.stride(2) != 1:
        values = values.contiguous()
    kv_heads, _, dim = keys.shape
    indices = indices.to(keys.device).contiguous()
    n_sel = indices.shape[1]
    if out is None:
        out_k = torch.empty(kv_heads, n_sel, dim, device=keys.device, dtype=keys.dtype)
        out_v = torch.empty_like(out_k)
    else:
        out_k, out_v = out
        for t in out:
            if t.shape != (kv_heads, n_sel, dim) or t.dtype != keys.dtype or not t.is_contiguous():
                raise ConfigError(f"out tensors must be contiguous {keys.dtype} [{kv_heads}, {n_sel}, {dim}]")
    if n_sel:
        block_s = 64 if keys.is_cuda else 1024
        _gather_kernel[(kv_heads, cdiv(n_sel, block_s))](
            keys, values, indices, out_k, out_v,
            n_sel, keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            D=dim, BLOCK_S=block_s, BLOCK_D=next_power_of_2(dim),
        )
    return out_k, out_v


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def pq_topk(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    start: int = 0,
    stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` tokens of ``[start, stop)`` by PQ score per KV head: ``(indices [kv_heads, k], scores)``.

    Triton on CUDA, the torch reference elsewhere (same signature and results up to fp32 rounding)."""
    fn = pq_topk_triton if _use_triton(codes) else pq_topk_reference
    return fn(query, centroids, codes, k, start, stop)


def gather_kv(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected tokens' keys and values: Triton on CUDA, torch elsewhere."""
    fn = gather_kv_triton if _use_triton(keys) else gather_kv_reference
    return fn(keys, values, indices)
