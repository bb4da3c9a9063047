"""Product quantization of keys, per layer and KV head (PQCache's index).

Each head's ``head_dim`` channels are split into ``subspaces`` (m) groups; in
each group the keys are clustered into ``2**bits`` centroids by k-means and a
token's key is replaced by the index of its nearest centroid in every group.
Keys are the ones the model attends to (after RoPE), in the project's
``[kv_heads, tokens, head_dim]`` layout. The default ``rope`` layout groups
channels so that each RoPE rotation pair stays inside one subspace (see
:meth:`PQConfig.channel_order`); ``contiguous`` is PQCache's plain split.

k-means is batched: every (layer, head, subspace) is one problem of a
``[B, n, d]`` batch, so one call clusters a whole layer (or model) with a few
batched matrix products per iteration, on the GPU when the keys are there and
on the CPU otherwise. It is deterministic by seed: the random draws come from
a CPU generator, and the centroid sums are a sequential ``index_add_`` on the CPU
and one-hot matrix products on the GPU, never float atomics. The first ``sinks`` tokens (attention sinks, always attended) are
left out of training, and training only ever sees the first ``num_tokens``
keys it is given: never the stale tail of a preallocated buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from kvstore.errors import ConfigError, FormatError

MAX_BITS = 8
SUBSPACE_DIM = 32  # channels per subspace when a config sizes its subspaces by the head
LAYOUTS = ("rope", "contiguous")
_CHUNK_ELEMENTS = 1 << 24  # bound on B * chunk * k for the distance / one-hot temporaries


@dataclass(frozen=True, slots=True)
class PQConfig:
    """Product quantization settings (PQCache's: m=2, b=6, 32 sinks).

    ``subspaces=None`` (the default) sizes the index by the head: one subspace per
    :data:`SUBSPACE_DIM` channels (m=2 on a 64-wide head, as PQCache; 8 on a 256-wide
    one), resolved by :meth:`for_head_dim` when an index is built."""

    subspaces: int | None = None
    bits: int = 6
    sinks: int = 32
    iters: int = 16
    seed: int = 0
    layout: str = "rope"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"PQConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("subspaces", "bits", "iters"):
            value = getattr(self, name)
            if name == "subspaces" and value is None:
                continue
            if type(value) is not int or value <= 0:
                raise ConfigError(f"PQConfig.{name} must be a positive int, got {value!r}")
        if self.bits > MAX_BITS:
            raise ConfigError(f"PQConfig.bits must be at most {MAX_BITS} (uint8 codes), got {self.bits}")
        for name in ("sinks", "seed"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"PQConfig.{name} must be a non-negative int, got {value!r}")

    @property
    def centroids(self) -> int:
        """Centroids per subspace, ``2**bits``."""
        return 1 << self.bits

    def for_head_dim(self, head_dim: int) -> PQConfig:
        """This configuration with its subspaces set for ``head_dim``-wide heads (unchanged
        when already set): ``head_dim / SUBSPACE_DIM``, at least 2 (PQCache's), the largest
        such count that splits the head into even widths (whole RoPE pairs)."""
        if self.subspaces is not None:
            return self
        m = max(2, head_dim // SUBSPACE_DIM)
        while m > 1 and (head_dim % m or (head_dim // m) % 2):
            m -= 1
        return replace(self, subspaces=m)

    def _resolved(self) -> int:
        if self.subspaces is None:
            raise ConfigError("this PQConfig sizes its subspaces by the head: call for_head_dim(head_dim) first")
        return self.subspaces

    @property
    def tag(self) -> str:
        """A key segment naming this (resolved) configuration."""
        return f"m{self._resolved()}b{self.bits}s{self.sinks}i{self.iters}r{self.seed}{self.layout[0]}"

    def sub_dim(self, head_dim: int) -> int:
        """Channels per subspace; ``head_dim`` must divide evenly."""
        m = self.for_head_dim(head_dim)._resolved()
        if head_dim % m:
            raise ConfigError(f"head_dim {head_dim} is not divisible by {m} subspaces")
        return head_dim // m

    def channel_order(self, head_dim: int) -> torch.Tensor | None:
        """The channel permutation whose consecutive ``head_dim / m`` entries form each subspace
        (``None``: the identity, for the ``contiguous`` layout).

        ``rope``: RoPE (transformers' rotate-half convention) turns channel ``i`` with channel
        ``i + head_dim/2``; splitting the head in contiguous halves would put the two
        coordinates of every rotating pair in different subspaces. Here subspace ``j`` takes
        channels ``[j*h, (j+1)*h)`` and their partners ``head_dim/2 + [j*h, (j+1)*h)``
        (``h = head_dim / 2m``): whole pairs, from fast to slow rotation."""
        sub = self.sub_dim(head_dim)
        m = head_dim // sub
        if self.layout == "contiguous":
            return None
        if sub % 2:
            raise ConfigError(f"the rope layout needs an even subspace width, got {sub}")
        half, h = head_dim // 2, sub // 2
        order = [c for j in range(m) for c in (*range(j * h, (j + 1) * h), *range(half + j * h, half + (j + 1) * h))]
        return torch.tensor(order, dtype=torch.long)

    def to_dict(self) -> dict[str, Any]:
        return {"subspaces": self._resolved(), "bits": self.bits, "sinks": self.sinks,
                "iters": self.iters, "seed": self.seed, "layout": self.layout}

    @classmethod
    def from_dict(cls, doc: Any) -> PQConfig:
        """Parse a stored configuration (raises :class:`FormatError`)."""
        fields = ("subspaces", "bits", "sinks", "iters", "seed", "layout")
        if not isinstance(doc, dict) or set(doc) != set(fields):
            raise FormatError(f"PQ configuration must have exactly the fields {fields}")
        try:
            return cls(**doc)
        except ConfigError as exc:
            raise FormatError(f"stored PQ configuration is invalid: {exc}") from None


DEFAULT_CONFIG = PQConfig()


def _chunk(b: int, k: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, b * k))


def _sq_dist_to(x_t: torch.Tensor, x_norms: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``||x - c||^2`` for points ``x_t [B, d, n]`` (transposed; norms ``[B, n]``) and one
    centroid per problem ``c [B, d]``."""
    dots = torch.bmm(c[:, None], x_t).squeeze(1)
    return (x_norms - 2 * dots + c.square().sum(-1, keepdim=True)).clamp_(min=0)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding of every problem of the batch, with draws from a CPU generator."""
    b, n, _ = x.shape
    draws = torch.rand(k, b, generator=generator, dtype=torch.float64).to(x.device)
    rows = torch.arange(b, device=x.device)
    x_norms = x.square().sum(-1)
    x_t = x.transpose(1, 2).contiguous()
    first = (draws[0] * n).long().clamp_(max=n - 1)
    centroids = [x[rows, first]]
    dist = _sq_dist_to(x_t, x_norms, centroids[0])
    for i in range(1, k):
        cdf = dist.double().cumsum(1)
        total = cdf[:, -1:]
        pick = torch.searchsorted(cdf, draws[i][:, None] * total).squeeze(1).clamp_(max=n - 1)
        uniform = (draws[i] * n).long().clamp_(max=n - 1)
        pick = torch.where(total.squeeze(1) > 0, pick, uniform)  # all points already chosen
        centroids.append(x[rows, pick])
        dist = torch.minimum(dist, _sq_dist_to(x_t, x_norms, centroids[-1]))
    return torch.stack(centroids, 1)


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of every point: ``x [B, n, d]``, ``centroids [B, k, d]`` -> ``[B, n]``."""
    b, n, _ = x.shape
    norms = centroids.square().sum(-1)[:, None]  # [B, 1, k]
    step = _chunk(b, centroids.shape[1])
    out = torch.empty(b, n, dtype=torch.long, device=x.device)
    c_t = centroids.transpose(1, 2)
    for s in range(0, n, step):
        chunk = x[:, s:s + step]
        out[:, s:s + step] = torch.baddbmm(norms.expand(-1, chunk.shape[1], -1), chunk, c_t, alpha=-2).argmin(-1)
    return out


def _cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, k: int, onehot: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums ``[B, k, d]`` and counts ``[B, k]``, in a fixed order (deterministic).

    CPU: ``index_add_`` (sequential). CUDA: one-hot matrix products, as atomic adds
    would make the float sums depend on thread timing."""
    b, n, d = x.shape
    if not (x.device.type != "cpu" if onehot is None else onehot):
        flat = (labels + torch.arange(b, device=x.device)[:, None] * k).reshape(-1)
        sums = torch.zeros(b * k, d, dtype=x.dtype).index_add_(0, flat, x.reshape(-1, d))
        counts = torch.bincount(flat, minlength=b * k).to(x.dtype)
        return sums.view(b, k, d), counts.view(b, k)
    sums = torch.zeros(b, k, d, device=x.device, dtype=x.dtype)
    counts = torch.zeros(b, k, device=x.device, dtype=x.dtype)
    classes = torch.arange(k, device=x.device)
    step = _chunk(b, k)
    for s in range(0, n, step):
        member = (labels[:, s:s + step, None] == classes).to(x.dtype)  # [B, chunk, k]
        sums += torch.bmm(member.transpose(1, 2), x[:, s:s + step])
        counts += member.sum(1)
    return sums, counts


def kmeans(
    x: torch.Tensor, k: int, *, iters: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means on ``x [B, n, d]``: returns ``(centroids [B, k, d] fp32, labels [B, n])``.

    Seeded by k-means++ from ``seed``; stops after ``iters`` iterations or when no label
    changes. A cluster left empty keeps its previous centroid. Runs where ``x`` is.
    """
    if x.ndim != 3 or x.shape[1] == 0:
        raise ConfigError(f"kmeans needs a non-empty [B, n, d] batch, got {list(x.shape)}")
    x = x.float()
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp(x, k, generator)
    labels = assign(x, centroids)
    for _ in range(iters):
        sums, counts = _cluster_sums(x, labels, k)
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centroids)
        new = assign(x, centroids)
        if torch.equal(new, labels):
            break
        labels = new
    return centroids, labels


def _split(keys: torch.Tensor, m: int, order: torch.Tensor | None) -> torch.Tensor:
    """``[..., H, N, D]`` -> ``[..., H, m, N, D/m]``, channels permuted by ``order`` first."""
    if order is not None:
        keys = keys.index_select(-1, order.to(keys.device))
    *lead, h, n, d = keys.shape
    return keys.reshape(*lead, h, n, m, d // m).movedim(-2, -3)


def train(keys: torch.Tensor, config: PQConfig = DEFAULT_CONFIG, *, num_tokens: int | None = None) -> torch.Tensor:
    """Centroids of ``keys`` ``[..., kv_heads, tokens, head_dim]`` (one layer, or layers stacked in front).

    Trains on tokens ``[sinks, num_tokens)`` (all of ``[0, num_tokens)`` when that leaves
    none); ``num_tokens`` defaults to the tensor's length: pass it when ``keys`` is a
    preallocated buffer only partly filled. Returns ``[..., kv_heads, m, 2**bits, head_dim/m]``
    fp32 on the keys' device, subspace channels in ``config.channel_order`` order: every
    (layer, head, subspace) in one batched k-means.
    """
    n = keys.shape[-2] if num_tokens is None else num_tokens
    if keys.ndim < 3 or not 0 < n <= keys.shape[-2]:
        raise ConfigError(f"train needs keys [..., heads, tokens, head_dim] with 0 < num_tokens <= tokens, "
                          f"got {list(keys.shape)} and num_tokens={num_tokens}")
    config = config.for_head_dim(keys.shape[-1])
    order = config.channel_order(keys.shape[-1])
    start = config.sinks if n > config.sinks else 0
    parts = _split(keys[..., start:n, :], config.subspaces, order)  # [..., H, m, n, d]
    lead = parts.shape[:-2]
    flat = parts.reshape(-1, *parts.shape[-2:])
    centroids, _ = kmeans(flat, config.centroids, iters=config.iters, seed=config.seed)
    return centroids.reshape(*lead, config.centroids, parts.shape[-1])


def encode(keys: torch.Tensor, centroids: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """PQ codes ``[..., kv_heads, tokens, m]`` uint8 of ``keys [..., kv_heads, tokens, head_dim]``
    under ``centroids [..., kv_heads, m, K, head_dim/m]`` (trained with channel ``order``)."""
    m, k = centroids.shape[-3], centroids.shape[-2]
    parts = _split(keys.to(centroids.device, torch.float32), m, order)  # [..., H, m, N, d]
    lead = parts.shape[:-2]
    labels = assign(parts.reshape(-1, *parts.shape[-2:]), centroids.float().reshape(-1, k, parts.shape[-1]))
    return labels.reshape(*lead, -1).movedim(-2, -1).to(torch.uint8)


def decode(codes: torch.Tensor, centroids: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate keys ``[..., kv_heads, tokens, head_dim]`` (original channel order) from codes and centroids."""
    d = centroids.shape[-1]
    idx = codes.movedim(-1, -2).long().to(centroids.device)  # [..., H, m, N]
    parts = torch.gather(centroids, -2, idx[..., None].expand(*idx.shape, d))  # [..., H, m, N, d]
    out = parts.movedim(-3, -2).reshape(*codes.shape[:-1], -1)
    if order is None:
        return out
    return out.index_select(-1, torch.argsort(order).to(out.device))


def pack_codes(codes: torch.Tensor, bits: int) -> np.ndarray:
    """Codes (any shape, values < 2**bits) as a dense little-bit-first bitstream of ``bits`` per code."""
    flat = codes.detach().reshape(-1).cpu().numpy().astype(np.uint8)
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ConfigError(f"a code does not fit in {bits} bits")
    bitplanes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitplanes.reshape(-1), bitorder="little")


def unpack_codes(data: np.ndarray | bytes | memoryview, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` uint8 codes (flat)."""
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if raw.size != -(-count * bits // 8):
        raise FormatError(f"packed codes hold {raw.size} bytes, {count} codes of {bits} bits need {-(-count * bits // 8)}")
    bitstream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    planes = np.zeros((count, 8), dtype=np.uint8)
    planes[:, :bits] = bitstream
    return torch.from_numpy(np.packbits(planes, axis=1, bitorder="little").reshape(count))


@dataclass(frozen=True)
class PQIndex:
    """A context's PQ index: ``centroids [layers, kv_heads, m, K, d]`` fp32 and ``codes
    [layers, kv_heads, tokens, m]`` uint8. ``layer_ids``: the model layers its rows index
    (``None``: every layer, in order); models with sliding-window layers index only their
    full-attention layers, as a window is already a small set of tokens to attend."""

    config: PQConfig
    centroids: torch.Tensor
    codes: torch.Tensor
    layer_ids: tuple[int, ...] | None = None

    def row(self, layer: int) -> int | None:
        """The index row of model layer ``layer`` (``None``: the layer is not indexed)."""
        if self.layer_ids is None:
            return layer if 0 <= layer < self.layers else None
        try:
            return self.layer_ids.index(layer)
        except ValueError:
            return None

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def layers(self) -> int:
        return self.codes.shape[0]

    @property
    def head_dim(self) -> int:
        return self.centroids.shape[-3] * self.centroids.shape[-1]

    def channel_order(self) -> torch.Tensor | None:
        """See :meth:`PQConfig.channel_order`: how query channels map onto the centroids' subspaces."""
        return self.config.channel_order(self.head_dim)

    def to(self, device: str | torch.device) -> PQIndex:
        return PQIndex(self.config, self.centroids.to(device), self.codes.to(device), self.layer_ids)


def build_index(
    kv_keys: list[torch.Tensor] | torch.Tensor,
    config: PQConfig = DEFAULT_CONFIG,
    *,
    device: str | torch.device | None = None,
    layers_per_batch: int | None = None,
    layer_ids: Sequence[int] | None = None,
) -> PQIndex:
    """Train and encode a whole context: ``kv_keys`` is per layer ``[kv_heads, tokens, head_dim]``
    (or stacked ``[layers, ...]``). ``layers_per_batch`` layers share one batched k-means
    (default: all). ``device`` defaults to the keys' device. ``layer_ids``: the model layers
    the keys are of, when not every layer (see :class:`PQIndex`)."""
    keys = torch.stack(list(kv_keys)) if not isinstance(kv_keys, torch.Tensor) else kv_keys
    if keys.ndim != 4:
        raise ConfigError(f"keys must be [layers, kv_heads, tokens, head_dim], got {list(keys.shape)}")
    if layer_ids is not None and len(layer_ids) != keys.shape[0]:
        raise ConfigError(f"{len(layer_ids)} layer ids for {keys.shape[0]} layers of keys")
    config = config.for_head_dim(keys.shape[-1])
    if device is not None:
        keys = keys.to(device)
    step = layers_per_batch or keys.shape[0]
    centroids = torch.cat([train(keys[i:i + step], config) for i in range(0, keys.shape[0], step)])
    order = config.channel_order(keys.shape[-1])
    codes = torch.cat([encode(keys[i:i + step], centroids[i:i + step], order) for i in range(0, keys.shape[0], step)])
    return PQIndex(config, centroids, codes, None if layer_ids is None else tuple(layer_ids))
