"""Numba kernels behind :mod:`kvstore.codecs.rans` and :mod:`kvstore.codecs.symbol_model`.

Private: the public wrappers validate every argument before calling in here, so
these loops trust shapes and dtypes but still bound every read that depends on
stream contents (a corrupt stream sets an error code, it never reads out of
bounds). See ``README_rans.md`` for the stream layout these loops implement.

Symbols are addressed by their flat C-order position ``p`` in a canonical
``[B, T, C]`` array; the model of position ``p`` is ``model_map[b * C + c]``.
Group ``g`` holds positions ``[g * S, min(g * S + S, N))`` and position ``p``
belongs to lane ``(p - g * S) % 32`` of that group.

Numba compiles these on first use; ``cache=True`` keeps the machine code in
``__pycache__`` so later processes load it instead of compiling again.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit

LANES = 32
STATE_LOW = 1 << 16  # L: states live in [L, 2**32)
WORD_BITS = 16
WORD_MASK = (1 << WORD_BITS) - 1

# error codes reported by the kernels (0 = fine)
ERR_NONE = 0
ERR_BAD_SYMBOL = 1  # encoder: symbol >= alphabet
ERR_ZERO_FREQ = 2  # encoder: symbol has frequency 0 in its model
ERR_WORDS_OVERRUN = 3  # decoder: a lane wanted a word past its group's end
ERR_WORDS_LEFT = 4  # decoder: a group did not consume all its words
ERR_FINAL_STATE = 5  # decoder: a lane did not end at the initial state


@njit(cache=True, nogil=True)
def _walker_start(p: int, T: int, C: int):  # pragma: no cover - jitted
    """(b, t, c) of flat position p in a [B, T, C] array."""
    row = p // C
    c = p - row * C
    b = row // T
    t = row - b * T
    return b, t, c


@njit(cache=True, nogil=True)
def encode_groups(
    sym, model_map, T, C, enc, alphabet, precision, S, g0, g1, scratch, states, counts, errs
):  # pragma: no cover
    """Encode groups ``g0 .. g1-1`` into ``scratch``; group g fills states[g], counts[g], errs[g].

    sym: uint8 [N]; model_map: int32 [B*C]; enc: uint64 [M*alphabet] packed
    ``freq << 32 | cum``; scratch: uint16 [N], group g writes its words backwards
    ending at ``min(g*S + S, N)`` (each symbol emits at most one word).
    """
    N = sym.shape[0]
    shift = 32 - precision
    for g in range(g0, g1):
        start = g * S
        end = min(start + S, N)
        x = np.full(LANES, STATE_LOW, dtype=np.int64)
        wpos = end
        b, t, c = _walker_start(end - 1, T, C)
        rowbase = b * C
        err = 0
        for p in range(end - 1, start - 1, -1):
            s = np.int64(sym[p])
            m = np.int64(model_map[rowbase + c])
            # walk one position back
            c -= 1
            if c < 0:
                c = C - 1
                t -= 1
                if t < 0:
                    t = T - 1
                    b -= 1
                    rowbase = b * C
            if s >= alphabet:
                err = ERR_BAD_SYMBOL
                break
            e = enc[m * alphabet + s]
            f = np.int64(e >> np.uint64(32))
            cum = np.int64(e & np.uint64(0xFFFFFFFF))
            if f == 0:
                err = ERR_ZERO_FREQ
                break
            j = (p - start) & (LANES - 1)
            xj = x[j]
            # renormalize without a branch: the word is always written at wpos - 1, a slot of this
            # group's region that holds no word yet (before position p at most end - 1 - p words
            # were emitted, so wpos - 1 >= p >= start), and kept only when the lane needs it
            need = xj >= (f << shift)
            scratch[wpos - 1] = np.uint16(xj & WORD_MASK)
            wpos -= need
            xj = (xj >> WORD_BITS) if need else xj
            q = np.int64(np.uint32(xj) // np.uint32(f))  # 32-bit operands: a shorter division
            xj = (q << precision) + (xj - q * f) + cum
            x[j] = xj
        errs[g] = err
        counts[g] = end - wpos
        for j in range(LANES):
            states[g * LANES + j] = np.uint32(x[j])


@njit(cache=True, nogil=True)
def gather_words(scratch, S, N, g0, g1, offsets, out):  # pragma: no cover
    """Copy groups ``g0 .. g1-1``'s words (the tail of each scratch region) to ``out[offsets[g]:]``."""
    for g in range(g0, g1):
        end = min(g * S + S, N)
        n = offsets[g + 1] - offsets[g]
        o = offsets[g]
        src = end - n
        for i in range(n):
            out[o + i] = scratch[src + i]


