"""GPU rANS decoding and dequantization (``kvstore.kernels``) against the torch references and
the numba CPU decoder.

Without CUDA the Triton kernels run under Triton's interpreter, which must be switched on
before ``triton`` is first imported: ``tests/triton_interpreter.py``, imported first, sets
``TRITON_INTERPRET=1`` when no GPU is present. If something imported triton earlier in the same process, the
interpreted tests skip themselves and :func:`test_interpreted_kernels_in_a_subprocess`
runs them in a fresh interpreter instead. The interpreter costs ~30 ms per loop iteration
of a program, so these tests use small streams with short lanes (a few groups of 8-16
steps). The ``gpu`` tests run the compiled kernels on fresh random inputs with poisoned
outputs and check every element.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triton_interpreter import CUDA, INTERP, interp, rerun_interpreted, rerun_needed  # first: before triton

from kvstore.codecs import rans
from kvstore.codecs.kvcodec import KVCodec
from benchmarks.rans import synthetic
from kvstore.codecs.symbol_model import FrequencyTable, count_symbols
from kvstore.errors import CodecError, FormatError
from kvstore.format import container
from kvstore.kernels import decode_rans as kernels_dispatch_decode
from kvstore.kernels.dequantize import (
    dequantize_affine,
    dequantize_kv_channel_major,
    dequantize_rowscale,
)
from kvstore.kernels.kvcodec_decode import decode_kvcodec_kernels
from kvstore.kernels.rans_decode import plan_rans_launch, rans_decode_gpu, rans_decode_launch
from kvstore.kernels.rans_streams import (
    ERR_OVERRUN,
    ERR_WORDS_LEFT,
    MODE_AFFINE,
    MODE_ROWSCALE,
    MODE_SYMBOL,
    DecodeConfig,
    LaunchStream,
    check_stream,
    decode_tables,
    upload_streams,
)
from kvstore.kernels.torch_ops import (
    dequantize_affine_ref,
    dequantize_kv_channel_major_ref,
    dequantize_rowscale_ref,
    rans_decode_launch_ref,
    rans_decode_ref,
)

from kvcodec_samples import D, H, L, small_profile as fitted_small_profile, synthetic_kv

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
CPU = torch.device("cpu")


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical, except bf16 under the interpreter: it rounds fp32 -> bf16 by truncation
    (the GPU rounds to nearest even, checked exactly by the gpu tests), so within one bf16 ulp."""
    if a.dtype == torch.bfloat16 and INTERP:
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=0, equal_nan=True)
    else:
        assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def make_case(rng, dims, precision=15, *, alphabet=256, bits=2.5, noise=0.003, permute=False, group_size=256):
    """(stream bytes, table, model_map, symbols): Gaussian-ish symbols with a few uniform ones
    (rare symbols exercise the long scans), per-(b, c) models, optionally a permuted map."""
    B, T, C = dims
    sym, mm, _ = synthetic(B, T, C, alphabet=alphabet, bits=bits, seed=int(rng.integers(1 << 31)))
    table = FrequencyTable.from_counts(count_symbols(sym, mm, mm.size, alphabet), precision)
    flip = rng.random(sym.shape) < noise
    sym[flip] = rng.integers(0, alphabet, int(flip.sum()))
    if permute:
        mm = rng.permutation(mm.size).reshape(mm.shape)
    return rans.encode(sym, table, mm, group_size=group_size), table, mm, sym


CASES = [
    # dims, precision, config, extra
    ((2, 40, 24), 15, DecodeConfig(lookup=1, block_g=8), {}),
    ((2, 20, 24), 15, DecodeConfig(lookup=0, block_g=8), {"permute": True, "group_size": 192}),
    ((2, 40, 24), 15, DecodeConfig(lookup=2, block_g=8), {}),
    ((3, 11, 5), 12, DecodeConfig(lookup=1, block_g=4), {"permute": True, "group_size": 96}),  # T*C < 32 per b
    ((1, 300, 1), 16, DecodeConfig(lookup=1, block_g=8), {"group_size": 320}),  # P=16: int64 entries
    ((2, 64, 64), 8, DecodeConfig(lookup=0, block_g=16, bucket_bits=6), {"alphabet": 40, "bits": 3.0}),
    ((4, 37, 33), 14, DecodeConfig(lookup=1, block_g=16, bucket_bits=7), {"group_size": 32 * 12}),
]


