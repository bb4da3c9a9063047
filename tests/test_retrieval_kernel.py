"""PQ score / top-k and gather: the torch reference, and the Triton kernels under the interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvstore.errors import ConfigError
from kvstore.kernels.pq_reference import (
    gather_kv_reference,
    pq_scores_reference,
    pq_topk_reference,
)
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
    from kvstore.kernels.pq_reference import gather_kv_reference, pq_topk_reference
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