@njit(cache=True, nogil=True)
def build_decode_tables(freqs, precision, bucket_bits):  # pragma: no cover
    """Decoder lookups for every model of ``freqs`` (uint32 [M, A]).

    Returns ``cum`` uint32 [M, A + 1] (``cum[m, s]`` = start of symbol s's slot
    range, ``cum[m, A] = 2**precision``) and ``bucket`` uint8 [M, 2**bucket_bits]:
    the symbol owning the first slot of each bucket of ``2**(precision -
    bucket_bits)`` slots. A slot's symbol is then found by a short forward scan.
    """
    M = freqs.shape[0]
    A = freqs.shape[1]
    nb = 1 << bucket_bits
    shift = precision - bucket_bits
    cum = np.zeros((M, A + 1), dtype=np.uint32)
    bucket = np.zeros((M, nb), dtype=np.uint8)
    for m in range(M):
        acc = 0
        for s in range(A):
            cum[m, s] = acc
            acc += np.int64(freqs[m, s])
        cum[m, A] = acc
        s = 0
        for k in range(nb):
            slot = k << shift
            while np.int64(cum[m, s + 1]) <= slot:
                s += 1
            bucket[m, k] = s
    return cum, bucket


@njit(cache=True, nogil=True, inline="always")
def _group_end_error(x, ptr, wend):  # pragma: no cover - jitted
    """The error code of a group whose lanes ended in ``x`` having read words up to ``ptr``."""
    if ptr > wend:
        return ERR_WORDS_OVERRUN
    if ptr != wend:
        return ERR_WORDS_LEFT
    for j in range(LANES):
        if x[j] != STATE_LOW:
            return ERR_FINAL_STATE
    return ERR_NONE


@njit(cache=True, nogil=True)
def group_words(words, offsets, g, symbols):  # pragma: no cover - jitted
    """(words, first index) from which group ``g`` of ``symbols`` symbols can read one word per
    symbol without a bound check: ``words`` itself when that many follow the group's first word,
    else a zero-padded copy of the group's tail (a corrupt lane reads zeros there and is caught
    by the group-end check)."""
    first = offsets[g]
    if first + symbols <= words.shape[0]:
        return words, first
    padded = np.zeros(symbols + 1, dtype=np.uint16)
    available = words.shape[0] - first
    padded[:available] = words[first:]
    return padded, 0


@njit(cache=True, nogil=True, inline="always")
def _group_start(words, states, offsets, g, S, N):  # pragma: no cover - jitted
    """Group ``g``'s first and end positions, its lanes' initial states (uint64) and the words
    it reads from, with the index of its first word there (see :func:`group_words`)."""
    start = g * S
    end = min(start + S, N)
    x = np.empty(LANES, dtype=np.uint64)
    for j in range(LANES):
        x[j] = np.uint64(states[g * LANES + j])
    group, first = group_words(words, offsets, g, end - start)
    return start, end, x, group, first


