"""rANS decoding on the GPU: the ``@triton.jit`` kernel and its host-side launcher.

The stream format is ``kvstore/codecs/README_rans.md``; the algorithm is
:func:`kvstore.codecs.rans_lockstep.lockstep_decode` (and the pure-torch
:func:`kvstore.kernels.torch_ops.rans_decode_launch_ref`, same signature as
:func:`rans_decode_launch` here). A program owns a ``[BLOCK_G, 32]`` tile: up to
``BLOCK_G`` consecutive groups of one stream, 32 lanes each; every loop
iteration advances all its lanes by one symbol. One launch decodes several
streams (a kvcodec chunk's ``k``, ``v`` and ``scales``) so that their groups
run concurrently, and writes each stream's symbols through an *epilogue*:

* ``MODE_SYMBOL``: ``out_u8[out_base + p] = s``;
* ``MODE_AFFINE``: ``out_f[out_base + p] = (s - zero) * scale[m] + bias[m]`` (``m`` the
  symbol's model: the key dequantization ``(sym - 128) * step_k + center``);
* ``MODE_ROWSCALE``: ``out_f[out_base + p] = (s - zero) * vtab[codes[row_base + p // C]]``
  (the value dequantization, once the scale codes are decoded).

Host side (:func:`check_stream`) the 48-byte header gets exactly the checks of
:func:`kvstore.codecs.rans.decode` (header fields, table, model map, shape,
padding); the kernel checks the rest on the GPU, per group, into an error
bitmask (:data:`ERR_BITS`): offsets monotonic from 0 to ``W`` with no group
holding more words than symbols, initial states ``>= 2**16``, no lane reading
past its group's words, every word consumed and every lane back at ``2**16``.
Every read and write is bounded whatever the stream holds: word reads are
masked to the group's (clamped) word range, table reads are indexed by
``slot < 2**P`` and symbols that a table lookup yields, writes by positions.

Symbol lookup (:class:`DecodeTables`, built once per :class:`FrequencyTable`
and device): a per-model ``bucket`` table
(uint8, ``2**min(P, 8)`` entries: the symbol owning each bucket's first slot)
and a per-model table of packed ``(cum, freq)`` entries scanned forward from
it (``lookup=0``), or packed ``(cum, freq[s], freq[s+1], freq[s+2])`` entries
covering three symbols per load (``lookup=1``, precision <= 15), or a binary
search over the packed cumulative frequencies (``lookup=2``). A full
``2**P``-slot symbol table per model does not fit: 32,768 models at P = 15 is
1 GiB. ``benchmarks/kernels_notes.md`` has the measurements behind the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from kvstore.codecs.rans import as_bytes
from kvstore.codecs.symbol_model import FrequencyTable
from kvstore.errors import CodecError
from kvstore.kernels.support import MIN_INTERPRETER_VERSION, interpreter_supported
from kvstore.kernels.rans_streams import (  # the host side, re-exported for the launch's callers
    DEFAULT_CONFIG,
    ERR_BITS,
    MAX_STREAMS,
    MODE_AFFINE,
    MODE_ROWSCALE,
    MODE_SYMBOL,
    NDESC,
    ZERO,
    DecodeConfig,
    DecodeTables,
    LaunchStream,
    build_descriptors,
    check_errors,
    check_stream,
    decode_tables,
    describe_errors,
    upload_streams,
)

__all__ = [
    "ERR_BITS",
    "MODE_AFFINE",
    "MODE_ROWSCALE",
    "MODE_SYMBOL",
    "DecodeConfig",
    "DecodeTables",
    "LaunchStream",
    "RansLaunch",
    "build_descriptors",
    "check_stream",
    "decode_tables",
    "describe_errors",
    "plan_rans_launch",
    "rans_decode_gpu",
    "rans_decode_launch",
]


def interpreter_active() -> bool:
    """Whether Triton runs kernels through its interpreter in this process: ``TRITON_INTERPRET=1``
    must be set before ``triton`` is first imported (its own ``@jit`` library functions are then
    interpreted too)."""
    return type(tl.max).__name__ == "InterpretedFunction"


def kernel_for(kernel, device: torch.device):
    """``kernel`` to launch on tensors of ``device``: CUDA, or any device under the interpreter
    (numpy on the CPU, far slower than a GPU: tests use small streams)."""
    if device.type == "cuda":
        return kernel
    if interpreter_active():
        if not interpreter_supported():
            raise CodecError(f"Triton {triton.__version__}'s interpreter cannot run these kernels (needs "
                             f"{'.'.join(map(str, MIN_INTERPRETER_VERSION))} or later); use the torch references")  # fmt: skip
        return kernel
    raise CodecError(
        "Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before triton is imported; "
        "use the torch references (kvstore.kernels.torch_ops) elsewhere"
    )


@triton.jit
def _ballot_excl(need):
    """(lanes below mine that need a word, lanes that need one) over the warp: vote + popc."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p;
        .reg .b32 m, lt;
        setp.ne.b32 p, $2, 0;
        vote.sync.ballot.b32 m, p, 0xffffffff;
        mov.u32 lt, %lanemask_lt;
        and.b32 lt, lt, m;
        popc.b32 $0, lt;
        popc.b32 $1, m;
        }""",
        constraints="=r,=r,r",
        args=[need],
        dtype=(tl.int32, tl.int32),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _prefetch(ptrs):
    """Ask for the L1 line holding each address (no register waits on it)."""
    return tl.inline_asm_elementwise(
        asm="prefetch.global.L1 [$1];\n mov.u32 $0, 0;",
        constraints="=r,l",
        args=[ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _stream_tile(desc_ptr, pid, NSTREAMS: tl.constexpr, NDESC_C: tl.constexpr, PROG0_COL: tl.constexpr,
                 BLOCK_G: tl.constexpr):  # fmt: skip
    """The stream a program works on and its tile of groups, from the launch descriptors (the
    decoder's and the encoder's share columns 0-4: G, S, N, T*C, C; ``PROG0_COL`` holds each
    stream's first program). Returns the stream's index and descriptor row, its group count,
    T*C and C, the tile's group indices ``gi``, which are valid, their first positions and
    symbol counts, and the steps of the longest group."""
    sid = 0
    for i in tl.static_range(1, NSTREAMS):
        p0 = tl.load(desc_ptr + i * NDESC_C + PROG0_COL)
        sid = tl.where(pid >= p0, i, sid)
    d = desc_ptr + sid * NDESC_C
    G = tl.load(d + 0).to(tl.int32)
    S = tl.load(d + 1).to(tl.int32)
    N = tl.load(d + 2).to(tl.int32)
    TC = tl.load(d + 3).to(tl.int32)
    C = tl.load(d + 4).to(tl.int32)
    prog0 = tl.load(d + PROG0_COL).to(tl.int32)
    gi = (pid - prog0) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BG] group index within the stream
    gval = gi < G
    start = gi * S
    nsym = tl.where(gval, tl.minimum(S, N - start), 0)  # [BG]
    steps = (tl.max(nsym, axis=0) + 31) // 32
    return sid, d, G, TC, C, gi, gval, start, nsym, steps


@triton.jit
def _cum_freq(e, CF64: tl.constexpr):
    """``(cum, freq)`` of a packed ``cf`` entry (int32 ``cum | freq << 16``, or int64 with ``CF64``)."""
    if CF64:
        return (e & 0x1FFFF).to(tl.uint32), (e >> 32).to(tl.uint32)
    else:
        return (e & 0xFFFF).to(tl.uint32), ((e >> 16) & 0xFFFF).to(tl.uint32)


@triton.jit
def _cum3(e):
    """The four bounds of a packed ``cf3`` entry: ``cum[s]`` and the ends of symbols s, s+1, s+2."""
    c0 = (e & 0xFFFF).to(tl.uint32)
    e0 = c0 + ((e >> 16) & 0xFFFF).to(tl.uint32)
    e1 = e0 + ((e >> 32) & 0xFFFF).to(tl.uint32)
    e2 = e1 + ((e >> 48) & 0xFFFF).to(tl.uint32)
    return c0, e0, e1, e2


@triton.jit
def _lookup(brow, crow, slot, active, BSHIFT: tl.constexpr, LOOKUP: tl.constexpr, CF64: tl.constexpr):
    """The symbol owning ``slot`` and its ``(cum, freq)``: ``brow`` / ``crow`` point at each lane's
    model's bucket row and entry row (pointer tensors, or one pointer when the model is uniform)."""
    if LOOKUP == 2:
        s = tl.zeros(slot.shape, dtype=tl.int32)
        for bit in tl.static_range(7, -1, -1):
            cand = s + (1 << bit)
            cum_c, _ = _cum_freq(tl.load(crow + cand, mask=active, other=0), CF64)
            s = tl.where(cum_c <= slot, cand, s)
        lo, f = _cum_freq(tl.load(crow + s, mask=active, other=0), CF64)
    elif LOOKUP == 1:
        sb = tl.load(brow + (slot >> BSHIFT), mask=active, other=0).to(tl.int32)
        c0, e0, e1, e2 = _cum3(tl.load(crow + sb, mask=active, other=0))
        in0 = slot < e0
        in1 = slot < e1
        lo = tl.where(in0, c0, tl.where(in1, e0, e1))
        hi = tl.where(in0, e0, tl.where(in1, e1, e2))
        s = sb + tl.where(in0, 0, tl.where(in1, 1, 2))
        more = active & (slot >= e2)
        while tl.max(more.to(tl.int32)) > 0:  # rare: the slot lies 3+ symbols past its bucket's first
            sb = tl.where(more, tl.minimum(sb + 3, 255), sb)
            c0, e0, e1, e2 = _cum3(tl.load(crow + sb, mask=more, other=0))
            in0 = slot < e0
            in1 = slot < e1
            lo = tl.where(more, tl.where(in0, c0, tl.where(in1, e0, e1)), lo)
            hi = tl.where(more, tl.where(in0, e0, tl.where(in1, e1, e2)), hi)
            s = tl.where(more, sb + tl.where(in0, 0, tl.where(in1, 1, 2)), s)
            more = more & (slot >= e2)
        f = hi - lo
    else:
        s = tl.load(brow + (slot >> BSHIFT), mask=active, other=0).to(tl.int32)
        lo, f = _cum_freq(tl.load(crow + s, mask=active, other=0), CF64)
        more = active & (slot >= lo + f)
        while tl.max(more.to(tl.int32)) > 0:
            s = tl.where(more, tl.minimum(s + 1, 255), s)
            lo2, f2 = _cum_freq(tl.load(crow + s, mask=more, other=0), CF64)
            lo = tl.where(more, lo2, lo)
            f = tl.where(more, f2, f)
            more = more & (slot >= lo + f)
    return s, lo, f


@triton.jit
def _renormalize(x, need, ptr, wend2, wb, BALLOT: tl.constexpr, PREFETCH: tl.constexpr):
    """Lanes in ``need`` (state below 2**16) read their group's next words in lane order:
    ``ptr`` (the group's next word, per lane) advances by the words taken. A read at or past
    ``wend2`` is skipped (the group then ends with ``ptr > wend2``: the overrun error)."""
    needi = need.to(tl.int32)
    if BALLOT:
        excl, total = _ballot_excl(needi)
    else:
        incl = tl.cumsum(needi, axis=1)
        excl = incl - needi
        total = tl.sum(needi, axis=1)[:, None]
    idx = ptr + excl
    w = tl.load(wb + idx, mask=need & (idx < wend2), other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    x = tl.where(need, (x << 16) | w, x)
    ptr = ptr + total
    if PREFETCH:
        _prefetch(wb + (ptr + 96))
    return x, ptr


@triton.jit
def _rans_decode_kernel(
    desc_ptr, data32_ptr, data16_ptr, mm_ptr,
    bkt0, cf0, bkt1, cf1, bkt2, cf2,
    aff_scale_ptr, aff_bias_ptr, vtab_ptr, codes_ptr,
    out_f_ptr, out_u8_ptr, err_ptr,
    NSTREAMS: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, LOOKUP: tl.constexpr, CF64: tl.constexpr,
    BALLOT: tl.constexpr, BLOCK_G: tl.constexpr, ZERO_SYM: tl.constexpr, NDESC_C: tl.constexpr,
    PREFETCH: tl.constexpr = False, ROWS: tl.constexpr = False, ALIGNED: tl.constexpr = False,
):  # fmt: skip
    LANES_C: tl.constexpr = 32
    MASK: tl.constexpr = (1 << PREC) - 1
    BSHIFT: tl.constexpr = PREC - BB
    NB: tl.constexpr = 1 << BB
    pid = tl.program_id(0)
    _sid, d, G, TC, C, gi, gval, start, nsym, steps = _stream_tile(desc_ptr, pid, NSTREAMS, NDESC_C, 14, BLOCK_G)
    st_base = tl.load(d + 5)
    off_base = tl.load(d + 6)
    w_base = tl.load(d + 7)
    W = tl.load(d + 8).to(tl.int32)
    mm_base = tl.load(d + 9)
    mode = tl.load(d + 10).to(tl.int32)
    out_base = tl.load(d + 11)
    row_base = tl.load(d + 12)
    tab = tl.load(d + 13).to(tl.int32)
    err_base = tl.load(d + 15)
    inc_c = tl.load(d + 16).to(tl.int32)
    inc_r = tl.load(d + 17).to(tl.int32)
    carry_r = tl.load(d + 18).to(tl.int32)
    row_inc = tl.load(d + 19).to(tl.int32)
    ident = tl.load(d + 20).to(tl.int32)

    if tab == 0:
        bkt = bkt0
        cft = cf0
    elif tab == 1:
        bkt = bkt1
        cft = cf1
    else:
        bkt = bkt2
        cft = cf2

    lane = tl.arange(0, LANES_C)

    # word offsets (checked here: the host read only the header)
    ob = tl.load(data32_ptr + off_base + gi, mask=gval, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    oe = tl.load(data32_ptr + off_base + gi + 1, mask=gval, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    bad_off = (ob > oe) | (oe > W) | ((oe - ob) > nsym) | ((gi == 0) & (ob != 0)) | ((gi == G - 1) & (oe != W))
    bad_off = bad_off & gval
    wend = tl.minimum(oe, W)
    wbeg = tl.minimum(ob, wend)
    wend = tl.where(bad_off, wbeg, wend).to(tl.int32)  # a bad group reads no words at all
    ptr = wbeg.to(tl.int32)[:, None] + tl.zeros([BLOCK_G, LANES_C], dtype=tl.int32)  # replicated per lane
    wend2 = wend[:, None] + tl.zeros([BLOCK_G, LANES_C], dtype=tl.int32)

    sidx = st_base + gi[:, None] * LANES_C + lane[None, :]
    x = tl.load(data32_ptr + sidx, mask=gval[:, None], other=65536).to(tl.uint32, bitcast=True)
    bad_init = tl.max((x < 65536).to(tl.int32), axis=1) > 0

    pos = start[:, None] + lane[None, :]  # [BG, 32] int32
    wb = data16_ptr + w_base

    if ALIGNED:
        # ROWS, one group per program and every row a multiple of 32 long: each warp-step
        # decodes 32 positions of one row, so the model (the row) is the same for the whole
        # warp and every lane is active (the group holds whole steps). Rows are walked one
        # at a time: the table rows are found once per row, not per step.
        on = tl.full([BLOCK_G, LANES_C], 1, tl.int1)
        g_start = tl.max(start, axis=0)
        row0 = g_start // TC
        r0 = g_start - row0 * TC
        span = r0 + steps * LANES_C  # the group's positions, from the start of its first row
        optr = out_u8_ptr + (out_base + pos)
        for ri in range((span + TC - 1) // TC):
            brow = bkt + (row0 + ri) * NB
            crow = cft + (row0 + ri) * 256
            n_here = (tl.minimum(span - ri * TC, TC) - tl.maximum(r0 - ri * TC, 0)) // LANES_C
            for _k in range(n_here):
                slot = x & MASK
                s, lo, f = _lookup(brow, crow, slot, on, BSHIFT, LOOKUP, CF64)
                x = f * (x >> PREC) + (slot - lo)
                x, ptr = _renormalize(x, x < 65536, ptr, wend2, wb, BALLOT, PREFETCH)
                tl.store(optr, s.to(tl.uint8))
                optr += LANES_C
    else:
        # per-lane position counters: c = pos % C, r = pos % TC, bC = (pos // TC) * C, row = pos // C
        c = pos % C
        r = pos % TC
        bC = (pos // TC) * C
        row = pos // C
        q = lane[None, :] + tl.zeros([BLOCK_G, LANES_C], dtype=tl.int32)  # step * 32 + lane
        for _k in range(steps):
            active = q < nsym[:, None]
            if ROWS:  # C == 1, identity map: the model is the row
                mi = bC
            else:
                mi = bC + c
                if ident == 0:
                    mi = tl.load(mm_ptr + mm_base + mi, mask=active, other=0)
            slot = x & MASK
            s, lo, f = _lookup(bkt + mi * NB, cft + mi * 256, slot, active, BSHIFT, LOOKUP, CF64)
            xn = f * (x >> PREC) + (slot - lo)
            x = tl.where(active, xn, x)
            x, ptr = _renormalize(x, active & (x < 65536), ptr, wend2, wb, BALLOT, PREFETCH)
            # ---- epilogue
            if ROWS:
                tl.store(out_u8_ptr + (out_base + pos), s.to(tl.uint8), mask=active)
            elif mode == 0:
                tl.store(out_u8_ptr + (out_base + pos), s.to(tl.uint8), mask=active)
            elif mode == 1:
                sc = tl.load(aff_scale_ptr + mi, mask=active, other=0.0)
                bi = tl.load(aff_bias_ptr + mi, mask=active, other=0.0)
                val = (s - ZERO_SYM).to(tl.float32) * sc + bi
                tl.store(out_f_ptr + (out_base + pos), val.to(out_f_ptr.dtype.element_ty), mask=active)
            else:
                code = tl.load(codes_ptr + (row_base + row), mask=active, other=0).to(tl.int32)
                stp = tl.load(vtab_ptr + code, mask=active, other=0.0)
                val = (s - ZERO_SYM).to(tl.float32) * stp
                tl.store(out_f_ptr + (out_base + pos), val.to(out_f_ptr.dtype.element_ty), mask=active)
            # ---- advance every lane by 32 positions
            q = q + LANES_C
            pos = pos + LANES_C
            if not ROWS:
                c = c + inc_c
                wc = c >= C
                c = tl.where(wc, c - C, c)
                row = row + row_inc + wc.to(tl.int32)
            r = r + inc_r
            wr = r >= TC
            r = tl.where(wr, r - TC, r)
            bC = bC + (carry_r + wr.to(tl.int32)) * C

    # ptr only grows, by every word a lane needed: past wend2 exactly when a lane overran
    left = tl.max((ptr != wend2).to(tl.int32), axis=1) > 0
    over = tl.max((ptr > wend2).to(tl.int32), axis=1) > 0
    final = tl.max((x != 65536).to(tl.int32), axis=1) > 0
    err = (bad_off.to(tl.int32) * 1 | bad_init.to(tl.int32) * 2 | over.to(tl.int32) * 4
           | (left & ~bad_off).to(tl.int32) * 8 | final.to(tl.int32) * 16)  # fmt: skip
    tl.store(err_ptr + err_base + gi, err, mask=gval)


# ----------------------------------------------------------------------------- launcher


_DUMMIES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element placeholder for an argument the launch does not use (cached)."""
    hit = _DUMMIES.get((device, dtype))
    if hit is None:
        hit = _DUMMIES[(device, dtype)] = torch.zeros(1, dtype=dtype, device=device)
    return hit


@dataclass(frozen=True)
class RansLaunch:
    """A planned :func:`rans_decode_launch`: checks done, descriptors on the device, every
    argument but the outputs bound. :meth:`run` queues it; a prepared chunk keeps one per
    layout and config, so a decode's host work before the kernel starts is an allocation
    and Triton's launch: with the check, the GPU idles through that work at every chunk."""

    kernel: Any
    programs: int
    num_errors: int
    device: torch.device
    args: tuple  # the kernel's arguments before ``codes``
    constexprs: dict

    def run(
        self,
        *,
        out_f: torch.Tensor | None = None,
        out_u8: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
        err: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queue the decode into these outputs; returns the int32 per-group error words (``err``)."""
        if err is None:
            err = torch.zeros(max(1, self.num_errors), dtype=torch.int32, device=self.device)
        if self.programs:
            dev = self.device
            self.kernel[(self.programs,)](
                *self.args, codes if codes is not None else _dummy(dev, torch.uint8),
                out_f if out_f is not None else _dummy(dev, torch.float16),
                out_u8 if out_u8 is not None else _dummy(dev, torch.uint8), err, **self.constexprs,
            )  # fmt: skip
        return err


def plan_rans_launch(
    data: torch.Tensor,
    streams: list[LaunchStream],
    tables: list[DecodeTables],
    *,
    model_maps: torch.Tensor | None = None,
    aff_scale: torch.Tensor | None = None,
    aff_bias: torch.Tensor | None = None,
    vtab: torch.Tensor | None = None,
    config: DecodeConfig = DEFAULT_CONFIG,
    desc: torch.Tensor | None = None,
) -> RansLaunch:
    """Check and bind a launch of :func:`rans_decode_launch` (its arguments but the outputs)."""
    if not 1 <= len(streams) <= MAX_STREAMS:
        raise CodecError(f"a launch decodes 1 to {MAX_STREAMS} streams, got {len(streams)}")
    if not 1 <= len(tables) <= MAX_STREAMS:
        raise CodecError(f"a launch uses 1 to {MAX_STREAMS} tables, got {len(tables)}")
    device = data.device
    precisions = {t.precision for t in tables}
    if len(precisions) != 1:
        raise CodecError("all tables of one launch must share their precision")
    prec = precisions.pop()
    lookup = config.lookup
    if lookup == 1 and prec > 15:
        lookup = 0
    cf_of = [t.cf3 if lookup == 1 else t.cf for t in tables]
    host_desc, programs, nerr = build_descriptors(streams, config.block_g)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise CodecError("data must be a 1-D uint8 tensor")
    if programs and desc is None:
        desc = torch.from_numpy(host_desc).to(device, non_blocking=False)
    pad = (-data.numel()) % 4
    if pad:  # int32 / int16 views need a multiple of 4 bytes
        data = torch.cat([data, torch.zeros(pad, dtype=torch.uint8, device=device)])
    f32 = _dummy(device, torch.float32)
    bb = min(prec, 8, int(config.bucket_bits))
    bks = [t.coarse_bucket(bb) for t in tables]
    bks = bks + [bks[0]] * (MAX_STREAMS - len(bks))
    cfs = list(cf_of) + [cf_of[0]] * (MAX_STREAMS - len(cf_of))
    native = device.type == "cuda" and not interpreter_active()
    rows = bool(config.rows) and all(st.identity and st.mode == MODE_SYMBOL and st.info.dims[2] == 1 for st in streams)
    aligned = rows and bool(config.aligned) and config.block_g == 1 and all(st.info.dims[1] % 32 == 0 for st in streams)
    args = (
        desc, data.view(torch.int32), data.view(torch.int16),
        model_maps if model_maps is not None else _dummy(device, torch.int32),
        bks[0], cfs[0], bks[1], cfs[1], bks[2], cfs[2],
        aff_scale if aff_scale is not None else f32, aff_bias if aff_bias is not None else f32,
        vtab if vtab is not None else f32,
    )  # fmt: skip
    constexprs = dict(
        NSTREAMS=len(streams), PREC=prec, BB=bb, LOOKUP=lookup, CF64=prec > 15,
        BALLOT=bool(config.ballot) and native and config.block_g == 1 and config.num_warps == 1,
        BLOCK_G=config.block_g, ZERO_SYM=ZERO, NDESC_C=NDESC, PREFETCH=bool(config.prefetch) and native, ROWS=rows,
        ALIGNED=aligned,
        num_warps=config.num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    kernel = kernel_for(_rans_decode_kernel, device) if programs else None
    return RansLaunch(kernel, programs, nerr, device, args, constexprs)


def rans_decode_launch(
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
    config: DecodeConfig = DEFAULT_CONFIG,
    desc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode ``streams`` (all in the uint8 device buffer ``data``) in one launch.

    Writes each stream's symbols through its epilogue (module doc) and returns the int32
    per-group error words (``err``, allocated if None; 0 = fine, see :data:`ERR_BITS`).
    Asynchronous: nothing is synchronized. ``model_maps``: int32 concatenated maps of the
    non-identity streams. ``desc``: the descriptors already on the device (else built and
    copied here). Unused outputs may be None. :func:`plan_rans_launch` + :meth:`RansLaunch.run`.
    """
    planned = plan_rans_launch(data, streams, tables, model_maps=model_maps, aff_scale=aff_scale, aff_bias=aff_bias,
                               vtab=vtab, config=config, desc=desc)  # fmt: skip
    return planned.run(out_f=out_f, out_u8=out_u8, codes=codes, err=err)


def rans_decode_gpu(
    data: bytes | bytearray | memoryview | np.ndarray,
    table: FrequencyTable,
    model_map=None,
    *,
    shape: tuple[int, ...] | None = None,
    device: torch.device | str = "cuda",
    config: DecodeConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """:func:`kvstore.codecs.rans.decode` on ``device``: uint8 symbols as a tensor there.

    Raises :class:`FormatError` for anything ``rans.decode`` rejects (synchronizes
    once, to read the error flag).
    """
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
    err = rans_decode_launch(buf, [st], [decode_tables(table, device)], model_maps=mm, out_u8=out, config=config)
    check_errors(err)
    return out.reshape(info.shape)
