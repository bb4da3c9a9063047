"""``kvstore bench kernels``: GPU encoding and decoding of a kvcodec chunk, against the copy ceiling.

One 2,048-token chunk of a Llama-3-8B-shaped cache (32 layers, 8 KV heads, 128
dims; 134M elements per K+V) of synthetic KV with realistic structure (keys:
per-channel offsets and scales with a few outlier channels, a large first token;
values: per-token log-normal scales), under a profile built by ``build_profile``
from two other synthetic contexts, at kvcodec's default level and format version
(channel-major streams, ~1,024 symbols per lane). Figures (GB/s are 10^9 bytes of
fp16 KV per second, produced by a decoder or consumed by an encoder; CUDA-event
medians after warm-up through ``triton.testing.do_bench``, which also flushes L2
between runs):

- ``hbm_copy_GBps``: a 1 GiB device-to-device copy, bytes read + written;
- ``encode_GBps``: ``KVCodec.encode`` of the KV on the GPU (:func:`encode_kvcodec_kernels`:
  the fused Triton quantization pass, one Triton rANS launch, stream assembly, the streams
  copied to host memory through a pinned buffer);
- ``encode_device_GBps``: the same with the streams left on the device;
- ``encode_torch_quantize_GBps``: the same as ``encode_GBps`` with the torch quantization;
- ``encode_quantize_ms`` / ``encode_quantize_torch_ms`` / ``encode_rans_kernel_ms``: the parts
  alone (``checks.fused_quantize_mismatches``: symbols where the two quantizations differ);
- ``encode_cpu_MBps``: the CPU encoder (torch quantization + numba rANS), MB/s;
- ``decode_GBps``: :func:`decode_prepared` on streams already on the GPU, the error
  check (one synchronization) and patches/sinks included;
- ``decode_kernels_GBps``: the same without the final synchronization/check;
- ``decode_host_us``: the host's time per decode (no check) with decodes queued back to back,
  and ``decode_prelaunch_us``: from the call to the decode kernel queued, the GPU idle (with
  the check, the GPU waits for this at every chunk);
- ``decode_token_major_GBps``: the same chunk in the token-major layout (format version 1);
- ``decode_e2e_GBps``: :func:`decode_kvcodec_kernels` from the chunk's container in host
  memory (checksums, header checks, pinned staging, host-to-device copy included);
- ``decode_torch_ref_GBps``: the pure-torch reference on the GPU;
- ``decode_cpu_MBps``: ``KVCodec.decode`` on the CPU (numba, all cores), MB/s;
- ``variants``: every kernel variant's figure (checked bit-identical to the default's output);
- ``group_size_study``: the chunk re-encoded in both layouts with other lane lengths, the
  size against the token-major layout at its default 4,096-symbol lanes, and the decode figure;
- ``pq_topk_us`` / ``pq_topk_torch_ref_us``: the PQ top-k of one layer of 131,072 tokens,
  8 KV heads, 32 query heads, budget 1/5: the counting select (``pq_select_triton``, what
  retrieval attention runs) against the torch reference (scores + ``torch.topk``);
  ``pq_scores_topk_us`` (Triton scores + ``torch.topk``, the previous path), ``pq_scores_us``,
  ``pq_torch_topk_only_us``, ``pq_gather_us`` (the selected tokens' K and V) beside them
  (:mod:`benchmarks.pq_topk`); ``pq_topk_host_us`` / ``pq_topk_torch_ref_host_us``:
  the host's time per call with calls queued back to back (``do_bench`` flushes L2 before
  each timed call, which hides up to ~90 us of host work; a decode loop pays it);

``kvcodec3``: the transform codec's decode figures per chunk shape (:mod:`benchmarks.kernels_kvcodec3`).

Without CUDA the benchmark is skipped with a message.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

SHAPE = (32, 8, 2048, 128)


def synthetic_kv(tokens: int, seed: int, device: torch.device, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``[L, H, tokens, D]`` keys and values; channel statistics are fixed (the "model"),
    token data depend on ``seed`` (the "context")."""
    L, H, _, D = shape
    gm = torch.Generator(device=device).manual_seed(1234)
    center = torch.randn(L, H, 1, D, generator=gm, device=device) * 0.7
    k_scale = torch.exp(torch.randn(L, H, 1, D, generator=gm, device=device) * 0.5)
    k_scale[..., :3] *= 6.0  # outlier channels
    v_scale = torch.exp(torch.randn(L, H, 1, D, generator=gm, device=device) * 0.3)
    g = torch.Generator(device=device).manual_seed(seed)
    keys = torch.randn(L, H, tokens, D, generator=g, device=device) * k_scale + center
    keys[:, :, 0] *= 20  # attention-sink-like first token
    tok = torch.exp(torch.randn(L, H, tokens, 1, generator=g, device=device) * 0.5)
    values = torch.randn(L, H, tokens, D, generator=g, device=device) * v_scale * tok
    return keys.half(), values.half()


