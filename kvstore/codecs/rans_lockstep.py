"""Lockstep reference decoder: the GPU decoding algorithm, written in plain numpy.

Every lane of every group advances one symbol per step, exactly as a warp of
32 GPU threads per group would: decode, then the lanes whose state fell below
``2**16`` take the next words of their group's stream in lane order (an
exclusive prefix sum of the "needs a word" mask gives each lane its word).
It is slow (one numpy pass per step) and exists to pin down the algorithm that
``kernels/`` ports to Triton and to cross-check :func:`kvstore.codecs.rans.decode`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from kvstore.codecs.rans import LANES, STATE_LOW, as_bytes, read_header
from kvstore.codecs.symbol_model import FrequencyTable, canonical_layout
from kvstore.errors import FormatError


def lockstep_decode(
    data: bytes | bytearray | memoryview | np.ndarray, table: FrequencyTable, model_map: ArrayLike | int | None = None
) -> np.ndarray:
    """Decode ``data`` with all lanes in lockstep; same result and errors as ``rans.decode``."""
    raw = as_bytes(data)
    info = read_header(raw)
    (_, T, C), mm = canonical_layout(info.shape, model_map)
    n, S, G, W, prec = info.num_symbols, info.group_size, info.num_groups, info.num_words, info.precision
    out = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return out.reshape(info.shape)
    x = raw[info.states_offset : info.offsets_offset].view("<u4").astype(np.int64).reshape(G, LANES)
    offsets = raw[info.offsets_offset : info.words_offset].view("<u4").astype(np.int64)
    words = np.append(raw[info.words_offset : info.words_offset + 2 * W].view("<u2").astype(np.int64), 0)
    cum = np.zeros((table.num_models, table.alphabet + 1), dtype=np.int64)
    np.cumsum(table.freqs, axis=1, out=cum[:, 1:])
    ptr, wend = offsets[:-1].copy(), offsets[1:]
    lane = np.arange(LANES)[None, :]
    mask = (1 << prec) - 1
    for k in range(S // LANES):
        p = np.arange(G)[:, None] * S + k * LANES + lane  # [G, 32] positions
        active = p < np.minimum(np.arange(G)[:, None] * S + S, n)
        pc = np.where(active, p, 0)
        m = mm[(pc // (T * C)) * C + pc % C]
        slot = x & mask
        s = (cum[m, 1:] <= slot[..., None]).sum(-1)  # the symbol whose slot range holds `slot`
        lo, hi = cum[m, s], cum[m, s + 1]
        x = np.where(active, (hi - lo) * (x >> prec) + slot - lo, x)
        out[p[active]] = s[active]
        need = active & (x < STATE_LOW)
        idx = ptr[:, None] + np.cumsum(need, axis=1) - need  # exclusive prefix sum over lanes
        if np.any(need & (idx >= wend[:, None])):
            raise FormatError("rANS stream is corrupt: a lane needs more words than its group holds")
        x = np.where(need, (x << 16) | words[np.where(need, idx, 0)], x)
        ptr += need.sum(axis=1)
    if np.any(ptr != wend) or np.any(x != STATE_LOW):
        raise FormatError("rANS stream is corrupt: words left over or a lane off its initial state")
    return out.reshape(info.shape)