@njit(cache=True, nogil=True, inline="always")
def _row_lane_step(x, j, words, ptr, cum, bucket, mask, shift, precision):  # pragma: no cover - jitted
    """Decode lane ``j``'s next symbol under a row's ``cum`` / ``bucket`` and renormalize it from
    ``words[ptr]`` without a branch; returns (symbol, next word index). Inlined into the
    kernels of :func:`decode_rows_kernel` and :func:`decode_groups_kernel`, where ``mask``,
    ``shift`` and ``precision`` are constants."""
    xj = x[j]
    slot = xj & mask
    s = np.uint64(bucket[slot >> shift])
    lo, hi = np.uint64(cum[s]), np.uint64(cum[s + np.uint64(1)])
    while hi <= slot:
        s += np.uint64(1)
        lo, hi = hi, np.uint64(cum[s + np.uint64(1)])
    xj = (hi - lo) * (xj >> precision) + slot - lo
    need = xj < np.uint64(STATE_LOW)
    w = np.uint64(words[ptr])
    x[j] = ((xj << np.uint64(WORD_BITS)) | w) if need else xj
    return s, ptr + np.uint64(need)


@njit(cache=True, nogil=True, inline="always")
def _row_run(x, j, words, ptr, cum, bucket, values, column, mask, shift, precision):  # pragma: no cover
    """``len(column)`` symbols of one row, lanes from ``j``: ``column[k] = values[s]``."""
    for k in range(column.shape[0]):
        s, ptr = _row_lane_step(x, j, words, ptr, cum, bucket, mask, shift, precision)
        column[k] = values[s]
        j = (j + np.uint64(1)) & np.uint64(LANES - 1)
    return ptr


@njit(cache=True, nogil=True, inline="always")
def _row_run_per_token(x, j, words, ptr, cum, bucket, lut, lut_rows, column, mask, shift, precision):  # pragma: no cover
    """As :func:`_row_run`, each token through its own lookup row: ``column[k] = lut[lut_rows[k], s]``."""
    for k in range(column.shape[0]):
        s, ptr = _row_lane_step(x, j, words, ptr, cum, bucket, mask, shift, precision)
        column[k] = lut[np.uint64(lut_rows[k]), s]
        j = (j + np.uint64(1)) & np.uint64(LANES - 1)
    return ptr


@lru_cache(maxsize=None)
def decode_rows_kernel(precision: int, bucket_bits: int):
    """The kernel of :func:`kvstore.codecs.rans.decode_rows_through_lut` compiled for one
    ``precision`` and ``bucket_bits``: with both constant, the per-symbol loop keeps every
    value it needs in registers. Returns ``kernel(words, states, offsets, model_map, T, cum,
    bucket, S, N, g0, g1, D, lut, token_lut, out, errs)``.

    Decodes groups ``g0 .. g1-1`` of a row-major ``[R, T]`` stream (one model per row,
    ``model_map[r]``; row ``r = i * D + d``) and writes each symbol ``s`` of ``(r, t)``
    through a lookup table, transposed: ``out[i, t, d] = lut[k, s]`` where ``k`` is the row
    ``r``, or ``token_lut[i, t]`` when ``token_lut`` is not empty. Fuses the entropy decode
    with dequantization and the channel-major to token-major transpose: each output element
    is written once, straight into ``out`` (any strides). Words and errors as
    :func:`decode_groups_kernel`; cum / bucket from :func:`build_decode_tables`.

    The kernel captures only numbers, so that Numba's disk cache finds it again in later
    processes (a closure over other compiled closures is compiled anew in every process).
    """
    mask = np.uint64((1 << precision) - 1)
    shift = np.uint64(precision - bucket_bits)
    prec = np.uint64(precision)
    lane_mask = np.uint64(LANES - 1)

    @njit(cache=True, nogil=True)
    def kernel(words, states, offsets, model_map, T, cum, bucket, S, N, g0, g1, D, lut, token_lut, out, errs):  # pragma: no cover
        per_token = token_lut.shape[0] > 0
        for g in range(g0, g1):
            start, end, x, group, first = _group_start(words, states, offsets, g, S, N)
            ptr = np.uint64(first)
            r = start // T
            t = start - r * T
            p = start
            j = np.uint64(0)
            while p < end:  # one run per row: its model and output column are fixed
                i = r // D
                n = min(end - p, T - t)
                column = out[i, t : t + n, r - i * D]
                m = model_map[r]
                if per_token:
                    ptr = _row_run_per_token(x, j, group, ptr, cum[m], bucket[m], lut, token_lut[i, t : t + n], column,
                                             mask, shift, prec)
                else:
                    ptr = _row_run(x, j, group, ptr, cum[m], bucket[m], lut[r], column, mask, shift, prec)
                j = (j + np.uint64(n)) & lane_mask
                p += n
                t = 0
                r += 1
            errs[g] = _group_end_error(x, np.int64(ptr) - first + offsets[g], offsets[g + 1])

    return kernel