# ----------------------------------------------------------------------------- interpreter tests


@interp
@pytest.mark.parametrize(("dims", "precision", "config", "extra"), CASES)
def test_decode_matches_cpu_decoder_and_reference(dims, precision, config, extra):
    rng = np.random.default_rng(abs(hash((dims, precision))) % (1 << 32))
    data, table, mm, sym = make_case(rng, dims, precision, **extra)
    expect = rans.decode(data, table, mm)
    np.testing.assert_array_equal(expect, sym)
    got = rans_decode_gpu(data, table, mm, device=CPU, config=config)
    np.testing.assert_array_equal(got.numpy(), sym)
    np.testing.assert_array_equal(rans_decode_ref(data, table, mm).numpy(), sym)


@interp
def test_one_dimensional_and_empty_streams():
    rng = np.random.default_rng(5)
    _, _, _, sym = make_case(rng, (1, 200, 1), 15, group_size=64)
    flat, table1 = sym.reshape(-1), FrequencyTable.from_counts(count_symbols(sym.reshape(-1), None, 1), 15)
    data = rans.encode(flat, table1, None, group_size=64)
    np.testing.assert_array_equal(rans_decode_gpu(data, table1, None, device=CPU).numpy(), flat)
    empty = rans.encode(np.zeros(0, np.uint8), table1, None)
    assert rans_decode_gpu(empty, table1, None, device=CPU).shape == (0,)
    assert rans_decode_ref(empty, table1, None).shape == (0,)


@interp
def test_one_launch_decodes_three_streams_through_their_epilogues():
    """Keys-like affine, values-like row-scaled (codes decoded beforehand) and plain symbols,
    in one launch, against the reference: outputs and error words equal."""
    rng = np.random.default_rng(11)
    da, ta, ma, sa = make_case(rng, (2, 16, 32), 15, group_size=32 * 8)
    db, tb, mb, sb = make_case(rng, (2, 16, 32), 15, group_size=32 * 16)
    dc, tc, mc, sc = make_case(rng, (3, 20, 7), 15, permute=True, group_size=32 * 4)
    infos = [check_stream(d, t, m)[0] for d, t, m in ((da, ta, ma), (db, tb, mb), (dc, tc, mc))]
    data, offs = upload_streams([np.frombuffer(d, np.uint8) for d in (da, db, dc)], CPU)
    tabs = [decode_tables(t, CPU) for t in (ta, tb, tc)]
    n = sa.size
    rows = n // 32
    codes = torch.from_numpy(rng.integers(90, 140, rows).astype(np.uint8))
    vtab = torch.exp2((torch.arange(256, dtype=torch.float32) - 128) / 4) * 0.7
    scale = torch.rand(ta.num_models) + 0.1
    bias = torch.randn(ta.num_models)
    mm_c = torch.from_numpy(mc.reshape(-1).astype(np.int32))
    streams = [
        LaunchStream(infos[0], offs[0], 0, MODE_AFFINE, 5, identity=True),
        LaunchStream(infos[1], offs[1], 1, MODE_ROWSCALE, 5 + n, identity=True, row_base=0),
        LaunchStream(infos[2], offs[2], 2, MODE_SYMBOL, 3, mm_offset=0, identity=False),
    ]
    results = []
    for fn in (rans_decode_launch, rans_decode_launch_ref):
        out_f = torch.full((2 * n + 10,), float("nan"), dtype=torch.float16)
        out_u8 = torch.full((sc.size + 8,), 0xAB, dtype=torch.uint8)
        err = fn(data, streams, tabs, model_maps=mm_c, out_f=out_f, out_u8=out_u8, aff_scale=scale,
                 aff_bias=bias, vtab=vtab, codes=codes, config=DecodeConfig(block_g=4))  # fmt: skip
        results.append((out_f, out_u8, err))
    (f1, u1, e1), (f2, u2, e2) = results
    assert torch.equal(e1, e2) and not bool(e1.any())
    assert torch.equal(u1, u2) and torch.equal(f1.isnan(), f2.isnan()) and torch.equal(f1.nan_to_num(), f2.nan_to_num())
    np.testing.assert_array_equal(u1[3 : 3 + sc.size].numpy(), sc.reshape(-1))
    assert bool(f1[:5].isnan().all()) and bool(f1[5 + 2 * n :].isnan().all()) and not bool(f1[5 : 5 + 2 * n].isnan().any())
    m = torch.arange(n) // (16 * 32) * 32 + torch.arange(n) % 32
    keys = ((torch.from_numpy(sa.reshape(-1)).int() - 128).float() * scale[m] + bias[m]).half()
    assert torch.equal(f1[5 : 5 + n], keys)
    vals = ((torch.from_numpy(sb.reshape(-1)).int() - 128).float() * vtab[codes.long()].repeat_interleave(32)).half()
    assert torch.equal(f1[5 + n : 5 + 2 * n], vals)
    assert bool((u1[:3] == 0xAB).all()) and bool((u1[3 + sc.size :] == 0xAB).all())


