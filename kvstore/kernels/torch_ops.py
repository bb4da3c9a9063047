"""The kernels' operations in plain torch, with the same signatures, on any device.

Each function computes exactly what its Triton twin computes (same outputs, same
per-group error bits) with plain tensor operations, vectorized over all lanes of
all groups of all streams like :func:`kvstore.codecs.rans_lockstep.lockstep_decode`:
one torch step per symbol step. They are the ground truth of the tests and the
fallback where Triton cannot run; they are slow (a few thousand small launches
per chunk on a GPU).
"""

from __future__ import annotations

import numpy as np
import torch

from kvstore.codecs.rans import LANES, STATE_LOW, as_bytes
from kvstore.codecs.symbol_model import FrequencyTable
from kvstore.errors import CodecError
from kvstore.kernels.rans_encode_plan import ERR_BAD_SYMBOL, assemble, check_symbols, make_outputs, plan_stream
from kvstore.kernels.rans_encode_plan import build_descriptors as encode_descriptors
from kvstore.kernels.rans_streams import (
    ERR_FINAL_STATE,
    ERR_INIT_STATE,
    ERR_OFFSETS,
    ERR_OVERRUN,
    ERR_WORDS_LEFT,
    MAX_STREAMS,
    MODE_AFFINE,
    MODE_ROWSCALE,
    MODE_SYMBOL,
    ZERO,
    DecodeConfig,
    DecodeTables,
    LaunchStream,
    check_errors,
    check_stream,
    decode_tables,
    upload_streams,
)

__all__ = [
    "dequantize_affine_ref",
    "dequantize_kv_channel_major_ref",
    "dequantize_rowscale_ref",
    "rans_decode_launch_ref",
    "rans_decode_ref",
    "rans_encode_launch_ref",
    "rans_encode_ref",
]

_U32 = 0xFFFFFFFF


def _u32(data: torch.Tensor, byte_offset: int, count: int) -> torch.Tensor:
    return data[byte_offset : byte_offset + 4 * count].view(torch.int32).to(torch.int64) & _U32


def _cum_rows(t: DecodeTables) -> torch.Tensor:
    """int64 [M, 257]: cum[m, s] for s = 0..256 (2**P past the alphabet)."""
    mask = (1 << 17) - 1 if t.precision > 15 else 0xFFFF
    cum = t.cf.to(torch.int64) & mask
    tail = torch.full((cum.shape[0], 1), 1 << t.precision, dtype=torch.int64, device=cum.device)
    return torch.cat([cum, tail], dim=1)


