"""Symbol models for the rANS coder: per-context quantized frequency tables.

A *model* is one probability distribution over the alphabet ``0 .. A-1``
(``A <= 256``, uint8 symbols) stored as integer frequencies that sum to
``2**precision``. A :class:`FrequencyTable` holds ``num_models`` of them, one
row each; the codec uses one model per (layer, channel) or per (layer, head,
channel-group). Which model codes which symbol is given by a *model map*:

    symbols ``[B, T, C]`` with ``model_map[B, C]``: symbol ``[b, t, c]`` uses model
    ``model_map[b, c]`` (the ``T`` axis, e.g. tokens, shares its models).
    ``[T, C]`` with ``model_map[C]`` and ``[N]`` with a scalar are the same with
    ``B = 1`` (and ``C = 1``); per-symbol models: symbols ``[1, N]``, map ``[N]``.

:func:`quantize_counts` turns profiled counts into frequencies that never give a
present symbol zero frequency; with ``min_freq >= 1`` (the default) every symbol
of the alphabet stays codable, so values never seen while profiling still
encode (at ``precision - log2(min_freq)`` bits). :func:`ideal_code_bits` is the
code length the entropy coder approaches, the reference for
``entropy_efficiency``.
"""

from __future__ import annotations

import struct
import zlib
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike

from kvstore.codecs import _rans_numba as _k
from kvstore.errors import CodecError, FormatError

MIN_PRECISION = 8
MAX_PRECISION = 16
DEFAULT_PRECISION = 14
MAX_ALPHABET = 256
MAX_MODELS = 1 << 20
#: the decoder finds a slot's symbol from a 2**BUCKET_BITS-entry table per model and a short scan
BUCKET_BITS = 8

_TABLE_MAGIC = b"KVFT"
_TABLE_VERSION = 1
_TABLE_HEADER = struct.Struct("<4sBBBBIHH")  # magic, version, precision, entry bytes, 0, models, alphabet, 0


def _check_precision(precision: int) -> int:
    if isinstance(precision, bool) or not isinstance(precision, (int, np.integer)):
        raise CodecError(f"precision must be an int, got {precision!r}")
    if not MIN_PRECISION <= int(precision) <= MAX_PRECISION:
        raise CodecError(f"precision must be in [{MIN_PRECISION}, {MAX_PRECISION}], got {precision}")
    return int(precision)


