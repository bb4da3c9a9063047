"""kvcodec3's GPU decode (``kvstore.kernels.kvcodec3_decode``): the Triton kernels and their torch
versions against the codec's CPU decoder.

Without CUDA the kernels run under Triton's interpreter, switched on before ``triton`` is
first imported (``tests/triton_interpreter.py``); if triton was imported earlier in
the process, the interpreted tests run in a fresh interpreter instead. Shapes are small: the
interpreter runs each program's loop in numpy.
"""

from __future__ import annotations

import pytest
import torch

from triton_interpreter import CUDA, INTERP, interp, rerun_interpreted, rerun_needed  # first: before triton

from kvstore.codecs.kvcodec3 import KVCodec3
from kvstore.codecs.kvcodec3_profile import fit_transform, transform_groups, with_levels
from kvstore.errors import FormatError
from kvstore.format import container
from kvstore.kernels import interpreter_supported
from kvstore.kernels.kvcodec3_decode import decode_kvcodec3_kernels
from tests.transform_samples import LEVELS, L, correlated_kv, rope_table, transform_profile

DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not (CUDA or INTERP) or not interpreter_supported(),
                                                                     reason="needs CUDA or the Triton interpreter"))]


@pytest.fixture(scope="module")
def profile():
    return transform_profile()


def shaped_profile(shape: tuple[int, int, int], group_layers: int = 2):
    samples = [correlated_kv(200, s, shape=shape) for s in range(3)]
    fitted = fit_transform(samples, rope=rope_table(shape[0], shape[2]), key_weight=torch.rand(*shape) + 0.5,
                           groups=transform_groups(("full",) * shape[0], group_layers))
    return with_levels(fitted, samples, LEVELS)


def encoded(codec: KVCodec3, keys: torch.Tensor, values: torch.Tensor, start: int):
    return container.decode(container.encode(codec.encode(keys, values, start=start), kind="t"))


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to the rounding of the GEMM's fp16 products and the order of its sums."""
    scale = float(want.float().abs().max()) + 1e-6
    err = float((got.float() - want.float()).abs().max())
    assert err <= 2e-3 * scale + (2e-3 * scale if want.dtype == torch.float16 else 0), (err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("level", "start"), [(0, 0), (2, 300), (5, 70)])
def test_kernels_decode_what_the_codec_decodes(profile, backend, level, start):
    """Every level, chunks at the context start (sinks) and later: the kernels rebuild the
    CPU decoder's keys (RoPE redone at the chunk's positions) and values (row scales)."""
    keys, values = correlated_kv(70, seed=11, start=start)
    codec = KVCodec3(profile, level)
    obj = encoded(codec, keys, values, start)
    want = codec.decode(obj, tuple(keys.shape), torch.float32, torch.device("cpu"))
    got = decode_kvcodec3_kernels(codec, obj, tuple(keys.shape), torch.float32, DEVICE, backend=backend)
    for g, w in zip(got, want):
        assert g.device.type == DEVICE.type and g.dtype == torch.float32
        assert_close(g.cpu(), w)
    if start == 0:  # the sinks come back bit for bit
        s = profile.sink_tokens
        assert torch.equal(got[0][:, :, :s].cpu(), keys[:, :, :s]) and torch.equal(got[1][:, :, :s].cpu(), values[:, :, :s])


@pytest.mark.parametrize("backend", BACKENDS)
def test_patches_and_exact_tokens_on_the_kernel_path(profile, backend):
    """Coordinates beyond the symbols (patches: the float32 path of the kernel) and tokens the
    bases cannot represent (stored exactly) decode as on the CPU, in fp16."""
    keys, values = correlated_kv(40, seed=5, start=8, scale=20)
    keys, values = keys.half(), values.half()
    keys[1, 0, 7] = 500.0
    codec = KVCodec3(profile, 0)
    obj = encoded(codec, keys, values, 8)
    assert {"k_patch_index", "exact_tokens"} <= set(obj.header.buffers)
    want = codec.decode(obj, tuple(keys.shape), torch.float16, torch.device("cpu"))
    got = decode_kvcodec3_kernels(codec, obj, tuple(keys.shape), torch.float16, DEVICE, backend=backend)
    assert_close(got[0].cpu(), want[0])
    assert_close(got[1].cpu(), want[1])
    assert torch.equal(got[0][:, :, 7].cpu(), keys[:, :, 7])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 256), (2, 2, 80), (3, 3, 32)])