def rans_decode_launch_ref(
    data: torch.Tensor,
    streams: list[LaunchStream],
    tables: list[DecodeTables],
    *,
    model_maps: torch.Tensor | None = None,
    out_f: torch.Tensor | None = None,
    out_u8: torch.Tensor | None = None,
    aff_scale: torch.Tensor | None = None,
    aff_bias: torch.Tensor | None = None,
    vtab: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    err: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    desc: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`kvstore.kernels.rans_decode.rans_decode_launch` in torch (``config``/``desc`` ignored)."""
    if not 1 <= len(streams) <= MAX_STREAMS:
        raise CodecError(f"a launch decodes 1 to {MAX_STREAMS} streams, got {len(streams)}")
    device = data.device
    total_groups = sum(st.info.num_groups for st in streams)
    if err is None:
        err = torch.zeros(max(1, total_groups), dtype=torch.int32, device=device)
    if total_groups == 0:
        return err
    prec = tables[0].precision
    mask = (1 << prec) - 1
    cums = [_cum_rows(t) for t in tables]
    # per-group parameters of every stream, concatenated: [Gtot]
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "sid", "start", "nsym", "ob", "oe", "W", "first", "last", "TC", "C", "mode", "out", "row", "mm", "ident", "tab",
        "wbase")}  # fmt: skip
    xs = []
    words_all = []
    wofs = 0
    for i, st in enumerate(streams):
        info = st.info
        G, S, N, W = info.num_groups, info.group_size, info.num_symbols, info.num_words
        if G == 0:
            continue
        _, T, C = info.dims
        g = torch.arange(G, device=device, dtype=torch.int64)
        start = g * S
        offs = _u32(data, st.offset + info.offsets_offset, G + 1)
        xs.append(_u32(data, st.offset + info.states_offset, G * LANES).reshape(G, LANES))
        words_all.append(data[st.offset + info.words_offset : st.offset + info.words_offset + 2 * W].view(torch.int16)
                         .to(torch.int64) & 0xFFFF)  # fmt: skip

        def full(v: int, G: int = G) -> torch.Tensor:
            return torch.full((G,), v, dtype=torch.int64, device=device)

        cols["sid"].append(full(i))
        cols["start"].append(start)
        cols["nsym"].append(torch.clamp(N - start, max=S))
        cols["ob"].append(offs[:-1])
        cols["oe"].append(offs[1:])
        cols["W"].append(full(W))
        cols["first"].append(g == 0)
        cols["last"].append(g == G - 1)
        cols["TC"].append(full(T * C))
        cols["C"].append(full(C))
        cols["mode"].append(full(st.mode))
        cols["out"].append(full(st.out_base))
        cols["row"].append(full(st.row_base))
        cols["mm"].append(full(st.mm_offset))
        cols["ident"].append(full(int(st.identity)))
        cols["tab"].append(full(st.table))
        cols["wbase"].append(full(wofs))
        wofs += W
    p = {k: torch.cat(v) for k, v in cols.items()}
    x = torch.cat(xs)  # [Gtot, 32] int64
    words = torch.cat([*words_all, torch.zeros(1, dtype=torch.int64, device=device)])
    nsym, W, ob, oe = p["nsym"], p["W"], p["ob"], p["oe"]
    bad_off = (ob > oe) | (oe > W) | (oe - ob > nsym) | (p["first"] & (ob != 0)) | (p["last"] & (oe != W))
    wend = torch.minimum(oe, W)
    wbeg = torch.minimum(ob, wend)
    wend = torch.where(bad_off, wbeg, wend)
    ptr = wbeg.clone()
    bad_init = (x < STATE_LOW).any(dim=1)
    overrun = torch.zeros_like(bad_init)
    lane = torch.arange(LANES, device=device, dtype=torch.int64)[None, :]
    steps = int((nsym.max().item() + LANES - 1) // LANES)
    col = lambda k: p[k][:, None]
    for k in range(steps):
        q = k * LANES + lane
        active = q < col("nsym")
        pos = col("start") + q
        posc = torch.where(active, pos, 0)
        mi = (posc // col("TC")) * col("C") + posc % col("C")
        if model_maps is not None and not bool((p["ident"] == 1).all()):
            mapped = model_maps.to(torch.int64)[torch.where(col("ident") == 1, 0, col("mm") + mi)]
            mi = torch.where(col("ident") == 1, mi, mapped)
        slot = x & mask
        s = torch.zeros_like(x)
        lo = torch.zeros_like(x)
        hi = torch.zeros_like(x)
        for ti, cum in enumerate(cums):
            sel = (col("tab") == ti) & active
            if not bool(sel.any()):
                continue
            rows = cum[torch.where(sel, mi, 0)]  # [Gtot, 32, 257]
            st_ = torch.searchsorted(rows, slot[..., None], right=True)[..., 0] - 1
            st_ = st_.clamp(0, 255)
            s = torch.where(sel, st_, s)
            lo = torch.where(sel, rows.gather(2, st_[..., None])[..., 0], lo)
            hi = torch.where(sel, rows.gather(2, st_[..., None] + 1)[..., 0], hi)
        x = torch.where(active, (hi - lo) * (x >> prec) + slot - lo, x)
        need = active & (x < STATE_LOW)
        needi = need.to(torch.int64)
        idx = ptr[:, None] + torch.cumsum(needi, dim=1) - needi
        ok = need & (idx < wend[:, None])
        overrun |= (need & ~ok).any(dim=1)
        w = words[torch.where(ok, col("wbase") + idx, words.numel() - 1)]
        x = torch.where(need, (x << 16) | w, x)
        ptr = ptr + needi.sum(dim=1)
        # epilogues
        dst = col("out") + pos
        for mode in (MODE_SYMBOL, MODE_AFFINE, MODE_ROWSCALE):
            sel = active & (col("mode") == mode)
            if not bool(sel.any()):
                continue
            if mode == MODE_SYMBOL:
                out_u8[dst[sel]] = s[sel].to(torch.uint8)
            elif mode == MODE_AFFINE:
                m = mi[sel]
                val = (s[sel] - ZERO).to(torch.float32) * aff_scale[m] + aff_bias[m]
                out_f[dst[sel]] = val.to(out_f.dtype)
            else:
                row = (col("row") + pos // col("C"))[sel]
                step = vtab[codes[row].to(torch.int64)]
                out_f[dst[sel]] = ((s[sel] - ZERO).to(torch.float32) * step).to(out_f.dtype)
    left = (ptr != wend) & ~bad_off
    final = (x != STATE_LOW).any(dim=1)
    bits = (bad_off.to(torch.int32) * ERR_OFFSETS | bad_init.to(torch.int32) * ERR_INIT_STATE
            | overrun.to(torch.int32) * ERR_OVERRUN | left.to(torch.int32) * ERR_WORDS_LEFT
            | final.to(torch.int32) * ERR_FINAL_STATE)  # fmt: skip
    err[: bits.numel()] = bits
    return err


def rans_decode_ref(
    data: bytes | bytearray | memoryview | np.ndarray,
    table: FrequencyTable,
    model_map=None,
    *,
    shape: tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """:func:`kvstore.kernels.rans_decode.rans_decode_gpu` in torch."""
    device = torch.device(device)
    raw = as_bytes(data)
    info, mm32 = check_stream(raw, table, model_map, shape=shape)
    out = torch.empty(info.num_symbols, dtype=torch.uint8, device=device)
    if info.num_symbols == 0:
        return out.reshape(info.shape)
    buf, (offset,) = upload_streams([raw], device)
    identity = bool(np.array_equal(mm32, np.arange(mm32.size)))
    st = LaunchStream(info, offset, 0, MODE_SYMBOL, 0, identity=identity)
    mm = None if identity else torch.from_numpy(mm32).to(device)
    err = rans_decode_launch_ref(buf, [st], [decode_tables(table, device)], model_maps=mm, out_u8=out)
    check_errors(err)
    return out.reshape(info.shape)


def dequantize_rowscale_ref(
    sym: torch.Tensor, codes: torch.Tensor, vtab: torch.Tensor, row_len: int, out: torch.Tensor, zero: int = ZERO
) -> torch.Tensor:
    """``out[p] = (sym[p] - zero) * vtab[codes[p // row_len]]`` (float32 math, rounded to ``out.dtype``)."""
    n = sym.numel()
    step = vtab[codes.reshape(-1).to(torch.int64)].repeat_interleave(row_len)[:n]
    out.view(-1)[:n] = ((sym.reshape(-1).to(torch.int32) - zero).to(torch.float32) * step).to(out.dtype)
    return out


def dequantize_affine_ref(
    sym: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, row_len: int, rows_per_block: int,
    out: torch.Tensor, zero: int = ZERO,
) -> torch.Tensor:  # fmt: skip
    """``out[p] = (sym[p] - zero) * scale[m] + bias[m]`` with ``m = (p // (rows_per_block * row_len)) * row_len
    + p % row_len`` (the model of ``[B, T, C]`` symbols under an identity ``[B, C]`` map)."""
    n = sym.numel()
    pos = torch.arange(n, device=sym.device, dtype=torch.int64)
    m = (pos // (rows_per_block * row_len)) * row_len + pos % row_len
    val = (sym.reshape(-1).to(torch.int32) - zero).to(torch.float32) * scale[m] + bias[m]
    out.view(-1)[:n] = val.to(out.dtype)
    return out


def dequantize_kv_channel_major_ref(
    sym: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, vtab: torch.Tensor,
    out: torch.Tensor, zero: int = ZERO,
) -> torch.Tensor:  # fmt: skip
    """:func:`kvstore.kernels.dequantize.dequantize_kv_channel_major` in torch."""
    _, LH, D, T = sym.shape
    r = (sym.to(torch.int32) - zero).to(torch.float32).transpose(2, 3)  # [2, LH, T, D]
    keys = r[0] * scale.reshape(LH, 1, D) + bias.reshape(LH, 1, D)
    values = r[1] * vtab[codes.reshape(LH, T).to(torch.int64)][..., None]
    o = out.view(2, LH, T, D)
    o[0] = keys.to(out.dtype)
    o[1] = values.to(out.dtype)
    return out


def rans_encode_launch_ref(symbols, plans, *, config=None):
    """:func:`kvstore.kernels.rans_encode.rans_encode_launch` in torch (``config`` ignored): the
    same :class:`~kvstore.kernels.rans_encode.EncodeOutputs` (scratch slots that hold no word
    may differ)."""
    device = check_symbols(symbols, plans)
    _, _, scr_base, grp_base, _ = encode_descriptors(plans, 1)
    out = make_outputs(plans, device, scr_base, grp_base)
    if sum(p.num_groups for p in plans) == 0:
        return out
    prec = plans[0].table.precision
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("sid", "start", "nsym", "TC", "C", "scr")}
    for i, p in enumerate(plans):
        G, S, N = p.num_groups, p.group_size, p.num_symbols
        if G == 0:
            continue
        _, T, C = p.dims
        start = torch.arange(G, device=device, dtype=torch.int64) * S
        full = lambda v, G=G: torch.full((G,), v, dtype=torch.int64, device=device)
        cols["sid"].append(full(i))
        cols["start"].append(start)
        cols["nsym"].append(torch.clamp(N - start, max=S))
        cols["TC"].append(full(T * C))
        cols["C"].append(full(C))
        cols["scr"].append(full(scr_base[i]))
    g = {k: torch.cat(v)[:, None] for k, v in cols.items()}
    entries = [decode_tables(p.table, device).cf.to(torch.int64) for p in plans]
    maps = [torch.from_numpy(p.mm32.astype(np.int64)).to(device) for p in plans]
    syms = [s_.reshape(-1).to(torch.int64) for s_ in symbols]
    cum_mask = (1 << 17) - 1 if prec > 15 else 0xFFFF
    f_shift = 32 if prec > 15 else 16
    lane = torch.arange(LANES, device=device, dtype=torch.int64)[None, :]
    x = torch.full((g["sid"].shape[0], LANES), STATE_LOW, dtype=torch.int64, device=device)
    wpos = (g["start"] + g["nsym"]).clone()  # [Gtot, 1]
    bad = torch.zeros_like(x, dtype=torch.bool)
    steps = int((int(g["nsym"].max()) + LANES - 1) // LANES)
    for k in range(steps - 1, -1, -1):
        q = k * LANES + lane
        active = q < g["nsym"]
        pos = torch.where(active, g["start"] + q, 0)
        s = torch.zeros_like(x)
        cum = torch.zeros_like(x)
        f = torch.zeros_like(x)
        for i in range(len(plans)):
            sel = active & (g["sid"] == i)
            if not bool(sel.any()):
                continue
            ps = torch.where(sel, pos, 0)
            si = syms[i][ps]
            m = maps[i][(ps // g["TC"]) * g["C"] + ps % g["C"]]
            e = entries[i][m, si]
            s = torch.where(sel, si, s)
            cum = torch.where(sel, e & cum_mask, cum)
            f = torch.where(sel, (e >> f_shift) & 0x1FFFF, f)
        ok = active & (f != 0)
        bad |= active & (f == 0)
        f = torch.where(ok, f, 1)
        need = ok & (x >= (f << (32 - prec)))
        needi = need.to(torch.int64)
        wpos = wpos - needi.sum(dim=1, keepdim=True)
        slot = g["scr"] + wpos + torch.cumsum(needi, dim=1) - needi
        out.scratch[slot[need]] = (x[need] & 0xFFFF).to(torch.int32).to(torch.int16)
        x = torch.where(need, x >> 16, x)
        x = torch.where(ok, ((x // f) << prec) + x % f + cum, x)
    out.states[: x.numel()] = x.to(torch.int32).reshape(-1)  # wraps to the uint32 bit pattern
    out.counts[: x.shape[0]] = (g["start"] + g["nsym"] - wpos).reshape(-1).to(torch.int32)
    out.err[: x.shape[0]] = bad.any(dim=1).to(torch.int32) * ERR_BAD_SYMBOL
    return out


def rans_encode_ref(symbols: torch.Tensor, table: FrequencyTable, model_map=None, *, group_size: int | None = None,
                    config=None) -> bytes:  # fmt: skip
    """:func:`kvstore.kernels.rans_encode.rans_encode_gpu` in torch."""
    if not isinstance(symbols, torch.Tensor) or symbols.dtype != torch.uint8:
        raise CodecError("symbols must be a uint8 tensor")
    plan = plan_stream(tuple(symbols.shape), table, model_map, group_size)
    symbols = symbols.contiguous()
    return assemble([symbols], [plan], rans_encode_launch_ref([symbols], [plan])).to_host()[0].tobytes()
