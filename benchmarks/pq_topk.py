"""Check the PQ top-k / gather Triton kernels against the torch reference on CUDA, and time them.

``python -m benchmarks.pq_topk``: fresh random inputs for every check,
outputs poisoned (NaN / -1, with a guard after the selection) before each kernel run,
scores compared with a float64 reference, the counting select compared element for
element with :func:`~kvstore.kernels.pq_torch.pq_select_reference` on integer data
(exact scores); then, for one layer of 131,072 tokens, 8 KV heads, 32 query heads,
head_dim 128, m=2, b=6, budget 1/5 (sinks 32 + window 64 + top-k): the counting select
(``pq_select_triton``, what retrieval attention runs), the scores + ``torch.topk`` path
(``pq_topk_triton``) and the torch reference on the same GPU, and the gather of the
selected K/V. Timings are medians of ``triton.testing.do_bench`` over inputs rotated
among sets larger than L2; the ``*_host_us`` figures are the host's time per call with
calls queued back to back (what a decode loop pays when the host is the slower side:
``do_bench`` flushes L2 before each timed call, and that hides up to ~90 us of host work).
Prints a table last.
"""

from __future__ import annotations

import math
import sys

import torch

from kvstore.kernels.pq_torch import gather_kv_reference, pq_select_reference, pq_topk_reference
from kvstore.kernels.pq_select import combinations, pq_select_triton
from kvstore.kernels.pq_topk import gather_kv_triton, pq_scores_triton, pq_topk_triton


def reference_scores64(query, centroids, codes, start, stop):
    """PQ scores in float64 (``[kv_heads, stop - start]``): what fp32 kernels are checked against."""
    kv_heads, m, _, sub = centroids.shape
    q = query.double().reshape(kv_heads, -1, m, sub).sum(1)
    lut = torch.einsum("hms,hmks->hmk", q, centroids.double())
    return torch.gather(lut, 2, codes[:, start:stop].long().transpose(1, 2)).sum(1)


CASES = [  # dtype, kv_heads, group, m, K, sub, n, k, start, stop
    (torch.float16, 8, 4, 2, 64, 64, 131072, 26119, 32, 131008),
    (torch.float32, 3, 3, 2, 64, 32, 4096, 724, 32, 4032),
    (torch.bfloat16, 2, 1, 4, 256, 16, 10000, 1, 0, 10000),
    (torch.float16, 4, 8, 3, 16, 8, 777, 100, 5, 700),
]


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _check_select(query, centroids, codes, k, start, stop, ref, device, g) -> list[str]:
    """The counting select on the case's data (picks at least the float64 k-th best, ascending)
    and on integer data of the same shape (equal to the reference element for element)."""
    failures = []
    kv_heads, m, K, _ = centroids.shape
    if combinations(m, K) is None:
        return failures
    for integer in (False, True):
        if integer:
            query = torch.randint(-3, 4, query.shape, generator=g).to(device, query.dtype)
            centroids = torch.randint(-3, 4, centroids.shape, generator=g).to(device, centroids.dtype)
        buf = torch.full((kv_heads * k + 64,), -1, device=device, dtype=torch.int64)
        got = pq_select_triton(query, centroids, codes, k, start, stop, out=buf[: kv_heads * k].view(kv_heads, k))
        _sync(device)
        if not (buf[kv_heads * k:] == -1).all():
            failures.append(f"select {kv_heads}x{codes.shape[1]} k={k}: wrote past its output")
        if integer:
            want = pq_select_reference(query, centroids, codes, k, start, stop)
            if not torch.equal(got, want):
                failures.append(f"select {kv_heads}x{codes.shape[1]} k={k}: {int((got != want).sum())} "
                                "positions differ from the reference on exact scores")  # fmt: skip
        elif k:
            kth = ref.topk(k, dim=1).values[:, -1:]
            ok = (ref.gather(1, (got - start).clamp(0, ref.shape[1] - 1)) >= kth - 1e-5 * ref.abs().max()).all()
            if not ok or not (got.diff(dim=1) > 0).all() or int(got.min()) < start or int(got.max()) >= stop:
                failures.append(f"select {kv_heads}x{codes.shape[1]} k={k}: a pick below the k-th best, "
                                "out of order or out of range")  # fmt: skip
    return failures


