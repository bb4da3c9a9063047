"""``kvstore bench kernels``, kvcodec3 part: the transform codec's decode on the GPU.

One chunk of the kernels benchmark's Llama-3-8B shape (32 layers, 8 KV heads, 128 dims,
2,048 tokens; 268 MB of fp16 KV) and one of SmolLM2's shape (30 x 3 x 64, 8,192 tokens;
94 MB), under synthetic profiles with kvcodec3's default transform groups (5 layers) and
the share of components SmolLM2's level 2 codes (2,239 and 3,795 of 5,760 features for
keys and values, ``benchmarks/RESULTS.md``): the decode's work grows with the rank of each
group, so these ranks, not the data, set its speed. Figures per shape (GB/s of fp16 KV):

- ``decode_GBps``: the rANS launch and the inverse-transform kernels on streams already on
  the device, with the error check (one synchronization); ``decode_kernels_GBps`` without it;
- ``rans_GBps`` / ``reconstruct_GBps``: each part alone;
- ``reconstruct_TFLOPs``: the GEMMs' rate (2 x tokens x rank x features per group, K and V);
- ``decode_e2e_GBps``: :func:`decode_kvcodec3_kernels` from the chunk's container in host memory;
- ``max_abs_err_vs_cpu`` / ``max_abs_kv``: the GPU decode against ``KVCodec3.decode`` on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from kvstore.codecs.kvcodec3 import KVCodec3
from kvstore.codecs.kvcodec3_profile import DEFAULT_GROUP_LAYERS, TransformProfile, transform_groups, with_levels
from kvstore.codecs.kvcodec_profile import Level
from kvstore.codecs.pca import Basis
from kvstore.codecs.rope import RotaryTable
from kvstore.format import container

SHAPES = {"llama8b": (32, 8, 2048, 128), "smollm2": (30, 3, 8192, 64)}
#: shares of each group's features SmolLM2's level 2 codes (keys, values)
RANK_SHARES = (2239 / 5760, 3795 / 5760)


def synthetic_profile(shape: tuple[int, int, int], shares: tuple[float, float] = RANK_SHARES,
                      sample_tokens: int = 256) -> TransformProfile:  # fmt: skip
    """A one-level kvcodec3 profile of ``shape`` ``(L, H, D)`` whose groups code ``shares`` of
    their features: random near-orthonormal components, coordinate spreads from 2 steps down to
    a third of one, symbol tables counted on ``sample_tokens`` tokens drawn from them."""
    L, H, D = shape
    groups = transform_groups(["full"] * L, DEFAULT_GROUP_LAYERS)
    gen = torch.Generator().manual_seed(0)

    def basis(p: int, share: float) -> Basis:
        r = max(1, round(share * p))
        components = (torch.randn(p, r, generator=gen) / math.sqrt(p)).half()
        return Basis(torch.zeros(p), components, torch.linspace(4.0, 0.1, r))

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    rope = RotaryTable(inv_freq.repeat(L, 1).contiguous(), torch.ones(L))
    features = [len(g) * H * D for g in groups]
    fitted = TransformProfile(L, H, D, groups, torch.ones(L, H, D), rope, tuple(basis(p, shares[0]) for p in features),
                              tuple(basis(p, shares[1]) for p in features), (), (), 4)  # fmt: skip

    codes = torch.randint(-4, 4, (L, H, sample_tokens), generator=gen)
    keys = fitted.keys_from_coordinates(_coordinates(fitted.key_bases, sample_tokens, gen), 0)
    values = fitted.values_from_coordinates(_coordinates(fitted.value_bases, sample_tokens, gen), codes)
    return with_levels(fitted, [(keys, values)], [Level(1.0, 1.0)])


def _coordinates(bases: tuple[Basis, ...], tokens: int, gen: torch.Generator) -> torch.Tensor:
    """``[tokens, sum of ranks]`` coordinates drawn with each basis's calibration spreads."""
    return torch.cat([torch.randn(tokens, b.rank, generator=gen) * b.variances.sqrt() for b in bases], dim=1)


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def figures(dev: torch.device, bench: Callable[[Callable[[], Any]], float], sync: Callable[[], None],
            shape: tuple[int, int, int, int], *, repeats: int = 3) -> dict[str, Any]:  # fmt: skip
    """Every figure of the module doc for one chunk ``shape`` ``[L, H, T, D]`` on ``dev``
    (``bench(fn) -> ms``; ``repeats``: end-to-end decodes, the median kept; tests run a small
    shape on the CPU under the Triton interpreter)."""
    from kvstore.kernels.kvcodec3_decode import decode_kvcodec3_kernels, reconstruct_chunk, upload_symbol_streams

    L, H, T, D = shape
    profile = synthetic_profile((L, H, D))
    codec = KVCodec3(profile, 0)
    gen = torch.Generator().manual_seed(1)
    start = 4096  # past the sinks: every token coded
    keys = profile.keys_from_coordinates(_coordinates(profile.key_bases, T, gen), start)
    values = profile.values_from_coordinates(_coordinates(profile.value_bases, T, gen),
                                             torch.randint(-4, 4, (L, H, T), generator=gen))  # fmt: skip
    keys, values = keys.half(), values.half()
    obj = container.decode(container.encode(codec.encode(keys, values, start=start), kind="bench"))
    kv_bytes = 2 * keys.numel() * 2
    stored = sum(len(obj.raw(n)) for n in ("k", "v", "scales"))
    streams = upload_symbol_streams(codec, obj, T, dev)
    out = (torch.empty(shape, dtype=torch.float16, device=dev), torch.empty(shape, dtype=torch.float16, device=dev))
    symbols, err = streams.decode()

    def kernels() -> None:
        s, _ = streams.decode()
        reconstruct_chunk(codec, s, out, start)

    def checked() -> None:
        s, e = streams.decode()
        reconstruct_chunk(codec, s, out, start)
        if e is not None and bool(e.any()):
            raise AssertionError("rANS error flags raised on a valid chunk")

    rans_ms = bench(lambda: streams.decode())
    reconstruct_ms = bench(lambda: reconstruct_chunk(codec, symbols, out, start))
    kernels_ms = bench(kernels)
    decode_ms = bench(checked)
    e2e = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        decode_kvcodec3_kernels(codec, obj, shape, torch.float16, dev)
        sync()
        e2e.append(time.perf_counter() - t0)
    k_gpu, v_gpu = decode_kvcodec3_kernels(codec, obj, shape, torch.float16, dev)
    k_cpu, v_cpu = codec.decode(obj, shape, torch.float16, torch.device("cpu"))
    err_max = max(float((k_gpu.cpu().float() - k_cpu.float()).abs().max()),
                  float((v_gpu.cpu().float() - v_cpu.float()).abs().max()))  # fmt: skip
    flops = 2 * T * sum(b.rank * b.features for b in (*profile.key_bases, *profile.value_bases))
    return {
        "shape": list(shape),
        "bits_per_element": 8 * stored / (2 * keys.numel()),
        "key_rank": profile.key_rank,
        "value_rank": profile.value_rank,
        "decode_GBps": _gbps(kv_bytes, decode_ms),
        "decode_kernels_GBps": _gbps(kv_bytes, kernels_ms),
        "rans_GBps": _gbps(kv_bytes, rans_ms),
        "reconstruct_GBps": _gbps(kv_bytes, reconstruct_ms),
        "reconstruct_TFLOPs": flops / (reconstruct_ms * 1e-3) / 1e12,
        "decode_e2e_GBps": kv_bytes / sorted(e2e)[len(e2e) // 2] / 1e9,
        "max_abs_err_vs_cpu": err_max,
        "max_abs_kv": float(max(keys.abs().max(), values.abs().max())),
    }