ROW_LAUNCHES = {
    # rows of lengths that are not multiples of 32: the rows loop, two groups per program
    "rows": ((((6, 45, 1), 96), ((3, 64, 1), 64), ((5, 13, 1), 32)),
             (DecodeConfig(block_g=2), DecodeConfig(block_g=2, rows=False), DecodeConfig(block_g=2))),
    # every row a multiple of 32 long, one group per program: the aligned loop (groups that
    # start mid-row, span rows, hold one step)
    "aligned": ((((5, 64, 1), 96), ((3, 96, 1), 160), ((2, 32, 1), 32)),
                (DecodeConfig(), DecodeConfig(aligned=False), DecodeConfig())),
}  # fmt: skip


@interp
@pytest.mark.parametrize("launch", sorted(ROW_LAUNCHES))
def test_row_streams_take_the_rows_loops_with_the_generic_loops_results(launch):
    """Three one-model-per-row streams (C == 1, identity maps, symbol epilogue: a channel-major
    kvcodec chunk's launch) decode alike through the ``rows`` (or ``aligned``) loop, the generic
    loop and the reference, one stream corrupt: same symbols, same error words (the kernel's
    into a poisoned buffer: it writes every group's word, so a decode may allocate them
    uninitialized), nothing written outside the outputs."""
    layouts, (fast, generic, ref_config) = ROW_LAUNCHES[launch]
    rng = np.random.default_rng(17)
    cases = [make_case(rng, dims, 15, group_size=gs) for dims, gs in layouts]
    good = [d for d, *_ in cases]
    info2 = rans.read_header(good[2])
    corrupt = bytearray(good[2])
    corrupt[info2.states_offset + 1] ^= 0x5A
    for streams_bytes, corrupted in ((good, False), (good[:2] + [bytes(corrupt)], True)):
        infos = [check_stream(d, t, m)[0] for d, (_, t, m, _) in zip(streams_bytes, cases, strict=True)]
        data, offs = upload_streams([np.frombuffer(d, np.uint8) for d in streams_bytes], CPU)
        tabs = [decode_tables(t, CPU) for _, t, _, _ in cases]
        bases = np.cumsum([4] + [s.size + 7 for *_, s in cases])
        streams = [LaunchStream(i, o, j, MODE_SYMBOL, int(bases[j]), identity=True)
                   for j, (i, o) in enumerate(zip(infos, offs, strict=True))]  # fmt: skip
        assert plan_rans_launch(data, streams, tabs, config=fast).constexprs["ALIGNED"] == (launch == "aligned")
        results = []
        for fn, config in ((rans_decode_launch, fast), (rans_decode_launch, generic), (rans_decode_launch_ref, ref_config)):
            out = torch.full((int(bases[-1]) + 9,), 0xAB, dtype=torch.uint8)
            poisoned = torch.full((sum(i.num_groups for i in infos),), -1, dtype=torch.int32)
            err = poisoned if fn is rans_decode_launch else None
            results.append((out, fn(data, streams, tabs, out_u8=out, err=err, config=config)))
        (u1, e1) = results[0]
        for u, e in results[1:]:
            assert torch.equal(u1, u) and torch.equal(e1, e)
        assert bool(e1.any()) == corrupted
        for j, (*_, sym) in enumerate(cases):
            base = int(bases[j])
            assert bool((u1[base - 4 : base] == 0xAB).all())
            if not (corrupted and j == 2):
                np.testing.assert_array_equal(u1[base : base + sym.size].numpy(), sym.reshape(-1))
        assert bool((u1[int(bases[2]) + cases[2][3].size :] == 0xAB).all())


