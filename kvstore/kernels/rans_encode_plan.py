"""Host-side planning of the rANS encode kernel, without Triton: stream plans, launch
descriptors, outputs and the assembly of the encoded streams.

Shared by the Triton launcher (:mod:`kvstore.kernels.rans_encode`) and the pure-torch
reference (:mod:`kvstore.kernels.torch_ops`), so the reference runs where Triton is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

from kvstore.codecs import rans
from kvstore.codecs.rans import HEADER_BYTES, LANES, stream_overhead_bytes
from kvstore.codecs.symbol_model import FrequencyTable
from kvstore.errors import CodecError

MAX_STREAMS = 3
ERR_BAD_SYMBOL = 1  # a symbol with frequency 0 in its model (or outside the alphabet)

# descriptor columns (int64 [n_streams, NDESC])
(E_G, E_S, E_N, E_TC, E_C, E_SCR, E_MM, E_IDENT, E_PROG0, E_GRP, E_INC_C, E_INC_R, E_CARRY_R) = range(13)
NDESC = 16


@dataclass(frozen=True)
class EncodeConfig:
    """Kernel variant: ``block_g`` groups per program, ``num_warps``, ``ballot`` (word slots by
    PTX vote/popc instead of a scan; CUDA with ``block_g == 1`` and one warp only: the 32
    lanes of the tile must be the 32 threads of one warp)."""

    block_g: int = 1
    num_warps: int = 1
    ballot: bool = True


DEFAULT_CONFIG = EncodeConfig()


@dataclass(frozen=True)
class StreamPlan:
    """One stream to encode: the header fields :func:`kvstore.codecs.rans.encode` would write
    and the model map (int32 ``[B*C]``; ``identity`` when ``model_map[i] == i``)."""

    table: FrequencyTable
    ndim: int
    dims: tuple[int, int, int]
    mm32: np.ndarray
    identity: bool
    map_crc: int
    group_size: int
    num_groups: int

    @property
    def num_symbols(self) -> int:
        B, T, C = self.dims
        return B * T * C


def plan_stream(
    shape: tuple[int, ...], table: FrequencyTable, model_map: ArrayLike | int | None = None,
    group_size: int | None = None,
) -> StreamPlan:  # fmt: skip
    """The checks of :func:`kvstore.codecs.rans.encode` on a stream's shape, map and group size
    (``None``: :func:`kvstore.codecs.rans.default_group_size`)."""
    dims, mm32, S, G = rans.stream_layout(shape, table, model_map, group_size)
    identity = bool(np.array_equal(mm32, np.arange(mm32.size, dtype=np.int32)))
    crc = rans.map_crc(mm32)
    return StreamPlan(table, len(tuple(shape)), dims, mm32, identity, crc, S, G)


@dataclass
class EncodeOutputs:
    """What an encode launch writes: ``scratch`` int16 (each stream's words at the end of its
    groups' slots), ``states`` int32 ``[sum G * 32]``, ``counts`` int32 ``[sum G]`` (words per
    group) and ``err`` int32 ``[sum G]`` (0 = fine), streams one after the other."""

    scratch: torch.Tensor
    states: torch.Tensor
    counts: torch.Tensor
    err: torch.Tensor
    scratch_base: list[int]
    group_base: list[int]


def build_descriptors(plans: Sequence[StreamPlan], block_g: int) -> tuple[np.ndarray, int, list[int], list[int], list[int]]:
    """int64 descriptors, the number of programs, each stream's scratch, group and map offsets."""
    desc = np.zeros((max(1, len(plans)), NDESC), dtype=np.int64)
    prog = scr = grp = mm = 0
    scr_base, grp_base, mm_base = [], [], []
    for i, p in enumerate(plans):
        _, T, C = p.dims
        TC = T * C
        desc[i, E_G], desc[i, E_S], desc[i, E_N] = p.num_groups, p.group_size, p.num_symbols
        desc[i, E_TC], desc[i, E_C] = TC, C
        desc[i, E_SCR], desc[i, E_MM], desc[i, E_IDENT] = scr, mm, int(p.identity)
        desc[i, E_PROG0], desc[i, E_GRP] = prog, grp
        if C and TC:
            desc[i, E_INC_C], desc[i, E_INC_R], desc[i, E_CARRY_R] = LANES % C, LANES % TC, LANES // TC
        scr_base.append(scr)
        grp_base.append(grp)
        mm_base.append(mm)
        scr += p.num_symbols
        grp += p.num_groups
        mm += 0 if p.identity else p.mm32.size
        prog += -(-p.num_groups // block_g)
    return desc, prog, scr_base, grp_base, mm_base


# ----------------------------------------------------------------------------- the kernel


def check_symbols(symbols: Sequence[torch.Tensor], plans: Sequence[StreamPlan]) -> torch.device:
    if not 1 <= len(plans) <= MAX_STREAMS or len(symbols) != len(plans):
        raise CodecError(f"a launch encodes 1 to {MAX_STREAMS} streams, one symbol tensor each")
    device = symbols[0].device
    for sym, p in zip(symbols, plans, strict=True):
        if sym.dtype != torch.uint8 or not sym.is_contiguous() or sym.numel() != p.num_symbols:
            raise CodecError(f"symbols must be contiguous uint8 with {p.num_symbols} elements")
        if sym.device != device:
            raise CodecError("all symbols of one launch must be on one device")
    if len({p.table.precision for p in plans}) != 1:
        raise CodecError("all tables of one launch must share their precision")
    return device


def make_outputs(plans: Sequence[StreamPlan], device: torch.device, scr_base, grp_base) -> EncodeOutputs:
    groups = sum(p.num_groups for p in plans)
    return EncodeOutputs(
        scratch=torch.empty(max(1, sum(p.num_symbols for p in plans)), dtype=torch.int16, device=device),
        states=torch.empty(max(1, groups * LANES), dtype=torch.int32, device=device),
        counts=torch.zeros(max(1, groups), dtype=torch.int32, device=device),
        err=torch.zeros(max(1, groups), dtype=torch.int32, device=device),
        scratch_base=list(scr_base),
        group_base=list(grp_base),
    )


def model_maps_tensor(plans: Sequence[StreamPlan], device: torch.device) -> torch.Tensor | None:
    """The non-identity maps of ``plans`` concatenated (int32, in descriptor order), or None."""
    maps = [p.mm32 for p in plans if not p.identity]
    return torch.from_numpy(np.concatenate(maps)).to(device) if maps else None


@dataclass
class EncodedStreams:
    """Finished streams, back to back in one uint8 device buffer (each starts 4-byte aligned)."""

    data: torch.Tensor
    spans: list[tuple[int, int]]  # (byte offset, length) per stream

    def tensors(self) -> list[torch.Tensor]:
        """Each stream as a uint8 view of :attr:`data`."""
        return [self.data[o : o + n] for o, n in self.spans]

    def to_host(self) -> list[np.ndarray]:
        """Each stream as a uint8 numpy array (one device-to-host copy, through pinned memory on CUDA)."""
        if self.data.device.type == "cpu":
            host = self.data
        else:
            host = torch.empty(self.data.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(self.data, non_blocking=True)
            torch.cuda.current_stream(self.data.device).synchronize()
        arr = host.numpy()
        return [arr[o : o + n] for o, n in self.spans]


def _raise_symbol_error(sym: torch.Tensor, plan: StreamPlan) -> None:
    """The CPU encoder's message for the first uncodable symbol (host copy; error path only)."""
    flat = sym.reshape(-1).cpu().numpy()
    rans._raise_encode_error(flat, plan.mm32, plan.dims, plan.table)
    raise CodecError("a symbol has frequency 0 in its model")  # pragma: no cover - the line above raises


def assemble(symbols: Sequence[torch.Tensor], plans: Sequence[StreamPlan], out: EncodeOutputs) -> EncodedStreams:
    """The streams' bytes from a launch's outputs: reads the word counts and error flags (one
    synchronization), raises :class:`CodecError` for an uncodable symbol as ``rans.encode``
    does, then writes headers, states, offsets and gathered words on the device."""
    counts_h = out.counts.cpu().numpy().astype(np.int64)
    err_h = out.err.cpu().numpy()
    device = out.states.device
    spans, pos = [], 0
    offsets_h: list[np.ndarray] = []
    for p, g0 in zip(plans, out.group_base, strict=True):
        cnt = counts_h[g0 : g0 + p.num_groups]
        offs = np.zeros(p.num_groups + 1, dtype=np.int64)
        np.cumsum(cnt, out=offs[1:])
        offsets_h.append(offs)
        W = int(offs[-1])
        total = stream_overhead_bytes(p.num_groups, W) + 2 * W
        spans.append((pos, total))
        pos += total
    for sym, p, g0 in zip(symbols, plans, out.group_base, strict=True):
        if p.num_groups and err_h[g0 : g0 + p.num_groups].any():
            _raise_symbol_error(sym, p)
    data = torch.zeros(max(pos, 4), dtype=torch.uint8, device=device)
    # headers and offsets: packed on the host, one small host-to-device copy, placed on the device
    small = np.zeros(sum(HEADER_BYTES + 4 * (p.num_groups + 1) for p in plans), dtype=np.uint8)
    places = []  # (byte offset in data, offset in small, length)
    at = 0
    for p, (o, _), offs in zip(plans, spans, offsets_h, strict=True):
        G, W = p.num_groups, int(offs[-1])
        rans.pack_header(small, at, p.table, p.ndim, p.dims, p.map_crc, p.group_size, G, W)
        small[at + HEADER_BYTES : at + HEADER_BYTES + 4 * (G + 1)] = offs.astype("<u4").view(np.uint8)
        places += [(o, at, HEADER_BYTES), (o + HEADER_BYTES + 4 * LANES * G, at + HEADER_BYTES, 4 * (G + 1))]
        at += HEADER_BYTES + 4 * (G + 1)
    small_d = torch.from_numpy(small).to(device)
    for o, a, length in places:
        data[o : o + length] = small_d[a : a + length]
    for p, g0, scr0, (o, _), offs in zip(plans, out.group_base, out.scratch_base, spans, offsets_h, strict=True):
        G, W = p.num_groups, int(offs[-1])
        if not G:
            continue
        so = o + HEADER_BYTES
        data[so : so + 4 * LANES * G].view(torch.int32)[:] = out.states[g0 * LANES : (g0 + G) * LANES]
        if not W:
            continue
        wo = so + 4 * LANES * G + 4 * (G + 1)
        # group g's words are scratch[end_g - cnt_g : end_g]; they go to words[offs[g] : offs[g+1]]
        S, n = p.group_size, p.num_symbols
        ends = np.minimum(np.arange(1, G + 1, dtype=np.int64) * S, n)
        shift = torch.from_numpy(scr0 + ends - (offs[1:] - offs[:-1]) - offs[:-1]).to(device)
        cnt = torch.from_numpy(offs[1:] - offs[:-1]).to(device)
        src = torch.repeat_interleave(shift, cnt, output_size=W) + torch.arange(W, device=device)
        data[wo : wo + 2 * W].view(torch.int16)[:] = out.scratch[src]
    return EncodedStreams(data, spans)