def check(device: str = "cuda", cases: list = CASES, gather_tokens: int = 20000) -> list[str]:
    """Correctness on ``device``; returns failure messages (empty when all pass)."""
    failures = []
    g = torch.Generator(device="cpu").manual_seed(1234)
    for dtype, kv_heads, group, m, K, sub, n, k, start, stop in cases:
        query = torch.randn(kv_heads * group, m * sub, generator=g).to(device, dtype)
        centroids = torch.randn(kv_heads, m, K, sub, generator=g).to(device, dtype)
        codes = torch.randint(0, K, (kv_heads, n, m), generator=g, dtype=torch.uint8).to(device)
        out = torch.full((kv_heads, stop - start), float("nan"), device=device)
        scores = pq_scores_triton(query, centroids, codes, start, stop, out=out)
        _sync(device)
        ref = reference_scores64(query, centroids, codes, start, stop)
        rel = ((scores.double() - ref).norm() / ref.norm()).item()
        if not torch.isfinite(scores).all() or rel > 1e-5:
            failures.append(f"scores {dtype} {kv_heads}x{n}: rel {rel:.2e}, finite {bool(torch.isfinite(scores).all())}")
        idx, _ = pq_topk_triton(query, centroids, codes, k, start, stop)
        if k:
            kth = ref.topk(k, dim=1).values[:, -1:]
            picked = ref.gather(1, idx - start)
            slack = 1e-5 * ref.abs().max()
            if not (picked >= kth - slack).all() or idx.sort(1).values.diff(dim=1).eq(0).any():
                failures.append(f"topk {dtype} {kv_heads}x{n} k={k}: a pick below the k-th best or repeated")
        ref_idx, _ = pq_topk_reference(query, centroids, codes, k, start, stop)
        if ref_idx.shape != idx.shape:
            failures.append("topk shapes differ from the reference")
        failures += _check_select(query, centroids, codes, k, start, stop, ref, device, g)
        print(f"  scores {dtype!s:15s} heads {kv_heads} group {group} m {m} K {K} n {n}: rel err {rel:.1e}", flush=True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        keys = torch.randn(1, 8, gather_tokens, 128, generator=g).to(device, dtype)
        values = torch.randn(1, 8, gather_tokens, 128, generator=g).to(device, dtype)
        sel = torch.randint(0, gather_tokens, (8, gather_tokens // 5), generator=g).to(device)
        out = (torch.full((8, sel.shape[1], 128), float("nan"), device=device, dtype=dtype),
               torch.full((8, sel.shape[1], 128), float("nan"), device=device, dtype=dtype))
        got = gather_kv_triton(keys[0], values[0], sel, out=out)
        _sync(device)
        want = gather_kv_reference(keys[0], values[0], sel)
        if not all(torch.equal(a, b) for a, b in zip(got, want)):
            failures.append(f"gather {dtype} differs from the reference")
    return failures


def host_us(fn, reps: int = 300) -> float:
    """Host microseconds per call of ``fn`` with the calls queued back to back (after a warm-up
    call and a synchronization); the GPU runs behind when it is the faster side."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / reps * 1e6


def timings(sets: int = 24) -> dict[str, float]:
    """Median microseconds of each step at the issue's shape."""
    from triton.testing import do_bench

    n, kv_heads, q_heads, dim, m, bits = 131072, 8, 32, 128, 2, 6
    sinks, window = 32, 64
    k = math.ceil(0.2 * n) - sinks - window
    g = torch.Generator(device="cpu").manual_seed(7)
    data = []
    for _ in range(sets):  # 24 sets x (2 MB codes + 4 MB scores + 64 MB K/V) >> 50 MB of L2
        data.append((
            torch.randn(q_heads, dim, generator=g).cuda().half(),
            torch.randn(kv_heads, m, 1 << bits, dim // m, generator=g).cuda(),
            torch.randint(0, 1 << bits, (kv_heads, n, m), generator=g, dtype=torch.uint8).cuda(),
        ))
    kv = [(torch.randn(kv_heads, n, dim, device="cuda", dtype=torch.float16),
           torch.randn(kv_heads, n, dim, device="cuda", dtype=torch.float16)) for _ in range(4)]
    counter = [0]

    def nxt():
        counter[0] = (counter[0] + 1) % sets
        return data[counter[0]]

    stop = n - window
    sel = [pq_topk_triton(*data[i], k, sinks, stop)[0] for i in range(4)]
    scores = [pq_scores_triton(*data[i], sinks, stop) for i in range(4)]
    c2 = [0]

    def nxt4():
        c2[0] = (c2[0] + 1) % 4
        return c2[0]

    out = {
        "pq_select_us": do_bench(lambda: pq_select_triton(*nxt(), k, sinks, stop), return_mode="median") * 1e3,
        "pq_scores_triton_us": do_bench(lambda: pq_scores_triton(*nxt(), sinks, stop), return_mode="median") * 1e3,
        "pq_topk_us": do_bench(lambda: pq_topk_triton(*nxt(), k, sinks, stop), return_mode="median") * 1e3,
        "pq_topk_reference_us": do_bench(lambda: pq_topk_reference(*nxt(), k, sinks, stop), return_mode="median") * 1e3,
        "torch_topk_only_us": do_bench(lambda: scores[nxt4()].topk(k, dim=1, sorted=False), return_mode="median") * 1e3,
        "gather_triton_us": do_bench(lambda: gather_kv_triton(*kv[(i := nxt4())], sel[i]), return_mode="median") * 1e3,
        "gather_reference_us": do_bench(lambda: gather_kv_reference(*kv[(i := nxt4())], sel[i]), return_mode="median") * 1e3,
    }
    # what a loop pays: calls queued back to back, host time per call (do_bench's L2 flush
    # before each timed call hides up to ~90 us of host work, which a decode loop does not)
    out["pq_select_host_us"] = host_us(lambda: pq_select_triton(*nxt(), k, sinks, stop))
    out["pq_topk_reference_host_us"] = host_us(lambda: pq_topk_reference(*nxt(), k, sinks, stop))
    out["k"] = k
    out["codes_plus_scores_MB"] = (kv_heads * n * m + kv_heads * (stop - sinks) * 4) / 1e6
    out["gather_MB"] = 2 * 2 * kv_heads * k * dim * 2 / 1e6  # read + write, K and V
    return out


def main() -> int:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    failures = check()
    print("correctness:", "all passed" if not failures else failures, flush=True)
    first = timings()
    second = timings()
    print(f"{'step':28s} {'run 1 (us)':>12s} {'run 2 (us)':>12s}")
    for name in first:
        print(f"{name:28s} {first[name]:12.1f} {second[name]:12.1f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
