"""GPU rANS encoding and kvcodec chunk encoding (``kvstore.kernels.rans_encode``,
``kvstore.kernels.kvcodec_encode``) against the numba CPU encoder: the same bytes.

As in ``test_kernels_rans.py``, the Triton kernels run under Triton's interpreter where there
is no GPU (``TRITON_INTERPRET=1`` set by ``tests/triton_interpreter.py`` at import; if triton was imported earlier in the
process, :func:`test_interpreted_kernels_in_a_subprocess` runs the interpreted tests in a fresh
interpreter). The interpreter costs milliseconds per loop iteration of a program: small
streams, short lanes. The ``gpu`` tests run the compiled kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from triton_interpreter import CUDA, interp, rerun_interpreted, rerun_needed  # first: before triton

from kvstore.codecs import rans
from kvstore.codecs.kvcodec import KVCodec
from kvstore.codecs.kvcodec_profile import Level, build_profile
from benchmarks.rans import synthetic
from kvstore.codecs.symbol_model import FrequencyTable, count_symbols
from kvstore.errors import CodecError
from kvstore.format import container
from kvstore.kernels import encode_rans as dispatch_encode
from kvstore.kernels.kvcodec_encode import encode_kvcodec_kernels
from kvstore.kernels.kvcodec_decode import decode_kvcodec_kernels
from kvstore.kernels.quantize import quantize_kvcodec_gpu
from kvstore.kernels.rans_decode import DecodeConfig, rans_decode_gpu
from kvstore.kernels.rans_encode import EncodeConfig, encode_streams, plan_stream, rans_encode_gpu
from kvstore.kernels.torch_ops import rans_encode_ref

from kvcodec_samples import small_profile as fitted_small_profile, synthetic_kv

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
CPU = torch.device("cpu")


def make_symbols(rng, dims, precision=15, *, alphabet=256, bits=2.5, noise=0.003, permute=False, min_freq=1):
    """(symbols, table, model_map): Gaussian-ish symbols with a few uniform ones, per-(b, c) models."""
    B, T, C = dims
    sym, mm, _ = synthetic(B, T, C, alphabet=alphabet, bits=bits, seed=int(rng.integers(1 << 31)))
    table = FrequencyTable.from_counts(count_symbols(sym, mm, mm.size, alphabet), precision, min_freq=min_freq)
    if min_freq:
        flip = rng.random(sym.shape) < noise
        sym[flip] = rng.integers(0, alphabet, int(flip.sum()))
    if permute:
        mm = rng.permutation(mm.size).reshape(mm.shape)
    return sym, table, mm


CASES = [
    # dims, precision, group_size, extra, block_g
    ((2, 40, 24), 15, 256, {}, 8),
    ((3, 11, 5), 12, 96, {"permute": True}, 4),  # T*C < 32 per row: lanes cross rows
    ((1, 300, 1), 16, 320, {}, 8),  # P = 16: int64 table entries, frequencies up to 2**16
    ((2, 64, 64), 8, 32 * 16, {"alphabet": 40, "bits": 3.0}, 8),  # small alphabet, P = 8
    ((96, 21, 1), 15, 32 * 4, {}, 16),  # channel-major-like: [rows, T, 1], short last group
    ((4, 37, 33), 14, None, {}, 4),  # default group size: one group
]


# ----------------------------------------------------------------------------- interpreter tests


@interp
@pytest.mark.parametrize(("dims", "precision", "group_size", "extra", "block_g"), CASES)
def test_triton_encoder_writes_the_cpu_encoders_bytes(dims, precision, group_size, extra, block_g):
    rng = np.random.default_rng(abs(hash((dims, precision))) % (1 << 32))
    sym, table, mm = make_symbols(rng, dims, precision, **extra)
    expect = rans.encode(sym, table, mm, group_size=group_size)
    got = rans_encode_gpu(torch.from_numpy(sym), table, mm, group_size=group_size, config=EncodeConfig(block_g=block_g))
    assert got == expect
    assert rans_encode_ref(torch.from_numpy(sym), table, mm, group_size=group_size) == expect
    np.testing.assert_array_equal(rans.decode(got, table, mm), sym)  # both decoders read it
    np.testing.assert_array_equal(rans_decode_gpu(got, table, mm, device=CPU, config=DecodeConfig(block_g=8)).numpy(), sym)


@interp
def test_one_and_two_dimensional_and_empty_streams():
    rng = np.random.default_rng(6)
    sym, _, _ = make_symbols(rng, (1, 200, 1), 15)
    flat = sym.reshape(-1)
    t1 = FrequencyTable.from_counts(count_symbols(flat, None, 1), 15)
    cfg = EncodeConfig(block_g=4)
    assert rans_encode_gpu(torch.from_numpy(flat), t1, None, group_size=64, config=cfg) == rans.encode(flat, t1, None, group_size=64)
    two = rng.integers(0, 256, (50, 7)).astype(np.uint8)
    t7 = FrequencyTable.from_counts(count_symbols(two, np.arange(7), 7), 14)
    got = rans_encode_gpu(torch.from_numpy(two), t7, np.arange(7), group_size=96, config=cfg)
    assert got == rans.encode(two, t7, np.arange(7), group_size=96)
    empty = np.zeros(0, np.uint8)
    assert rans_encode_gpu(torch.from_numpy(empty), t1, None, config=cfg) == rans.encode(empty, t1, None)
    assert rans_encode_ref(torch.from_numpy(empty), t1, None) == rans.encode(empty, t1, None)


@interp
def test_one_launch_encodes_three_streams():
    """Three streams of different shapes, maps, tables and group sizes in one launch: each
    stream's bytes are the CPU encoder's."""
    rng = np.random.default_rng(12)
    cases = [make_symbols(rng, (2, 16, 32), 15), make_symbols(rng, (64, 9, 1), 15),
             make_symbols(rng, (3, 20, 7), 15, permute=True)]  # fmt: skip
    sizes = (32 * 8, 32 * 2, 32 * 4)
    plans = [plan_stream(s.shape, t, m, gs) for (s, t, m), gs in zip(cases, sizes, strict=True)]
    syms = [torch.from_numpy(s) for s, _, _ in cases]
    for backend in ("triton", "torch"):
        enc = encode_streams(syms, plans, config=EncodeConfig(block_g=4), backend=backend)
        for got, (s, t, m), gs in zip(enc.to_host(), cases, sizes, strict=True):
            assert got.tobytes() == rans.encode(s, t, m, group_size=gs), backend
        assert [o % 4 for o, _ in enc.spans] == [0, 0, 0]


@interp
def test_uncodable_symbols_raise_like_the_cpu_encoder():
    rng = np.random.default_rng(13)
    sym, table, mm = make_symbols(rng, (2, 30, 8), 15, min_freq=0)
    zero = np.argwhere(table.freqs[mm[0, 0]] == 0)
    assert zero.size
    sym[0, 5, 0] = int(zero[0, 0])  # frequency 0 in its model
    with pytest.raises(CodecError, match="frequency 0") as cpu:
        rans.encode(sym, table, mm, group_size=64)
    for fn in (rans_encode_gpu, rans_encode_ref):
        with pytest.raises(CodecError, match="frequency 0") as gpu_err:
            fn(torch.from_numpy(sym), table, mm, group_size=64)
        assert str(gpu_err.value) == str(cpu.value)
    small = FrequencyTable.from_counts(np.ones((16, 40)), 12)
    big = np.full((2, 30, 8), 41, dtype=np.uint8)  # outside the alphabet
    with pytest.raises(CodecError, match="outside the alphabet"):
        rans_encode_gpu(torch.from_numpy(big), small, np.arange(16).reshape(2, 8), group_size=64)


@pytest.fixture(scope="module")
def small_profile():
    return fitted_small_profile()


@interp
@pytest.mark.parametrize(("version", "tokens", "start", "dtype"), [
    (2, 7, 0, torch.float16), (2, 6, 50, torch.bfloat16), (1, 7, 2, torch.float16),
])  # fmt: skip
def test_kvcodec_gpu_encoder_writes_the_cpu_codecs_chunk(small_profile, version, tokens, start, dtype):
    codec = KVCodec(small_profile, 1, version=version)
    keys, values = synthetic_kv(tokens, 60 + tokens, dtype)
    keys[1, 0, tokens - 1, 4] = 5000.0  # a patch
    cpu = codec.encode(keys, values, start=start)
    for backend, quantize in (("triton", "triton"), ("torch", "triton"), ("triton", "torch")):
        got = encode_kvcodec_kernels(codec, keys, values, start=start, backend=backend, quantize=quantize,
                                 config=EncodeConfig(block_g=16))  # fmt: skip
        assert container.encode(got, kind="t") == container.encode(cpu, kind="t"), (backend, quantize)
    # several groups per stream: still the CPU encoder's bytes, and both decoders read them
    short = encode_kvcodec_kernels(codec, keys, values, start=start, lane_symbols=4, config=EncodeConfig(block_g=16))
    assert rans.read_header(short["k"]).num_groups > 1
    expect = codec.entropy_code(codec.quantize(keys, values, start=start), lane_symbols=4)
    for name in ("k", "v", "scales"):
        assert short[name].tobytes() == expect[name], name
    obj = container.decode(container.encode(short, kind="t"))
    shape = tuple(keys.shape)
    k0, v0 = codec.decode(obj, shape, dtype, CPU)
    k_ref, v_ref = codec.decode(container.decode(container.encode(cpu, kind="t")), shape, dtype, CPU)
    assert torch.equal(k0, k_ref) and torch.equal(v0, v_ref)
    on_device = encode_kvcodec_kernels(codec, keys, values, start=start, lane_symbols=4, to_host=False,
                                   config=EncodeConfig(block_g=16))  # fmt: skip
    assert isinstance(on_device["k"], torch.Tensor)
    k1, v1 = decode_kvcodec_kernels(on_device, codec, shape, dtype, CPU, config=DecodeConfig(block_g=16))
    if dtype == torch.bfloat16:  # the interpreter rounds fp32 -> bf16 by truncation (see test_kernels_rans)
        torch.testing.assert_close(k1.float(), k0.float(), rtol=2**-7, atol=0)
        torch.testing.assert_close(v1.float(), v0.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(k1, k0) and torch.equal(v1, v0)


def _kv(L: int, H: int, T: int, D: int, seed: int, dtype: torch.dtype = torch.float32):
    """Keys with per-channel offsets, values with per-token scales, ``[L, H, T, D]`` (any D)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, H, T, D, generator=g) * (1 + torch.arange(D) % 3) + torch.linspace(-2, 2, D)
    values = torch.randn(L, H, T, D, generator=g) * torch.exp(torch.randn(L, H, T, 1, generator=g))
    return keys.to(dtype), values.to(dtype)


