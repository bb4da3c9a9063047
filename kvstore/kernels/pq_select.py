"""PQ top-k selection by counting code combinations: the k best tokens without sorting scores.

With PQCache's settings (``m = 2`` subspaces of ``K = 64`` centroids) a token's PQ score
depends only on its code combination, one of ``K**m = 4,096``; the 131,072 tokens of a
long context share them. So the top-k is found from the combinations, not the tokens:

Both launches have the grid ``(kv_heads, segments)``, about one program per SM in all; a
segment is a run of ``seg_len`` consecutive tokens of ``[start, stop)``.

1. ``_pq_segment_count_kernel``: each program counts its segment's tokens per combination
   into its own histogram row (zeroed by the program itself; one relaxed atomic add per
   token, on addresses no other program touches). Independent of the query.
2. ``_pq_select_kernel``, per program:

   - the lookup tables (group-summed query . centroids, ``m x K``) and from them the
     score of every combination, as an order-preserving 32-bit key;
   - the head's count per combination (the sum of its segments' rows), and the sum of the
     rows of the segments before this one;
   - a weighted radix select over the keys (16 two-bit steps, each one reduction of the
     counts): the exact k-th best key ``T``, the same in every program of the head;
   - from the earlier segments' counts, its first output slot and how many tokens at ``T``
     came before; a class per combination (above ``T``, at ``T``, below) in its own
     scratch copy; then one ordered pass over its segment that writes the positions of the
     tokens above ``T`` and of the first ``k - above`` at ``T``.

The result is exact: every token above the k-th score, ties at it broken by position
(lowest first), positions ascending: :func:`kvstore.kernels.pq_torch.pq_select_reference`
has the same semantics on the reference's scores. It replaces ``torch.topk`` over
``[kv_heads, n]`` fp32 scores, which dominated scoring + top-k: the scores are never
written. Two launches, no memset (figures in ``benchmarks/kernels_notes.md``).

:func:`pq_select` dispatches: these kernels on CUDA tensors when ``K`` is a power of two and
``K**m <= MAX_COMBOS``; on CUDA otherwise, the Triton scores kernel (``K`` a power of two) or
the torch scores, then the same ordered selection in torch; the reference elsewhere.
:func:`pq_select_triton` always runs the kernels (on CPU tensors under ``TRITON_INTERPRET=1``,
as the tests do). Works with triton >= 3.6. Not ``tl.histogram``: before 3.9 it lowers to
per-bin ballots, far costlier at 4,096 bins than 3.9's shared-memory atomics (instruction
counts in ``benchmarks/kernels_notes.md``).
"""

from __future__ import annotations

import torch

from kvstore.errors import ConfigError
from kvstore.kernels.support import cdiv, interpreter_supported, next_power_of_2
from kvstore.kernels.pq_torch import (
    check_k,
    check_pq_shapes,
    check_token_range,
    order_selection,
    pq_scores_reference,
    pq_select_reference,
)

try:
    import triton
    import triton.language as tl

    from kvstore.kernels.pq_topk import lut_row
except ImportError:  # pragma: no cover - platforms without triton use the reference
    triton = None

__all__ = ["MAX_COMBOS", "combinations", "pq_select", "pq_select_triton"]

MAX_COMBOS = 4096  # K**m the select kernel holds in registers (16 per thread at 8 warps)
MAX_SEGMENTS = 1024  # programs per KV head
HIST_ROWS = 4  # segment histograms the select kernel sums per step
_PROGRAMS = 128  # programs per launch on a GPU, all heads' segments: about one per SM


def combinations(m: int, n_centroids: int) -> int | None:
    """``n_centroids**m`` when the counting select applies (``n_centroids`` a power of two, at
    most :data:`MAX_COMBOS` combinations), else ``None``."""
    if n_centroids < 1 or n_centroids & (n_centroids - 1) or m < 1:
        return None
    bits = (n_centroids.bit_length() - 1) * m
    return 1 << bits if bits <= MAX_COMBOS.bit_length() - 1 else None