def _count(buffers: dict[str, Any], name: str) -> int:
    return int(buffers[name].numel()) if name in buffers else 0


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _copy_gbps(dev: torch.device, bench) -> float:
    src = torch.empty(1 << 30 if dev.type == "cuda" else 1 << 20, dtype=torch.uint8, device=dev).random_(0, 256)
    dst = torch.empty_like(src)
    return _gbps(2 * src.numel(), bench(lambda: dst.copy_(src)))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(quick: bool) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: the kernels benchmark needs a GPU", "encode_GBps": None, "decode_GBps": None}
    import triton

    def bench(fn, rep=300):
        return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")

    result = measure(torch.device("cuda"), SHAPE, quick, bench, torch.cuda.synchronize)
    result.update(pq_figures(quick))
    from benchmarks.kernels_kvcodec3 import SHAPES, figures

    result["kvcodec3"] = {name: figures(torch.device("cuda"), bench, torch.cuda.synchronize, shape)
                          for name, shape in SHAPES.items()}  # fmt: skip
    _log(f"kvcodec3 {result['kvcodec3']}")
    return result


def pq_figures(quick: bool) -> dict[str, Any]:
    """PQ scores + top-k and the gather on CUDA (:mod:`benchmarks.pq_topk`: one layer,
    131,072 tokens, 8 KV / 32 query heads, budget 1/5), after its correctness checks."""
    from kvstore.kernels import pq_topk_bench

    failures = pq_topk_bench.check()
    t = pq_topk_bench.timings(sets=8 if quick else 24)
    out = {
        "pq_topk_us": t["pq_select_us"],
        "pq_topk_torch_ref_us": t["pq_topk_reference_us"],
        "pq_topk_speedup_vs_torch_ref": t["pq_topk_reference_us"] / t["pq_select_us"],
        "pq_scores_topk_us": t["pq_topk_us"],
        "pq_scores_us": t["pq_scores_triton_us"],
        "pq_torch_topk_only_us": t["torch_topk_only_us"],
        "pq_gather_us": t["gather_triton_us"],
        "pq_gather_torch_ref_us": t["gather_reference_us"],
        "pq_topk_host_us": t["pq_select_host_us"],
        "pq_topk_torch_ref_host_us": t["pq_topk_reference_host_us"],
        "pq_k": t["k"],
        "pq_check_failures": failures,
    }
    _log(f"pq {out}")
    return out


def _stream_bytes(buffers: dict[str, Any]) -> int:
    return sum(len(memoryview(buffers[k]).cast("B")) for k in ("k", "v", "scales"))