def assert_same_quantization(codec, keys, values, start):
    """The fused kernel's symbols, codes, sinks and patches equal the torch quantization's."""
    fused = quantize_kvcodec_gpu(codec, keys, values, start=start)
    expect = codec.quantize_tensors(keys, values, start=start)
    for name, a, b in zip(("k", "v", "scales"), fused[:3], expect[:3], strict=True):
        assert a.dtype == torch.uint8 and a.shape == b.shape and torch.equal(a, b), name
    assert sorted(fused[3]) == sorted(expect[3])
    for name, t in expect[3].items():
        assert torch.equal(fused[3][name], t), name
    return fused[3]


@interp
@pytest.mark.parametrize(("version", "start", "dtype"), [(2, 0, torch.float16), (1, 50, torch.bfloat16), (2, 2, torch.float32)])
def test_fused_quantization_equals_the_torch_quantization(small_profile, version, start, dtype):
    """Both layouts, sinks (none, all four, two), a key patch, three input dtypes."""
    codec = KVCodec(small_profile, 3, version=version)
    keys, values = synthetic_kv(37, 80 + start, dtype)
    keys[0, 1, 20, 7] = 3000.0
    raw = assert_same_quantization(codec, keys, values, start)
    assert "k_patch_index" in raw and ("sink_k" in raw) == (start < 4)


