"""The rANS entropy coder and its symbol models: round trips, efficiency, corrupt streams."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.codecs import rans
from kvstore.codecs.rans import HEADER_BYTES, LANES, decode, default_group_size, encode, read_header
from benchmarks.rans import synthetic
from kvstore.codecs.rans_lockstep import lockstep_decode
from kvstore.codecs.symbol_model import (
    FrequencyTable,
    canonical_layout,
    count_symbols,
    ideal_code_bits,
    quantize_counts,
)
from kvstore.errors import CodecError, FormatError


def roundtrip(sym, table, model_map=None, **kw) -> bytes:
    data = encode(sym, table, model_map, **kw)
    out = decode(data, table, model_map)
    assert out.dtype == np.uint8 and out.shape == np.shape(sym)
    np.testing.assert_array_equal(out, sym)
    return data


def table_for(sym, model_map, models, alphabet=256, precision=14, min_freq=1) -> FrequencyTable:
    return FrequencyTable.from_counts(count_symbols(sym, model_map, models, alphabet), precision, min_freq=min_freq)


# ---------------------------------------------------------------- symbol models


def test_quantize_counts_sums_and_floors():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, (50, 40)) * (rng.random((50, 40)) < 0.5)
    counts[3] = 0  # an empty row -> uniform
    counts[4] = 0
    counts[4, 7] = 10**9  # a single present symbol
    counts[5, :] = 1
    counts[5, 0] = 10**12  # extreme skew
    for precision in (8, 12, 14, 16):
        for min_freq in (0, 1, 2):
            f = quantize_counts(counts, precision, min_freq=min_freq)
            assert f.dtype == np.uint32 and f.shape == counts.shape
            assert np.all(f.sum(axis=1) == 1 << precision)
            assert np.all(f[counts > 0] >= 1)
            assert np.all(f >= min_freq)
            assert np.all(f[3] >= 1) and f[3].max() - f[3].min() <= 1
            if min_freq == 0:
                assert f[4, 7] == 1 << precision and np.all(np.delete(f[4], 7) == 0)


def test_quantize_counts_close_to_entropy():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(16, 0.5), size=20)
    counts = np.round(p * 1e6)
    f = quantize_counts(counts, 14)
    q = f / (1 << 14)
    ent = -(counts * np.log2(np.where(counts > 0, counts / counts.sum(1, keepdims=True), 1))).sum()
    cost = -(counts * np.log2(q)).sum()
    assert cost / ent - 1 < 0.002


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0, 1e300, allow_subnormal=True), min_size=1, max_size=256),
    st.integers(8, 16),
    st.sampled_from([0, 1]),
)
def test_quantize_counts_property(counts, precision, min_freq):
    f = quantize_counts(counts, precision, min_freq=min_freq)
    c = np.asarray(counts)
    assert f.sum() == 1 << precision
    assert np.all(f[c > 0] >= 1) and np.all(f >= min_freq)
    if c.sum() > 0 and min_freq == 0:
        assert np.all(f[c == 0] == 0)


def test_quantize_counts_rejects_bad_input():
    with pytest.raises(CodecError):
        quantize_counts([[1, -1]], 12)
    with pytest.raises(CodecError):
        quantize_counts([[1, np.nan]], 12)
    with pytest.raises(CodecError):
        quantize_counts(np.ones((1, 300)), 12)
    with pytest.raises(CodecError):
        quantize_counts([[1, 2]], 7)
    with pytest.raises(CodecError):
        quantize_counts([[1, 2]], 17)
    with pytest.raises(CodecError):
        quantize_counts(np.ones(256), 8, min_freq=2)
    assert quantize_counts([0, 5, 0, 0], 8, min_freq=0).tolist() == [0, 256, 0, 0]


def test_frequency_table_validation_and_bytes():
    t = FrequencyTable.from_counts(np.arange(60).reshape(3, 20), 12)
    again = FrequencyTable.from_bytes(t.to_bytes())
    assert again == t and again.fingerprint == t.fingerprint and hash(again) == hash(t)
    t16 = FrequencyTable([[1 << 16, 0]], 16)  # a lone symbol at precision 16 needs 32-bit entries
    assert FrequencyTable.from_bytes(t16.to_bytes()) == t16
    assert FrequencyTable([[1 << 15, 0]], 15).fingerprint != FrequencyTable([[1 << 15, 0]], 15).fingerprint ^ 1
    with pytest.raises(CodecError):
        FrequencyTable([[1, 2]], 12)  # does not sum to 2**12
    with pytest.raises(CodecError):
        FrequencyTable([[4096.0, 0.0]], 12)
    blob = t.to_bytes()
    for bad in (blob[:10], blob[:-1], blob + b"\0", b"XXXX" + blob[4:]):
        with pytest.raises(FormatError):
            FrequencyTable.from_bytes(bad)
    broken = bytearray(blob)
    broken[16] ^= 1  # first frequency: the row no longer sums to 2**12
    with pytest.raises(FormatError):
        FrequencyTable.from_bytes(bytes(broken))


def test_count_symbols_and_ideal_bits():
    rng = np.random.default_rng(2)
    sym = rng.integers(0, 9, (3, 50, 7)).astype(np.uint8)
    mm = rng.integers(0, 5, (3, 7))
    counts = count_symbols(sym, mm, 5, 9)
    expect = np.zeros((5, 9), np.int64)
    np.add.at(expect, (np.broadcast_to(mm[:, None, :], sym.shape), sym), 1)
    np.testing.assert_array_equal(counts, expect)
    t = FrequencyTable.from_counts(counts, 12)
    direct = np.sum(12 - np.log2(t.freqs[np.broadcast_to(mm[:, None, :], sym.shape), sym].astype(float)))
    assert ideal_code_bits(sym, t, mm) == pytest.approx(direct, rel=1e-12)
    with pytest.raises(CodecError):
        count_symbols(sym, mm, 5, 8)  # symbol 8 outside the alphabet
    with pytest.raises(CodecError):
        count_symbols(sym, mm[:, :3], 5, 9)
    with pytest.raises(CodecError):
        count_symbols(sym.astype(np.int16), mm, 5, 9)


def test_canonical_layout():
    assert canonical_layout((10,), None)[0] == (1, 10, 1)
    assert canonical_layout((10,), 3)[1].tolist() == [3]
    assert canonical_layout((4, 6), np.arange(6))[0] == (1, 4, 6)
    assert canonical_layout((2, 4, 6), np.zeros((2, 6), int))[0] == (2, 4, 6)
    for shape, mm in [((4, 6), np.arange(4)), ((2, 4, 6), np.zeros((6,), int)), ((1, 2, 3, 4), None), ((5,), [1])]:
        with pytest.raises(CodecError):
            canonical_layout(shape, mm)


# ------------------------------------------------------------------ round trips


def test_roundtrip_shapes_and_layouts():
    rng = np.random.default_rng(3)
    sym3 = rng.integers(0, 16, (3, 37, 50)).astype(np.uint8)
    mm3 = rng.integers(0, 10, (3, 50))
    t = table_for(sym3, mm3, 10, 16)
    roundtrip(sym3, t, mm3)
    roundtrip(sym3[0], t, mm3[0])  # [T, C] with [C]
    roundtrip(sym3.reshape(-1), t, 4)  # [N] with one model
    flat = sym3.reshape(1, -1)
    roundtrip(flat, t, rng.integers(0, 10, flat.shape[1]))  # per-symbol models
    roundtrip(np.zeros((0,), np.uint8), t)
    roundtrip(np.zeros((0, 5), np.uint8), t, np.zeros(5, int))
    roundtrip(np.zeros((2, 0, 5), np.uint8), t, np.zeros((2, 5), int))
    for n in (1, 5, 31, 32, 33, 63, 64, 65, 1000, 4097):
        roundtrip(sym3.reshape(-1)[:n], t, 7)
    for gs in (32, 64, 96, 4096, 1 << 20):
        data = roundtrip(sym3, t, mm3, group_size=gs)
        assert read_header(data).group_size == gs
    rows = sym3[:, :, :5].transpose(0, 2, 1).reshape(15, 37, 1)  # one model per row: decoded row by row
    for gs in (32, 96, 160, 4096):  # groups that start and end inside rows
        roundtrip(rows, t, rng.integers(0, 10, (15, 1)), group_size=gs)


@pytest.mark.parametrize("precision", [8, 10, 12, 14, 15, 16])
def test_roundtrip_adversarial(precision):
    rng = np.random.default_rng(precision)
    total = 1 << precision
    # all-zero symbols, single-symbol alphabet (the symbol always has probability 1: zero bits)
    one = FrequencyTable([[total]], precision)
    data = roundtrip(np.zeros(10_000, np.uint8), one)
    assert read_header(data).num_words == 0
    # all 256 symbols used, uniform
    t256 = FrequencyTable(np.full((1, 256), total // 256), precision)
    roundtrip(np.arange(100_000, dtype=np.int64).astype(np.uint8), t256)
    roundtrip(rng.integers(0, 256, 50_000).astype(np.uint8), t256)
    # extreme skew: one symbol takes all but the minimum; code the rare ones a lot
    skew = np.ones((2, 256), np.int64)
    skew[0, 0] = total - 255
    skew[1, 255] = total - 255
    tsk = FrequencyTable(skew, precision)
    sym = np.where(rng.random(60_000) < 0.5, rng.integers(0, 256, 60_000), 0).astype(np.uint8)
    roundtrip(sym, tsk, 0)
    roundtrip(np.full(60_000, 255, np.uint8), tsk, 0)  # rarest symbol every time
    roundtrip(np.full(60_000, 255, np.uint8), tsk, 1)  # likeliest symbol every time
    roundtrip(np.zeros(60_000, np.uint8), tsk, 1)


def test_threads_give_identical_bytes():
    sym, mm, _ = synthetic(2, 2000, 64, seed=4)
    t = table_for(sym, mm, 128, 32)
    one = encode(sym, t, mm, group_size=2048, threads=1)
    two = encode(sym, t, mm, group_size=2048, threads=2)
    assert one == two and read_header(one).num_groups > 2
    np.testing.assert_array_equal(decode(one, t, mm, threads=2), sym)
    np.testing.assert_array_equal(decode(one, t, mm, threads=1), sym)
    previous = rans.limit_threads(1)
    try:
        assert rans._thread_count(None, 8, 1 << 20) == 1 and rans._thread_count(4, 8, 1 << 20) == 1
        assert encode(sym, t, mm, group_size=2048) == one
        np.testing.assert_array_equal(decode(one, t, mm), sym)
    finally:
        assert rans.limit_threads(previous) == 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(CodecError):
            rans.limit_threads(bad)


def test_buffer_types_and_concurrent_calls():
    from concurrent.futures import ThreadPoolExecutor

    sym, mm, _ = synthetic(1, 3000, 48, seed=10)
    t = table_for(sym, mm, 48, 32)
    data = encode(sym, t, mm, group_size=1024)
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8), np.frombuffer(data, np.uint8).copy()):
        np.testing.assert_array_equal(decode(buf, t, mm), sym)
    unaligned = np.empty(len(data) + 1, np.uint8)[1:]  # odd address: copied before the kernels see it
    unaligned[:] = np.frombuffer(data, np.uint8)
    np.testing.assert_array_equal(decode(unaligned, t, mm), sym)

    def job(i: int) -> bool:
        return encode(sym, t, mm, group_size=1024, threads=2) == data and np.array_equal(decode(data, t, mm), sym)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(job, range(8)))


def test_lockstep_reference_decoder_agrees():
    sym, mm, _ = synthetic(2, 150, 48, seed=5)
    t = table_for(sym, mm, 96, 32, precision=12)
    for gs in (None, 32, 160, 4096):
        data = encode(sym, t, mm, group_size=gs)
        np.testing.assert_array_equal(lockstep_decode(data, t, mm), sym)
    bad = bytearray(data)
    bad[-3] ^= 0x10
    with pytest.raises(FormatError):
        lockstep_decode(bytes(bad), t, mm)


def _tables(draw, models: int, alphabet: int, precision: int) -> np.ndarray:
    kind = draw(st.sampled_from(["dirichlet", "sparse", "skewed", "uniform"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "dirichlet":
        counts = rng.dirichlet(np.full(alphabet, 0.3), size=models) * 1e6
    elif kind == "sparse":
        counts = rng.integers(0, 100, (models, alphabet)) * (rng.random((models, alphabet)) < 0.2)
    elif kind == "skewed":
        counts = np.ones((models, alphabet))
        counts[np.arange(models), rng.integers(0, alphabet, models)] = 1e12
    else:
        counts = np.ones((models, alphabet))
    min_freq = draw(st.sampled_from([0, 1]))
    return quantize_counts(counts, precision, min_freq=min_freq)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_roundtrip_property(data):
    precision = data.draw(st.integers(8, 16), label="precision")
    alphabet = data.draw(st.sampled_from([1, 2, 3, 16, 100, 256]), label="alphabet")
    models = data.draw(st.integers(1, 6), label="models")
    freqs = _tables(data.draw, models, alphabet, precision)
    table = FrequencyTable(freqs, precision)
    ndim = data.draw(st.integers(1, 3), label="ndim")
    B = data.draw(st.integers(1, 3)) if ndim == 3 else 1
    T = data.draw(st.integers(0, 300))
    C = data.draw(st.integers(1, 70)) if ndim >= 2 else 1
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mm = rng.integers(0, models, (B, C))
    # draw every symbol from its model's distribution (so zero-frequency symbols never occur)
    p = freqs / freqs.sum(axis=1, keepdims=True)
    sym = np.empty((B, T, C), np.uint8)
    for b in range(B):
        for c in range(C):
            sym[b, :, c] = rng.choice(alphabet, size=T, p=p[mm[b, c]])
    shape = ((T,), (T, C), (B, T, C))[ndim - 1]
    model_map = (int(mm[0, 0]), mm[0], mm)[ndim - 1]
    if ndim == 1:
        sym = sym[0, :, 0:1].reshape(shape) if C else sym.reshape(shape)
    elif ndim == 2:
        sym = sym[0]
    group_size = data.draw(st.one_of(st.none(), st.sampled_from([32, 64, 160, 1024])), label="group_size")
    encoded = roundtrip(sym, table, model_map, group_size=group_size)
    np.testing.assert_array_equal(lockstep_decode(encoded, table, model_map), sym)


# ------------------------------------------------------------------ efficiency


def test_entropy_efficiency_realistic():
    """~200K symbols from 64 models of ~2-3 bits: ideal / coded >= 0.985 (the benchmark target)."""
    for bits, tokens in ((3.0, 3200), (2.0, 1600)):
        sym, mm, _ = synthetic(1, tokens, 64, bits=bits, seed=6)
        t = table_for(sym, mm, 64, 32)
        data = encode(sym, t, mm)
        eff = ideal_code_bits(sym, t, mm) / (8 * len(data))
        assert eff >= 0.985, (bits, tokens, eff)
    big, mm, _ = synthetic(1, 15625, 64, bits=3.0, seed=7)  # 1M symbols
    t = table_for(big, mm, 64, 32)
    data = roundtrip(big, t, mm)
    assert ideal_code_bits(big, t, mm) / (8 * len(data)) >= 0.995


def test_default_group_size():
    assert default_group_size(0) == 0
    assert default_group_size(1) == 32
    assert default_group_size(100_000) == 100_000 and default_group_size(100_001) == 100_032
    for n in (10**5, 10**6, 3 * 10**6, 10**7):
        s = default_group_size(n)
        g = -(-n // s)
        assert s % LANES == 0 and 2048 <= s / LANES <= 6200 and g == max(1, int(n / (LANES * 4096) + 0.5))


# ------------------------------------------------------------- errors, corrupt


def test_encode_rejects_bad_input():
    t = FrequencyTable([[2048, 2048, 0]], 12)
    with pytest.raises(CodecError, match="frequency 0"):
        encode(np.array([0, 1, 2, 0], np.uint8), t)
    with pytest.raises(CodecError, match="alphabet"):
        encode(np.array([0, 3], np.uint8), t)
    with pytest.raises(CodecError):
        encode(np.array([0, 1], np.int32), t)
    with pytest.raises(CodecError):
        encode(np.zeros((2, 3), np.uint8), t, np.array([0, 0, 1]))  # model 1 does not exist
    with pytest.raises(CodecError):
        encode(np.zeros((2, 3), np.uint8), t, np.array([0, 0]))
    with pytest.raises(CodecError):
        encode(np.zeros(100, np.uint8), t, group_size=48)
    with pytest.raises(CodecError):
        encode(np.zeros((1, 1, 1, 1), np.uint8), t)


@pytest.fixture(scope="module")
def small_stream():
    sym, mm, _ = synthetic(1, 40, 24, seed=8)
    t = table_for(sym, mm, 24, 32, precision=12)
    data = encode(sym, t, mm, group_size=256)
    return sym, mm, t, data


def test_every_truncation_and_extension_raises(small_stream):
    _, mm, t, data = small_stream
    for cut in range(len(data)):
        with pytest.raises(FormatError):
            decode(data[:cut], t, mm)
    for extra in (b"\0", b"\0\0", b"\0" * 4, b"\1" * 2):
        with pytest.raises(FormatError):
            decode(data + extra, t, mm)


def test_every_byte_corruption_raises(small_stream):
    _, mm, t, data = small_stream
    rng = np.random.default_rng(9)
    info = read_header(data)
    assert info.num_groups == 4 and len(data) < 1400
    for pos in range(len(data)):
        for flip in (0x01, 0x80, int(rng.integers(1, 256))):
            bad = bytearray(data)
            bad[pos] ^= flip
            with pytest.raises(FormatError):
                decode(bytes(bad), t, mm)


def test_words_swapped_between_groups_raise(small_stream):
    _, mm, t, data = small_stream
    info = read_header(data)
    words = np.frombuffer(data, np.uint16, count=info.num_words, offset=info.words_offset).copy()
    bad = bytearray(data)
    bad[info.words_offset : info.words_offset + 2 * info.num_words] = words[::-1].tobytes()
    with pytest.raises(FormatError):
        decode(bytes(bad), t, mm)


def _with_header(data: bytes, **fields) -> bytes:
    names = ["magic", "version", "precision", "lanes", "ndim", "B", "T", "C", "models", "alphabet", "reserved",
             "table_crc", "map_crc", "S", "G", "W"]  # fmt: skip
    values = dict(zip(names, rans._HEADER.unpack_from(data)))
    values.update(fields)
    return rans._HEADER.pack(*values.values()) + data[HEADER_BYTES:]


def test_header_fields_are_validated(small_stream):
    _, mm, t, data = small_stream
    decode(_with_header(data), t, mm)  # unchanged header decodes
    for fields in (
        {"magic": b"KVRX"}, {"version": 2}, {"lanes": 16}, {"precision": 7}, {"precision": 17}, {"precision": 13},
        {"ndim": 0}, {"ndim": 4}, {"ndim": 2}, {"ndim": 1}, {"T": 41}, {"T": 0}, {"C": 25}, {"B": 2}, {"T": 0xFFFFFFFF},
        {"models": 0}, {"models": 25}, {"alphabet": 0}, {"alphabet": 257}, {"alphabet": 31}, {"reserved": 1},
        {"table_crc": 0}, {"map_crc": 0}, {"S": 0}, {"S": 48}, {"S": 224}, {"S": 0xFFFFFFE0}, {"G": 0},
        {"G": 5}, {"G": 0xFFFFFFFF}, {"W": 0}, {"W": 0xFFFFFFFF},
    ):  # fmt: skip
        with pytest.raises(FormatError):
            decode(_with_header(data, **fields), t, mm)


def test_caps_checked_before_allocation(small_stream):
    sym, mm, t, data = small_stream
    with pytest.raises(FormatError, match="cap"):
        decode(data, t, mm, max_symbols=sym.size - 1)
    with pytest.raises(FormatError, match="shape"):
        decode(data, t, mm, shape=(41, 24))
    assert decode(data, t, mm, shape=sym.shape, max_symbols=sym.size).shape == sym.shape
    # a 200-byte stream claiming 2**31 - 32 symbols is refused by the cap without allocating
    huge = struct.pack("<4sBBBBIIIIHHIIIII", b"KVRA", 1, 12, 32, 1, 1, (1 << 31) - 32, 1, 24, 32, 0, 0, 0,
                       (1 << 31) - 32, 1, 0) + bytes(4 * 32 + 8)  # fmt: skip
    with pytest.raises(FormatError):
        decode(huge, t, mm, max_symbols=1 << 20)


def test_wrong_table_or_map_raises(small_stream):
    sym, mm, t, data = small_stream
    other = table_for(sym, mm[:, ::-1], 24, 32, precision=12)
    with pytest.raises(FormatError, match="table"):
        decode(data, other, mm)
    with pytest.raises(FormatError, match="model_map"):
        decode(data, t, mm[:, ::-1])
    with pytest.raises(FormatError):
        decode(data, t, mm[:, :5])
    with pytest.raises(FormatError):
        decode(data, FrequencyTable.from_counts(np.ones((24, 32)), 14), mm)
    with pytest.raises(FormatError):
        decode(np.zeros((3, 3), np.float32)[:, 1], t, mm)  # not contiguous bytes


@pytest.mark.parametrize("tokens,group_size", [(1, None), (37, 64), (256, None), (300, 96)])
def test_decode_rows_through_lut_equals_decode_then_lookup(tokens, group_size):
    """The fused decoder writes ``lut[k, s]`` of every symbol, transposed to ``[i, t, d]``,
    the same as decoding the symbols and looking them up afterwards; into strided views too."""
    rng = np.random.default_rng(tokens)
    rows, width = 12, 4
    mm = np.arange(rows).reshape(rows, 1)
    sym = np.minimum(rng.geometric(0.3, (rows, tokens, 1)) - 1, 31).astype(np.uint8)
    t = table_for(sym, mm, rows, 32, precision=12)
    data = encode(sym, t, mm, group_size=group_size)
    lut = rng.integers(-30000, 30000, (256, 40)).astype(np.int16)
    symbols = decode(data, t, mm)[:, :, 0].reshape(rows // width, width, tokens)  # [i, d, t]
    token_lut = rng.integers(0, 256, (rows // width, tokens)).astype(np.uint8)
    want_rows = lut[np.arange(rows).reshape(rows // width, width, 1), symbols].transpose(0, 2, 1)
    want_tokens = lut[token_lut[:, None, :], symbols].transpose(0, 2, 1)
    for kw, want in (({}, want_rows), ({"token_lut": token_lut}, want_tokens)):
        big = np.full((rows // width + 1, tokens + 5, width), 9, np.int16)
        out = big[1:, 2 : tokens + 2]
        rans.decode_rows_through_lut(data, t, rows=rows, tokens=tokens, row_width=width, lut=lut, out=out, **kw)
        np.testing.assert_array_equal(out, want)
        assert (big[0] == 9).all() and (big[:, :2] == 9).all() and (big[:, tokens + 2 :] == 9).all()


def test_decode_rows_through_lut_checks_its_arguments_and_stream(small_stream):
    rng = np.random.default_rng(4)
    rows, tokens = 8, 64
    mm = np.arange(rows).reshape(rows, 1)
    sym = rng.integers(0, 8, (rows, tokens, 1)).astype(np.uint8)
    t = table_for(sym, mm, rows, 8, precision=10)
    data = encode(sym, t, mm, group_size=64)
    lut, out = np.zeros((256, 8), np.int16), np.zeros((2, tokens, 4), np.int16)
    ok = dict(rows=rows, tokens=tokens, row_width=4, lut=lut, out=out)
    rans.decode_rows_through_lut(data, t, **ok)
    for bad in ({"out": np.zeros((2, tokens, 3), np.int16)}, {"lut": np.zeros((256, 4), np.int16)},
                {"lut": lut.astype(np.int32)}, {"lut": lut[: rows - 1]}, {"lut": lut[:0]},
                {"token_lut": np.zeros((2, tokens), np.uint8), "lut": lut[:255]},
                {"token_lut": np.zeros((2, tokens + 1), np.uint8)}, {"token_lut": np.zeros((2, tokens), np.int32)},
                {"row_width": 0}):  # fmt: skip
        with pytest.raises(CodecError):
            rans.decode_rows_through_lut(data, t, **{**ok, **bad})
    for pos in range(rans.HEADER_BYTES, len(data), 7):  # corrupt words, states and offsets
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(FormatError):
            rans.decode_rows_through_lut(bytes(bad), t, **ok)
    with pytest.raises(FormatError):  # another stream shape
        rans.decode_rows_through_lut(data, t, **{**ok, "rows": 4, "out": np.zeros((1, tokens, 4), np.int16)})


_FUSED_DECODE_ONCE = """
import numpy as np
from kvstore.codecs import _rans_numba, rans
from kvstore.codecs.symbol_model import FrequencyTable
table = FrequencyTable.from_counts(np.ones((4, 16)), precision=13)
sym = (np.arange(4 * 64) % 16).astype(np.uint8).reshape(4, 64, 1)
data = rans.encode(sym, table, np.arange(4).reshape(4, 1))
out = np.zeros((2, 64, 2), np.int16)
rans.decode_rows_through_lut(data, table, rows=4, tokens=64, row_width=2, lut=np.zeros((4, 16), np.int16), out=out)
print(sum(_rans_numba.decode_rows_kernel(13, 8).stats.cache_hits.values()))
"""


def test_fused_decoder_is_compiled_once_across_processes(tmp_path):
    """The fused decoder's kernel, built per precision, is found in Numba's disk cache by a
    later process instead of being compiled again (about a second of every process's first load)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    hits = [subprocess.run([sys.executable, "-c", _FUSED_DECODE_ONCE], env=env, capture_output=True, text=True,
                           check=True, timeout=300).stdout.split()[-1] for _ in range(2)]  # fmt: skip
    assert hits == ["0", "1"]
