"""Host-side planning of the rANS decode kernels, without Triton: stream checks, decode
tables, launch descriptors, uploads and error reports.

Shared by the Triton launcher (:mod:`kvstore.kernels.rans_decode`) and the pure-torch
reference (:mod:`kvstore.kernels.torch_ops`), so the reference runs where Triton is absent.
The stream format is ``kvstore/codecs/README_rans.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvstore.codecs import rans
from kvstore.codecs.rans import LANES, StreamInfo
from kvstore.codecs.symbol_model import FrequencyTable
from kvstore.errors import CodecError, FormatError
from kvstore.kernels.derived import derived

MODE_SYMBOL, MODE_AFFINE, MODE_ROWSCALE = 0, 1, 2
ZERO = 128

# per-group error bits written by the kernel (and by the torch reference)
ERR_OFFSETS = 1  # word offsets not monotonic from 0 to W, or a group with more words than symbols
ERR_INIT_STATE = 2  # an initial state below 2**16
ERR_OVERRUN = 4  # a lane needed a word past its group's end
ERR_WORDS_LEFT = 8  # the group's words were not all consumed
ERR_FINAL_STATE = 16  # a lane did not end at 2**16
ERR_BITS = {
    ERR_OFFSETS: "group word offsets are not monotonic from 0 to the word count, or a group holds more words than symbols",
    ERR_INIT_STATE: "a lane's initial state is below 2**16",
    ERR_OVERRUN: "a lane needs more words than its group holds",
    ERR_WORDS_LEFT: "a group's words were not all consumed",
    ERR_FINAL_STATE: "a lane did not end at the initial state",
}

# stream descriptor columns (int64 [n_streams, NDESC])
(D_G, D_S, D_N, D_TC, D_C, D_STATES, D_OFFS, D_WORDS, D_W, D_MM, D_MODE, D_OUT, D_ROW, D_TAB, D_PROG0, D_ERR,
 D_INC_C, D_INC_R, D_CARRY_R, D_ROWINC, D_IDENT) = range(21)
NDESC = 24
MAX_STREAMS = 3


def describe_errors(err: np.ndarray) -> str:
    """A message naming the first failing group and its errors."""
    bad = np.flatnonzero(err)
    g = int(bad[0])
    bits = int(err[g])
    what = "; ".join(msg for bit, msg in ERR_BITS.items() if bits & bit) or f"error {bits}"
    return f"rANS stream is corrupt: {what} (group {g}, {bad.size} bad group(s))"


# ----------------------------------------------------------------------------- lookup tables


@dataclass(frozen=True)
class DecodeTables:
    """A :class:`FrequencyTable`'s lookup structures on one device.

    ``bucket`` uint8 [M, 2**bb]: the symbol owning the first slot of each bucket of
    ``2**(P - bb)`` slots, ``bb = min(P, 8)``. ``cf`` [M, 256]: int32 ``cum | freq << 16``
    (P <= 15) or int64 ``cum | freq << 32`` (P = 16); symbols past the alphabet have
    ``cum = 2**P, freq = 0``. ``cf3`` [M, 256] int64 (P <= 15 only, else None):
    ``cum[s] | freq[s] << 16 | freq[s+1] << 32 | freq[s+2] << 48``.
    """

    precision: int
    num_models: int
    alphabet: int
    bucket: torch.Tensor
    cf: torch.Tensor
    cf3: torch.Tensor | None

    @property
    def bucket_bits(self) -> int:
        return min(self.precision, 8)

    def coarse_bucket(self, bits: int) -> torch.Tensor:
        """``bucket`` with ``2**bits`` buckets per model (``bits <= bucket_bits``), cached."""
        bits = min(int(bits), self.bucket_bits)
        if bits == self.bucket_bits:
            return self.bucket
        cache = self.__dict__.setdefault("_coarse", {})  # frozen dataclass: a plain dict entry
        if bits not in cache:
            cache[bits] = self.bucket[:, :: 1 << (self.bucket_bits - bits)].contiguous()
        return cache[bits]


def _build_tables_numpy(table: FrequencyTable) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    P, M, A = table.precision, table.num_models, table.alphabet
    _, bucket = table._decode_entries  # (cum uint32 [M, A+1], bucket uint8 [M, 2**min(P, 8)]), cached by the table
    freq = np.zeros((M, 256 + 2), dtype=np.int64)
    freq[:, :A] = table.freqs
    cum = np.full((M, 256 + 2), 1 << P, dtype=np.int64)
    cum[:, :A] = np.cumsum(table.freqs, axis=1, dtype=np.int64) - table.freqs
    shift = 16 if P <= 15 else 32
    cf = (cum[:, :256] | (freq[:, :256] << shift)).astype(np.int32 if P <= 15 else np.int64)
    cf3 = None
    if P <= 15:
        cf3 = cum[:, :256] | (freq[:, :256] << 16) | (freq[:, 1:257] << 32) | (freq[:, 2:258] << 48)
        cf3 = cf3.astype(np.uint64).view(np.int64)
    return np.ascontiguousarray(bucket), np.ascontiguousarray(cf), cf3


def decode_tables(table: FrequencyTable, device: torch.device | str) -> DecodeTables:
    """The GPU lookup structures of ``table`` on ``device``, built once per table and device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache = derived(table, "gpu_tables")
    hit = cache.get(device)
    if hit is None:
        bucket, cf, cf3 = _build_tables_numpy(table)
        hit = DecodeTables(
            table.precision, table.num_models, table.alphabet,
            torch.from_numpy(bucket).to(device), torch.from_numpy(cf).to(device),
            None if cf3 is None else torch.from_numpy(cf3).to(device),
        )  # fmt: skip
        cache[device] = hit
    return hit