@lru_cache(maxsize=None)
def decode_groups_kernel(precision: int, bucket_bits: int):
    """The kernel of :func:`kvstore.codecs.rans.decode` compiled for one ``precision`` and
    ``bucket_bits`` (constants in the loop, as :func:`decode_rows_kernel`). Returns
    ``kernel(words, states, offsets, model_map, T, C, cum, bucket, S, N, g0, g1, out, errs)``,
    which decodes groups ``g0 .. g1-1``: group g writes out[g*S : min(g*S+S, N)] and errs[g].

    words: uint16 [W >= 1] (a stream without words passes one zero word); states: uint32
    [G*32]; offsets: int64 [G+1] (validated monotonic, last == W); model_map: int32 [B*C];
    cum / bucket from :func:`build_decode_tables`. Words are read as :func:`group_words` says.
    """
    mask = np.uint64((1 << precision) - 1)
    shift = np.uint64(precision - bucket_bits)
    prec = np.uint64(precision)
    lane_mask = np.uint64(LANES - 1)

    @njit(cache=True, nogil=True)
    def kernel(words, states, offsets, model_map, T, C, cum, bucket, S, N, g0, g1, out, errs):  # pragma: no cover
        identity = np.arange(256).astype(np.uint8)
        for g in range(g0, g1):
            start, end, x, group, first = _group_start(words, states, offsets, g, S, N)
            ptr = np.uint64(first)
            j = np.uint64(0)
            if C == 1:  # one model per run of T symbols: the row decoder's loop, through the identity
                p = start
                while p < end:
                    r = p // T
                    n = min(end - p, (r + 1) * T - p)
                    ptr = _row_run(x, j, group, ptr, cum[model_map[r]], bucket[model_map[r]], identity, out[p : p + n],
                                   mask, shift, prec)  # fmt: skip
                    j = (j + np.uint64(n)) & lane_mask
                    p += n
                errs[g] = _group_end_error(x, np.int64(ptr) - first + offsets[g], offsets[g + 1])
                continue
            b, t, c = _walker_start(start, T, C)
            rowbase = b * C
            for p in range(start, end):
                m = model_map[rowbase + c]
                c += 1
                if c == C:
                    c = 0
                    t += 1
                    if t == T:
                        t = 0
                        b += 1
                        rowbase = b * C
                s, ptr = _row_lane_step(x, j, group, ptr, cum[m], bucket[m], mask, shift, prec)
                out[p] = np.uint8(s)
                j = (j + np.uint64(1)) & lane_mask
            errs[g] = _group_end_error(x, np.int64(ptr) - first + offsets[g], offsets[g + 1])

    return kernel


@njit(cache=True, nogil=True)
def count_symbols_kernel(sym, model_map, T, C, counts):  # pragma: no cover
    """counts[model_map[b*C+c], s] += 1 for every symbol; returns the first bad position or -1."""
    N = sym.shape[0]
    A = counts.shape[1]
    p = 0
    rowbase = 0
    while p < N:
        for t in range(T):
            for c in range(C):
                s = np.int64(sym[p])
                if s >= A:
                    return p
                counts[model_map[rowbase + c], s] += 1
                p += 1
        rowbase += C
    return -1