@interp
def test_fused_quantization_any_head_dim_and_value_patches():
    """D = 24 (not a power of two: masked tile columns), a level fine enough that values need
    patches, tokens not a multiple of the tile."""
    samples = [_kv(1, 2, 64, 24, seed) for seed in (1, 2)]
    profile = build_profile(samples, levels=(Level(0.5, 0.4), Level(0.3, 0.004)))
    keys, values = _kv(1, 2, 45, 24, 3)
    for version in (1, 2):
        raw = assert_same_quantization(KVCodec(profile, 1, version=version), keys, values, 1)
        assert raw["v_patch_index"].numel() > 10


@interp
@pytest.mark.parametrize(("which", "bad"), [(0, float("nan")), (1, float("inf")), (1, float("nan"))])
def test_fused_quantization_refuses_non_finite_kv(small_profile, which, bad):
    kv = list(synthetic_kv(20, 5))
    kv[which][1, 1, 9, 3] = bad
    with pytest.raises(CodecError, match="NaN or infinite"):
        quantize_kvcodec_gpu(KVCodec(small_profile, 2), *kv, start=0)


@interp
def test_old_layout_chunk_decodes_on_the_triton_decoder():
    """The token-major chunk stored before the format version existed (``test_kvcodec``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_kvcodec import old_chunk

    codec, obj = old_chunk()
    k0, v0 = codec.decode(obj, (2, 2, 40, 8), torch.float16, CPU)
    for plan in ("split", "fused"):
        k1, v1 = decode_kvcodec_kernels(obj, codec, (2, 2, 40, 8), torch.float16, CPU, plan=plan,
                                    config=DecodeConfig(block_g=4))  # fmt: skip
        assert torch.equal(k0, k1) and torch.equal(v0, v1), plan


@interp
def test_kernels_benchmark_runs_on_a_small_shape(small_profile):
    """``kvstore bench kernels``'s measurement code on a tiny chunk under the interpreter (one
    timing call per figure): every figure present, the checks true."""
    import time

    from benchmarks.kernels import measure

    def bench(fn, rep=0):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    result = measure(CPU, (1, 2, 8, 16), True, bench, lambda: None)
    assert result["encode_GBps"] > 0 and result["decode_GBps"] > 0
    assert result["decode_host_us"] > 0 and result["decode_prelaunch_us"] > 0
    assert result["checks"]["gpu_encoder_streams_identical_to_cpu"]
    assert result["checks"]["fused_quantize_mismatches"] == {"k": 0, "v": 0, "scales": 0}
    assert result["checks"]["equal_to_codec_decode"] and result["checks"]["keys_equal_to_cpu_decode"]
    assert result["chunk"]["version"] == 2
    assert all(row["bit_identical"] for row in result["group_size_study"])


# ----------------------------------------------------------------------------- no kernel needed


def test_torch_backend_encodes_a_chunk_on_the_cpu(small_profile):
    """``backend="torch"`` works off CUDA (quantization by torch there, or by the fused kernel
    under the interpreter): the CPU codec's chunk."""
    codec = KVCodec(small_profile, 2)
    keys, values = synthetic_kv(9, 21)
    got = encode_kvcodec_kernels(codec, keys, values, start=0, backend="torch", config=EncodeConfig(block_g=16))
    assert container.encode(got, kind="t") == container.encode(codec.encode(keys, values, start=0), kind="t")
    with pytest.raises(CodecError, match="quantize must be"):
        encode_kvcodec_kernels(codec, keys, values, quantize="numpy")


