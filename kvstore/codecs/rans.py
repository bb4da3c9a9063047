"""Interleaved rANS entropy coder for uint8 symbols with per-context models.

The stream is built for parallel decoding: symbols are cut into *groups* of
``group_size`` consecutive positions, each coded by 32 interleaved *lanes*
(one GPU warp, one thread per lane) that share one stream of 16-bit words, so a
group decodes independently of every other and a warp's loads and stores
coalesce. States are 32 bits in ``[2**16, 2**32)``, renormalized 16 bits at a
time; frequencies have ``precision`` bits (8..16). The byte layout is in
``README_rans.md``.

Usage::

    table = FrequencyTable.from_counts(count_symbols(sym, model_map, M, A), precision=14)
    data = encode(sym, table, model_map)          # sym: uint8 [B, T, C], model_map: [B, C]
    assert (decode(data, table, model_map) == sym).all()

On the CPU both directions run Numba kernels (no GIL held) over groups on a few
threads (throughput in ``benchmarks/RESULTS.md``).
Malformed streams raise :class:`~kvstore.errors.FormatError`; every header
field is checked before anything is allocated and every lane must end exactly
at the initial state after consuming exactly its group's words.
"""

from __future__ import annotations

import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from kvstore.codecs import _rans_numba as _k
from kvstore.codecs.symbol_model import (
    BUCKET_BITS,
    MAX_ALPHABET,
    MAX_MODELS,
    MAX_PRECISION,
    MIN_PRECISION,
    FrequencyTable,
    canonical_layout,
    validate_model_map,
)
from kvstore.decode_threads import usable_cpus
from kvstore.errors import CodecError, FormatError

__all__ = [
    "HEADER_BYTES",
    "LANES",
    "MAX_SYMBOLS",
    "StreamInfo",
    "decode",
    "decode_rows_through_lut",
    "default_group_size",
    "encode",
    "limit_threads",
    "read_header",
    "stream_overhead_bytes",
]

MAGIC = b"KVRA"
VERSION = 1
LANES = _k.LANES
STATE_LOW = _k.STATE_LOW
#: magic, version, precision, lanes, ndim, B, T, C, models, alphabet, 0, table crc, map crc, S, G, W
_HEADER = struct.Struct("<4sBBBBIIIIHHIIIII")
HEADER_BYTES = _HEADER.size  # 48
MAX_SYMBOLS = (1 << 31) - 1
#: default target of symbols per lane: ~33 bits of overhead per lane is <0.5% at >=2 bits/symbol
DEFAULT_LANE_SYMBOLS = 4096
_MIN_PARALLEL_SYMBOLS = 1 << 16

_KERNEL_ERRORS = {
    _k.ERR_WORDS_OVERRUN: "a lane needs more words than its group holds",
    _k.ERR_WORDS_LEFT: "a group's words were not all consumed",
    _k.ERR_FINAL_STATE: "a lane did not end at the initial state",
}