def quantize_counts(counts: ArrayLike, precision: int = DEFAULT_PRECISION, *, min_freq: int = 1) -> np.ndarray:
    """Quantize symbol counts ``[num_models, alphabet]`` (or ``[alphabet]``) to frequencies.

    Each returned row (uint32) sums to exactly ``2**precision``. Every symbol gets
    at least ``min_freq``; a symbol with a non-zero count gets at least 1 even
    when ``min_freq == 0``. A row of all-zero counts becomes uniform. The rest of
    the mass is shared in proportion to the counts, and the rounding remainder
    goes to the symbols whose code length it shortens most, which keeps the
    profiled data's code length within a fraction of a percent of its entropy.
    """
    precision = _check_precision(precision)
    c = np.array(counts, dtype=np.float64)  # a copy: normalized in place below
    squeeze = c.ndim == 1
    if squeeze:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] < 1 or c.shape[1] > MAX_ALPHABET:
        raise CodecError(f"counts must be [num_models, alphabet<=256], got shape {np.shape(counts)}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise CodecError("counts must be finite and non-negative")
    if isinstance(min_freq, bool) or not isinstance(min_freq, (int, np.integer)) or min_freq < 0:
        raise CodecError(f"min_freq must be a non-negative int, got {min_freq!r}")
    total = 1 << precision
    alphabet = c.shape[1]
    if alphabet * int(min_freq) > total:
        raise CodecError(f"alphabet {alphabet} x min_freq {min_freq} exceeds 2**{precision}")
    peak = c.max(axis=1)
    c[peak == 0] = 1.0  # no data: uniform
    present = c > 0  # taken before scaling, which may flush relatively tiny counts to 0
    c /= np.where(peak > 0, peak, 1.0)[:, None]  # scale-free, so row sums cannot overflow
    floor = np.where(present, max(int(min_freq), 1), int(min_freq)).astype(np.int64)
    if np.any(floor.sum(axis=1) > total):
        raise CodecError(f"too many present symbols for precision {precision}")
    rest = total - floor.sum(axis=1)
    share = c * (rest / c.sum(axis=1))[:, None]
    f = floor + np.floor(share).astype(np.int64)
    deficit = total - f.sum(axis=1)  # 0 <= deficit <= number of present symbols, up to float rounding
    for r in np.flatnonzero(deficit < 0):  # rounding overshoot (rare): take back from the largest
        while deficit[r] < 0:
            i = int(np.argmax(f[r] - floor[r]))
            f[r, i] -= 1
            deficit[r] += 1
    # give the remainder to the present symbols whose +1 saves the most bits
    gain = np.where(present, c * np.log2((f + 1) / np.maximum(f, 1)), -1.0)
    order = np.argsort(-gain, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(alphabet)[None, :].repeat(len(c), 0), axis=1)
    f += (rank < deficit[:, None]) & present
    if not np.all(f.sum(axis=1) == total):  # pragma: no cover - guarded by construction
        raise AssertionError("quantize_counts: a row does not sum to 2**precision")
    out = f.astype(np.uint32)
    return out[0] if squeeze else out


class FrequencyTable:
    """``num_models`` quantized distributions over ``alphabet`` symbols, each summing to ``2**precision``.

    Immutable. Build one with :meth:`from_counts` (profiling) or from stored
    bytes with :meth:`from_bytes`; :attr:`fingerprint` (CRC-32 of the table) is
    recorded in every rANS stream so decoding with the wrong table fails loudly.
    """

    __slots__ = ("__dict__", "__weakref__", "freqs", "precision")  # __dict__: cached properties

    def __init__(self, freqs: ArrayLike, precision: int = DEFAULT_PRECISION) -> None:
        precision = _check_precision(precision)
        f = np.asarray(freqs)
        if f.ndim == 1:
            f = f[None, :]
        if f.ndim != 2 or not 1 <= f.shape[1] <= MAX_ALPHABET or not 1 <= f.shape[0] <= MAX_MODELS:
            raise CodecError(f"freqs must be [1..{MAX_MODELS} models, 1..256 symbols], got {np.shape(freqs)}")
        if not np.issubdtype(f.dtype, np.integer):
            raise CodecError(f"freqs must be integers, got {f.dtype}")
        f64 = f.astype(np.int64)
        if np.any(f64 < 0) or np.any(f64.sum(axis=1) != (1 << precision)):
            raise CodecError(f"every row of freqs must be >= 0 and sum to 2**{precision}")
        arr = np.ascontiguousarray(f64.astype(np.uint32))
        arr.setflags(write=False)
        self.freqs: np.ndarray = arr
        self.precision: int = precision

    @classmethod
    def from_counts(cls, counts: ArrayLike, precision: int = DEFAULT_PRECISION, *, min_freq: int = 1) -> FrequencyTable:
        """Quantize ``counts [num_models, alphabet]`` with :func:`quantize_counts`."""
        return cls(quantize_counts(counts, precision, min_freq=min_freq), precision)

    @property
    def num_models(self) -> int:
        return int(self.freqs.shape[0])

    @property
    def alphabet(self) -> int:
        return int(self.freqs.shape[1])

    @cached_property
    def fingerprint(self) -> int:
        """CRC-32 of the precision byte followed by the frequencies as little-endian uint32."""
        return zlib.crc32(self.freqs.astype("<u4").tobytes(), zlib.crc32(bytes([self.precision])))

    @cached_property
    def code_lengths(self) -> np.ndarray:
        """Bits each (model, symbol) costs under this table: ``precision - log2(freq)``, inf if 0."""
        with np.errstate(divide="ignore"):
            bits = self.precision - np.log2(self.freqs.astype(np.float64))
        bits.setflags(write=False)
        return bits

    @cached_property
    def _encode_entries(self) -> np.ndarray:
        """uint64 [M * A]: ``freq << 32 | cum`` per (model, symbol), the encoder's lookup."""
        f = self.freqs.astype(np.uint64)
        cum = np.cumsum(f, axis=1) - f
        return np.ascontiguousarray(((f << np.uint64(32)) | cum).ravel())

    @cached_property
    def _decode_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(cum uint32 [M, A+1], bucket uint8 [M, 2**min(precision, BUCKET_BITS)]): the decoder's lookups."""
        return _k.build_decode_tables(self.freqs, self.precision, min(self.precision, BUCKET_BITS))

    def to_bytes(self) -> bytes:
        """Serialize: a 16-byte header, then the frequencies row-major, little-endian.

        Entries are uint16 when ``precision <= 15`` and uint32 at 16 (a lone
        symbol may have frequency 65536). See ``README_rans.md``.
        """
        width = 2 if self.precision <= 15 else 4
        head = _TABLE_HEADER.pack(
            _TABLE_MAGIC, _TABLE_VERSION, self.precision, width, 0, self.num_models, self.alphabet, 0
        )
        return head + self.freqs.astype("<u2" if width == 2 else "<u4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> FrequencyTable:
        """Parse :meth:`to_bytes` output; any malformed input raises :class:`FormatError`."""
        buf = memoryview(data).cast("B")
        if len(buf) < _TABLE_HEADER.size:
            raise FormatError("frequency table: truncated header")
        magic, version, precision, width, _, models, alphabet, _ = _TABLE_HEADER.unpack_from(buf)
        if magic != _TABLE_MAGIC or version != _TABLE_VERSION:
            raise FormatError(f"frequency table: bad magic/version {magic!r}/{version}")
        if not MIN_PRECISION <= precision <= MAX_PRECISION or width != (2 if precision <= 15 else 4):
            raise FormatError(f"frequency table: bad precision {precision} / entry width {width}")
        if not 1 <= models <= MAX_MODELS or not 1 <= alphabet <= MAX_ALPHABET:
            raise FormatError(f"frequency table: bad shape {models} x {alphabet}")
        if len(buf) != _TABLE_HEADER.size + models * alphabet * width:
            raise FormatError(
                f"frequency table: {len(buf)} bytes, expected {_TABLE_HEADER.size + models * alphabet * width}"
            )
        freqs = np.frombuffer(buf, dtype="<u2" if width == 2 else "<u4", offset=_TABLE_HEADER.size)
        try:
            return cls(freqs.reshape(models, alphabet), precision)
        except CodecError as exc:
            raise FormatError(f"frequency table: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FrequencyTable)
            and self.precision == other.precision
            and self.freqs.shape == other.freqs.shape
            and bool(np.array_equal(self.freqs, other.freqs))
        )

    def __hash__(self) -> int:
        return self.fingerprint

    def __repr__(self) -> str:
        return f"FrequencyTable(models={self.num_models}, alphabet={self.alphabet}, precision={self.precision})"


def canonical_layout(
    shape: tuple[int, ...], model_map: ArrayLike | int | None
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Map ``(symbols.shape, model_map)`` to ``((B, T, C), model_map int32 [B*C])``.

    ``[N]`` + scalar/None -> ``(1, N, 1)``; ``[T, C]`` + ``[C]`` -> ``(1, T, C)``;
    ``[B, T, C]`` + ``[B, C]`` -> itself. ``None`` means model 0 everywhere.
    """
    ndim = len(shape)
    if not 1 <= ndim <= 3:
        raise CodecError(f"symbols must have 1 to 3 dimensions, got shape {shape}")
    if ndim == 1:
        B, T, C = 1, shape[0], 1
    elif ndim == 2:
        B, T, C = 1, shape[0], shape[1]
    else:
        B, T, C = shape
    if model_map is None:
        mm = np.zeros(B * C, dtype=np.int64)
    else:
        arr = np.asarray(model_map)
        if not np.issubdtype(arr.dtype, np.integer):
            raise CodecError(f"model_map must be integers, got {arr.dtype}")
        expect = shape[:-2] + shape[-1:] if ndim >= 2 else ()
        if arr.shape != expect:
            raise CodecError(f"model_map for symbols {shape} must have shape {expect}, got {arr.shape}")
        mm = arr.astype(np.int64).reshape(B * C)
    return (int(B), int(T), int(C)), mm


def validate_model_map(mm: np.ndarray, num_models: int) -> np.ndarray:
    """``mm`` as contiguous int32 after checking every value is in ``[0, num_models)``."""
    if mm.size and (mm.min() < 0 or mm.max() >= num_models):
        raise CodecError(f"model_map values must be in [0, {num_models})")
    return np.ascontiguousarray(mm, dtype=np.int32)


def count_symbols(
    symbols: ArrayLike, model_map: ArrayLike | int | None, num_models: int, alphabet: int = MAX_ALPHABET
) -> np.ndarray:
    """Histogram ``int64 [num_models, alphabet]`` of ``symbols`` per model (see the module doc)."""
    sym = np.asarray(symbols)
    if sym.dtype != np.uint8:
        raise CodecError(f"symbols must be uint8, got {sym.dtype}")
    if not 1 <= alphabet <= MAX_ALPHABET or not 1 <= num_models <= MAX_MODELS:
        raise CodecError("bad num_models / alphabet")
    (_, T, C), mm = canonical_layout(sym.shape, model_map)
    mm32 = validate_model_map(mm, num_models)
    counts = np.zeros((num_models, alphabet), dtype=np.int64)
    if sym.size:
        bad = _k.count_symbols_kernel(np.ascontiguousarray(sym).reshape(-1), mm32, T, C, counts)
        if bad >= 0:
            raise CodecError(
                f"symbol {int(sym.reshape(-1)[bad])} at flat position {bad} is outside the alphabet {alphabet}"
            )
    return counts


def ideal_code_bits(symbols: ArrayLike, table: FrequencyTable, model_map: ArrayLike | int | None = None) -> float:
    """Sum over symbols of ``precision - log2(freq[model, symbol])``: the information content
    under the stored model, which an ideal entropy coder would emit (inf if a symbol has
    frequency 0). ``entropy_efficiency = ideal_code_bits / (8 * len(stream))``."""
    counts = count_symbols(symbols, model_map, table.num_models, table.alphabet)
    nz = counts > 0
    return float(np.sum(counts[nz] * table.code_lengths[nz]))