def test_reference_encoder_matches_cpu_on_many_shapes():
    rng = np.random.default_rng(22)
    for dims in [(1, 1, 1), (1, 31, 1), (2, 7, 3), (3, 50, 40), (1, 1000, 1), (5, 3, 70), (40, 33, 1)]:
        for precision in (8, 11, 15, 16):
            sym, table, mm = make_symbols(rng, dims, precision, permute=bool(rng.integers(2)))
            gs = 32 * int(rng.integers(1, 9))
            assert rans_encode_ref(torch.from_numpy(sym), table, mm, group_size=gs) == rans.encode(
                sym, table, mm, group_size=gs
            ), (dims, precision, gs)


def test_plan_checks_match_the_cpu_encoder():
    table = FrequencyTable.from_counts(np.ones((4, 256)), 15)
    for bad in ({"group_size": 33}, {"group_size": 0}):
        with pytest.raises(CodecError):
            plan_stream((2, 10, 2), table, np.arange(4).reshape(2, 2), **bad)
    with pytest.raises(CodecError):
        plan_stream((2, 10, 2), table, np.arange(5).reshape(1, 5))
    with pytest.raises(CodecError):
        plan_stream((2, 10, 2), table, np.full((2, 2), 4))  # model out of range
    p = plan_stream((2, 10, 2), table, np.arange(4).reshape(2, 2))
    assert p.identity and p.group_size == 64 and p.num_groups == 1
    assert not plan_stream((2, 10, 2), table, np.array([[1, 0], [2, 3]])).identity


def test_dispatch_uses_the_reference_off_cuda():
    rng = np.random.default_rng(9)
    sym, table, mm = make_symbols(rng, (2, 10, 8), 15)
    assert dispatch_encode(torch.from_numpy(sym), table, mm, group_size=64) == rans.encode(sym, table, mm, group_size=64)


@rerun_needed
def test_interpreted_kernels_in_a_subprocess():
    """Triton was imported before this module could switch its interpreter on: run the
    interpreted tests in a fresh process."""
    rerun_interpreted(__file__)


# ----------------------------------------------------------------------------- on a GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("config", [EncodeConfig(), EncodeConfig(ballot=False), EncodeConfig(block_g=4, num_warps=4)],
                         ids=lambda c: f"g{c.block_g}w{c.num_warps}b{int(c.ballot)}")  # fmt: skip
