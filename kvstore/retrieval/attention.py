"""Retrieval-based attention (PQCache): attend to sinks + a recent window + the top-k tokens by PQ score.

For a query at absolute position ``p`` (it sees ``visible = p + 1`` tokens) the
attended set is, per KV head:

- the first ``sinks`` tokens;
- the last ``window`` tokens ``[p - window + 1, p]`` (the current one included);
- the ``k`` tokens of the middle ``[sinks, p - window + 1)`` with the highest
  PQ score ``sum_j (sum_g q_gj) . centroid_j[code_j]`` (GQA groups summed, as
  PQCache does: one selection per KV head, shared by its query heads; ties at
  the k-th score go to the lowest positions, in both forms below),

with ``k = ceil(budget * visible) - sinks - window`` (at least 0): the budget
counts every attended token, sinks and window included.

Two equivalent forms: :func:`decode_step` for one query (the kernels' PQ
top-k, then a gather of just the selected tokens' K and V from a
:class:`~kvstore.retrieval.sources.KVSource`: GPU memory, host memory or the
store) and :func:`retrieval_mask` + :func:`masked_attention` for many query
positions at once (teacher forcing), each with its own causal selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from kvstore.errors import ConfigError
from kvstore.kernels import gather_tokens, select_pq_tokens


@dataclass(frozen=True, slots=True)
class RetrievalConfig:
    """How many tokens a query attends: ``budget`` of those it sees, sinks and window included.

    ``rerank``: the PQ scores shortlist ``rerank * k`` middle tokens and the exact ``q . k``
    of the shortlist picks the ``k`` attended (the keys of the shortlist are read, the
    values of the ``k`` only). The default 2 meets the recall (>= 0.9) and perplexity
    targets (measurements in ``benchmarks/RESULTS.md``);
    ``rerank=1`` is PQCache's own recipe (top-k by PQ score alone)."""

    budget: float = 0.2
    sinks: int = 32
    window: int = 64
    rerank: float = 2.0

    def __post_init__(self) -> None:
        if not (isinstance(self.budget, int | float) and 0 < self.budget <= 1):
            raise ConfigError(f"budget must lie in (0, 1], got {self.budget!r}")
        if not (isinstance(self.rerank, int | float) and self.rerank >= 1):
            raise ConfigError(f"rerank must be a number >= 1, got {self.rerank!r}")
        for name in ("sinks", "window"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"{name} must be a non-negative int, got {value!r}")

    def plan(self, visible: int) -> tuple[int, int, int]:
        """``(sinks, window, k)`` for a query that sees ``visible`` tokens; they never overlap."""
        sinks = min(self.sinks, visible)
        window = min(self.window, visible - sinks)
        middle = visible - sinks - window
        k = max(0, math.ceil(self.budget * visible - 1e-9) - sinks - window)
        return sinks, window, min(k, middle)

    def candidates(self, visible: int) -> int:
        """How many middle tokens the PQ scores shortlist: ``k``, or ``ceil(rerank * k)`` when the
        shortlist is re-ranked by exact ``q . k`` (beyond PQCache: the keys of the shortlist are
        fetched to pick the final ``k``)."""
        sinks, window, k = self.plan(visible)
        return min(visible - sinks - window, math.ceil(self.rerank * k - 1e-9))


DEFAULT_RETRIEVAL = RetrievalConfig()