@dataclass(frozen=True)
class StreamInfo:
    """The validated header of a stream and where its sections lie (byte offsets)."""

    precision: int
    ndim: int
    dims: tuple[int, int, int]  # canonical (B, T, C)
    num_models: int
    alphabet: int
    table_crc: int
    map_crc: int
    group_size: int
    num_groups: int
    num_words: int
    states_offset: int
    offsets_offset: int
    words_offset: int
    total_bytes: int

    @property
    def num_symbols(self) -> int:
        B, T, C = self.dims
        return B * T * C

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the symbols had when encoded (1-D, 2-D or 3-D)."""
        B, T, C = self.dims
        return ((T,), (T, C), (B, T, C))[self.ndim - 1]


def default_group_size(num_symbols: int, lane_symbols: int = DEFAULT_LANE_SYMBOLS) -> int:
    """Symbols per group for a stream of ``num_symbols``: about ``lane_symbols`` per lane.

    Each group costs 132 bytes beyond its payload (32 final states + one offset),
    about 33 bits per lane, i.e. ``33 / (lane_symbols * bits_per_symbol)`` of the
    stream: 0.4% at the default 4096 and 2 bits/symbol. Smaller values give a GPU
    more groups to decode in parallel at a proportional cost in size.
    """
    if num_symbols <= 0:
        return 0
    if lane_symbols < 1:
        raise CodecError(f"lane_symbols must be >= 1, got {lane_symbols}")
    groups = max(1, int(num_symbols / (LANES * lane_symbols) + 0.5))
    per = -(-num_symbols // groups)
    return -(-per // LANES) * LANES


def stream_overhead_bytes(num_groups: int, num_words: int) -> int:
    """Bytes of a stream that are not coded words: header, states, offsets, padding."""
    return HEADER_BYTES + 4 * LANES * num_groups + 4 * (num_groups + 1) + 2 * (num_words & 1)


def map_crc(mm32: np.ndarray) -> int:
    """The CRC32 of a stream's int32 model map, as its header records it."""
    return zlib.crc32(mm32.astype("<u4").tobytes())