def _corruptions(data: bytes, info, rng, count):
    """Single-byte changes in the states, offsets and words sections (the kernel checks these)."""
    lo, hi = info.states_offset, info.words_offset + 2 * info.num_words
    positions = sorted({int(p) for p in rng.integers(lo, hi, count)} | {lo, info.offsets_offset, info.words_offset})
    for p in positions:
        bad = bytearray(data)
        bad[p] ^= int(rng.integers(1, 256))
        yield p, bytes(bad)


@interp
def test_aligned_rows_loop_reports_corruption_like_the_reference():
    """Single-byte corruptions of a channel-major-shaped stream (rows of 64, groups spanning
    rows) give the aligned loop's decode the reference's error words (overrun, words left,
    final state...), with nothing written outside the output."""
    rng = np.random.default_rng(29)
    data, table, mm, sym = make_case(rng, (4, 64, 1), 15, group_size=96)
    info = rans.read_header(data)
    tabs = [decode_tables(table, CPU)]
    assert plan_rans_launch(upload_streams([np.frombuffer(data, np.uint8)], CPU)[0],
                            [LaunchStream(info, 0, 0, MODE_SYMBOL, 0, identity=True)], tabs).constexprs["ALIGNED"]  # fmt: skip
    seen = 0
    for p, bad in _corruptions(data, info, rng, 6):
        buf, (off,) = upload_streams([np.frombuffer(bad, np.uint8)], CPU)
        st = LaunchStream(info, off, 0, MODE_SYMBOL, 8, identity=True)
        errs = []
        for fn in (rans_decode_launch, rans_decode_launch_ref):
            out = torch.full((sym.size + 16,), 0xAB, dtype=torch.uint8)
            errs.append(fn(buf, [st], tabs, out_u8=out, err=torch.full((info.num_groups,), -1, dtype=torch.int32)
                           if fn is rans_decode_launch else None))  # fmt: skip
            assert bool((out[:8] == 0xAB).all()) and bool((out[8 + sym.size :] == 0xAB).all()), p
        assert torch.equal(errs[0], errs[1]), (p, errs)
        seen |= int(np.bitwise_or.reduce(errs[0].numpy()))
    assert seen & ERR_OVERRUN or seen & ERR_WORDS_LEFT, seen  # the corruptions reached the word checks