# ----------------------------------------------------------------------------- host-side checks


def check_stream(
    data: bytes | bytearray | memoryview | np.ndarray,
    table: FrequencyTable,
    model_map=None,
    *,
    shape: tuple[int, ...] | None = None,
    max_symbols: int | None = None,
) -> tuple[StreamInfo, np.ndarray]:
    """The host-side checks of :func:`kvstore.codecs.rans.decode` (header, table, map, shape, padding).

    ``data`` is the whole stream or at least its header; the padding check runs only
    when the whole stream is given. Returns the header and the model map as int32 [B*C].
    """
    kw = {} if max_symbols is None else {"max_symbols": max_symbols}
    _, info, _, mm32 = rans.check_stream(data, table, model_map, shape=shape, **kw)
    return info, mm32


# ----------------------------------------------------------------------------- launch description


@dataclass
class LaunchStream:
    """One stream of a launch: where its bytes are and what to do with its symbols.

    ``offset``: byte offset of the stream in the launch's data buffer (a multiple of 4).
    ``table``: index into the launch's tables. ``mm_offset``: where its int32 model map
    starts in the launch's concatenated map (ignored when ``identity``: ``model_map[i] == i``).
    ``mode`` / ``out_base`` / ``row_base``: the epilogue (module doc). Its per-group error
    words follow those of the streams before it in the launch's error buffer.
    """

    info: StreamInfo
    offset: int
    table: int
    mode: int
    out_base: int
    mm_offset: int = 0
    identity: bool = False
    row_base: int = 0


@dataclass(frozen=True)
class DecodeConfig:
    """Kernel variant: ``lookup`` (0 bucket + scan, 1 bucket + 3-symbol entries, 2 binary
    search), ``ballot`` (word indices by PTX vote/popc instead of a scan; CUDA only),
    ``block_g`` groups per program, ``num_warps``, ``prefetch`` (PTX prefetch of each group's
    words ~100 words ahead; CUDA only), ``bucket_bits`` (<= 8: buckets per model, log2),
    ``rows`` (launches whose streams all have one model per row, identity maps and the
    uint8 epilogue, as a channel-major kvcodec chunk's, take a loop without the model-map,
    channel-counter and epilogue branches), ``aligned`` (rows launches with ``block_g == 1``
    whose rows are all multiples of 32 long, as a kvcodec chunk's are at 32-token multiples:
    a loop walking one row at a time, with the table rows found once per row and no lane
    masks). ``ballot`` applies only with ``block_g == 1`` (with two groups per thread the
    vote gives wrong word indices). The default is the fastest bit-exact variant; figures
    in ``benchmarks/kernels_notes.md``."""

    lookup: int = 1
    ballot: bool = True
    block_g: int = 1
    num_warps: int = 1
    prefetch: bool = True
    bucket_bits: int = 8
    rows: bool = True
    aligned: bool = True


DEFAULT_CONFIG = DecodeConfig()


def build_descriptors(streams: list[LaunchStream], block_g: int) -> tuple[np.ndarray, int, int]:
    """int64 [len(streams), NDESC] descriptors, the number of programs, the number of error words."""
    desc = np.zeros((max(1, len(streams)), NDESC), dtype=np.int64)
    prog = 0
    errs = 0
    for i, st in enumerate(streams):
        info = st.info
        if st.offset % 4:
            raise CodecError("stream offsets in the data buffer must be multiples of 4")
        _, T, C = info.dims
        TC = T * C
        desc[i, D_G] = info.num_groups
        desc[i, D_S] = info.group_size
        desc[i, D_N] = info.num_symbols
        desc[i, D_TC] = TC
        desc[i, D_C] = C
        desc[i, D_STATES] = (st.offset + info.states_offset) // 4
        desc[i, D_OFFS] = (st.offset + info.offsets_offset) // 4
        desc[i, D_WORDS] = (st.offset + info.words_offset) // 2
        desc[i, D_W] = info.num_words
        desc[i, D_MM] = st.mm_offset
        desc[i, D_MODE] = st.mode
        desc[i, D_OUT] = st.out_base
        desc[i, D_ROW] = st.row_base
        desc[i, D_TAB] = st.table
        desc[i, D_PROG0] = prog
        desc[i, D_ERR] = errs
        errs += info.num_groups
        if C and TC:
            desc[i, D_INC_C] = LANES % C
            desc[i, D_ROWINC] = LANES // C
            desc[i, D_INC_R] = LANES % TC
            desc[i, D_CARRY_R] = LANES // TC
        desc[i, D_IDENT] = int(st.identity)
        prog += -(-info.num_groups // block_g)
    return desc, prog, errs


# ----------------------------------------------------------------------------- the kernel


def upload_streams(
    raws: list[np.ndarray], device: torch.device, *, pinned: bool = True
) -> tuple[torch.Tensor, list[int]]:
    """Copy host streams into one device buffer (64-byte aligned each); returns it and their offsets."""
    offsets, total = [], 0
    for r in raws:
        offsets.append(total)
        total += -(-len(r) // 64) * 64
    host = torch.empty(max(total, 4), dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
    hn = host.numpy()
    for r, o in zip(raws, offsets, strict=True):
        hn[o : o + len(r)] = r
        hn[o + len(r) : o + -(-len(r) // 64) * 64] = 0
    return host.to(device, non_blocking=True), offsets


def check_errors(err: torch.Tensor) -> None:
    """Raise :class:`FormatError` if any group reported an error (one synchronization)."""
    if bool(err.any()):
        raise FormatError(describe_errors(err.cpu().numpy()))