def stream_layout(
    shape: tuple[int, ...], table: FrequencyTable, model_map: ArrayLike | int | None = None,
    group_size: int | None = None,
) -> tuple[tuple[int, int, int], np.ndarray, int, int]:  # fmt: skip
    """The checks every encoder (CPU or GPU) makes on a stream's shape, model map and group
    size: ``(dims (B, T, C), int32 model map, group size, number of groups)``."""
    if not isinstance(table, FrequencyTable):
        raise CodecError(f"table must be a FrequencyTable, got {type(table).__name__}")
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape)) if shape else 1
    if any(d >= 1 << 32 for d in shape) or n > MAX_SYMBOLS:
        raise CodecError(f"at most {MAX_SYMBOLS} symbols per stream, got {n}")
    dims, mm = canonical_layout(shape, model_map)
    mm32 = validate_model_map(mm, table.num_models)
    if group_size is None:
        S = default_group_size(n)
    else:
        S = int(group_size)
        if S < LANES or S % LANES or S > MAX_SYMBOLS:
            raise CodecError(f"group_size must be a positive multiple of {LANES}, got {group_size}")
        if n == 0:
            S = 0
    return dims, mm32, S, (-(-n // S) if n else 0)


def pack_header(out: np.ndarray, offset: int, table: FrequencyTable, ndim: int, dims: tuple[int, int, int],
                crc: int, group_size: int, num_groups: int, num_words: int) -> None:
    """Write a stream's header into ``out`` (uint8) at ``offset``."""
    B, T, C = dims
    _HEADER.pack_into(
        out, offset, MAGIC, VERSION, table.precision, LANES, ndim, B, T, C,
        table.num_models, table.alphabet, 0, table.fingerprint, crc, group_size, num_groups, num_words,
    )  # fmt: skip


_THREAD_LIMIT: int | None = None


def limit_threads(threads: int | None) -> int | None:
    """Cap the threads every encode and decode uses (``None``: one per available CPU, the
    default); returns the previous cap. For callers that run several decodes side by side,
    and for measuring the coder per core."""
    global _THREAD_LIMIT
    if threads is not None and (type(threads) is not int or threads < 1):
        raise CodecError(f"threads must be a positive int or None, got {threads!r}")
    previous, _THREAD_LIMIT = _THREAD_LIMIT, threads
    return previous


def _thread_count(threads: int | None, groups: int, symbols: int) -> int:
    if symbols < _MIN_PARALLEL_SYMBOLS or groups < 2:
        return 1
    n = usable_cpus() if threads is None else int(threads)
    if _THREAD_LIMIT is not None:
        n = min(n, _THREAD_LIMIT)
    return max(1, min(n, groups))


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _run_ranges(fn, groups: int, threads: int) -> None:
    """Call ``fn(g0, g1)`` over ``threads`` contiguous ranges of ``range(groups)``."""
    if threads <= 1:
        fn(0, groups)
        return
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < threads:
            _POOL_SIZE = max(threads, usable_cpus())
            _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="kvstore-rans")
        pool = _POOL
    bounds = [groups * i // threads for i in range(threads + 1)]
    futures = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(threads) if bounds[i] < bounds[i + 1]]
    for fut in futures:
        fut.result()


def encode(
    symbols: ArrayLike,
    table: FrequencyTable,
    model_map: ArrayLike | int | None = None,
    *,
    group_size: int | None = None,
    threads: int | None = None,
) -> bytes:
    """Entropy-code uint8 ``symbols`` (1-D, 2-D or 3-D) under ``table``.

    ``model_map`` picks the model of every symbol (see :mod:`~kvstore.codecs.symbol_model`):
    ``[B, T, C]`` symbols with a ``[B, C]`` map, ``[T, C]`` with ``[C]``, ``[N]``
    with a scalar; ``None`` is model 0. ``group_size`` (a multiple of 32) defaults
    to :func:`default_group_size`. Raises :class:`CodecError` for a symbol outside
    the alphabet or with zero frequency in its model.
    """
    sym = np.asarray(symbols)
    if sym.dtype != np.uint8:
        raise CodecError(f"symbols must be uint8, got {sym.dtype}")
    dims, mm32, S, G = stream_layout(sym.shape, table, model_map, group_size)
    n = int(sym.size)
    flat = np.ascontiguousarray(sym).reshape(-1)
    states = np.empty(G * LANES, dtype=np.uint32)
    counts = np.zeros(G, dtype=np.int64)
    errs = np.zeros(G, dtype=np.int64)
    scratch = np.empty(n, dtype=np.uint16)
    B, T, C = dims
    enc = table._encode_entries
    nthreads = _thread_count(threads, G, n)
    if G:
        _run_ranges(
            lambda g0, g1: _k.encode_groups(
                flat, mm32, T, C, enc, table.alphabet, table.precision, S, g0, g1, scratch, states, counts, errs
            ),
            G,
            nthreads,
        )
    if errs.any():
        _raise_encode_error(flat, mm32, dims, table)
    W = int(counts.sum())
    total = stream_overhead_bytes(G, W) + 2 * W
    out = np.zeros(total, dtype=np.uint8)
    pack_header(out, 0, table, sym.ndim, dims, map_crc(mm32), S, G, W)
    so = HEADER_BYTES
    oo = so + 4 * LANES * G
    wo = oo + 4 * (G + 1)
    out[so:oo].view("<u4")[:] = states
    offsets = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out[oo:wo].view("<u4")[:] = offsets
    words = out[wo : wo + 2 * W].view("<u2")
    if G:
        _run_ranges(lambda g0, g1: _k.gather_words(scratch, S, n, g0, g1, offsets, words), G, nthreads)
    return out.tobytes()


def _raise_encode_error(flat: np.ndarray, mm32: np.ndarray, dims: tuple[int, int, int], table: FrequencyTable) -> None:
    _, T, C = dims
    bad = np.flatnonzero(flat >= table.alphabet)
    if bad.size:
        p = int(bad[0])
        raise CodecError(f"symbol {int(flat[p])} at flat position {p} is outside the alphabet {table.alphabet}")
    pos = np.arange(flat.size, dtype=np.int64)
    models = mm32[(pos // (T * C)) * C + pos % C]
    zero = np.flatnonzero(table.freqs[models, flat] == 0)
    p = int(zero[0]) if zero.size else -1
    raise CodecError(
        f"symbol {int(flat[p])} at flat position {p} has frequency 0 in model {int(models[p])}; "
        "build the table with min_freq >= 1 to keep every symbol codable"
    )


def read_header(data: bytes | bytearray | memoryview | np.ndarray, *, max_symbols: int = MAX_SYMBOLS) -> StreamInfo:
    """Parse and validate a stream's header and section sizes; reads nothing past the header.

    Checks magic, version, lane count, precision, shape (``B*T*C <= max_symbols``),
    model/alphabet bounds, group size and count, word count (at most one per
    symbol) and that the byte length is exactly what those imply.
    """
    buf = as_bytes(data)
    if len(buf) < HEADER_BYTES:
        raise FormatError(f"rANS stream: {len(buf)} bytes, shorter than the {HEADER_BYTES}-byte header")
    (magic, version, precision, lanes, ndim, B, T, C, models, alphabet, reserved, tcrc, mcrc, S, G, W) = (
        _HEADER.unpack_from(buf)
    )
    if magic != MAGIC:
        raise FormatError(f"rANS stream: bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise FormatError(f"rANS stream: unsupported version {version}")
    if lanes != LANES or reserved != 0:
        raise FormatError(f"rANS stream: bad lane count {lanes} or reserved field {reserved}")
    if not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise FormatError(f"rANS stream: bad precision {precision}")
    if not 1 <= ndim <= 3 or (ndim < 3 and B != 1) or (ndim < 2 and C != 1):
        raise FormatError(f"rANS stream: bad dims ndim={ndim} ({B}, {T}, {C})")
    n = B * T * C
    if n > min(max_symbols, MAX_SYMBOLS):
        raise FormatError(f"rANS stream: {n} symbols exceeds the cap {min(max_symbols, MAX_SYMBOLS)}")
    if not 1 <= models <= MAX_MODELS or not 1 <= alphabet <= MAX_ALPHABET:
        raise FormatError(f"rANS stream: bad table shape {models} x {alphabet}")
    if n == 0:
        if S or G or W:
            raise FormatError("rANS stream: an empty stream must have no groups or words")
    else:
        if S < LANES or S % LANES:
            raise FormatError(f"rANS stream: bad group size {S}")
        if G != -(-n // S):
            raise FormatError(f"rANS stream: {G} groups for {n} symbols of group size {S}")
        if W > n:
            raise FormatError(f"rANS stream: {W} words for {n} symbols")
    total = stream_overhead_bytes(G, W) + 2 * W
    if len(buf) != total:
        raise FormatError(f"rANS stream: {len(buf)} bytes, header implies {total} (truncated or padded)")
    so = HEADER_BYTES
    oo = so + 4 * LANES * G
    wo = oo + 4 * (G + 1)
    return StreamInfo(precision, ndim, (B, T, C), models, alphabet, tcrc, mcrc, S, G, W, so, oo, wo, total)


def check_stream(
    data: bytes | bytearray | memoryview | np.ndarray,
    table: FrequencyTable,
    model_map: ArrayLike | int | None = None,
    *,
    shape: tuple[int, ...] | None = None,
    max_symbols: int = MAX_SYMBOLS,
) -> tuple[np.ndarray, StreamInfo, tuple[int, int, int], np.ndarray]:
    """The checks every decoder (CPU or GPU) makes before decoding a stream: its header,
    its shape, that it was coded with this table and model map, and zero padding after
    the words (when the whole stream is given). Returns the stream as uint8, its header,
    its canonical ``(B, T, C)`` and the model map as int32 ``[B*C]``."""
    if not isinstance(table, FrequencyTable):
        raise CodecError(f"table must be a FrequencyTable, got {type(table).__name__}")
    raw = as_bytes(data)
    info = read_header(raw, max_symbols=max_symbols)
    if shape is not None and tuple(int(d) for d in shape) != info.shape:
        raise FormatError(f"rANS stream holds symbols of shape {info.shape}, expected {tuple(shape)}")
    if (info.num_models, info.alphabet, info.precision) != (table.num_models, table.alphabet, table.precision):
        raise FormatError(
            f"rANS stream was coded with a {info.num_models}x{info.alphabet} table at precision {info.precision}, "
            f"got {table!r}"
        )
    if info.table_crc != table.fingerprint:
        raise FormatError("rANS stream was coded with a different frequency table (fingerprint mismatch)")
    try:
        dims, mm = canonical_layout(info.shape, model_map)
    except CodecError as exc:
        raise FormatError(f"rANS stream: model_map does not fit the stream's shape {info.shape}: {exc}") from None
    mm32 = validate_model_map(mm, table.num_models)
    if map_crc(mm32) != info.map_crc:
        raise FormatError("rANS stream was coded with a different model_map (checksum mismatch)")
    if np.any(raw[info.words_offset + 2 * info.num_words :]):
        raise FormatError("rANS stream: non-zero padding after the words")
    return raw, info, dims, mm32


@dataclass(frozen=True)
class _Sections:
    """A validated stream's arrays, ready for the decode kernels."""

    info: StreamInfo
    dims: tuple[int, int, int]
    model_map: np.ndarray
    words: np.ndarray
    states: np.ndarray
    offsets: np.ndarray


def _sections(data, table: FrequencyTable, model_map, shape, max_symbols: int) -> _Sections:
    raw, info, dims, mm32 = check_stream(data, table, model_map, shape=shape, max_symbols=max_symbols)
    n, S, G, W = info.num_symbols, info.group_size, info.num_groups, info.num_words
    states = _u32(raw, info.states_offset, G * LANES)
    offsets = _u32(raw, info.offsets_offset, G + 1).astype(np.int64)
    words = raw[info.words_offset : info.words_offset + 2 * W].view("<u2")
    if not words.dtype.isnative or words.ctypes.data % 2:
        words = words.astype(np.uint16)
    if W == 0:  # the kernels read a (clamped) word before checking whether they needed it
        words = np.zeros(1, dtype=np.uint16)
    if np.any(states < STATE_LOW):
        raise FormatError("rANS stream: a lane's initial state is below 2**16")
    if offsets[0] != 0 or offsets[-1] != W or np.any(np.diff(offsets) < 0):
        raise FormatError("rANS stream: group word offsets are not monotonic from 0 to the word count")
    group_syms = np.minimum(S, n - S * np.arange(G, dtype=np.int64))
    if np.any(np.diff(offsets) > group_syms):
        raise FormatError("rANS stream: a group holds more words than symbols")
    return _Sections(info, dims, mm32, words, states, offsets)


def _run_decode(sec: _Sections, table: FrequencyTable, threads: int | None, kernel) -> None:
    """Run ``kernel(g0, g1, errs, cum, bucket, bucket_bits)`` over the stream's groups; raise on any group error."""
    info = sec.info
    cum, bucket = table._decode_entries
    kb = min(table.precision, BUCKET_BITS)
    errs = np.zeros(info.num_groups, dtype=np.int64)
    _run_ranges(lambda g0, g1: kernel(g0, g1, errs, cum, bucket, kb), info.num_groups,
                _thread_count(threads, info.num_groups, info.num_symbols))  # fmt: skip
    if errs.any():
        g = int(np.flatnonzero(errs)[0])
        raise FormatError(f"rANS stream is corrupt: {_KERNEL_ERRORS.get(int(errs[g]), 'error')} (group {g})")


def decode(
    data: bytes | bytearray | memoryview | np.ndarray,
    table: FrequencyTable,
    model_map: ArrayLike | int | None = None,
    *,
    shape: tuple[int, ...] | None = None,
    max_symbols: int = MAX_SYMBOLS,
    threads: int | None = None,
) -> np.ndarray:
    """Decode a stream made by :func:`encode` with the same ``table`` and ``model_map``.

    Returns uint8 symbols of the encoded shape. ``shape`` (if given) must equal
    it and ``max_symbols`` caps it; both are checked before anything is
    allocated. Raises :class:`FormatError` for any malformed, truncated or
    corrupted stream: bad header fields or sizes, another table or model map,
    non-zero padding, a lane that needs more words than its group holds, a group
    that leaves words unread, or a lane that does not end at the initial state.
    """
    sec = _sections(data, table, model_map, shape, max_symbols)
    info, (_, T, C) = sec.info, sec.dims
    n = info.num_symbols
    out = np.empty(n, dtype=np.uint8)
    if n:
        _run_decode(sec, table, threads, lambda g0, g1, errs, cum, bucket, kb: _k.decode_groups_kernel(table.precision, kb)(
            sec.words, sec.states, sec.offsets, sec.model_map, T, C, cum, bucket, info.group_size, n, g0, g1, out,
            errs))  # fmt: skip
    return out.reshape(info.shape)


def decode_rows_through_lut(
    data: bytes | bytearray | memoryview | np.ndarray,
    table: FrequencyTable,
    *,
    rows: int,
    tokens: int,
    row_width: int,
    lut: np.ndarray,
    out: np.ndarray,
    token_lut: np.ndarray | None = None,
    threads: int | None = None,
) -> None:
    """Decode a stream of ``[rows, tokens, 1]`` symbols, one model per row (the model map
    ``arange(rows)``), straight into ``out`` ``[rows // row_width, tokens, row_width]``
    (any strides): the symbol ``s`` of row ``r = i * row_width + d`` and token ``t`` becomes
    ``out[i, t, d] = lut[k, s]``, ``k`` being the row ``r`` (one lookup row per stream row)
    or, given ``token_lut``, ``token_lut[i, t]``.

    Entropy decoding, dequantization (``lut`` holds each symbol's value) and the transpose
    to token-major in one pass. Stream checks and errors as :func:`decode`; the lookup
    arguments are checked too (:class:`CodecError`)."""
    groups = rows // row_width if row_width > 0 else 0
    if row_width <= 0 or rows % row_width or out.ndim != 3 or out.shape != (groups, tokens, row_width):
        raise CodecError(f"output {out.shape} does not fit {rows} rows of {tokens} symbols, {row_width} per group")
    if lut.ndim != 2 or not lut.shape[0] or lut.shape[1] < table.alphabet or lut.dtype != out.dtype:
        raise CodecError(f"lookup table {lut.dtype}{lut.shape} does not cover {table.alphabet} symbols of {out.dtype}")
    if token_lut is None:
        if lut.shape[0] < rows:
            raise CodecError(f"the lookup table needs a row for each of the {rows} rows, has {lut.shape[0]}")
        token_lut = np.zeros((0, 0), dtype=np.uint8)
    else:
        token_lut = np.asarray(token_lut)
        if token_lut.shape != (groups, tokens) or token_lut.dtype != np.uint8 or lut.shape[0] < 256:
            raise CodecError(f"token_lut must be uint8 [{groups}, {tokens}] over a lookup table of 256 rows")
    sec = _sections(data, table, np.arange(rows).reshape(rows, 1), (rows, tokens, 1), MAX_SYMBOLS)
    n = sec.info.num_symbols
    if n:
        _run_decode(sec, table, threads, lambda g0, g1, errs, cum, bucket, kb: _k.decode_rows_kernel(table.precision, kb)(
            sec.words, sec.states, sec.offsets, sec.model_map, tokens, cum, bucket, sec.info.group_size, n, g0, g1,
            row_width, lut, token_lut, out, errs))  # fmt: skip


def as_bytes(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """A read-only flat uint8 view of any contiguous bytes-like object (no copy)."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"rANS stream: expected contiguous bytes, got {type(data).__name__}: {exc}") from None


def _u32(raw: np.ndarray, offset: int, count: int) -> np.ndarray:
    arr = raw[offset : offset + 4 * count].view("<u4")
    if not arr.dtype.isnative or arr.ctypes.data % 4:
        arr = arr.astype(np.uint32)
    return arr