def test_gpu_encoder_random_streams_byte_identical(config):
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    rng = np.random.default_rng(seed)
    dev = torch.device("cuda")
    for dims, precision, gs in [((16, 512, 128), 15, None), ((8, 300, 40), 16, 32 * 40), ((4, 77, 3), 12, 32 * 3),
                                ((4096, 200, 1), 15, 32 * 64), ((1, 100_000, 1), 15, 32 * 100)]:  # fmt: skip
        sym, table, mm = make_symbols(rng, dims, precision, permute=bool(rng.integers(2)))
        expect = rans.encode(sym, table, mm, group_size=gs)
        got = rans_encode_gpu(torch.from_numpy(sym).to(dev), table, mm, group_size=gs, config=config)
        assert got == expect, (seed, dims)
        np.testing.assert_array_equal(rans_decode_gpu(got, table, mm, device=dev).cpu().numpy(), sym)


@gpu
@needs_cuda
@pytest.mark.parametrize("version", [1, 2])
def test_gpu_kvcodec_encode_reads_back_on_both_decoders(small_profile, version):
    """KV on the GPU: ``codec.encode`` runs the GPU encoder; its streams are the CPU encoder's
    bytes for the same (GPU-quantized) symbols, and the CPU and GPU decoders agree."""
    dev = torch.device("cuda")
    codec = KVCodec(small_profile, 1, version=version)
    keys, values = synthetic_kv(700, int(np.random.SeedSequence().entropy % 1000))
    kd, vd = keys.to(dev), values.to(dev)
    buffers = codec.encode(kd, vd, start=0)
    q = quantize_kvcodec_gpu(codec, kd, vd, start=0)  # the fused quantization the encoder ran
    for name, sym, spec in zip(("k", "v", "scales"), q[:3], codec.streams(700), strict=True):
        assert buffers[name].tobytes() == rans.encode(sym.cpu().numpy(), spec.table, spec.model_map,
                                                      group_size=spec.group_size)  # fmt: skip
    obj = container.decode(container.encode(buffers, kind="t"))
    k_cpu, v_cpu = codec.decode(obj, tuple(keys.shape), torch.float16, CPU)
    k_gpu, v_gpu = codec.decode(obj, tuple(keys.shape), torch.float16, dev)
    assert torch.equal(k_gpu.cpu(), k_cpu)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=2e-3, atol=1e-6)
    cpu_obj = container.decode(container.encode(codec.encode(keys, values, start=0), kind="t"))
    sizes = [sum(o.header.buffers[n].nbytes for n in ("k", "v", "scales")) for o in (obj, cpu_obj)]
    assert abs(sizes[0] / sizes[1] - 1) < 1e-3  # at most a rare value scale code rounds differently


@gpu
@needs_cuda
@pytest.mark.parametrize("version", [1, 2])
def test_gpu_fused_quantization_matches_torch_up_to_scale_code_ties(small_profile, version):
    """On the GPU the fused kernel's ``log2`` and sum of squares are not rounded like torch's:
    keys and key patches are equal, a scale code differs in a rare tie (by one), and every
    token whose code agrees has equal value symbols."""
    dev = torch.device("cuda")
    codec = KVCodec(small_profile, 1, version=version)
    T = 3000
    keys, values = synthetic_kv(T, int(np.random.SeedSequence().entropy % 1000))
    keys[1, 0, 100, 3] = 3000.0
    fk, fv, fs, fraw = quantize_kvcodec_gpu(codec, keys.to(dev), values.to(dev), start=0)
    tk, tv, ts, traw = codec.quantize_tensors(keys.to(dev), values.to(dev), start=0)
    assert torch.equal(fk, tk)
    assert torch.equal(fraw["k_patch_index"], traw["k_patch_index"]) and torch.equal(fraw["k_patch_value"], traw["k_patch_value"])
    diff = fs.view(-1).int() - ts.view(-1).int()
    assert int(diff.abs().max()) <= 1 and float((diff != 0).float().mean()) <= 1e-3
    same = (diff == 0).view(-1, T)  # [L*H, T]
    L, H, _, D = keys.shape
    fv, tv = (fv.view(L * H, D, T), tv.view(L * H, D, T)) if version == 2 else (fv.view(L * H, T, D).transpose(1, 2), tv.view(L * H, T, D).transpose(1, 2))
    assert torch.equal(fv.transpose(1, 2)[same], tv.transpose(1, 2)[same])
