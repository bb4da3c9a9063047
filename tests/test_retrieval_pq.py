"""Product quantization of keys: batched k-means, PQ train / encode / decode, code packing."""

import pytest
import torch

from kvstore.errors import ConfigError, FormatError
from kvstore.retrieval import pq


def clusters(b=3, per=200, k=8, d=4, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, k, d, generator=g) * 5
    labels = torch.arange(k).repeat_interleave(per).expand(b, -1)
    x = centers.gather(1, labels[..., None].expand(-1, -1, d)) + noise * torch.randn(b, k * per, d, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x[:, perm], labels[:, perm], centers


def test_kmeans_recovers_clusters():
    x, labels, centers = clusters()
    found, assigned = pq.kmeans(x, 8, iters=30, seed=0)
    for b in range(x.shape[0]):
        # every true cluster maps to exactly one found cluster, and back
        pairs = set(zip(labels[b].tolist(), assigned[b].tolist()))
        assert len(pairs) == 8 and len({f for _, f in pairs}) == 8
        nearest = torch.cdist(centers[b], found[b]).min(dim=1).values
        assert nearest.max() < 0.05


def test_kmeans_is_deterministic_by_seed():
    x = torch.randn(4, 500, 8, generator=torch.Generator().manual_seed(1))
    a, la = pq.kmeans(x, 16, seed=3)
    b, lb = pq.kmeans(x, 16, seed=3)
    c, _ = pq.kmeans(x, 16, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_kmeans_with_fewer_points_than_clusters():
    x = torch.randn(2, 5, 3)
    centroids, labels = pq.kmeans(x, 8)
    assert centroids.shape == (2, 8, 3) and torch.isfinite(centroids).all()
    assert torch.allclose(centroids.gather(1, labels[..., None].expand(-1, -1, 3)), x)


def test_train_ignores_sinks_and_stale_buffer_tail():
    g = torch.Generator().manual_seed(0)
    config = pq.PQConfig(bits=3, sinks=4)
    keys = torch.randn(2, 100, 8, generator=g)
    keys[:, :4] = 1e4  # attention sinks: huge, must not pull a centroid
    buffer = torch.cat([keys, torch.full((2, 50, 8), -1e6)], dim=1)  # preallocated, tail unwritten
    exact = pq.train(keys, config)
    assert exact.abs().max() < 100
    assert torch.equal(pq.train(buffer, config, num_tokens=100), exact)
    with pytest.raises(ConfigError):
        pq.train(keys, config, num_tokens=101)


@pytest.mark.parametrize("layout", ["rope", "contiguous"])
def test_encode_decode_round_trip(layout):
    config = pq.PQConfig(subspaces=2, bits=4, sinks=0, layout=layout)
    g = torch.Generator().manual_seed(2)
    heads, dim = 3, 16
    centroids = torch.randn(heads, 2, 16, dim // 2, generator=g)
    codes = torch.randint(0, 16, (heads, 50, 2), generator=g, dtype=torch.uint8)
    order = config.channel_order(dim)
    keys = pq.decode(codes, centroids, order)
    assert keys.shape == (heads, 50, dim)
    assert torch.equal(pq.encode(keys, centroids, order), codes)
    # the score identity the kernels rely on: q . decode(codes) == sum_j q_j . centroid_j[code_j]
    q = torch.randn(dim, generator=g)
    q_sub = (q if order is None else q[order]).reshape(2, dim // 2)
    lut = torch.einsum("js,hjks->hjk", q_sub, centroids)
    scores = lut.gather(2, codes.long().transpose(1, 2)).sum(1)
    assert torch.allclose(scores, keys @ q, atol=1e-4)


def test_rope_layout_keeps_rotation_pairs_together():
    order = pq.PQConfig(subspaces=2, layout="rope").channel_order(8)
    assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert pq.PQConfig(layout="contiguous").channel_order(8) is None


def test_pq_on_real_shaped_keys_beats_a_single_centroid():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 600, 16, generator=g) @ torch.randn(16, 16, generator=g)
    index = pq.build_index(keys, pq.PQConfig(bits=5, sinks=8))
    assert index.centroids.shape == (2, 3, 2, 32, 8) and index.codes.shape == (2, 3, 600, 2)
    approx = pq.decode(index.codes, index.centroids, index.channel_order())
    error = (approx - keys).square().sum() / (keys - keys.mean(2, keepdim=True)).square().sum()
    assert error < 0.6


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack(bits):
    codes = torch.randint(0, 1 << bits, (3, 37, 2), dtype=torch.uint8)
    packed = pq.pack_codes(codes, bits)
    assert packed.nbytes == -(-codes.numel() * bits // 8)
    assert torch.equal(pq.unpack_codes(packed, bits, codes.numel()).reshape(codes.shape), codes)
    with pytest.raises(FormatError):
        pq.unpack_codes(packed[:-1], bits, codes.numel())


def test_config_validation_and_serialization():
    config = pq.PQConfig(subspaces=4, bits=8, sinks=0, iters=3, seed=9, layout="contiguous")
    assert pq.PQConfig.from_dict(config.to_dict()) == config
    for bad in ({"bits": 9}, {"subspaces": 0}, {"sinks": -1}, {"layout": "x"}, {"iters": 1.5}):
        with pytest.raises(ConfigError):
            pq.PQConfig(**bad)
    with pytest.raises(FormatError):
        pq.PQConfig.from_dict({**config.to_dict(), "bits": 12})
    with pytest.raises(FormatError):
        pq.PQConfig.from_dict({"bits": 6})
    with pytest.raises(ConfigError):
        pq.PQConfig(subspaces=3).sub_dim(64)


def test_cluster_sums_gpu_form_matches_cpu_form():
    x = torch.randn(3, 1000, 8)
    labels = torch.randint(0, 16, (3, 1000))
    cpu_sums, cpu_counts = pq._cluster_sums(x, labels, 16, onehot=False)
    mm_sums, mm_counts = pq._cluster_sums(x, labels, 16, onehot=True)
    assert torch.allclose(cpu_sums, mm_sums, atol=1e-4) and torch.equal(cpu_counts, mm_counts)
