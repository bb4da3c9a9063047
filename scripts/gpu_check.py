"""A GPU smoke check of kvcodec on CUDA: encoder, decoder, both stream layouts, the store path.

1. Store path, KV on the GPU: ``put`` encodes with the GPU encoder (channel-major, format
   version 2), ``get`` on CUDA equals ``get`` on the CPU at every level.
2. Store path, token-major chunks (format version 1, as stored before the version existed),
   encoded on the CPU: CUDA decode equals CPU decode at every level.
3. The GPU encoder's streams are byte-identical to the CPU encoder's for the same symbols, on
   a Llama-3-8B-shaped 2,048-token chunk; how many symbols the fused GPU quantization and the
   torch one on the GPU round differently from the CPU's (keys: none; scale codes: rare ties);
   a rough encode and decode speed (``kvstore bench kernels``
   has the real figures).
4. kvcodec3 through the store, KV on the GPU: ``get`` on CUDA (the Triton inverse transform)
   within rounding of ``get`` on the CPU at every level.

Run: ``python scripts/gpu_check.py`` (exits non-zero on any mismatch).
"""

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # the checkout: benchmarks/, eval/
import asyncio
import time

import torch

from kvstore import KVStore
from benchmarks.kernels import SHAPE
from benchmarks.kernels import synthetic_kv as llama_kv
from kvstore.codecs import rans
from kvstore.codecs.kvcodec import DEFAULT_LEVEL, KVCodec
from kvstore.codecs.kvcodec_profile import build_profile
from kvstore.format import container
from kvstore.kernels.kvcodec_encode import encode_kvcodec_kernels
from kvstore.kernels.kvcodec_decode import decode_kvcodec_kernels
from kvstore.kernels.quantize import quantize_kvcodec_gpu


def synthetic(L=4, H=2, T=600, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, H, T, D, generator=g) * torch.linspace(0.5, 4, D) + 1.0
    v = torch.randn(L, H, T, D, generator=g) * torch.exp(torch.randn(L, H, T, 1, generator=g))
    return k.half(), v.half()


async def store_round_trip(levels, kv, device_in: str, label: str) -> None:
    k, v = kv
    tokens = list(range(k.shape[2]))
    async with KVStore("memory://", levels=levels) as store:
        layers = list(zip(k.to(device_in).unbind(0), v.to(device_in).unbind(0)))
        await store.put("gpu-check", tokens, layers)
        for level in range(len(levels)):
            cpu = await store.get("gpu-check", tokens, level=level, device="cpu")
            gpu = await store.get("gpu-check", tokens, level=level, device="cuda")
            same = all(torch.equal(a.cpu(), b) and torch.equal(c.cpu(), d) for (a, c), (b, d) in zip(gpu, cpu))
            print(f"{label} level {level}: cuda decode equals cpu decode: {same}")
            assert same and gpu[0][0].is_cuda


def timed(fn, reps: int = 5) -> float:
    """Median seconds of ``fn`` on the GPU (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def encoder_check() -> None:
    dev = torch.device("cuda")
    T = SHAPE[2]
    samples = [tuple(t.cpu() for t in llama_kv(T // 2, s, dev)) for s in (1, 2)]
    profile = build_profile(samples)
    keys, values = llama_kv(T, 7, dev)
    fp16_bytes = 2 * keys.numel() * 2
    for version in (2, 1):
        codec = KVCodec(profile, DEFAULT_LEVEL, version=version)
        buffers = codec.encode(keys, values)  # dispatches to the GPU encoder (fused quantization)
        fused = [t.cpu().numpy() for t in quantize_kvcodec_gpu(codec, keys, values)[:3]]
        specs = codec.streams(T)
        for name, sym, spec in zip(("k", "v", "scales"), fused, specs):
            same = buffers[name].tobytes() == rans.encode(sym, spec.table, spec.model_map, group_size=spec.group_size)
            print(f"version {version} stream {name}: gpu encoder bytes equal cpu encoder bytes: {same}")
            assert same
        q_gpu = codec.quantize(keys, values)  # torch quantization on the GPU, symbols on the host
        q_cpu = codec.quantize(keys.cpu(), values.cpu())
        for label, q in (("fused kernel", fused), ("torch on the GPU", (q_gpu.keys, q_gpu.values, q_gpu.scales))):
            differ = {n: int((a != b).sum()) for n, a, b in zip(("keys", "values", "scales"), q,
                                                                (q_cpu.keys, q_cpu.values, q_cpu.scales))}
            print(f"version {version}: symbols the {label} quantization rounds differently from the CPU: {differ}")
            assert differ["keys"] == 0 and differ["scales"] <= 1e-3 * q_cpu.scales.size
        obj = container.decode(container.encode(buffers, kind="check"))
        k_gpu, v_gpu = codec.decode(obj, SHAPE, torch.float16, dev)
        k_cpu, v_cpu = codec.decode(obj, SHAPE, torch.float16, torch.device("cpu"))
        same = torch.equal(k_gpu.cpu(), k_cpu) and torch.equal(v_gpu.cpu(), v_cpu)
        print(f"version {version}: gpu-encoded chunk, cuda decode equals cpu decode: {same}")
        assert same
        size = sum(len(buffers[n]) for n in ("k", "v", "scales"))
        enc = timed(lambda c=codec: encode_kvcodec_kernels(c, keys, values))
        dec = timed(lambda c=codec, o=obj: decode_kvcodec_kernels(o, c, SHAPE, torch.float16, dev))
        print(f"version {version}: {8 * size / (2 * keys.numel()):.3f} bits/element in streams; "
              f"encode {fp16_bytes / enc / 1e9:.1f} GB/s, decode (from host memory) {fp16_bytes / dec / 1e9:.1f} GB/s")


async def transform_round_trip() -> None:
    from tests.transform_samples import correlated_kv, transform_profile

    from kvstore.codecs.kvcodec3 import KVCodec3

    profile = transform_profile()
    keys, values = correlated_kv(600, seed=9)
    tokens = list(range(keys.shape[2]))
    levels = [KVCodec3(profile, i) for i in range(len(profile.levels))]
    async with KVStore("memory://", levels=levels) as store:
        await store.put("gpu-check-3", tokens, list(zip(keys.cuda().unbind(0), values.cuda().unbind(0))))
        for level in range(len(levels)):
            cpu = await store.get("gpu-check-3", tokens, level=level, device="cpu")
            gpu = await store.get("gpu-check-3", tokens, level=level, device="cuda")
            err = max(float((a.cpu().float() - b.float()).abs().max()) for pair_g, pair_c in zip(gpu, cpu)
                      for a, b in zip(pair_g, pair_c))
            scale = max(float(t.abs().max()) for pair in cpu for t in pair)
            print(f"kvcodec3 level {level}: cuda decode vs cpu decode, max abs difference {err:.2e} of {scale:.2e}")
            assert err <= 4e-3 * scale and gpu[0][0].is_cuda


async def main() -> None:
    kv = synthetic()
    profile = build_profile([synthetic(seed=s) for s in (1, 2)], query_energy=torch.rand(4, 2, 64) + 0.1)
    n = len(profile.levels)
    await store_round_trip([KVCodec(profile, i) for i in range(n)], kv, "cuda", "channel-major, gpu-encoded")
    await store_round_trip([KVCodec(profile, i, version=1) for i in range(n)], kv, "cpu", "token-major, cpu-encoded")
    encoder_check()
    await transform_round_trip()


asyncio.run(main())
