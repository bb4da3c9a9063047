"""Where the time of one chunk decode and one PQ select goes, on CUDA: host vs GPU.

``PYTHONPATH=$PWD python scripts/gpu_profile.py`` (on the lent GPU, beside ``gpu_session.sh``). For each call:
the host's submit time (calls queued back to back, no synchronization), the ``do_bench``
median (CUDA events, what ``kvstore bench kernels`` reports), each kernel's GPU time from
``torch.profiler``, and the host's hot spots from ``cProfile``. A call whose submit time is
above its GPU time is bound by the host (Python, launches, allocations), not the kernels.
``--launch-costs`` prices the pieces instead: an allocation, a Triton launch against a direct
``CompiledKernel.run``, the select's checks, a check's synchronization. Session 7's output:
``benchmarks/results/profile-h100-2026-11-22-session7.txt``.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # the checkout: benchmarks/, eval/
import cProfile
import io
import math
import pstats

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from benchmarks.pq_topk import host_us


def gpu_kernels(fn, reps: int = 20) -> None:
    """Each CUDA kernel's mean GPU time per call (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if dev_us:
            rows.append((dev_us / reps, e.count / reps, e.key))
            total += dev_us / reps
    for us, count, key in sorted(rows, reverse=True)[:12]:
        print(f"    {us:9.1f} us  x{count:4.1f}  {key[:90]}")
    print(f"    {total:9.1f} us  GPU total per call")


def host_hot_spots(fn, reps: int = 200) -> None:
    """The host's top functions by cumulative time (cProfile), per call."""
    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    print("\n".join("    " + line for line in s.getvalue().splitlines()[6:26]))


def report(name: str, fn) -> None:
    print(f"== {name}", flush=True)
    print(f"  host submit {host_us(fn, 20):9.1f} us/call")  # few: the GPU runs behind, a long loop fills the launch queue
    print(f"  do_bench    {triton.testing.do_bench(fn, warmup=50, rep=300, return_mode='median') * 1e3:9.1f} us/call")
    gpu_kernels(fn)
    host_hot_spots(fn)