def measure(dev: torch.device, shape, quick: bool, bench, sync) -> dict[str, Any]:
    """The whole benchmark on ``dev`` (``bench(fn) -> ms``, ``sync()``); ``run`` uses CUDA and
    ``do_bench``, tests use a small shape on the CPU under the Triton interpreter."""
    from kvstore.codecs import rans
    from kvstore.codecs.kvcodec import DEFAULT_LEVEL, FORMAT_VERSION, KVCodec, Quantized
    from kvstore.codecs.kvcodec_profile import build_profile
    from kvstore.format import container
    from kvstore.kernels.kvcodec_encode import encode_kvcodec_kernels, stream_plans
    from kvstore.kernels.kvcodec_decode import decode_kvcodec_kernels, decode_prepared, prepare_kvcodec
    from kvstore.kernels.rans_decode import DecodeConfig
    from kvstore.kernels.quantize import quantize_kvcodec_gpu
    from kvstore.kernels.rans_encode import rans_encode_launch

    L, H, T, D = shape
    result: dict[str, Any] = {"shape": [L, H, T, D], "level": DEFAULT_LEVEL, "format_version": FORMAT_VERSION}
    n = L * H * T * D
    kv_bytes = 2 * n * 2  # fp16 keys + values
    reps = 20 if dev.type == "cuda" else 1  # queued decodes per pipelined figure (the interpreter is slow)

    # ---- copy ceiling
    result["hbm_copy_GBps"] = _copy_gbps(dev, bench)
    _log(f"copy {result['hbm_copy_GBps']:.0f} GB/s")

    # ---- profile and chunk
    t0 = time.perf_counter()
    samples = [tuple(t.cpu() for t in synthetic_kv(max(T // 2, 8), s, dev, shape)) for s in (1, 2)]
    profile = build_profile(samples)
    codec = KVCodec(profile, DEFAULT_LEVEL)
    token_codec = KVCodec(profile, DEFAULT_LEVEL, version=1)
    keys, values = synthetic_kv(T, 7, dev, shape)
    kc, vc = keys.cpu(), values.cpu()
    setup_s = time.perf_counter() - t0

    # ---- encode on the device: same bytes as the CPU encoder for the same symbols
    buffers = encode_kvcodec_kernels(codec, keys, values)
    fused = quantize_kvcodec_gpu(codec, keys, values)
    q = codec.quantize(keys, values)  # the torch quantization (the CPU encoder's), symbols copied to the host
    cpu_streams = codec.entropy_code(Quantized(*(t.cpu().numpy() for t in fused[:3]), fused[3]))
    checks: dict[str, Any] = {"gpu_encoder_streams_identical_to_cpu": all(
        buffers[k].tobytes() == cpu_streams[k] for k in ("k", "v", "scales"))}  # fmt: skip
    # fused vs torch quantization: keys equal; a scale code may differ in a rare tie (module doc of quantize)
    checks["fused_quantize_mismatches"] = {
        name: int((a.cpu().numpy() != b).sum()) for name, a, b in zip(("k", "v", "scales"), fused[:3], (q.keys, q.values, q.scales), strict=True)
    }  # fmt: skip
    ms = bench(lambda: encode_kvcodec_kernels(codec, keys, values))
    result["encode_GBps"], result["encode_ms"] = _gbps(kv_bytes, ms), ms
    ms = bench(lambda: encode_kvcodec_kernels(codec, keys, values, to_host=False))
    result["encode_device_GBps"], result["encode_device_ms"] = _gbps(kv_bytes, ms), ms
    ms = bench(lambda: encode_kvcodec_kernels(codec, keys, values, quantize="torch"))
    result["encode_torch_quantize_GBps"] = _gbps(kv_bytes, ms)
    result["encode_quantize_ms"] = bench(lambda: quantize_kvcodec_gpu(codec, keys, values))
    result["encode_quantize_torch_ms"] = bench(lambda: codec.quantize_tensors(keys, values))
    syms = list(fused[:3])
    del fused
    plans = stream_plans(codec, T)
    result["encode_rans_kernel_ms"] = bench(lambda: rans_encode_launch(syms, plans))
    syms.clear()
    t1 = time.perf_counter()
    codec.encode(kc, vc)
    result["encode_cpu_MBps"] = kv_bytes / (time.perf_counter() - t1) / 1e6
    _log(f"encode {result['encode_GBps']:.1f} GB/s (device-resident {result['encode_device_GBps']:.1f}, torch "
         f"quantization {result['encode_torch_quantize_GBps']:.1f}; quantize {result['encode_quantize_ms']:.3f} ms, "
         f"torch {result['encode_quantize_torch_ms']:.3f} ms, rANS kernel {result['encode_rans_kernel_ms']:.3f} ms); "
         f"cpu {result['encode_cpu_MBps']:.0f} MB/s; {checks}")  # fmt: skip

    blob = container.encode(buffers, kind="bench")
    obj = container.decode(blob)
    stream_bytes = {k: len(buffers[k]) for k in ("k", "v", "scales")}
    infos = {k: rans.read_header(buffers[k]) for k in ("k", "v", "scales")}
    q1 = token_codec.quantize(keys, values)
    token_buffers = token_codec.entropy_code(q1)
    token_bytes = _stream_bytes(token_buffers)
    result["chunk"] = {
        "version": codec.version,
        "elements": 2 * n,
        "container_bytes": len(blob),
        "stream_bytes": stream_bytes,
        "bits_per_element": 8 * len(blob) / (2 * n),
        "ideal_bits_per_element": codec.ideal_bits(q) / (2 * n),
        "stream_bytes_vs_token_major": sum(stream_bytes.values()) / token_bytes - 1,
        "groups": {k: i.num_groups for k, i in infos.items()},
        "symbols_per_lane": {k: i.group_size // 32 for k, i in infos.items()},
        "patches": {k: _count(buffers, f"{k}_patch_index") for k in ("k", "v")},
        "setup_s": setup_s,
    }
    _log(f"chunk {result['chunk']}")

    # ---- correctness of the default path against the codec's own decode and the CPU
    chunk = prepare_kvcodec(obj, codec, (L, H, T, D), dev)
    k_ref, v_ref = codec.decode(obj, (L, H, T, D), torch.float16, dev)
    k1, v1 = decode_prepared(chunk, torch.float16)
    checks["equal_to_codec_decode"] = bool(torch.equal(k1, k_ref) and torch.equal(v1, v_ref))
    t1 = time.perf_counter()
    k_cpu, v_cpu = codec.decode(obj, (L, H, T, D), torch.float16, torch.device("cpu"))
    cpu_s = time.perf_counter() - t1
    checks["keys_equal_to_cpu_decode"] = bool(torch.equal(k1.cpu(), k_cpu))
    checks["values_mismatches_vs_cpu_decode"] = int((v1.cpu() != v_cpu).sum())
    result["checks"] = checks
    result["decode_cpu_MBps"] = kv_bytes / cpu_s / 1e6
    del k_ref, v_ref, k_cpu, v_cpu
    _log(f"checks {checks}; cpu {result['decode_cpu_MBps']:.0f} MB/s")

    # ---- headline figures
    ms = bench(lambda: decode_prepared(chunk, torch.float16))
    result["decode_GBps"] = _gbps(kv_bytes, ms)
    result["decode_ms"] = ms
    ms = bench(lambda: decode_prepared(chunk, torch.float16, check=False))
    result["decode_kernels_GBps"] = _gbps(kv_bytes, ms)
    result["decode_kernels_ms"] = ms
    result["decode_pipelined_GBps"] = _gbps(kv_bytes, _pipelined(chunk, sync, reps))
    result["decode_host_us"], result["decode_prelaunch_us"] = _host_times(chunk, sync, reps)
    token_chunk = prepare_kvcodec(token_buffers, token_codec, (L, H, T, D), dev)
    kt, vt = decode_prepared(token_chunk, torch.float16)
    checks["token_major_equal"] = bool(torch.equal(kt, k1) and torch.equal(vt, v1))
    del kt, vt
    result["decode_token_major_GBps"] = _gbps(kv_bytes, bench(lambda: decode_prepared(token_chunk, torch.float16)))
    for plan in ("split", "fused") if dev.type == "cuda" else ():
        result[f"decode_token_major_{plan}_plan_ms"] = bench(
            lambda p=plan: decode_prepared(token_chunk, torch.float16, plan=p, check=False))  # fmt: skip
    e2e = []
    for _ in range((3 if quick else 5) if dev.type == "cuda" else 1):
        sync()
        t1 = time.perf_counter()
        decode_kvcodec_kernels(obj, codec, (L, H, T, D), torch.float16, dev)
        sync()
        e2e.append(time.perf_counter() - t1)
    result["decode_e2e_GBps"] = kv_bytes / float(np.median(e2e)) / 1e9
    _log(f"decode {result['decode_GBps']:.0f} GB/s ({ms:.3f} ms kernels), token-major "
         f"{result['decode_token_major_GBps']:.0f}, e2e {result['decode_e2e_GBps']:.1f} GB/s")  # fmt: skip

    # torch reference: a single timed run after a warm-up run (each is thousands of small launches)
    decode_prepared(chunk, torch.float16, backend="torch")
    sync()
    t1 = time.perf_counter()
    kr, vr = decode_prepared(chunk, torch.float16, backend="torch")
    sync()
    result["decode_torch_ref_GBps"] = kv_bytes / (time.perf_counter() - t1) / 1e9
    result["decode_torch_ref_s"] = time.perf_counter() - t1
    checks["torch_ref_equal"] = bool(torch.equal(kr, k1) and torch.equal(vr, v1))
    del kr, vr
    _log(f"torch ref {result['decode_torch_ref_GBps']:.2f} GB/s")

    # ---- kernel variants (the default layout and lanes)
    variants = [
        DecodeConfig(),
        DecodeConfig(aligned=False),  # the rows loop (per-lane row counters and masks)
        DecodeConfig(rows=False),  # the generic loop (model-map, channel-counter and epilogue branches)
        DecodeConfig(prefetch=False),
        DecodeConfig(ballot=False, prefetch=False),
        DecodeConfig(block_g=2, ballot=False, prefetch=False),
        DecodeConfig(lookup=0),
        DecodeConfig(lookup=2),
        DecodeConfig(bucket_bits=7),
    ]
    if quick:
        variants = variants[:3]
    if dev.type != "cuda":
        variants = []  # the interpreter: the figures mean nothing, the decode tests cover the variants
    result["variants"] = _variants(chunk, variants, (k1, v1), kv_bytes, bench)

    # ---- lane length (parallelism against size), token-major and channel-major layouts
    lane_sizes = (4096, 1024, 256) if quick else (4096, 2048, 1024, 512, 256)
    if dev.type != "cuda":
        lane_sizes = lane_sizes[-1:]
    study = []
    for layout, c, qq in (("token", token_codec, q1), ("channel", codec, q)):
        for lane_symbols in lane_sizes:
            bufs = c.entropy_code(qq, lane_symbols=lane_symbols)
            size = _stream_bytes(bufs)
            ch = prepare_kvcodec(bufs, c, (L, H, T, D), dev)
            kk, vv = decode_prepared(ch, torch.float16)
            row: dict[str, Any] = {
                "layout": layout, "lane_symbols": lane_symbols, "groups_kv": rans.read_header(bufs["k"]).num_groups,
                "stream_bytes": size, "size_vs_token_major_4096": size / token_bytes - 1,
                "bit_identical": bool(torch.equal(kk, k1) and torch.equal(vv, v1)),
            }  # fmt: skip
            del kk, vv
            ms = bench(lambda x=ch: decode_prepared(x, torch.float16))
            row["ms"], row["GBps"] = ms, _gbps(kv_bytes, ms)
            row["pipelined_GBps"] = _gbps(kv_bytes, _pipelined(ch, sync, reps))
            if layout == "channel" and lane_symbols in (4096, 1024) and dev.type == "cuda":
                row["variants"] = _variants(ch, [DecodeConfig(ballot=False, prefetch=False), DecodeConfig(lookup=0),
                                                 DecodeConfig(block_g=2, ballot=False, prefetch=False)],
                                            (k1, v1), kv_bytes, bench)  # fmt: skip
            study.append(row)
            _log(f"lanes {row}")
    result["group_size_study"] = study
    _log(_summary(result))
    return result
def _pipelined(chunk, sync, reps: int = 20) -> float:
    """ms per decode with ``reps`` decodes queued back to back (no check in between: the host
    prepares the next launches while the GPU decodes), errors checked once at the end."""
    from kvstore.kernels.kvcodec_decode import decode_prepared
    from kvstore.kernels.rans_decode import check_errors

    if reps > 1:
        decode_prepared(chunk, torch.float16, check=False)  # warm-up
    sync()
    errs = []
    t0 = time.perf_counter()
    for _ in range(reps):
        decode_prepared(chunk, torch.float16, check=False)
        errs.append(chunk.last_err)
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / reps
    for e in errs:
        check_errors(e)
    return ms


def _host_times(chunk, sync, reps: int = 20) -> tuple[float, float]:
    """Host microseconds per decode (no check) queued back to back, and the median time from a
    call to its decode kernel queued, with the GPU idle at the call (what a checked decode waits)."""
    from kvstore.kernels import rans_decode
    from kvstore.kernels.kvcodec_decode import decode_prepared

    decode_prepared(chunk, torch.float16, check=False)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        decode_prepared(chunk, torch.float16, check=False)
    host_us = (time.perf_counter() - t0) / reps * 1e6
    sync()
    queued: list[float] = []
    run = rans_decode.RansLaunch.run

    def timed_run(self, **outputs):
        out = run(self, **outputs)
        queued.append(time.perf_counter())
        return out

    starts = []
    rans_decode.RansLaunch.run = timed_run
    try:
        for _ in range(reps):
            sync()
            starts.append(time.perf_counter())
            decode_prepared(chunk, torch.float16, check=False)
    finally:
        rans_decode.RansLaunch.run = run
    sync()
    return host_us, float(np.median([(q - s) * 1e6 for q, s in zip(queued, starts, strict=True)]))


def _variants(chunk, configs, expect, out_bytes: int, bench) -> list[dict[str, Any]]:
    from kvstore.kernels.kvcodec_decode import decode_prepared

    rows = []
    for cfg in configs:
        name = (f"lookup{cfg.lookup}-g{cfg.block_g}-w{cfg.num_warps}-ballot{int(cfg.ballot)}"
                f"-pf{int(cfg.prefetch)}-bb{cfg.bucket_bits}-rows{int(cfg.rows)}-aligned{int(cfg.aligned)}")  # fmt: skip
        try:
            kv, vv = decode_prepared(chunk, torch.float16, config=cfg)
            same = bool(torch.equal(kv, expect[0]) and torch.equal(vv, expect[1]))
            del kv, vv
            ms = bench(lambda c=cfg: decode_prepared(chunk, torch.float16, config=c, check=False))
            rows.append({"variant": name, "ms": ms, "GBps": _gbps(out_bytes, ms), "bit_identical": same})
        except Exception as exc:  # noqa: BLE001 - report and go on
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        _log(f"variant {rows[-1]}")
    return rows


def _summary(r: dict[str, Any]) -> str:
    lines = [
        f"hbm copy            {r['hbm_copy_GBps']:8.0f} GB/s",
        (f"encode (gpu)        {r['encode_GBps']:8.1f} GB/s   streams left on the device {r['encode_device_GBps']:.1f}"
         f"   (quantize {r['encode_quantize_ms']:.3f} ms, torch {r['encode_quantize_torch_ms']:.3f} ms, "
         f"rANS kernel {r['encode_rans_kernel_ms']:.3f} ms)"),
        f"encode (torch quant) {r['encode_torch_quantize_GBps']:7.1f} GB/s",
        f"encode (cpu)        {r['encode_cpu_MBps']:8.0f} MB/s",
        (f"decode (default)    {r['decode_GBps']:8.1f} GB/s   kernels only {r['decode_kernels_GBps']:.1f}   "
         f"pipelined {r['decode_pipelined_GBps']:.1f}"),
        f"decode host         {r['decode_host_us']:8.1f} us/call   kernel queued after {r['decode_prelaunch_us']:.1f} us",
        f"decode token-major  {r['decode_token_major_GBps']:8.1f} GB/s",
        f"decode e2e (host)   {r['decode_e2e_GBps']:8.1f} GB/s",
        f"torch reference     {r['decode_torch_ref_GBps']:8.2f} GB/s",
        f"cpu decode (numba)  {r['decode_cpu_MBps']:8.0f} MB/s",
        (f"bits/element        {r['chunk']['bits_per_element']:8.3f}   streams vs token-major "
         f"{100 * r['chunk']['stream_bytes_vs_token_major']:+.2f}%"),
    ]
    for v in r.get("variants", []):
        lines.append(f"  {v['variant']:45s} {v.get('GBps', float('nan')):7.1f} GB/s  {v.get('error', '')[:60]}")
    for s in r.get("group_size_study", []):
        lines.append(f"  {s['layout']:7s} lane {s['lane_symbols']:5d}  groups {s['groups_kv']:5d}  size "
                     f"{100 * s['size_vs_token_major_4096']:+.2f}%  {s['GBps']:7.1f} GB/s  pipelined "
                     f"{s.get('pipelined_GBps', float('nan')):7.1f}  exact {s['bit_identical']}"
                     + "".join(f"  | {v['variant']} {v.get('GBps', float('nan')):.0f}" for v in s.get("variants", [])))  # fmt: skip
    return "\n".join(lines)


def profile_launches() -> None:
    """For Nsight Compute (``python -m benchmarks.kernels``): encode the benchmark chunk twice
    on the GPU, then decode it twice in the default layout and twice token-major."""
    from kvstore.codecs.kvcodec import DEFAULT_LEVEL, KVCodec
    from kvstore.codecs.kvcodec_profile import build_profile
    from kvstore.kernels.kvcodec_encode import encode_kvcodec_kernels
    from kvstore.kernels.kvcodec_decode import decode_prepared, prepare_kvcodec

    dev = torch.device("cuda")
    T = SHAPE[2]
    samples = [tuple(t.cpu() for t in synthetic_kv(T // 2, s, dev)) for s in (1, 2)]
    profile = build_profile(samples)
    keys, values = synthetic_kv(T, 7, dev)
    for version in (2, 1):
        codec = KVCodec(profile, DEFAULT_LEVEL, version=version)
        for _ in range(2):
            bufs = encode_kvcodec_kernels(codec, keys, values)
        chunk = prepare_kvcodec(bufs, codec, SHAPE, dev)
        for _ in range(2):
            decode_prepared(chunk, torch.float16)
    torch.cuda.synchronize()


if __name__ == "__main__":
    profile_launches()