@interp
def test_corrupt_streams_raise_and_stay_in_bounds():
    rng = np.random.default_rng(3)
    data, table, mm, sym = make_case(rng, (2, 24, 16), 15, group_size=32 * 6)
    info = rans.read_header(data)
    tabs = [decode_tables(table, CPU)]
    for i, (p, bad) in enumerate(_corruptions(data, info, rng, 3)):
        with pytest.raises(FormatError):
            rans.decode(bad, table, mm)
        buf, (off,) = upload_streams([np.frombuffer(bad, np.uint8)], CPU)
        st = LaunchStream(info, off, 0, MODE_SYMBOL, 16, identity=True)
        errs = []
        for fn in (rans_decode_launch, rans_decode_launch_ref):
            out = torch.full((sym.size + 32,), 0xAB, dtype=torch.uint8)
            err = fn(buf, [st], tabs, out_u8=out, config=DecodeConfig(block_g=4))
            assert bool((out[:16] == 0xAB).all()) and bool((out[16 + sym.size :] == 0xAB).all()), p
            errs.append(err)
        assert torch.equal(errs[0], errs[1]) and bool(errs[0].any()), (p, errs)
        if i == 0:
            with pytest.raises(FormatError):
                rans_decode_gpu(bad, table, mm, device=CPU, config=DecodeConfig(block_g=4))


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_kernels_match_references(dtype):
    g = torch.Generator().manual_seed(7)
    n, row = 3 * 5 * 64, 64
    sym = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    codes = torch.randint(100, 150, (n // row,), dtype=torch.uint8, generator=g)
    vtab = torch.exp2((torch.arange(256, dtype=torch.float32) - 128) / 4) * 0.85
    a = dequantize_rowscale(sym, codes, vtab, row, torch.full((n,), 7.0, dtype=dtype))
    b = dequantize_rowscale_ref(sym, codes, vtab, row, torch.full((n,), 7.0, dtype=dtype))
    assert_same(a, b)
    scale, bias = torch.rand(3 * row, generator=g) + 0.1, torch.randn(3 * row, generator=g)
    a = dequantize_affine(sym, scale, bias, row, 5, torch.full((n,), 7.0, dtype=dtype))
    b = dequantize_affine_ref(sym, scale, bias, row, 5, torch.full((n,), 7.0, dtype=dtype))
    assert_same(a, b)


@interp
@pytest.mark.parametrize("D", [32, 24])
def test_channel_major_dequantize_matches_reference(D):
    g = torch.Generator().manual_seed(D)
    LH, T = 3, 37
    sym = torch.randint(0, 256, (2, LH, D, T), dtype=torch.uint8, generator=g)
    codes = torch.randint(110, 140, (LH, T), dtype=torch.uint8, generator=g)
    scale, bias = torch.rand(LH * D, generator=g) + 0.1, torch.randn(LH * D, generator=g)
    vtab = torch.exp2((torch.arange(256, dtype=torch.float32) - 128) / 4) * 0.85
    a = dequantize_kv_channel_major(sym, codes, scale, bias, vtab, torch.full((2, 1, LH, T, D), float("nan")).half())
    b = dequantize_kv_channel_major_ref(sym, codes, scale, bias, vtab, torch.full((2, 1, LH, T, D), 5.0).half())
    assert_same(a, b)


@pytest.fixture(scope="module")
def small_profile():
    return fitted_small_profile()


@interp
@pytest.mark.parametrize(("tokens", "start", "plan", "dtype", "version"), [
    (6, 0, "split", torch.float16, 1), (5, 100, "fused", torch.float16, 1), (6, 0, "auto", torch.bfloat16, 1),
    (6, 0, "auto", torch.float16, 2), (5, 100, "auto", torch.bfloat16, 2),
])  # fmt: skip
def test_kvcodec_chunk_matches_the_cpu_codec(small_profile, tokens, start, plan, dtype, version):
    codec = KVCodec(small_profile, 1, version=version)
    keys, values = synthetic_kv(tokens, 40 + tokens, dtype)
    buffers = codec.encode(keys, values, start=start)
    obj = container.decode(container.encode(buffers, kind="t"))
    k0, v0 = codec.decode(obj, tuple(keys.shape), dtype, CPU)
    for backend in ("triton", "torch"):
        k1, v1 = decode_kvcodec_kernels(obj, codec, tuple(keys.shape), dtype, CPU, plan=plan, backend=backend,
                                    config=DecodeConfig(block_g=4))  # fmt: skip
        if backend == "torch":
            assert torch.equal(k0, k1) and torch.equal(v0, v1)
        else:
            assert_same(k1, k0)
            assert_same(v1, v0)
    k2, v2 = decode_kvcodec_kernels(buffers, codec, tuple(keys.shape), dtype, CPU, plan=plan, backend="torch")
    assert torch.equal(k0, k2) and torch.equal(v0, v2)  # a mapping of buffers


@interp
@pytest.mark.parametrize(("shape", "layers"), [((3, 1, 256), (0, 2)), ((2, 2, 80), (1,)), ((2, 3, 96), None)])
def test_kvcodec_decodes_every_head_shape_and_layer_group_on_triton(shape, layers):
    """One KV head x 256 (Gemma 3), 80- and 96-wide heads, and a layer group's rows of a
    model's profile: the Triton decoder gives the CPU codec's values."""
    codec = KVCodec(fitted_small_profile(shape), 2)
    if layers is not None:
        codec = codec.for_layers(layers, shape[0])
    keys, values = synthetic_kv(5, 9, shape=(len(layers) if layers else shape[0], *shape[1:]))
    obj = container.decode(container.encode(codec.encode(keys, values), kind="t"))
    k0, v0 = codec.decode(obj, tuple(keys.shape), torch.float16, CPU)
    k1, v1 = decode_kvcodec_kernels(obj, codec, tuple(keys.shape), torch.float16, CPU, backend="triton",
                                config=DecodeConfig(block_g=4))  # fmt: skip
    assert_same(k1, k0)
    assert_same(v1, v0)


@interp
def test_both_layouts_decode_alike_on_cpu_and_triton(small_profile):
    """The same chunk in the token-major (version 1) and channel-major (version 2, here with
    8-symbol lanes: several groups per stream) layouts: the CPU decoder and the Triton decoder
    give the same values for both, and a stream in the other layout is rejected."""
    old, new = KVCodec(small_profile, 2, version=1), KVCodec(small_profile, 2)
    keys, values = synthetic_kv(7, 77)
    shape = tuple(keys.shape)
    obj1 = container.decode(container.encode(old.encode(keys, values), kind="t"))
    k0, v0 = old.decode(obj1, shape, keys.dtype, CPU)
    short = new.entropy_code(new.quantize(keys, values), lane_symbols=8)
    assert rans.read_header(short["k"]).num_groups > 1 and rans.read_header(short["k"]).dims == (L * H * D, 7, 1)
    obj2 = container.decode(container.encode(short, kind="t"))
    assert all(torch.equal(a, b) for a, b in zip(new.decode(obj2, shape, keys.dtype, CPU), (k0, v0)))
    for codec, obj in ((old, obj1), (new, obj2)):
        for backend in ("triton", "torch"):
            k1, v1 = decode_kvcodec_kernels(obj, codec, shape, keys.dtype, CPU, backend=backend,
                                        config=DecodeConfig(block_g=16))  # fmt: skip
            assert torch.equal(k0, k1) and torch.equal(v0, v1), (codec.version, backend)
    with pytest.raises(FormatError):  # the layout follows the codec's version, checked against the headers
        decode_kvcodec_kernels(obj1, new, shape, keys.dtype, CPU, backend="torch")
    with pytest.raises(FormatError):
        old.decode(obj2, shape, keys.dtype, CPU)


# ----------------------------------------------------------------------------- no kernel needed


def test_malformed_patches_and_sinks_raise(small_profile):
    codec = KVCodec(small_profile, 0)
    keys, values = synthetic_kv(6, 5)
    keys[0, 0, 5, :3] = 3000.0  # far outside the symbol range: patches
    buffers = codec.encode(keys, values)
    assert "k_patch_index" in buffers and "sink_k" in buffers
    shape = tuple(keys.shape)
    bad = [
        {"k_patch_index": buffers["k_patch_index"] + keys.numel()},
        {"k_patch_index": buffers["k_patch_index"].long()},
        {"sink_v": buffers["sink_v"][:, :, :2]},
    ]
    for change in bad:
        with pytest.raises(FormatError):
            decode_kvcodec_kernels({**buffers, **change}, codec, shape, keys.dtype, CPU, backend="torch")
    with pytest.raises(FormatError):  # patches and sinks are stored in the KV dtype
        decode_kvcodec_kernels(buffers, codec, shape, torch.bfloat16, CPU, backend="torch")
    with pytest.raises(FormatError):
        decode_kvcodec_kernels({k: v for k, v in buffers.items() if k != "sink_v"}, codec, shape, keys.dtype, CPU,
                           backend="torch")  # fmt: skip


def test_reference_matches_cpu_decoder_on_many_shapes():
    rng = np.random.default_rng(21)
    for dims in [(1, 1, 1), (1, 31, 1), (2, 7, 3), (3, 50, 40), (1, 1000, 1), (5, 3, 70)]:
        for precision in (8, 11, 15, 16):
            data, table, mm, sym = make_case(rng, dims, precision, permute=bool(rng.integers(2)),
                                             group_size=32 * int(rng.integers(1, 9)))  # fmt: skip
            np.testing.assert_array_equal(rans_decode_ref(data, table, mm).numpy(), sym)


def test_reference_rejects_every_single_byte_corruption():
    rng = np.random.default_rng(8)
    data, table, mm, _ = make_case(rng, (1, 16, 8), 15, group_size=64)  # 2 groups of 2 steps
    for p in range(len(data)):
        bad = bytearray(data)
        bad[p] ^= 0x5A
        with pytest.raises(FormatError):
            rans_decode_ref(bytes(bad), table, mm)
    for cut in (1, 2, 47, len(data) - 1):
        with pytest.raises(FormatError):
            rans_decode_ref(data[:cut], table, mm)


def test_host_checks_reject_wrong_table_map_and_shape():
    rng = np.random.default_rng(4)
    data, table, mm, sym = make_case(rng, (2, 20, 16), 15)
    other = FrequencyTable.from_counts(count_symbols(sym, mm, mm.size, 256) + 1, 15)
    with pytest.raises(FormatError):
        check_stream(data, other, mm)
    with pytest.raises(FormatError):
        check_stream(data, table, mm[::-1].copy())
    with pytest.raises(FormatError):
        check_stream(data, table, mm, shape=(2, 20, 15))
    with pytest.raises(CodecError):
        check_stream(data, "not a table", mm)  # type: ignore[arg-type]
    info, mm32 = check_stream(data, table, mm, shape=sym.shape)
    assert info.shape == sym.shape and mm32.dtype == np.int32


def test_decode_tables_are_built_once_per_table_and_device():
    rng = np.random.default_rng(2)
    _, table, _, _ = make_case(rng, (1, 10, 4), 15)
    a, b = decode_tables(table, CPU), decode_tables(table, "cpu")
    assert a is b and a.bucket.shape == (4, 256) and a.cf.shape == (4, 256) and a.cf3.shape == (4, 256)
    assert a.coarse_bucket(6) is a.coarse_bucket(6) and a.coarse_bucket(6).shape == (4, 64)
    cum = np.cumsum(table.freqs, axis=1) - table.freqs
    np.testing.assert_array_equal(a.cf.numpy() & 0xFFFF, cum)
    np.testing.assert_array_equal(a.cf.numpy() >> 16, table.freqs)


def test_dispatch_uses_the_reference_off_cuda():
    rng = np.random.default_rng(9)
    data, table, mm, sym = make_case(rng, (2, 10, 8), 15)
    np.testing.assert_array_equal(kernels_dispatch_decode(data, table, mm, device="cpu").numpy(), sym)


@rerun_needed
def test_interpreted_kernels_in_a_subprocess():
    """Triton was imported before this module could switch its interpreter on: run the
    interpreted tests in a fresh process."""
    rerun_interpreted(__file__)


# ----------------------------------------------------------------------------- on a GPU


GPU_CONFIGS = [
    DecodeConfig(),  # lookup 1, one group per program, ballot, prefetch, the aligned rows loop where it applies
    DecodeConfig(aligned=False),  # the rows loop instead
    DecodeConfig(prefetch=False),
    DecodeConfig(lookup=0),
    DecodeConfig(lookup=2),
    DecodeConfig(bucket_bits=7),
    DecodeConfig(ballot=False, prefetch=False),
    DecodeConfig(block_g=2),  # ballot is then off (it misbehaved with two groups per thread)
    DecodeConfig(block_g=4, num_warps=4, lookup=0),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: f"L{c.lookup}b{int(c.ballot)}p{int(c.prefetch)}g{c.block_g}"
                         f"w{c.num_warps}bb{c.bucket_bits}a{int(c.aligned)}")  # fmt: skip
def test_gpu_decode_random_streams_every_element(config):
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    rng = np.random.default_rng(seed)
    dev = torch.device("cuda")
    # (the last case: rows of 1,024, identity map, groups starting mid-row: the aligned rows loop)
    for dims, precision, gs, permute in [((16, 512, 128), 15, None, rng.integers(2)), ((8, 300, 40), 16, 32 * 40, 1),
                                         ((4, 77, 3), 12, 32 * 3, rng.integers(2)), ((1, 100_000, 1), 15, 32 * 100, 0),
                                         ((48, 1024, 1), 15, 32 * 96, 0)]:  # fmt: skip
        data, table, mm, sym = make_case(rng, dims, precision, permute=bool(permute), group_size=gs)
        expect = rans.decode(data, table, mm)
        info, mm32 = check_stream(data, table, mm)
        buf, (off,) = upload_streams([np.frombuffer(data, np.uint8)], dev)
        identity = bool(np.array_equal(mm32, np.arange(mm32.size)))
        st = LaunchStream(info, off, 0, MODE_SYMBOL, 100, identity=identity)
        out = torch.full((sym.size + 200,), 0xAB, dtype=torch.uint8, device=dev)
        err = rans_decode_launch(buf, [st], [decode_tables(table, dev)], model_maps=torch.from_numpy(mm32).to(dev),
                                 out_u8=out, config=config)  # fmt: skip
        torch.cuda.synchronize()
        host = out.cpu().numpy()
        assert not err.any(), (seed, dims)
        np.testing.assert_array_equal(host[100 : 100 + sym.size], expect.reshape(-1), err_msg=f"seed {seed} {dims}")
        assert (host[:100] == 0xAB).all() and (host[100 + sym.size :] == 0xAB).all(), seed


@gpu
@needs_cuda
def test_gpu_corrupt_streams_raise():
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    rng = np.random.default_rng(seed)
    data, table, mm, _ = make_case(rng, (4, 256, 64), 15, group_size=32 * 64)
    info = rans.read_header(data)
    for _, bad in _corruptions(data, info, rng, 40):
        with pytest.raises(FormatError):
            rans.decode(bad, table, mm)
        for config in (DecodeConfig(), DecodeConfig(ballot=True, prefetch=True)):
            with pytest.raises(FormatError):
                rans_decode_gpu(bad, table, mm, device="cuda", config=config)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kvcodec_chunk_matches_the_codec(small_profile, dtype):
    dev = torch.device("cuda")
    for version in (1, 2):
        codec = KVCodec(small_profile, 1, version=version)
        for tokens, start in ((700, 0), (333, 50)):
            keys, values = synthetic_kv(tokens, int(np.random.SeedSequence().entropy % 1000), dtype)
            shape = tuple(keys.shape)
            obj = container.decode(container.encode(codec.encode(keys, values, start=start), kind="t"))
            k_gpu, v_gpu = codec.decode(obj, shape, dtype, dev)  # the default GPU path
            k_cpu, v_cpu = codec.decode(obj, shape, dtype, CPU)
            short = codec.entropy_code(codec.quantize(keys, values, start=start), lane_symbols=256)
            k2, v2 = decode_kvcodec_kernels(short, codec, shape, dtype, dev)
            assert torch.equal(k2, k_gpu) and torch.equal(v2, v_gpu)
            for plan in (("fused", "split") if version == 1 else ("auto",)):
                for config in (DecodeConfig(), DecodeConfig(block_g=2, ballot=False, prefetch=False)):
                    k1, v1 = decode_kvcodec_kernels(obj, codec, shape, dtype, dev, plan=plan, config=config)
                    assert torch.equal(k1, k_gpu) and torch.equal(v1, v_gpu), (version, plan, config)
                    torch.testing.assert_close(k1.cpu(), k_cpu, rtol=0, atol=0)
                    torch.testing.assert_close(v1.cpu(), v_cpu, rtol=2e-3, atol=1e-6)