def pq_inputs() -> dict:
    """The issue's PQ shape: one layer, 131,072 tokens, 8 KV / 32 query heads, budget 1/5."""
    n, kv_heads, q_heads, dim, m, bits, sinks, window = 131072, 8, 32, 128, 2, 6, 32, 64
    g = torch.Generator(device="cpu").manual_seed(7)
    return {
        "query": torch.randn(q_heads, dim, generator=g).cuda().half(),
        "centroids": torch.randn(kv_heads, m, 1 << bits, dim // m, generator=g).cuda(),
        "codes": torch.randint(0, 1 << bits, (kv_heads, n, m), generator=g, dtype=torch.uint8).cuda(),
        "k": math.ceil(0.2 * n) - sinks - window, "start": sinks, "stop": n - window,
    }  # fmt: skip


def pq_case():
    from kvstore.kernels.pq_select import pq_select_triton

    x = pq_inputs()
    return lambda: pq_select_triton(x["query"], x["centroids"], x["codes"], x["k"], x["start"], x["stop"])


def decode_case():
    from benchmarks.kernels import SHAPE, synthetic_kv
    from kvstore.codecs.kvcodec import DEFAULT_LEVEL, KVCodec
    from kvstore.codecs.kvcodec_profile import build_profile
    from kvstore.kernels.kvcodec_encode import encode_kvcodec_kernels
    from kvstore.kernels.kvcodec_decode import decode_prepared, prepare_kvcodec

    dev = torch.device("cuda")
    samples = [tuple(t.cpu() for t in synthetic_kv(SHAPE[2] // 2, s, dev)) for s in (1, 2)]
    codec = KVCodec(build_profile(samples), DEFAULT_LEVEL)
    keys, values = synthetic_kv(SHAPE[2], 7, dev)
    chunk = prepare_kvcodec(encode_kvcodec_kernels(codec, keys, values), codec, SHAPE, dev)
    return chunk, decode_prepared


def main() -> None:
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    report("pq_select_triton (131,072 tokens, 8 KV heads, k 26,119)", pq_case())
    chunk, decode_prepared = decode_case()
    report("decode_prepared check=False", lambda: decode_prepared(chunk, torch.float16, check=False))
    report("decode_prepared check=True", lambda: decode_prepared(chunk, torch.float16))


def launch_costs() -> None:
    """The host's price of each piece of a PQ select and of a decode's check, in one run."""
    from triton import knobs

    from kvstore.kernels import pq_select as ps
    from kvstore.kernels.pq_torch import pq_topk_reference

    x = pq_inputs()
    query, centroids, codes, k, sinks, stop = (x[key] for key in ("query", "centroids", "codes", "k", "start", "stop"))
    kv_heads = codes.shape[0]
    words = codes.view(torch.int16)[..., 0]
    segments = 16  # what pq_select_triton picks at this shape (128 programs)
    seg_len = triton.cdiv(triton.cdiv(stop - sinks, segments), 1024) * 1024
    counts = torch.zeros(kv_heads * segments, 4096, device="cuda", dtype=torch.int32)
    const = dict(M=2, K=64, LOG2K=6, BLOCK_M=2, WORD=True, NC=4096, BLOCK_N=4096, num_warps=8)
    grid = (kv_heads, segments)
    args = (words, counts, sinks, stop - sinks, seg_len, words.stride(0), words.stride(1))
    print("== launch costs (host us per call)")
    print(f"  torch.empty 128 KiB     {host_us(lambda: torch.empty(kv_heads, 4096, device='cuda', dtype=torch.int32)):7.2f}")
    print(f"  torch.zeros 128 KiB     {host_us(lambda: torch.zeros(kv_heads, 4096, device='cuda', dtype=torch.int32)):7.2f}")
    kern = ps._pq_segment_count_kernel
    print(f"  count kernel[grid]()    {host_us(lambda: kern[grid](*args, **const)):7.2f}")
    ck = kern[grid](*args, **const)
    ordered = [*args] + [const[name] for name in kern.arg_names[len(args):]]
    dev = torch.cuda.current_device()

    def direct():
        stream = triton.runtime.driver.active.get_current_stream(dev)
        ck.run(grid[0], grid[1], 1, stream, ck.function, ck.packed_metadata, None,
               knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *ordered)

    counts.zero_()
    direct()
    got = counts.clone()
    counts.zero_()
    kern[grid](*args, **const)
    same = torch.equal(got, counts)
    print(f"  direct compiled.run()   {host_us(direct):7.2f}   same counts: {same}")
    print(f"  pq checks + out (k=0)   {host_us(lambda: ps.pq_select_triton(query, centroids, codes, 0, sinks, stop), 500):7.2f}")
    sel = lambda: ps.pq_select_triton(query, centroids, codes, k, sinks, stop)  # noqa: E731
    ref = lambda: pq_topk_reference(query, centroids, codes, k, sinks, stop)  # noqa: E731
    print(f"  pq_select_triton        {host_us(sel, 500):7.2f}   do_bench {triton.testing.do_bench(sel, return_mode='median') * 1e3:7.2f}")
    print(f"  pq_topk_reference       {host_us(ref, 500):7.2f}   do_bench {triton.testing.do_bench(ref, return_mode='median') * 1e3:7.2f}")
    flag = torch.zeros(64, dtype=torch.uint8, device="cuda")
    err = torch.zeros(4160, dtype=torch.int32, device="cuda")
    from kvstore.kernels.rans_decode import check_errors
    print(f"  bool(pad.any()) idle    {host_us(lambda: bool(flag.any()), 500):7.2f}")
    print(f"  check_errors idle       {host_us(lambda: check_errors(err), 500):7.2f}")


if __name__ == "__main__" and "--launch-costs" in __import__("sys").argv:
    launch_costs()
elif __name__ == "__main__":
    main()
