"""The baseline codecs ``int8``, ``kivi2`` and ``cachegen_ref``: error bounds, sizes, corrupt input, the store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvstore import KVStore
from kvstore.codecs import _quant, codec_names, get_codec, rans

# importing the modules registers the codecs (until kvstore.codecs.base._load_builtin imports them)
from kvstore.codecs.cachegen_ref import CacheGenRefCodec
from kvstore.codecs.int8 import Int8Codec
from kvstore.codecs.kivi import KIVICodec
from kvstore.codecs.symbol_model import FrequencyTable, count_symbols, ideal_code_bits
from kvstore.errors import ChecksumError, CodecError, FormatError
from kvstore.format import container
from kvstore.format.chunk import ChunkIdentity, decode_chunk, encode_chunk

LAYERS, HEADS, DIM = 6, 2, 64
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOKENS = [1, 31, 33, 256]
CPU = torch.device("cpu")
#: half an ulp, relative, of the KV dtype (the final rounding of a decoded value), and its subnormal floor
REL = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
ABS = {torch.float16: 2.0**-25, torch.bfloat16: 1e-38, torch.float32: 1e-38}


def make_kv(shape, dtype=torch.float16, seed=0, device=CPU):
    """Keys with a few outlier channels and a large first (sink) token, values smaller and centred."""
    layers, dim = shape[0], shape[3]
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=g) * torch.linspace(0.5, 2.0, layers)[:, None, None, None]
    k[..., 3] = k[..., 3] * 12 + 5
    k[..., dim // 2] -= 8
    k[:, :, 0] *= 4
    v = torch.randn(shape, generator=g) * 0.3 + 0.1
    return k.to(device, dtype), v.to(device, dtype)


def ident(shape, dtype):
    layers, heads, tokens, dim = shape
    return ChunkIdentity("fp", "hash", 0, np.arange(tokens, dtype=np.int32), layers, heads, dim, dtype)


def roundtrip(codec, k, v):
    shape, dtype = tuple(k.shape), k.dtype
    blob = encode_chunk(codec, ident(shape, dtype), k, v)
    k2, v2 = decode_chunk(blob, ident(shape, dtype), CPU)
    assert k2.shape == k.shape and v2.shape == v.shape and k2.dtype == dtype and v2.dtype == dtype
    return blob, k2, v2, container.decode(blob)


def assert_within(decoded, original, bound):
    """``|decoded - original| <= bound`` plus the rounding of the result to its dtype."""
    x = original.float()
    slack = (x.abs() + bound) * REL[original.dtype] * 1.01 + ABS[original.dtype] + bound * 1e-5
    err = (decoded.float() - x).abs()
    excess = err - (bound + slack)
    assert excess.max() <= 0, f"error exceeds bound by {excess.max().item()} (max error {err.max().item()})"


def payload_bytes(obj) -> int:
    return sum(spec.nbytes for name, spec in obj.header.buffers.items() if name != "tokens")


def bits_per_element(blob, shape) -> float:
    return 8 * len(blob) / (2 * math.prod(shape))


def rebuild(blob, *, params=None, replace=None, drop=()):
    """Re-encode a chunk object with other codec params and/or buffers (valid checksums throughout)."""
    obj = container.decode(blob)
    buffers = {name: obj.tensor(name) for name in obj.header.buffers if name not in drop}
    buffers.update(replace or {})
    codec = dict(obj.header.codec)
    if params is not None:
        codec["params"] = params
    return container.encode(buffers, kind=obj.header.kind, codec=codec, meta=obj.header.meta)


def group_stats(x, axis, group):
    """Per-group min and max of ``x`` along ``axis`` (the last group may be partial), by a plain loop."""
    n = x.shape[axis]
    parts = [x.narrow(axis, s, min(group, n - s)) for s in range(0, n, group)]
    return (torch.stack([p.amin(axis) for p in parts], axis), torch.stack([p.amax(axis) for p in parts], axis))


def expand(p, axis, group, n):
    return p.repeat_interleave(group, dim=axis).narrow(axis, 0, n)


# ---------------------------------------------------------------- registry and parameters


@pytest.mark.parametrize(
    "name, params, cls",
    [
        ("int8", {}, Int8Codec),
        ("kivi2", {"bits": 2, "group_size": 32}, KIVICodec),
        ("cachegen_ref", {}, CacheGenRefCodec),
    ],
)
def test_registered_by_name(name, params, cls):
    assert name in codec_names()
    codec = get_codec(name)
    assert type(codec) is cls and codec.name == name
    assert params.items() <= codec.params.items()
    again = get_codec(name, codec.params)
    assert again.params == codec.params and again.tag == codec.tag


@pytest.mark.parametrize(
    "name, params",
    [
        ("int8", {"bits": 8}),
        ("kivi2", {"bits": 0}),
        ("kivi2", {"bits": 9}),
        ("kivi2", {"bits": "2"}),
        ("kivi2", {"bits": True}),
        ("kivi2", {"group_size": 0}),
        ("kivi2", {"residual": 128}),
        ("cachegen_ref", {"bins": 2}),
        ("cachegen_ref", {"bins": 31}),
        ("cachegen_ref", {"bins": 512}),
        ("cachegen_ref", {"high_bins": 32.0}),
        ("cachegen_ref", {"key_high_layers": -1}),
        ("cachegen_ref", {"precision": 20}),
    ],
)
def test_bad_params_raise_format_error(name, params):
    with pytest.raises(FormatError):
        get_codec(name, params)


def test_encode_rejects_bad_input():
    k, v = make_kv((2, 1, 4, 8))
    for name in ("int8", "kivi2", "cachegen_ref"):
        codec = get_codec(name)
        with pytest.raises(CodecError):
            codec.encode(k, v[:, :, :3])
        with pytest.raises(CodecError):
            codec.encode(k[0], v[0])
        with pytest.raises(CodecError):
            codec.encode(k[:, :, :0], v[:, :, :0])
        bad = k.clone()
        bad[1, 0, 2, 5] = float("nan")
        with pytest.raises(CodecError):
            codec.encode(bad, v)
        bad[1, 0, 2, 5] = float("inf")
        with pytest.raises(CodecError):
            codec.encode(k, bad)


# ---------------------------------------------------------------- int8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_int8_round_trip_within_half_step(tokens, dtype):
    shape = (LAYERS, HEADS, tokens, DIM)
    k, v = make_kv(shape, dtype)
    blob, k2, v2, obj = roundtrip(get_codec("int8"), k, v)
    for name, x, y in (("k", k, k2), ("v", v, v2)):
        scale = obj.tensor(f"{name}_scale")
        assert scale.dtype == torch.float16 and scale.shape == shape[:3]
        absmax = x.float().abs().amax(-1)
        # the stored scale is absmax / 127 rounded up to fp16: every code fits, none is wasted
        assert (scale.float() * 127 >= absmax).all()
        assert (scale.float() <= absmax / 127 * (1 + 2**-10) + 2**-24).all()
        assert_within(y, x, scale.float().unsqueeze(-1) / 2)
        assert obj.tensor(name).dtype == torch.int8 and obj.tensor(name).abs().max() == 127
    elements = math.prod(shape)
    assert payload_bytes(obj) == 2 * (elements + 2 * elements // DIM)
    if tokens == 256:
        assert 8.25 <= bits_per_element(blob, shape) < 8.25 + 0.05


def test_int8_zeros_and_large_values():
    k = torch.zeros(2, 1, 5, 8, dtype=torch.float16)
    _, k2, v2, _ = roundtrip(get_codec("int8"), k, k)
    assert torch.equal(k2, k) and torch.equal(v2, k)
    k, v = make_kv((2, 1, 5, 8), torch.float32)
    k, v = k * 1e5, v * 1e-6
    _, k2, v2, obj = roundtrip(get_codec("int8"), k, v)
    assert obj.tensor("k_scale").dtype == torch.float32  # beyond fp16's range: fp32 scales
    assert obj.tensor("v_scale").dtype == torch.float16
    assert_within(k2, k, obj.tensor("k_scale").float().unsqueeze(-1) / 2)
    assert_within(v2, v, obj.tensor("v_scale").float().unsqueeze(-1) / 2)


# ---------------------------------------------------------------- KIVI


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dim", [DIM, 48])
def test_kivi_round_trip_within_half_step(tokens, dtype, dim):
    shape = (LAYERS, HEADS, tokens, dim)
    k, v = make_kv(shape, dtype)
    codec = get_codec("kivi2", {})
    blob, k2, v2, obj = roundtrip(codec, k, v)
    groups_t, groups_d = -(-tokens // 32), -(-dim // 32)
    for name, x, y, axis, pshape in (
        ("k", k, k2, 2, (LAYERS, HEADS, groups_t, dim)),
        ("v", v, v2, 3, (LAYERS, HEADS, tokens, groups_d)),
    ):
        scale, zero = obj.tensor(f"{name}_scale"), obj.tensor(f"{name}_zero")
        assert scale.dtype == zero.dtype == torch.float16 and scale.shape == zero.shape == pshape
        lo, hi = group_stats(x.double(), axis, 32)  # keys per channel over tokens, values per token over channels
        s, z = scale.double(), zero.double()
        fp32_slack = hi.abs() * 2**-22  # the encoder computes (max - zero) / 3 in fp32
        assert (z <= lo).all() and (z + 3 * s >= hi - fp32_slack).all()
        assert (s <= (hi - z) / 3 * (1 + 2**-10) + 2**-24).all()
        assert_within(y, x, expand(s.float(), axis, 32, shape[axis]) / 2)
    elements = math.prod(shape)
    expected = 2 * -(-elements * 2 // 8) + 2 * 2 * (math.prod(shape[:2]) * dim * groups_t)
    expected += 2 * 2 * math.prod(shape[:3]) * groups_d
    assert payload_bytes(obj) == expected
    if tokens == 256 and dim == DIM:
        assert 3.0 <= bits_per_element(blob, shape) < 3.0 + 0.05


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_kivi_other_bit_widths(bits):
    shape = (3, 2, 45, 40)
    k, v = make_kv(shape, torch.float32, seed=bits)
    codec = get_codec("kivi2", {"bits": bits, "group_size": 16})
    _, k2, v2, obj = roundtrip(codec, k, v)
    assert obj.header.buffers["k"].nbytes == -(-math.prod(shape) * bits // 8)
    assert_within(k2, k, expand(obj.tensor("k_scale").float(), 2, 16, 45) / 2)
    assert_within(v2, v, expand(obj.tensor("v_scale").float(), 3, 16, 40) / 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_codes_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (1001,), dtype=torch.uint8)
    packed = _quant.pack_codes(codes, bits)
    assert packed.numel() == _quant.packed_bytes(1001, bits)
    assert torch.equal(_quant.unpack_codes(packed, bits, 1001), codes)
    if bits in (2, 4):  # whole codes per byte, low bits first
        per = 8 // bits
        assert int(packed[0]) == sum(int(codes[i]) << (bits * i) for i in range(per))
    if 1001 * bits % 8:
        bad = packed.clone()
        bad[-1] |= 0x80
        with pytest.raises(FormatError):
            _quant.unpack_codes(bad, bits, 1001)


def test_kivi_constant_groups_and_large_values():
    k = torch.full((2, 1, 40, 8), 1.5, dtype=torch.float16)
    _, k2, v2, _ = roundtrip(get_codec("kivi2"), k, k)
    assert torch.equal(k2, k) and torch.equal(v2, k)
    k, v = make_kv((2, 1, 40, 8), torch.float32)
    k = k * 1e5
    _, k2, _, obj = roundtrip(get_codec("kivi2"), k, v)
    assert obj.tensor("k_scale").dtype == obj.tensor("k_zero").dtype == torch.float32
    assert_within(k2, k, expand(obj.tensor("k_scale").float(), 2, 32, 40) / 2)


# ---------------------------------------------------------------- CacheGen reference


def expected_bins(layers, codec):
    if codec.bins is not None:
        return [codec.bins] * layers, [codec.bins] * layers
    return [32 if i < layers // 3 else 16 for i in range(layers)], [32 if i < 2 else 16 for i in range(layers)]


@pytest.mark.parametrize("params", [{}, {"bins": 32}])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_cachegen_round_trip_within_half_step(tokens, dtype, params):
    shape = (LAYERS, HEADS, tokens, DIM)
    channels = HEADS * DIM
    k, v = make_kv(shape, dtype)
    codec = get_codec("cachegen_ref", params)
    assert codec.schedule(LAYERS) == expected_bins(LAYERS, codec)
    _, k2, v2, obj = roundtrip(codec, k, v)
    expected_payload = 0
    for name, x, y, bins in zip(("k", "v"), (k, v), (k2, v2), expected_bins(LAYERS, codec)):
        scale = obj.tensor(f"{name}_scale")
        assert scale.dtype == torch.float16 and scale.shape == (LAYERS, tokens)
        # one maximum per (layer, token) over all heads and channels, as CacheGen merges the heads
        absmax = x.float().abs().amax(dim=(1, 3))
        assert (scale.float() >= absmax).all() and (scale.float() <= absmax * (1 + 2**-10) + 2**-24).all()
        c = torch.tensor([b // 2 - 1 for b in bins], dtype=torch.float32)[:, None]
        step = (scale.float() / c)[:, None, :, None]  # [layers, 1, tokens, 1]
        assert_within(y, x, step / 2)
        expected_payload += scale.numel() * 2
        for b in sorted(set(bins)):
            layers_b = [i for i, bb in enumerate(bins) if bb == b]
            alphabet = 2 * (b // 2 - 1) + 1
            raw_table = obj.raw(f"{name}_table_{b}")
            assert len(raw_table) == 16 + len(layers_b) * channels * alphabet * 2  # only the bins' alphabet
            table = FrequencyTable.from_bytes(raw_table)
            stream = obj.raw(f"{name}_stream_{b}")
            model_map = np.arange(len(layers_b) * channels).reshape(len(layers_b), channels)
            sym = rans.decode(stream, table, model_map)
            assert sym.shape == (len(layers_b), tokens, channels) and sym.max() < alphabet
            # the table is this chunk's own per-(layer, channel) histogram, and the stream is near its entropy
            counts = count_symbols(sym, model_map, model_map.size, alphabet)
            assert np.array_equal(table.freqs, FrequencyTable.from_counts(counts, 14, min_freq=0).freqs)
            info = rans.read_header(stream)
            ideal = ideal_code_bits(sym, table, model_map) / 8
            overhead = rans.stream_overhead_bytes(info.num_groups, info.num_words)
            assert ideal <= len(stream) <= ideal * 1.02 + overhead + 64
            expected_payload += len(raw_table) + len(stream)
    assert payload_bytes(obj) == expected_payload


def test_cachegen_schedule_parameters():
    codec = get_codec("cachegen_ref", {"key_high_layers": 1, "value_high_layers": 0, "high_bins": 64, "low_bins": 8})
    assert codec.schedule(4) == ([64, 8, 8, 8], [8, 8, 8, 8])
    assert get_codec("cachegen_ref").schedule(30) == ([32] * 10 + [16] * 20, [32] * 2 + [16] * 28)
    k, v = make_kv((4, 2, 20, 16), torch.float32)
    _, k2, _, obj = roundtrip(codec, k, v)
    assert {"k_table_64", "k_table_8", "v_table_8"} <= set(obj.header.buffers)
    assert "v_table_64" not in obj.header.buffers
    step = obj.tensor("k_scale").float() / torch.tensor([31.0, 3, 3, 3])[:, None]
    assert_within(k2, k, step[:, None, :, None] / 2)


def test_cachegen_zeros():
    k = torch.zeros(3, 2, 7, 8, dtype=torch.bfloat16)
    _, k2, v2, _ = roundtrip(get_codec("cachegen_ref"), k, k)
    assert torch.equal(k2, k) and torch.equal(v2, k)


def test_cachegen_size_on_realistic_chunk():
    """256 tokens of a SmolLM2-shaped chunk: the per-chunk tables are a large, counted part of the size."""
    shape = (30, 3, 256, 64)
    k, v = make_kv(shape, torch.float16)
    blob = encode_chunk(get_codec("cachegen_ref"), ident(shape, torch.float16), k, v)
    obj = container.decode(blob)
    tables = sum(spec.nbytes for name, spec in obj.header.buffers.items() if "_table_" in name)
    assert tables == 16 * 4 + 2 * 192 * (10 * 31 + 20 * 15 + 2 * 31 + 28 * 15)
    assert bits_per_element(blob, shape) > 8 * tables / (2 * math.prod(shape))


# ---------------------------------------------------------------- corrupt or inconsistent objects


def _blob(name, params=None, shape=(3, 2, 33, 16), dtype=torch.float16):
    k, v = make_kv(shape, dtype)
    codec = get_codec(name, params or {})
    return encode_chunk(codec, ident(shape, dtype), k, v), shape, dtype


def _decode(blob, shape, dtype):
    return decode_chunk(blob, ident(shape, dtype), CPU)


@pytest.mark.parametrize("name", ["int8", "kivi2", "cachegen_ref"])
def test_flipped_byte_raises(name):
    blob, shape, dtype = _blob(name)
    header = container.decode(blob).header
    for buf in header.buffers:
        start, stop = header.buffer_range(buf)
        for pos in (start, (start + stop) // 2, stop - 1):
            bad = bytearray(blob)
            bad[pos] ^= 0x10
            with pytest.raises(ChecksumError):
                _decode(bytes(bad), shape, dtype)
    with pytest.raises(FormatError):
        _decode(blob[:-1], shape, dtype)


@pytest.mark.parametrize("name", ["int8", "kivi2", "cachegen_ref"])
def test_missing_buffer_raises(name):
    blob, shape, dtype = _blob(name)
    for buf in container.decode(blob).header.buffers:
        if buf != "tokens":
            with pytest.raises(FormatError):
                _decode(rebuild(blob, drop=(buf,)), shape, dtype)


def test_int8_inconsistent_buffers_raise():
    blob, shape, dtype = _blob("int8")
    obj = container.decode(blob)
    k, scale = obj.tensor("k"), obj.tensor("k_scale")
    for replace in (
        {"k": k[:, :, :-1]},  # a token short
        {"k": k.view(torch.uint8)},  # wrong dtype
        {"k": k.reshape(-1)},  # flattened
        {"k_scale": scale[..., :-1]},
        {"k_scale": scale.to(torch.int16)},
        {"k_scale": scale.float().double()},
        {"v_scale": torch.full_like(scale, float("nan"))},
        {"v_scale": -scale},
        {"v_scale": torch.full_like(scale, float("inf"))},
    ):
        with pytest.raises(FormatError):
            _decode(rebuild(blob, replace=replace), shape, dtype)
    with pytest.raises(FormatError):
        _decode(rebuild(blob, params={"scale": 1}), shape, dtype)
    with pytest.raises(FormatError):
        _decode(rebuild(blob, params=[1]), shape, dtype)


def test_kivi_inconsistent_buffers_and_params_raise():
    blob, shape, dtype = _blob("kivi2")
    obj = container.decode(blob)
    packed, scale = obj.tensor("k"), obj.tensor("k_scale")
    for replace in (
        {"k": packed[:-1]},
        {"k": torch.cat([packed, packed[:1]])},
        {"k": packed.view(torch.int8)},
        {"k_scale": scale[:, :, :1]},  # 33 tokens need two groups
        {"v_zero": torch.full_like(obj.tensor("v_zero"), float("nan"))},
        {"v_scale": -obj.tensor("v_scale")},
    ):
        with pytest.raises(FormatError):
            _decode(rebuild(blob, replace=replace), shape, dtype)
    for params in ({"bits": 4, "group_size": 32}, {"bits": 2, "group_size": 16}, {"bits": 0, "group_size": 32},
                   {"bits": 2}, {"bits": 2, "group_size": 32, "extra": 1}):
        if params == {"bits": 2}:  # group_size defaults to 32: the same codec, decodes
            _decode(rebuild(blob, params=params), shape, dtype)
            continue
        with pytest.raises(FormatError):
            _decode(rebuild(blob, params=params), shape, dtype)


def test_kivi_padding_bits_must_be_zero():
    shape = (1, 1, 3, 5)  # 15 codes x 2 bits: the last byte has 2 unused bits
    blob, shape, dtype = _blob("kivi2", shape=shape)
    packed = container.decode(blob).tensor("k").clone()
    packed[-1] |= 0xC0
    with pytest.raises(FormatError):
        _decode(rebuild(blob, replace={"k": packed}), shape, dtype)


def test_cachegen_inconsistent_buffers_and_params_raise():
    blob, shape, dtype = _blob("cachegen_ref")  # 3 layers: keys 32 bins in layer 0, values in layers 0-1
    obj = container.decode(blob)
    k_table, v_table = obj.tensor("k_table_32"), obj.tensor("v_table_32")
    stream = obj.tensor("k_stream_16")
    table = FrequencyTable.from_bytes(obj.raw("k_table_16"))
    other_table = FrequencyTable(np.roll(table.freqs, 1, axis=1), table.precision)  # same shape, wrong fingerprint
    for replace in (
        {"k_table_32": v_table},  # another model count
        {"k_table_16": obj.tensor("v_table_16")},
        {"k_table_16": torch.frombuffer(bytearray(other_table.to_bytes()), dtype=torch.uint8)},
        {"k_table_32": k_table[:-2]},
        {"k_stream_16": stream[:-4]},
        {"k_stream_16": obj.tensor("v_stream_16")},
        {"k_stream_32": obj.tensor("k_stream_16")},
        {"k_scale": obj.tensor("k_scale")[:, :-1]},
        {"k_scale": -obj.tensor("k_scale")},
    ):
        with pytest.raises(FormatError):
            _decode(rebuild(blob, replace=replace), shape, dtype)
    corrupt = stream.clone()
    words = rans.read_header(stream.numpy()).words_offset
    corrupt[words + 2 : words + 12] ^= 0x5A  # valid checksum (re-encoded), corrupt rANS words
    with pytest.raises(FormatError):
        _decode(rebuild(blob, replace={"k_stream_16": corrupt}), shape, dtype)
    for params in ({"bins": 16}, {"bins": 32}, {"key_high_layers": 2}, {"value_high_layers": 1},
                   {"high_bins": 64}, {"bins": 3}, {"unknown": 1}):
        with pytest.raises(FormatError):
            _decode(rebuild(blob, params=params), shape, dtype)


# ---------------------------------------------------------------- the store and devices


async def test_kvstore_levels_round_trip():
    tokens, chunk = 300, 128
    k, v = make_kv((LAYERS, HEADS, tokens, DIM), torch.float16, seed=3)
    kv = [(k[i], v[i]) for i in range(LAYERS)]
    ids = list(range(1000, 1000 + tokens))
    levels = ["int8", ("kivi2", {}), ("cachegen_ref", {})]
    async with KVStore("memory://", chunk_tokens=chunk, levels=levels) as store:
        manifest = await store.put("test/model", ids, kv)
        assert [lvl.codec for lvl in manifest.levels] == ["int8", "kivi2", "cachegen_ref"]
        sizes = [sum(c.objects[i].size for c in manifest.chunks) for i in range(3)]
        assert sizes[0] > sizes[1] and sizes[0] > sizes[2]
        for level, codec in enumerate(store.codecs):
            got = await store.get("test/model", ids, level=level)
            assert len(got) == LAYERS
            for start in range(0, tokens, chunk):
                stop = min(start + chunk, tokens)
                ks, vs = k[:, :, start:stop].contiguous(), v[:, :, start:stop].contiguous()
                _, k2, v2, _ = roundtrip(codec, ks, vs)  # each chunk decodes as the codec alone would
                for layer in range(LAYERS):
                    assert torch.equal(got[layer][0][:, start:stop], k2[layer])
                    assert torch.equal(got[layer][1][:, start:stop], v2[layer])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "name, params", [("int8", {}), ("kivi2", {}), ("cachegen_ref", {}), ("cachegen_ref", {"bins": 32})]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(name, params, dtype):
    shape = (LAYERS, HEADS, 33, DIM)
    k, v = make_kv(shape, dtype)
    codec = get_codec(name, params)
    cuda = torch.device("cuda")
    blob_cpu = encode_chunk(codec, ident(shape, dtype), k, v)
    blob_gpu = encode_chunk(codec, ident(shape, dtype), k.to(cuda), v.to(cuda))
    assert blob_gpu == blob_cpu
    k_cpu, v_cpu = decode_chunk(blob_cpu, ident(shape, dtype), CPU)
    k_gpu, v_gpu = decode_chunk(blob_cpu, ident(shape, dtype), cuda)
    assert k_gpu.device.type == "cuda" and torch.equal(k_gpu.cpu(), k_cpu) and torch.equal(v_gpu.cpu(), v_cpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["raw", "int8"])
def test_decode_into_writes_the_callers_slice(name, dtype):
    """``decode_into`` fills a token slice of a larger output (strided views) with what
    ``decode`` returns, and leaves the rest of the output alone."""
    codec = get_codec(name)
    g = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(2, 3, 16, 8, generator=g).to(dtype) for _ in range(2))
    obj = container.decode(container.encode(codec.encode(keys, values), kind="chunk", codec={}, meta={}))
    want_k, want_v = codec.decode(obj, (2, 3, 16, 8), dtype, torch.device("cpu"))
    out_k, out_v = torch.full((2, 3, 40, 8), 7.0, dtype=dtype), torch.full((2, 3, 40, 8), 7.0, dtype=dtype)
    codec.decode_into(obj, out_k[:, :, 10:26], out_v[:, :, 10:26])
    assert torch.equal(out_k[:, :, 10:26], want_k) and torch.equal(out_v[:, :, 10:26], want_v)
    assert (out_k[:, :, :10] == 7).all() and (out_k[:, :, 26:] == 7).all() and (out_v[:, :, 26:] == 7).all()


def test_raw_decode_into_refuses_another_shape_or_dtype():
    codec = get_codec("raw")
    keys = torch.zeros(1, 1, 4, 8, dtype=torch.float16)
    obj = container.decode(container.encode(codec.encode(keys, keys), kind="chunk", codec={}, meta={}))
    with pytest.raises(FormatError, match="raw buffer 'k'"):
        codec.decode_into(obj, torch.empty(1, 1, 4, 8, dtype=torch.float32), torch.empty(1, 1, 4, 8, dtype=torch.float32))
    with pytest.raises(FormatError, match="raw buffer 'k'"):
        codec.decode_into(obj, torch.empty(1, 1, 5, 8, dtype=torch.float16), torch.empty(1, 1, 5, 8, dtype=torch.float16))