if triton is not None:
    # ``n`` and ``k`` change at every decode step: not specialized on (divisibility by 16 would
    # compile up to four variants of each kernel in the first steps, and buys nothing here).

    @triton.jit
    def _combo_ids(codes_ptr, h, tok, nmask, stride_ch, stride_cn,
                   M: tl.constexpr, K: tl.constexpr, LOG2K: tl.constexpr, BLOCK_M: tl.constexpr,
                   WORD: tl.constexpr):
        """Each token's code combination ``sum_j code_j << (j * log2 K)`` (codes >= K read as K - 1).

        ``WORD``: ``codes_ptr`` holds one ``M``-byte integer per token (contiguous codes viewed as
        int8/int16/int32, ``stride_cn == 1``): one vector load per token instead of ``M`` byte loads."""
        if WORD:
            word = tl.load(codes_ptr + h.to(tl.int64) * stride_ch + tok, mask=nmask, other=0).to(tl.int32)
            combo = tl.zeros(tok.shape, dtype=tl.int32)
            for j in tl.static_range(M):
                combo |= tl.minimum((word >> (8 * j)) & 255, K - 1) << (j * LOG2K)
            return combo
        else:
            offs_m = tl.arange(0, BLOCK_M)
            mask = nmask[:, None] & (offs_m[None, :] < M)
            code = tl.load(codes_ptr + h.to(tl.int64) * stride_ch + tok[:, None] * stride_cn + offs_m[None, :],
                           mask=mask, other=0)
            code = tl.minimum(code.to(tl.int32), K - 1)
            return tl.sum(tl.where(mask, code << (offs_m[None, :] * LOG2K), 0), axis=1)

    @triton.jit(do_not_specialize=["n"])
    def _pq_segment_count_kernel(
        codes_ptr, hist_ptr,
        start, n, seg_len, stride_ch, stride_cn,
        M: tl.constexpr, K: tl.constexpr, LOG2K: tl.constexpr, BLOCK_M: tl.constexpr, WORD: tl.constexpr,
        NC: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """``hist[h, p, c]``: the tokens of segment ``p`` of head ``h`` with combination ``c``. Each
        program owns its row, so it zeroes the row itself and its atomics never contend with
        another program's (no memset launch before, no cross-SM traffic on one address)."""
        h = tl.program_id(0)
        p = tl.program_id(1)
        row = hist_ptr + (h * tl.num_programs(1) + p).to(tl.int64) * NC
        tl.store(row + tl.arange(0, NC), tl.zeros([NC], dtype=tl.int32))
        tl.debug_barrier()  # the zeros are visible to every thread of the program before its atomics
        lo = p * seg_len
        hi = tl.minimum(lo + seg_len, n)
        for s in range(lo, hi, BLOCK_N):  # (BLOCK_N need not divide seg_len: masked at hi)
            offs = s + tl.arange(0, BLOCK_N)
            nmask = offs < hi
            combo = _combo_ids(codes_ptr, h, start + offs, nmask, stride_ch, stride_cn, M, K, LOG2K, BLOCK_M, WORD)
            tl.atomic_add(row + combo, tl.full([BLOCK_N], 1, tl.int32), mask=nmask, sem="relaxed")

    @triton.jit(do_not_specialize=["n", "k"])
    def _pq_select_kernel(
        q_ptr, c_ptr, codes_ptr, hist_ptr, lut_ptr, cls_ptr, out_ptr,
        start, n, k, seg_len, stride_qh, stride_ch, stride_cn,
        GROUP: tl.constexpr, M: tl.constexpr, K: tl.constexpr, LOG2K: tl.constexpr, BLOCK_M: tl.constexpr,
        WORD: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr, BLOCK_N: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        tl.static_assert(BLOCK_N < 32768, "two counts share one int32 scan: 16 bits each, the high one signed")
        h = tl.program_id(0)
        p = tl.program_id(1)
        segments = tl.num_programs(1)
        me = h * segments + p  # this program's scratch copies (no two programs share one)
        # 1. lookup tables: group-summed query . each centroid, per subspace
        for j in tl.static_range(M):
            lut = lut_row(q_ptr, c_ptr, h, j, stride_qh, GROUP, M, K, SUB, BLOCK_D)
            tl.store(lut_ptr + (me * M + j) * K + tl.arange(0, K), lut)
        tl.debug_barrier()
        # 2. every combination's score as an order-preserving unsigned key
        combo = tl.arange(0, NC)
        score = tl.zeros([NC], dtype=tl.float32)
        for j in tl.static_range(M):
            score += tl.load(lut_ptr + (me * M + j) * K + ((combo >> (j * LOG2K)) & (K - 1)))
        # (a sum that starts at +0.0 is never -0.0; NaN, whatever its bits, ranks lowest)
        bits = score.to(tl.int32, bitcast=True)
        key = tl.where(score != score, 0, tl.where(bits >= 0, bits ^ -2147483648, ~bits)).to(tl.uint32, bitcast=True)
        # 3. the head's count per combination, and the earlier segments' (for this segment's
        # first output slot), from the segments' histograms, ROWS at a time
        count = tl.zeros([NC], dtype=tl.int32)
        before = tl.zeros([NC], dtype=tl.int32)
        head = hist_ptr + (h * segments).to(tl.int64) * NC
        rows = tl.arange(0, ROWS)
        for r0 in range(0, segments, ROWS):
            r = r0 + rows
            part = tl.load(head + r[:, None] * NC + combo[None, :], mask=(r < segments)[:, None], other=0)
            count += tl.sum(part, axis=0)
            before += tl.sum(tl.where((r < p)[:, None], part, 0), axis=0)
        # 4. weighted radix select: the largest T with (tokens whose key >= T) >= k, two bits
        # per step (the three candidates' sums in one reduction; the reach only falls as T
        # grows, so the digit is how many of them still reach k). Every program of a head
        # computes the same T (same inputs, deterministic sums): the compaction relies on it.
        t = tl.zeros([], dtype=tl.uint32)
        digit = tl.arange(0, 4).to(tl.uint32)
        shift = tl.full([], 32, tl.uint32)
        for _ in range(16):
            shift -= 2
            cand = t | (digit << shift)  # [4]: digit 0 reaches at least k tokens (t does)
            reach = tl.sum(tl.where(key[None, :] >= cand[:, None], count[None, :], 0), axis=1)
            t = t | ((tl.sum((reach >= k).to(tl.uint32), axis=0) - 1) << shift)
        need = k - tl.sum(tl.where(key > t, count, 0), axis=0)  # tokens to take among those at T (>= 1)
        written = tl.sum(tl.where(key > t, before, 0), axis=0)  # the earlier segments' tokens above T
        ties = tl.sum(tl.where(key == t, before, 0), axis=0)  # ... and at T
        written += tl.minimum(ties, need)
        tl.store(cls_ptr + me * NC + combo, tl.where(key > t, 2, tl.where(key == t, 1, 0)).to(tl.int8))
        tl.debug_barrier()
        # 5. positions of this segment's tokens above T, and of those at T while fewer than `need`
        # came before; one scan per block counts both (above: low 16 bits, at T: high 16)
        lo = p * seg_len
        for s in range(lo, tl.minimum(lo + seg_len, n), BLOCK_N):
            offs = s + tl.arange(0, BLOCK_N)
            nmask = offs < n
            tok = start + offs
            ids = _combo_ids(codes_ptr, h, tok, nmask, stride_ch, stride_cn, M, K, LOG2K, BLOCK_M, WORD)
            cls = tl.load(cls_ptr + me * NC + ids, mask=nmask, other=0).to(tl.int32)
            both = tl.where(cls == 2, 1, tl.where(cls == 1, 65536, 0))
            excl = tl.cumsum(both, axis=0) - both
            tie_before = ties + (excl >> 16)
            take = (cls == 2) | ((cls == 1) & (tie_before < need))
            pos = written + (excl & 65535) + tl.minimum(tie_before, need) - tl.minimum(ties, need)
            tl.store(out_ptr + h.to(tl.int64) * k + pos, tok.to(tl.int64), mask=take)
            total = tl.sum(both, axis=0)
            written += (total & 65535) + tl.minimum(ties + (total >> 16), need) - tl.minimum(ties, need)
            ties += total >> 16


_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def _token_words(codes: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``codes [kv_heads, N, m]`` as one ``m``-byte integer per token ``[kv_heads, N]`` when ``m`` is
    1, 2 or 4 (copied to be contiguous if need be), else the uint8 codes with a unit last stride."""
    m = codes.shape[2]
    if m not in _WORDS:
        return (codes if codes.stride(2) == 1 else codes.contiguous()), False
    if codes.stride(2) != 1 or codes.stride(1) != m or codes.stride(0) % m or codes.storage_offset() % m:
        codes = codes.clone(memory_format=torch.contiguous_format)  # (contiguous() may keep the offset)
    return codes.view(_WORDS[m])[..., 0], True


def pq_select_triton(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    start: int = 0,
    stop: int | None = None,
    *,
    segments: int | None = None,
    out: torch.Tensor | None = None,
    _block_n: int | None = None,
) -> torch.Tensor:
    """:func:`~kvstore.kernels.pq_torch.pq_select_reference` by the counting-select kernels:
    ``[kv_heads, k]`` int64 positions, ascending. Needs ``K`` a power of two and ``K**m <= MAX_COMBOS``.

    ``segments``: programs per KV head for the classify and compact passes (default: about
    one program per SM in all; tests set it to cover segment boundaries); ``out``: a contiguous
    int64 ``[kv_heads, k]`` tensor to write into. Codes ``>= K`` are read as ``K - 1``.
    ``_block_n`` (tests): tokens per block instead of the device's default."""
    if triton is None:
        raise ConfigError("triton is not installed: use pq_select, which falls back to torch")
    if not codes.is_cuda and not interpreter_supported():
        raise ConfigError(f"Triton {triton.__version__}'s interpreter cannot run the select kernels: use pq_select")
    kv_heads, group, m, n_centroids, sub = check_pq_shapes(query, centroids, codes)
    nc = combinations(m, n_centroids)
    if nc is None:
        raise ConfigError(f"counting select needs K a power of two and K**m <= {MAX_COMBOS}, got K={n_centroids}, m={m}")
    n = check_token_range(codes, start, stop) - start
    check_k(k, n)
    if out is None:
        out = torch.empty(kv_heads, k, device=codes.device, dtype=torch.int64)
    elif out.shape != (kv_heads, k) or out.dtype != torch.int64 or not out.is_contiguous() or out.device != codes.device:
        raise ConfigError(f"out must be a contiguous int64 [{kv_heads}, {k}] tensor on {codes.device}")
    if k == 0:
        return out
    query = query.contiguous()
    centroids = centroids.contiguous()
    codes, word = _token_words(codes)
    device = codes.device
    block_n = _block_n or (1024 if codes.is_cuda else 512)
    if segments is None:  # about one program per SM (132 on an H100) across the heads
        segments = max(1, min(_PROGRAMS // kv_heads, cdiv(n, 4 * block_n))) if codes.is_cuda else 2
    if not 1 <= segments <= MAX_SEGMENTS:
        raise ConfigError(f"segments must lie in [1, {MAX_SEGMENTS}], got {segments}")
    seg_len = cdiv(cdiv(n, segments), block_n) * block_n
    segments = cdiv(n, seg_len)
    programs = kv_heads * segments
    # per program: its segment's histogram, its lookup tables and its class per combination
    hist = torch.empty(programs, nc, device=device, dtype=torch.int32)
    lut = torch.empty(programs, m, n_centroids, device=device, dtype=torch.float32)
    cls = torch.empty(programs, nc, device=device, dtype=torch.int8)
    shape = dict(M=m, K=n_centroids, LOG2K=n_centroids.bit_length() - 1, BLOCK_M=next_power_of_2(m),
                 WORD=word, NC=nc)  # fmt: skip
    strides = (codes.stride(0), codes.stride(1))
    grid = (kv_heads, segments)
    _pq_segment_count_kernel[grid](codes, hist, start, n, seg_len, *strides, **shape, BLOCK_N=4 * block_n,
                                   num_warps=8)  # fmt: skip
    _pq_select_kernel[grid](
        query, centroids, codes, hist, lut, cls, out, start, n, k, seg_len, query.stride(0), *strides,
        GROUP=group, SUB=sub, BLOCK_D=next_power_of_2(sub), ROWS=HIST_ROWS, **shape, BLOCK_N=block_n, num_warps=8,
    )
    return out


def pq_select(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """The ``k`` tokens of ``[start, stop)`` with the highest PQ score per KV head: ``[kv_heads, k]``
    int64 positions, ascending; ties at the k-th score go to the lowest positions.

    CUDA: the counting-select kernels when ``K**m <= MAX_COMBOS`` (PQCache's m=2, K=64 is
    4,096), else scores (the Triton kernel when ``K`` is a power of two, torch otherwise)
    and the same selection in torch; elsewhere the torch reference. The choice among
    exactly equal scores is the same everywhere (NaN scores rank lowest); scores that differ
    only by fp32 rounding (the kernels sum in another order) may rank differently."""
    if not (codes.is_cuda and triton is not None):
        return pq_select_reference(query, centroids, codes, k, start, stop)
    _, _, m, n_centroids, _ = check_pq_shapes(query, centroids, codes)
    if combinations(m, n_centroids) is not None:
        return pq_select_triton(query, centroids, codes, k, start, stop)
    if n_centroids & (n_centroids - 1):
        return order_selection(pq_scores_reference(query, centroids, codes, start, stop), k, start)
    from kvstore.kernels.pq_topk import pq_scores_triton

    return order_selection(pq_scores_triton(query, centroids, codes, start, stop), k, start)
