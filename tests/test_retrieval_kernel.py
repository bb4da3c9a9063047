"""PQ score / top-k and gather: the torch reference, and the Triton kernels under the interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvstore.errors import ConfigError
from kvstore.kernels import interpreter_supported
from kvstore.kernels.pq_torch import (
    gather_kv_reference,
    order_selection,
    pq_scores_reference,
    pq_select_reference,
    pq_topk_reference,
)
from kvstore.kernels.pq_select import combinations, pq_select
from kvstore.kernels.pq_topk import gather_kv, pq_topk


def inputs(kv_heads=2, group=3, m=2, k=64, sub=16, n=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(kv_heads * group, m * sub, generator=g)
    centroids = torch.randn(kv_heads, m, k, sub, generator=g)
    codes = torch.randint(0, k, (kv_heads, n, m), generator=g, dtype=torch.uint8)
    return query, centroids, codes


def test_reference_scores_are_group_summed_dot_products():
    query, centroids, codes = inputs()
    kv_heads, m, _, sub = centroids.shape
    keys = torch.stack([
        torch.cat([centroids[h, j, codes[h, :, j].long()] for j in range(m)], dim=1) for h in range(kv_heads)
    ])  # [kv_heads, n, D]
    q = query.reshape(kv_heads, -1, m * sub).sum(1)
    expected = torch.einsum("hnd,hd->hn", keys, q)
    assert torch.allclose(pq_scores_reference(query, centroids, codes), expected, atol=1e-4)
    assert torch.allclose(pq_scores_reference(query, centroids, codes, 10, 90), expected[:, 10:90], atol=1e-4)


def test_reference_topk_picks_the_best_of_the_range():
    query, centroids, codes = inputs()
    idx, scores = pq_topk_reference(query, centroids, codes, 50, 32, 600)
    assert idx.shape == (2, 50) and scores.shape == (2, 568)
    assert int(idx.min()) >= 32 and int(idx.max()) < 600
    threshold = scores.topk(50, dim=1).values[:, -1:]
    assert (scores.gather(1, idx - 32) >= threshold).all()
    with pytest.raises(ConfigError):
        pq_topk_reference(query, centroids, codes, 1000, 0, 600)
    with pytest.raises(ConfigError):
        pq_topk_reference(query[:5], centroids, codes, 5)


def test_dispatch_on_cpu_is_the_reference():
    query, centroids, codes = inputs()
    a, _ = pq_topk(query, centroids, codes, 40, 32, 650)
    b, _ = pq_topk_reference(query, centroids, codes, 40, 32, 650)
    assert torch.equal(a.sort(1).values, b.sort(1).values)
    keys, values = torch.randn(2, 700, 32), torch.randn(2, 700, 32)
    for x, y in zip(gather_kv(keys, values, a), gather_kv_reference(keys, values, a)):
        assert torch.equal(x, y)


INTERPRETED = textwrap.dedent(
    """
    import torch
    from kvstore.kernels.pq_torch import gather_kv_reference, pq_topk_reference
    from kvstore.kernels.pq_topk import gather_kv_triton, pq_topk_triton

    g = torch.Generator().manual_seed(0)
    cases = [  # kv_heads, group, m, K, sub, n, k, start, stop
        (2, 3, 2, 64, 32, 5000, 700, 32, 4936),
        (3, 1, 4, 16, 8, 1000, 1000 - 96, 32, 936),
        (1, 4, 2, 256, 16, 300, 1, 0, 300),
        (2, 2, 3, 8, 4, 129, 0, 5, 5),
    ]
    for kv_heads, group, m, K, sub, n, k, start, stop in cases:
        for dtype in (torch.float32, torch.float16):
            query = torch.randn(kv_heads * group, m * sub, generator=g).to(dtype)
            centroids = torch.randn(kv_heads, m, K, sub, generator=g).to(dtype)
            codes = torch.randint(0, K, (kv_heads, n, m), generator=g, dtype=torch.uint8)
            i1, s1 = pq_topk_triton(query, centroids, codes, k, start, stop)
            i2, s2 = pq_topk_reference(query, centroids, codes, k, start, stop)
            assert s1.shape == s2.shape and torch.isfinite(s1).all()
            tol = (1e-4 if dtype == torch.float32 else 2e-2) * (1 + (s2.abs().max() if s2.numel() else 0))
            assert torch.allclose(s1, s2, atol=tol), (s1 - s2).abs().max()
            # same selection up to ties: every pick scores at least the reference's k-th best
            if k:
                kth = s2.topk(k, dim=1).values[:, -1:]
                assert (s2.gather(1, i1 - start) >= kth - 2 * tol).all()
            assert i1.shape == i2.shape
    # gather from strided views of a cache [1, heads, T, D], fp16 and fp32
    for dtype in (torch.float16, torch.float32):
        cache_k = torch.randn(1, 3, 900, 64, generator=g).to(dtype)
        cache_v = torch.randn(1, 3, 900, 64, generator=g).to(dtype)
        idx = torch.randint(0, 900, (3, 333), generator=g)
        out = gather_kv_triton(cache_k[0], cache_v[0], idx)
        ref = gather_kv_reference(cache_k[0], cache_v[0], idx)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    print("ok")
    """
)


def test_triton_kernels_match_reference_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# -- counting select (pq_select): top-k by code combination, ties to the lowest positions --------


def test_order_selection_breaks_ties_by_position_and_returns_ascending_positions():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0], [0.0, -0.0, 5.0, 0.0, -2.0, float("nan")]])
    assert order_selection(scores[:1], 2).tolist() == [[1, 2]]
    assert order_selection(scores[:1], 4, start=10).tolist() == [[11, 12, 13, 14]]
    # -0.0 ties with 0.0; NaN (either sign) ranks lowest, on every device
    assert order_selection(scores[1:], 3).tolist() == [[0, 1, 2]]
    assert order_selection(-scores[1:], 1).tolist() == [[4]]
    assert order_selection(scores[1:], 6).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert order_selection(scores, 0).shape == (2, 0)
    with pytest.raises(ConfigError):
        order_selection(scores, 7)


def test_select_reference_is_the_topk_set_in_position_order():
    query, centroids, codes = inputs(n=900)
    got = pq_select_reference(query, centroids, codes, 120, 32, 836)
    want, _ = pq_topk_reference(query, centroids, codes, 120, 32, 836)
    assert torch.equal(got, want.sort(1).values)  # continuous scores: no ties at the k-th
    assert torch.equal(pq_select(query, centroids, codes, 120, 32, 836), got)  # CPU dispatch


def test_reference_reads_codes_beyond_the_codebook_as_the_last_centroid_and_checks_devices():
    query, centroids, codes = inputs(k=16)
    bad = codes.clone()
    bad[:, ::5, 0] = 255
    assert torch.equal(pq_scores_reference(query, centroids, bad), pq_scores_reference(query, centroids, bad.clamp(max=15)))
    with pytest.raises(ConfigError):
        pq_scores_reference(query.to("meta"), centroids, codes)
    with pytest.raises(ConfigError):
        pq_scores_reference(query, centroids, codes, 10, 800)


def test_combinations_apply_to_power_of_two_codebooks_up_to_4096():
    assert combinations(2, 64) == 4096 and combinations(1, 256) == 256 and combinations(3, 16) == 4096
    assert combinations(2, 128) is None and combinations(2, 48) is None and combinations(4, 16) is None


SELECT_INTERPRETED = textwrap.dedent(
    """
    import torch
    from kvstore.errors import ConfigError
    from kvstore.kernels.pq_torch import pq_lut_reference, pq_select_reference
    from kvstore.kernels.pq_select import pq_select_triton
    from benchmarks.pq_topk import reference_scores64

    g = torch.Generator().manual_seed(3)

    def data(kv_heads, group, m, K, sub, n, integer, dtype=torch.float32):
        if integer:  # small integers: every score exact in fp32, whatever the summation order
            query = torch.randint(-3, 4, (kv_heads * group, m * sub), generator=g).to(dtype)
            centroids = torch.randint(-3, 4, (kv_heads, m, K, sub), generator=g).to(dtype)
        else:
            query = torch.randn(kv_heads * group, m * sub, generator=g).to(dtype)
            centroids = torch.randn(kv_heads, m, K, sub, generator=g).to(dtype)
        return query, centroids, torch.randint(0, K, (kv_heads, n, m), generator=g, dtype=torch.uint8)

    cases = [  # kv_heads, group, m, K, sub, n, k, start, stop, segments
        (2, 3, 2, 64, 16, 3000, 600, 32, 2936, None),   # PQCache's m=2, b=6: int16 token words
        (2, 3, 2, 64, 16, 3000, 600, 32, 2936, 3),
        (3, 1, 2, 16, 8, 2500, 2500 - 96, 32, 2436, 4),  # k = every candidate
        (1, 4, 1, 256, 16, 1500, 1, 0, 1500, 2),         # int8 words, k = 1
        (2, 2, 4, 8, 4, 1200, 300, 5, 1100, 3),          # int32 words
        (2, 2, 3, 16, 4, 1100, 250, 0, 1100, 2),         # 3 bytes a token: the byte path
        (2, 2, 2, 4, 4, 700, 350, 0, 700, 1),            # 16 combinations, heavy ties
    ]
    for kv_heads, group, m, K, sub, n, k, start, stop, segments in cases:
        query, centroids, codes = data(kv_heads, group, m, K, sub, n, True)
        buf = torch.full((kv_heads * k + 64,), -1, dtype=torch.int64)  # poisoned, with a guard after `out`
        out = buf[: kv_heads * k].view(kv_heads, k)
        got = pq_select_triton(query, centroids, codes, k, start, stop, segments=segments, out=out)
        want = pq_select_reference(query, centroids, codes, k, start, stop)
        assert got is out and torch.equal(got, want), (m, K, segments, (got != want).sum())
        assert (buf[kv_heads * k:] == -1).all(), "wrote past the output"

    # the GPU's 1,024-token blocks, whole blocks above the k-th score (two 16-bit counts per scan)
    query, centroids, codes = data(2, 2, 1, 4, 4, 3100, False)
    worst = pq_lut_reference(query, centroids)[:, 0].argmin(1)
    for h in range(2):
        head = codes[h, 20:2068, 0]
        head[head == worst[h]] = (int(worst[h]) + 1) % 4
    got = pq_select_triton(query, centroids, codes, 3080, 20, 3100, segments=2, _block_n=1024)
    assert torch.equal(got, pq_select_reference(query, centroids, codes, 3080, 20, 3100))

    # codes the kernels read as they are (a token slice: strided heads, an offset) or copy first
    # (narrowed rows; odd offsets and strides that forbid the int16 view), fp16 queries
    query, centroids, wide = data(2, 4, 4, 64, 8, 2000, True, torch.float16)
    centroids2, query2 = centroids[:, 1:3].contiguous(), query[:, 8:24].contiguous()
    pairs = wide[:, :, 1:3].contiguous()
    flat = torch.randint(0, 64, (2 * 2000 * 2 + 1,), generator=g, dtype=torch.uint8)
    one_head = torch.randint(0, 64, (1, 2001, 2), generator=g, dtype=torch.uint8)
    for codes, q, c in [(pairs[:, 100:1900], query2, centroids2), (wide[:, 100:, 1:3], query2, centroids2),
                        (flat[1:].view(2, 2000, 2), query2, centroids2),
                        (one_head.view(-1)[1:4001].view(1, 2000, 2), query2[:4], centroids2[:1])]:
        got = pq_select_triton(q, c, codes, 400, 10, 1800, segments=3)
        assert torch.equal(got, pq_select_reference(q, c, codes.contiguous(), 400, 10, 1800))
    quad = torch.randint(0, 8, (2 * 500 * 4 + 2,), generator=g, dtype=torch.uint8)[2:].view(2, 500, 4)
    q4, c4, _ = data(2, 2, 4, 8, 4, 1, True)
    assert torch.equal(pq_select_triton(q4, c4, quad, 60, segments=2), pq_select_reference(q4, c4, quad, 60))

    # a NaN query: every score NaN, all tied (NaN ranks lowest): the first k positions, no hang
    query, centroids, codes = data(2, 2, 2, 16, 4, 900, False)
    query[0, 0] = float("nan")
    got = pq_select_triton(query, centroids, codes, 50, 5, 900, segments=2)
    assert torch.equal(got, pq_select_reference(query, centroids, codes, 50, 5, 900))
    assert got[0].tolist() == list(range(5, 55))

    # continuous scores: every pick is at least the float64 k-th best (fp32 rounding aside)
    for segments in (None, 5):
        query, centroids, codes = data(3, 4, 2, 64, 32, 4000, False)
        got = pq_select_triton(query, centroids, codes, 777, 32, 3900, segments=segments)
        ref = reference_scores64(query, centroids, codes, 32, 3900)
        kth = ref.topk(777, dim=1).values[:, -1:]
        assert (ref.gather(1, got - 32) >= kth - 1e-5 * ref.abs().max()).all()
        assert (got.diff(dim=1) > 0).all() and int(got.min()) >= 32 and int(got.max()) < 3900

    # codes >= K (never written by PQIndex) are read as K - 1, without reading out of bounds
    query, centroids, codes = data(2, 2, 2, 16, 4, 600, True)
    bad = codes.clone()
    bad[0, ::7, 1] = 200
    got = pq_select_triton(query, centroids, bad, 100, 0, 600, segments=2)
    assert torch.equal(got, pq_select_reference(query, centroids, bad.clamp(max=15), 100, 0, 600))

    for args, kwargs in [((query, centroids, codes, 601), {}), ((query, centroids, codes, 5, 10, 5), {}),
                         ((query, centroids, codes, 5), {"out": torch.empty(2, 4, dtype=torch.int64)}),
                         ((query, centroids, codes, 5), {"segments": 0}),
                         ((query, centroids[:, :, :12].contiguous(), codes, 5), {})]:
        try:
            pq_select_triton(*args, **kwargs)
        except ConfigError:
            pass
        else:
            raise AssertionError(f"no ConfigError for {kwargs or len(args)}")
    print("ok")
    """
)


@pytest.mark.skipif(not interpreter_supported(), reason="needs Triton >= 3.9's interpreter (3.6's cannot run these loops)")
def test_counting_select_kernels_match_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SELECT_INTERPRETED], env=env, capture_output=True, text=True,
                            timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_match_reference_on_gpu():
    """Scores, scores + top-k, the counting select and the gather, compiled, on fresh inputs with
    poisoned outputs (:func:`benchmarks.pq_topk.check`)."""
    from kvstore.kernels import pq_topk_bench

    assert pq_topk_bench.check("cuda") == []
