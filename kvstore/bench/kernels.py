"""``kvstore bench kernels``: GPU decoding of a kvcodec chunk, against the copy ceiling.

One 2,048-token chunk of a Llama-3-8B-shaped cache (32 layers, 8 KV heads, 128
dims; 134M elements per K+V) of synthetic KV with realistic structure (keys:
per-channel offsets and scales with a few outlier channels, a large first token;
values: per-token log-normal scales), under a profile built by ``build_profile``
from two other synthetic contexts, at kvcodec's default level. Figures (GB/s are
10^9 bytes of fp16 KV produced per second unless said otherwise; CUDA-event medians
after warm-up through ``triton.testing.do_bench``, which also flushes L2 between runs):

- ``hbm_copy_GBps``: a 1 GiB device-to-device copy, bytes read + written;
- ``decode_GBps``: :func:`decode_prepared` on streams already on the GPU, the error
  check (one synchronization) and patches/sinks included;
- ``decode_kernels_GBps``: the same without the final synchronization/check;
- ``decode_e2e_GBps``: :func:`decode_kvcodec_gpu` from the chunk's container in host
  memory (checksums, header checks, pinned staging, host-to-device copy included);
- ``decode_torch_ref_GBps``: the pure-torch reference on the GPU;
- ``decode_cpu_MBps``: ``KVCodecV1.decode`` on the CPU (numba, all cores), MB/s;
- ``encode_GBps``: null (no GPU encoder yet);
- ``variants``: every kernel variant's figure (checked bit-identical to the default's output);
- ``group_size_study``: the same chunk re-encoded with fewer symbols per lane (more
  groups, more parallelism), its size overhead and decode figure (fused plan).

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
        return {"skipped": "no CUDA device: the kernels benchmark needs a GPU", "encode_GBps": None}
    import triton

    def bench(fn, rep=300):
        return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")

    return measure(torch.device("cuda"), SHAPE, quick, bench, torch.cuda.synchronize)


def measure(dev: torch.device, shape, quick: bool, bench, sync) -> dict[str, Any]:
    """The whole benchmark on ``dev`` (``bench(fn) -> ms``, ``sync()``); ``run`` uses CUDA and
    ``do_bench``, tests use a small shape on the CPU under the Triton interpreter."""
    from kvstore.codecs import rans
    from kvstore.codecs.kvcodec import DEFAULT_LEVEL, KVCodecV1
    from kvstore.codecs.kvcodec_profile import build_profile
    from kvstore.format import container
    from kvstore.kernels.kvcodec_gpu import (
        decode_kvcodec_gpu,
        decode_prepared,
        prepare_kvcodec,
    )
    from kvstore.kernels.rans_decode import DecodeConfig

    L, H, T, D = shape
    result: dict[str, Any] = {"shape": [L, H, T, D], "level": DEFAULT_LEVEL, "encode_GBps": None}

    # ---- copy ceiling
    result["hbm_copy_GBps"] = _copy_gbps(dev, bench)
    _log(f"copy {result['hbm_copy_GBps']:.0f} GB/s")

    # ---- profile and chunk
    t0 = time.perf_counter()
    samples = [tuple(t.cpu() for t in synthetic_kv(max(T // 2, 8), s, dev, shape)) for s in (1, 2)]
    profile = build_profile(samples)
    codec = KVCodecV1(profile, DEFAULT_LEVEL)
    keys, values = synthetic_kv(T, 7, dev, shape)
    kc, vc = keys.cpu(), values.cpu()
    q = codec.quantize(kc, vc, start=0)
    buffers = dict(q.raw)
    for (name, table, models), sym in zip(codec._streams(), (q.keys, q.values, q.scales), strict=True):
        buffers[name] = rans.encode(sym, table, models)
    blob = container.encode(buffers, kind="bench")
    obj = container.decode(blob)
    n = L * H * T * D
    out_bytes = 2 * n * 2  # fp16 keys + values
    stream_bytes = {k: len(buffers[k]) for k in ("k", "v", "scales")}
    infos = {k: rans.read_header(buffers[k]) for k in ("k", "v", "scales")}
    result["chunk"] = {
        "elements": 2 * n,
        "container_bytes": len(blob),
        "stream_bytes": stream_bytes,
        "bits_per_element": 8 * len(blob) / (2 * n),
        "ideal_bits_per_element": codec.ideal_bits(q) / (2 * n),
        "groups": {k: i.num_groups for k, i in infos.items()},
        "symbols_per_lane": {k: i.group_size // 32 for k, i in infos.items()},
        "patches": {k: _count(buffers, f"{k}_patch_index") for k in ("k", "v")},
        "setup_s": time.perf_counter() - t0,
    }
    _log(f"chunk {result['chunk']}")

    # ---- correctness of the default path against the codec's own decode (torch, same GPU) and the CPU
    chunk = prepare_kvcodec(obj, codec, (L, H, T, D), dev)
    k_ref, v_ref = codec.decode(obj, (L, H, T, D), torch.float16, dev)
    k1, v1 = decode_prepared(chunk, torch.float16)
    checks = {"equal_to_codec_decode_on_gpu": bool(torch.equal(k1, k_ref) and torch.equal(v1, v_ref))}
    t1 = time.perf_counter()
    k_cpu, v_cpu = codec.decode(obj, (L, H, T, D), torch.float16, torch.device("cpu"))
    cpu_s = time.perf_counter() - t1
    checks["keys_equal_to_cpu_decode"] = bool(torch.equal(k1.cpu(), k_cpu))
    checks["values_mismatches_vs_cpu_decode"] = int((v1.cpu() != v_cpu).sum())
    result["checks"] = checks
    result["decode_cpu_MBps"] = out_bytes / cpu_s / 1e6
    del k_ref, v_ref, k_cpu, v_cpu
    _log(f"checks {checks}; cpu {result['decode_cpu_MBps']:.0f} MB/s")

    # ---- headline figures
    ms = bench(lambda: decode_prepared(chunk, torch.float16))
    result["decode_GBps"] = _gbps(out_bytes, ms)
    result["decode_ms"] = ms
    ms = bench(lambda: decode_prepared(chunk, torch.float16, check=False))
    result["decode_kernels_GBps"] = _gbps(out_bytes, ms)
    result["decode_kernels_ms"] = ms
    result["decode_pipelined_GBps"] = _gbps(out_bytes, _pipelined(chunk, sync))
    for plan in ("split", "fused"):
        result[f"decode_{plan}_plan_ms"] = bench(lambda p=plan: decode_prepared(chunk, torch.float16, plan=p, check=False))
    e2e = []
    for _ in range(3 if quick else 5):
        sync()
        t1 = time.perf_counter()
        decode_kvcodec_gpu(obj, codec, (L, H, T, D), torch.float16, dev)
        sync()
        e2e.append(time.perf_counter() - t1)
    result["decode_e2e_GBps"] = out_bytes / float(np.median(e2e)) / 1e9
    _log(f"decode {result['decode_GBps']:.0f} GB/s ({ms:.3f} ms kernels), e2e {result['decode_e2e_GBps']:.1f} GB/s")

    # torch reference: a single timed run after a warm-up run (each is thousands of small launches)
    decode_prepared(chunk, torch.float16, backend="torch")
    sync()
    t1 = time.perf_counter()
    kr, vr = decode_prepared(chunk, torch.float16, backend="torch")
    sync()
    result["decode_torch_ref_GBps"] = out_bytes / (time.perf_counter() - t1) / 1e9
    result["decode_torch_ref_s"] = time.perf_counter() - t1
    checks["torch_ref_equal"] = bool(torch.equal(kr, k1) and torch.equal(vr, v1))
    del kr, vr
    _log(f"torch ref {result['decode_torch_ref_GBps']:.2f} GB/s")

    # ---- kernel variants (the codec's current token-major layout, default group sizes)
    variants = [
        DecodeConfig(),
        DecodeConfig(ballot=False, prefetch=False),
        DecodeConfig(block_g=2, ballot=False, prefetch=False),
        DecodeConfig(lookup=0),
        DecodeConfig(lookup=2),
        DecodeConfig(bucket_bits=7),
        DecodeConfig(bucket_bits=6),
        DecodeConfig(block_g=4, num_warps=4),
    ]
    if quick:
        variants = variants[:3]
    if dev.type != "cuda":
        variants = [DecodeConfig(block_g=16), DecodeConfig(lookup=0, block_g=16)]
    result["variants"] = _variants(chunk, variants, (k1, v1), out_bytes, bench)

    # ---- group size (parallelism against size), token-major and channel-major layouts
    from kvstore.kernels.kvcodec_gpu import channel_major_buffers

    base_bytes = sum(stream_bytes.values())
    lane_sizes = (4096, 1024, 256) if quick else (4096, 2048, 1024, 512, 256)
    if dev.type != "cuda":
        lane_sizes = lane_sizes[-1:]
    study = []
    for layout in ("token", "channel"):
        for lane_symbols in lane_sizes:
            if layout == "token":
                bufs = dict(q.raw)
                for (name, tab, models), sym in zip(codec._streams(), (q.keys, q.values, q.scales), strict=True):
                    ls = lane_symbols if name != "scales" else max(8, lane_symbols // 4)
                    bufs[name] = rans.encode(sym, tab, models, group_size=rans.default_group_size(sym.size, ls))
            else:
                bufs = channel_major_buffers(codec, q, (L, H, T, D), lane_symbols)
            size = sum(len(bufs[k]) for k in ("k", "v", "scales"))
            ch = prepare_kvcodec(bufs, codec, (L, H, T, D), dev)
            kk, vv = decode_prepared(ch, torch.float16)
            row: dict[str, Any] = {
                "layout": layout, "lane_symbols": lane_symbols, "groups_kv": rans.read_header(bufs["k"]).num_groups,
                "stream_bytes": size, "size_overhead_vs_default": size / base_bytes - 1,
                "bit_identical": bool(torch.equal(kk, k1) and torch.equal(vv, v1)),
            }  # fmt: skip
            del kk, vv
            ms = bench(lambda x=ch: decode_prepared(x, torch.float16))
            row["ms"], row["GBps"] = ms, _gbps(out_bytes, ms)
            row["pipelined_GBps"] = _gbps(out_bytes, _pipelined(ch, sync))
            if layout == "channel" and lane_symbols in (4096, 1024) and dev.type == "cuda":
                row["variants"] = _variants(ch, [DecodeConfig(ballot=False, prefetch=False), DecodeConfig(lookup=0),
                                                 DecodeConfig(block_g=2, ballot=False, prefetch=False)],
                                            (k1, v1), out_bytes, bench)  # fmt: skip
            study.append(row)
            _log(f"group size {row}")
    result["group_size_study"] = study
    cm = [r for r in study if r["layout"] == "channel" and r["bit_identical"]]
    if cm:
        result["decode_channel_major_default_lanes_GBps"] = cm[0]["GBps"]
        fastest = max(cm, key=lambda r: r["GBps"])
        result["decode_channel_major_best_GBps"] = fastest["GBps"]
        result["decode_channel_major_best_lane_symbols"] = fastest["lane_symbols"]
    _log(_summary(result))
    return result


def _pipelined(chunk, sync, reps: int = 20) -> float:
    """ms per decode with ``reps`` decodes queued back to back (no check in between: the host
    prepares the next launches while the GPU decodes), errors checked once at the end."""
    from kvstore.kernels.kvcodec_gpu import decode_prepared
    from kvstore.kernels.rans_decode import check_errors

    decode_prepared(chunk, torch.float16, check=False)
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


def _variants(chunk, configs, expect, out_bytes: int, bench) -> list[dict[str, Any]]:
    from kvstore.kernels.kvcodec_gpu import decode_prepared

    rows = []
    for cfg in configs:
        name = (f"lookup{cfg.lookup}-g{cfg.block_g}-w{cfg.num_warps}-ballot{int(cfg.ballot)}"
                f"-pf{int(cfg.prefetch)}-bb{cfg.bucket_bits}")  # fmt: skip
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
        f"decode (default)    {r['decode_GBps']:8.1f} GB/s   kernels only {r['decode_kernels_GBps']:.1f}",
        (f"channel-major       {r.get('decode_channel_major_default_lanes_GBps', float('nan')):8.1f} GB/s   best "
         f"{r.get('decode_channel_major_best_GBps', float('nan')):.1f} at "
         f"{r.get('decode_channel_major_best_lane_symbols')} symbols/lane"),
        f"decode e2e (host)   {r['decode_e2e_GBps']:8.1f} GB/s   pipelined (device-resident) "
        f"{r.get('decode_pipelined_GBps', float('nan')):.1f}",
        f"torch reference     {r['decode_torch_ref_GBps']:8.2f} GB/s",
        f"cpu (numba)         {r['decode_cpu_MBps']:8.0f} MB/s",
        f"bits/element        {r['chunk']['bits_per_element']:8.3f}",
    ]
    for v in r.get("variants", []):
        lines.append(f"  {v['variant']:45s} {v.get('GBps', float('nan')):7.1f} GB/s  {v.get('error', '')[:60]}")
    for s in r.get("group_size_study", []):
        lines.append(f"  {s['layout']:7s} lane {s['lane_symbols']:5d}  groups {s['groups_kv']:5d}  size "
                     f"{100 * s['size_overhead_vs_default']:+.2f}%  {s['GBps']:7.1f} GB/s  pipelined "
                     f"{s.get('pipelined_GBps', float('nan')):7.1f}  exact {s['bit_identical']}"
                     + "".join(f"  | {v['variant']} {v.get('GBps', float('nan')):.0f}" for v in s.get("variants", [])))  # fmt: skip
    return "\n".join(lines)


def profile_launches(lane_symbols: int = 1024) -> None:
    """For Nsight Compute (``python -m kvstore.bench.kernels``): decode the benchmark chunk twice
    in kvcodec's layout (default lanes) and twice channel-major with ``lane_symbols``."""
    from kvstore.codecs import rans
    from kvstore.codecs.kvcodec import DEFAULT_LEVEL, KVCodecV1
    from kvstore.codecs.kvcodec_profile import build_profile
    from kvstore.kernels.kvcodec_gpu import (
        channel_major_buffers,
        decode_prepared,
        prepare_kvcodec,
    )

    dev = torch.device("cuda")
    T = SHAPE[2]
    samples = [tuple(t.cpu() for t in synthetic_kv(T // 2, s, dev)) for s in (1, 2)]
    codec = KVCodecV1(build_profile(samples), DEFAULT_LEVEL)
    keys, values = synthetic_kv(T, 7, dev)
    q = codec.quantize(keys.cpu(), values.cpu())
    token = dict(q.raw)
    for (name, table, models), sym in zip(codec._streams(), (q.keys, q.values, q.scales), strict=True):
        token[name] = rans.encode(sym, table, models)
    for bufs in (token, channel_major_buffers(codec, q, SHAPE, lane_symbols)):
        chunk = prepare_kvcodec(bufs, codec, SHAPE, dev)
        for _ in range(2):
            decode_prepared(chunk, torch.float16)
    torch.cuda.synchronize()


if __name__ == "__main__":
    profile_launches()
