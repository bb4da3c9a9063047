"""rANS encoding on the GPU: the ``@triton.jit`` kernel, its launcher and the stream assembly.

Produces exactly the bytes of :func:`kvstore.codecs.rans.encode` (``README_rans.md``) for the
same symbols, table, model map and group size, so the CPU and GPU decoders read either.
The algorithm is the CPU encoder's, run in lockstep: a program owns a ``[BLOCK_G, 32]``
tile (up to ``BLOCK_G`` groups of one stream, 32 lanes each) and walks its groups' steps
from the last to the first; at each step every lane encodes its symbol (positions
``g*S + 32k + j``) from its own state::

    if x >= freq << (32 - P):  emit x & 0xFFFF;  x >>= 16
    x = (x // freq << P) + x % freq + cum

A lane's words go to a per-stream scratch buffer (one slot per symbol), written backwards
from the end of its group: at each step the lanes that emit take the next slots below the
previous step's, in lane order (an exclusive prefix sum, or a warp vote on CUDA), which is
the order :func:`kvstore.codecs._rans_numba.encode_groups` writes them in. The kernel
stores each lane's final state, each group's word count and an error flag (a symbol of
frequency 0, or outside the alphabet). :func:`assemble` then reads the word counts (the one
synchronization), builds the 48-byte headers on the host and the offsets, and gathers every
group's words into the stream on the device.

One launch encodes up to three streams (a kvcodec chunk's ``k``, ``v`` and ``scales``) so
that their groups run concurrently. The pure-torch twin of :func:`rans_encode_launch` is
:func:`kvstore.kernels.torch_ops.rans_encode_launch_ref` (same signature and outputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from numpy.typing import ArrayLike

from kvstore.codecs.symbol_model import FrequencyTable
from kvstore.errors import CodecError
from kvstore.kernels.rans_decode import _ballot_excl, _stream_tile, decode_tables, interpreter_active, kernel_for
from kvstore.kernels.rans_encode_plan import (  # the host side, re-exported for the launch's callers
    DEFAULT_CONFIG,
    MAX_STREAMS,
    NDESC,
    EncodeConfig,
    EncodedStreams,
    EncodeOutputs,
    StreamPlan,
    assemble,
    build_descriptors,
    check_symbols,
    make_outputs,
    model_maps_tensor,
    plan_stream,
)

__all__ = [
    "EncodeConfig",
    "EncodeOutputs",
    "EncodedStreams",
    "StreamPlan",
    "assemble",
    "encode_streams",
    "plan_stream",
    "rans_encode_gpu",
    "rans_encode_launch",
]

@triton.jit
def _rans_encode_kernel(
    desc_ptr, sym0, sym1, sym2, cf0, cf1, cf2, mm_ptr, scratch_ptr, states_ptr, counts_ptr, err_ptr,
    NSTREAMS: tl.constexpr, PREC: tl.constexpr, CF64: tl.constexpr, BALLOT: tl.constexpr,
    BLOCK_G: tl.constexpr, NDESC_C: tl.constexpr,
):  # fmt: skip
    LANES_C: tl.constexpr = 32
    pid = tl.program_id(0)
    sid, d, G, TC, C, gi, gval, start, nsym, steps = _stream_tile(desc_ptr, pid, NSTREAMS, NDESC_C, 8, BLOCK_G)
    scr = tl.load(d + 5)
    mm_base = tl.load(d + 6)
    ident = tl.load(d + 7).to(tl.int32)
    grp = tl.load(d + 9)
    inc_c = tl.load(d + 10).to(tl.int32)
    inc_r = tl.load(d + 11).to(tl.int32)
    carry_r = tl.load(d + 12).to(tl.int32)
    if sid == 0:
        sp = sym0
        cft = cf0
    elif sid == 1:
        sp = sym1
        cft = cf1
    else:
        sp = sym2
        cft = cf2

    lane = tl.arange(0, LANES_C)
    last = (steps - 1) * LANES_C
    q = last + lane[None, :] + tl.zeros([BLOCK_G, LANES_C], dtype=tl.int32)  # step * 32 + lane
    pos = start[:, None] + q
    c = pos % C
    r = pos % TC
    bC = (pos // TC) * C
    x = tl.full([BLOCK_G, LANES_C], 65536, dtype=tl.uint32)
    wpos = (start + nsym)[:, None] + tl.zeros([BLOCK_G, LANES_C], dtype=tl.int32)  # replicated per lane
    bad = tl.zeros([BLOCK_G, LANES_C], dtype=tl.int32)
    scr_ptr = scratch_ptr + scr

    for _k in range(steps):
        active = q < nsym[:, None]
        s = tl.load(sp + pos, mask=active, other=0).to(tl.int32)
        mi = bC + c
        if ident == 0:
            mi = tl.load(mm_ptr + mm_base + mi, mask=active, other=0)
        e = tl.load(cft + mi * 256 + s, mask=active, other=0)
        if CF64:
            cum = (e & 0x1FFFF).to(tl.uint32)
            f = (e >> 32).to(tl.uint32)
        else:
            cum = (e & 0xFFFF).to(tl.uint32)
            f = ((e >> 16) & 0xFFFF).to(tl.uint32)
        ok = active & (f != 0)
        bad = bad | (active & (f == 0)).to(tl.int32)
        f = tl.where(ok, f, 1)
        # ---- renormalization: the emitting lanes take the next slots below, in lane order
        need = ok & (x.to(tl.int64) >= (f.to(tl.int64) << (32 - PREC)))
        needi = need.to(tl.int32)
        if BALLOT:
            excl, total = _ballot_excl(needi)
        else:
            excl = tl.cumsum(needi, axis=1) - needi
            total = tl.sum(needi, axis=1)[:, None]
        wpos = wpos - total
        word = (x & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(scr_ptr + (wpos + excl), word, mask=need)
        x = tl.where(need, x >> 16, x)
        # ---- state update
        qq = x // f
        x = tl.where(ok, (qq << PREC) + (x - qq * f) + cum, x)
        # ---- every lane steps back by 32 positions
        q = q - LANES_C
        pos = pos - LANES_C
        c = c - inc_c
        wc = c < 0
        c = tl.where(wc, c + C, c)
        r = r - inc_r
        wr = r < 0
        r = tl.where(wr, r + TC, r)
        bC = bC - (carry_r + wr.to(tl.int32)) * C

    sidx = (grp + gi[:, None]) * LANES_C + lane[None, :]
    tl.store(states_ptr + sidx, x.to(tl.int32, bitcast=True), mask=gval[:, None])
    count = (start + nsym) - tl.min(wpos, axis=1)
    tl.store(counts_ptr + grp + gi, count, mask=gval)
    tl.store(err_ptr + grp + gi, tl.max(bad, axis=1), mask=gval)


# ----------------------------------------------------------------------------- launcher


def rans_encode_launch(
    symbols: Sequence[torch.Tensor], plans: Sequence[StreamPlan], *, config: EncodeConfig = DEFAULT_CONFIG
) -> EncodeOutputs:
    """Encode up to three streams (``symbols[i]`` under ``plans[i]``) in one launch; asynchronous.

    Returns the raw outputs (:class:`EncodeOutputs`) that :func:`assemble` turns into streams."""
    device = check_symbols(symbols, plans)
    desc_h, programs, scr_base, grp_base, _ = build_descriptors(plans, config.block_g)
    out = make_outputs(plans, device, scr_base, grp_base)
    if programs == 0:
        return out
    prec = plans[0].table.precision
    cfs = [decode_tables(p.table, device).cf for p in plans]
    cfs = cfs + [cfs[0]] * (MAX_STREAMS - len(cfs))
    syms = list(symbols) + [symbols[0]] * (MAX_STREAMS - len(symbols))
    mm = model_maps_tensor(plans, device)
    if mm is None:
        mm = torch.zeros(1, dtype=torch.int32, device=device)
    desc = torch.from_numpy(desc_h).to(device)
    native = device.type == "cuda" and not interpreter_active()
    ballot = bool(config.ballot) and native and config.block_g == 1 and config.num_warps == 1
    kernel_for(_rans_encode_kernel, device)[(programs,)](
        desc, syms[0], syms[1], syms[2], cfs[0], cfs[1], cfs[2], mm, out.scratch, out.states, out.counts, out.err,
        NSTREAMS=len(plans), PREC=prec, CF64=prec > 15, BALLOT=ballot,
        BLOCK_G=config.block_g, NDESC_C=NDESC, num_warps=config.num_warps,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- stream assembly


def encode_streams(
    symbols: Sequence[torch.Tensor], plans: Sequence[StreamPlan], *, config: EncodeConfig = DEFAULT_CONFIG,
    backend: str = "triton",
) -> EncodedStreams:  # fmt: skip
    """Encode and assemble up to three streams on their device (``backend``: "triton" or "torch")."""
    if backend == "triton":
        out = rans_encode_launch(symbols, plans, config=config)
    elif backend == "torch":
        from kvstore.kernels.torch_ops import rans_encode_launch_ref

        out = rans_encode_launch_ref(symbols, plans, config=config)
    else:
        raise CodecError(f"backend must be 'triton' or 'torch', got {backend!r}")
    return assemble(symbols, plans, out)


def rans_encode_gpu(
    symbols: torch.Tensor,
    table: FrequencyTable,
    model_map: ArrayLike | int | None = None,
    *,
    group_size: int | None = None,
    config: EncodeConfig = DEFAULT_CONFIG,
) -> bytes:
    """:func:`kvstore.codecs.rans.encode` of a uint8 tensor on its device (CUDA, or the CPU
    under the Triton interpreter): the same bytes."""
    if not isinstance(symbols, torch.Tensor) or symbols.dtype != torch.uint8:
        raise CodecError("symbols must be a uint8 tensor")
    plan = plan_stream(tuple(symbols.shape), table, model_map, group_size)
    streams = encode_streams([symbols.contiguous()], [plan], config=config)
    return streams.to_host()[0].tobytes()