def test_every_head_shape_decodes_into_a_strided_output(backend, shape):
    """One KV head x 256 (Gemma 3), 80-wide heads (a half that is no power of two), an odd
    number of layers per group; written into views of a larger tensor, as ``get`` passes them,
    without touching anything outside."""
    prof = shaped_profile(shape)
    keys, values = correlated_kv(50, seed=2, start=16, shape=shape)
    codec = KVCodec3(prof, 1)
    obj = encoded(codec, keys, values, 16)
    want = codec.decode(obj, tuple(keys.shape), torch.float32, torch.device("cpu"))
    big = torch.full((2, shape[0], shape[1], 80, shape[2]), 7.0, device=DEVICE)
    out = (big[0, :, :, 10:60], big[1, :, :, 10:60])
    decode_kvcodec3_kernels(codec, obj, tuple(keys.shape), torch.float32, DEVICE, backend=backend, out=out)
    assert_close(out[0].cpu(), want[0])
    assert_close(out[1].cpu(), want[1])
    assert bool((big[:, :, :, :10] == 7).all()) and bool((big[:, :, :, 60:] == 7).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_group_codec_decodes_its_layers(profile, backend):
    keys, values = correlated_kv(30, seed=4)
    part = KVCodec3(profile, 1).for_layers((2, 3), L)
    k, v = keys[2:].contiguous(), values[2:].contiguous()
    obj = encoded(part, k, v, 0)
    want = part.decode(obj, tuple(k.shape), torch.float32, torch.device("cpu"))
    got = decode_kvcodec3_kernels(part, obj, tuple(k.shape), torch.float32, DEVICE, backend=backend)
    assert_close(got[0].cpu(), want[0])
    assert_close(got[1].cpu(), want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_streams_of_another_level_are_refused(profile, backend):
    """A chunk's streams read under another level's symbol models: the decoder's error flags
    (or the host's header checks) raise, as on the CPU."""
    keys, values = correlated_kv(40, seed=6)
    obj = encoded(KVCodec3(profile, 2), keys, values, 0)
    with pytest.raises(FormatError):
        decode_kvcodec3_kernels(KVCodec3(profile, 5), obj, tuple(keys.shape), torch.float32, DEVICE, backend=backend)
    buffers = KVCodec3(profile, 2).encode(keys, values, start=0)
    words = bytearray(buffers["v"])
    words[-8:] = bytes(8)  # the last words of the stream zeroed (the container's checksum made anew)
    forged = container.decode(container.encode(dict(buffers, v=bytes(words)), kind="t"))
    with pytest.raises(FormatError):
        decode_kvcodec3_kernels(KVCodec3(profile, 2), forged, tuple(keys.shape), torch.float32, DEVICE, backend=backend)


@interp
def test_a_cuda_device_takes_the_kernels_through_the_codec(profile, monkeypatch):
    """``KVCodec3.decode`` asks the device registry for its CUDA implementation: the kernels."""
    from kvstore.codecs import devices

    impl = devices.find_impl("kvcodec3", "cuda", "decode")
    assert impl is not None and impl.__module__ == "kvstore.kernels.codec_impls"


@rerun_needed
def test_interpreted_kernels_in_a_subprocess():
    """Triton was imported before this module could switch its interpreter on: run the
    interpreted tests in a fresh process."""
    rerun_interpreted(__file__)


@interp
def test_kernels_benchmark_part_runs_on_a_small_shape():
    """``kvstore bench kernels``'s kvcodec3 figures on a tiny chunk under the interpreter (one
    timing call per figure): every figure present, the decode within rounding of the CPU's."""
    import time

    from benchmarks.kernels_kvcodec3 import figures

    def bench(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    result = figures(torch.device("cpu"), bench, lambda: None, (2, 1, 24, 32), repeats=1)
    assert result["key_rank"] == round(2239 / 5760 * 2 * 32)  # SmolLM2's level 2 share of one group's features
    for name in ("decode_GBps", "decode_kernels_GBps", "rans_GBps", "reconstruct_GBps", "reconstruct_TFLOPs",
                 "decode_e2e_GBps", "bits_per_element"):
        assert result[name] > 0, name
    assert result["max_abs_err_vs_cpu"] <= 4e-3 * result["max_abs_kv"]