class KVSource(Protocol):
    """Where the selected tokens' keys and values come from."""

    def gather(self, layer: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[kv_heads, k, head_dim]`` of tokens ``indices [kv_heads, k]`` of ``layer``."""
        ...


def select_tokens(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    visible: int,
    config: RetrievalConfig,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token positions ``[kv_heads, n]`` (int64) one decode query attends to: sinks, PQ top-k, window
    (with ``config.rerank > 1`` the PQ part is the shortlist, cut by :func:`decode_step`).

    ``query [q_heads, head_dim]`` of one layer; ``codes [kv_heads, >= visible, m]``;
    ``order``: the index's channel order (:meth:`~kvstore.retrieval.pq.PQIndex.channel_order`),
    applied to the query so its subspaces line up with the centroids'."""
    kv_heads = centroids.shape[0]
    sinks, window, _ = config.plan(visible)
    k = config.candidates(visible)
    device = codes.device
    query = query.to(device)
    if order is not None:
        query = query.index_select(-1, order.to(device))
    top = select_pq_tokens(query, centroids, codes, k, sinks, visible - window)
    sink_idx = torch.arange(sinks, device=device).expand(kv_heads, -1)
    window_idx = torch.arange(visible - window, visible, device=device).expand(kv_heads, -1)
    return torch.cat([sink_idx, top, window_idx], dim=1)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of ``query [q_heads, D]`` over ``keys/values [kv_heads, n, D]`` (GQA): ``[q_heads, D]``."""
    kv_heads, _, dim = keys.shape
    q = query.reshape(kv_heads, -1, dim).to(keys.dtype)
    weights = torch.softmax(torch.bmm(q, keys.transpose(1, 2)).float() * scaling, dim=-1)
    return torch.bmm(weights.to(values.dtype), values).reshape(query.shape)


def decode_step(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    source: KVSource,
    layer: int,
    visible: int,
    config: RetrievalConfig,
    scaling: float,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode query's retrieval attention: ``(output [q_heads, D], attended positions [kv_heads, n])``."""
    indices = select_tokens(query, centroids, codes, visible, config, order)
    keys, values = source.gather(layer, indices)
    keys, values, indices = rerank_selection(query, keys, values, indices, visible, config)
    return attend(query.to(keys.device), keys, values, scaling), indices


def rerank_selection(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
    visible: int, config: RetrievalConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut a :func:`select_tokens` shortlist to the final ``k`` by exact group-summed ``q . k``
    (a no-op unless ``config.rerank > 1``). Inputs and outputs are aligned ``[kv_heads, n, ...]``."""
    sinks, _, k = config.plan(visible)
    short = config.candidates(visible)
    if short == k:
        return keys, values, indices
    kv_heads = keys.shape[0]
    q = query.to(keys.device, torch.float32).reshape(kv_heads, -1, keys.shape[2]).sum(1)  # [kv_heads, D]
    middle = slice(sinks, sinks + short)
    exact = torch.bmm(keys[:, middle].float(), q[:, :, None]).squeeze(-1)  # [kv_heads, short]
    keep = exact.topk(k, dim=1, sorted=False).indices + sinks
    rows = torch.cat([torch.arange(sinks, device=keys.device).expand(kv_heads, -1), keep,
                      torch.arange(sinks + short, keys.shape[1], device=keys.device).expand(kv_heads, -1)], dim=1)
    pick = rows[..., None].expand(-1, -1, keys.shape[2])
    return torch.gather(keys, 1, pick), torch.gather(values, 1, pick), torch.gather(indices, 1, rows.to(indices.device))


class TensorSource:
    """Keys and values held as tensors per layer ``[kv_heads, tokens, D]``, in GPU or host memory.

    Selected rows are gathered where the tensors are (the Triton gather on CUDA) and
    moved to ``device`` (for host memory: just the selected rows cross the bus)."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device | None = None) -> None:
        self.kv = kv
        self.device = torch.device(device) if device is not None else kv[0][0].device

    def gather(self, layer: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv[layer]
        k, v = gather_tokens(keys, values, indices.to(keys.device))
        # into host memory, a non-blocking copy would hand back rows still in flight
        to_gpu = self.device.type == "cuda"
        return k.to(self.device, non_blocking=to_gpu), v.to(self.device, non_blocking=to_gpu)


# -- many query positions at once (teacher forcing) -------------------------------------
def group_sum(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[q_heads, L, D]`` -> ``[kv_heads, L, D]``: the queries of each GQA group summed."""
    q_heads, length, dim = query.shape
    return query.reshape(kv_heads, q_heads // kv_heads, length, dim).sum(1)


def _keep_top(scores: torch.Tensor, allowed: torch.Tensor, k_row: torch.Tensor) -> torch.Tensor:
    """``[..., L, T]`` bool: the ``k_row[l]`` highest ``scores`` of row ``l`` among ``allowed``."""
    cols = torch.arange(scores.shape[-1], device=scores.device)
    ranked = scores.float().masked_fill(~allowed, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    keep = (cols < k_row[:, None]).expand_as(ranked)
    return torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, ranked, keep) & allowed


def _regions(positions: torch.Tensor, total: int, config: RetrievalConfig) -> tuple[torch.Tensor, ...]:
    """Per query row: ``(middle [L, T], always [L, T], k [L], shortlist [L])`` masks and counts."""
    device = positions.device
    plans = [config.plan(int(p) + 1) for p in positions.tolist()]
    sinks = torch.tensor([s for s, _, _ in plans], device=device)
    win_lo = torch.tensor([int(p) + 1 - w for p, (_, w, _) in zip(positions.tolist(), plans)], device=device)
    k_row = torch.tensor([k for _, _, k in plans], device=device)
    short = torch.tensor([config.candidates(int(p) + 1) for p in positions.tolist()], device=device)
    cols = torch.arange(total, device=device)
    middle = (cols >= sinks[:, None]) & (cols < win_lo[:, None])
    always = (cols < sinks[:, None]) | ((cols >= win_lo[:, None]) & (cols <= positions[:, None]))
    return middle, always, k_row, short


def select_middle(
    query: torch.Tensor, approx_keys: torch.Tensor, positions: torch.Tensor, config: RetrievalConfig,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The middle tokens each query picks, ``([kv_heads, L, T] bool, k per row [L])``: the top-k by
    PQ score (``approx_keys``), or with ``config.rerank > 1`` the top-k by exact score (``keys``)
    of the PQ shortlist."""
    kv_heads, total, _ = approx_keys.shape
    positions = positions.to(approx_keys.device)
    q = group_sum(query.float(), kv_heads)
    middle, _, k_row, short = _regions(positions, total, config)
    scores = torch.bmm(q, approx_keys.float().transpose(1, 2))
    if config.rerank == 1:
        return _keep_top(scores, middle, k_row), k_row
    if keys is None:
        raise ConfigError("re-ranking needs the exact keys")
    shortlist = _keep_top(scores, middle, short)
    return _keep_top(torch.bmm(q, keys.float().transpose(1, 2)), shortlist, k_row), k_row


def retrieval_mask(
    query: torch.Tensor, approx_keys: torch.Tensor, positions: torch.Tensor, config: RetrievalConfig,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which tokens each query attends: ``[kv_heads, L, T]`` bool.

    ``query [q_heads, L, D]`` at absolute ``positions [L]``; ``approx_keys [kv_heads, T, D]``
    are the PQ-decoded keys (``q . decode(codes)`` equals the lookup-table score); ``keys``
    (the exact ones) are needed only to re-rank."""
    picked, _ = select_middle(query, approx_keys, positions, config, keys)
    _, always, _, _ = _regions(positions.to(approx_keys.device), approx_keys.shape[1], config)
    return picked | always


def causal_mask(positions: torch.Tensor, total: int) -> torch.Tensor:
    """``[L, T]`` bool: query at position ``p`` sees tokens ``[0, p]``."""
    return torch.arange(total, device=positions.device) <= positions[:, None]


def masked_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of ``query [q_heads, L, D]`` over ``keys/values [kv_heads, T, D]`` where ``mask``
    (``[kv_heads, L, T]`` or ``[L, T]``) allows: ``[q_heads, L, D]``."""
    q_heads, length, dim = query.shape
    kv_heads = keys.shape[0]
    q = query.reshape(kv_heads, q_heads // kv_heads * length, dim)
    scores = torch.bmm(q.float(), keys.float().transpose(1, 2)).reshape(kv_heads, -1, length, keys.shape[1])
    allow = mask[:, None] if mask.ndim == 3 else mask
    scores = scores.mul_(scaling).masked_fill_(~allow, float("-inf"))
    weights = torch.softmax(scores, dim=-1).reshape(kv_heads, -1, keys.shape[1])
    return torch.bmm(weights, values.float()).reshape(q_heads, length, dim).to(query.dtype)


def topk_recall(
    query: torch.Tensor, keys: torch.Tensor, approx_keys: torch.Tensor, positions: torch.Tensor, config: RetrievalConfig
) -> torch.Tensor:
    """Recall of the exact top-k (by group-summed ``q . k``) by the selected middle tokens, per
    (KV head, query) with ``k > 0``: a flat tensor of fractions in [0, 1]."""
    exact_config = RetrievalConfig(config.budget, config.sinks, config.window, rerank=1.0)
    exact, k_row = select_middle(query, keys, positions, exact_config)
    picked, _ = select_middle(query, approx_keys, positions, config, keys)
    rows = k_row > 0
    hits = (exact & picked).sum(-1)[:, rows].float()
    return (hits / k_row[rows]).reshape(-1)
