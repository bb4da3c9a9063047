"""The PQ score / top-k and gather operations in plain torch, with the kernels' signatures (:mod:`kvstore.kernels.pq_topk`,
:mod:`kvstore.kernels.pq_select`).

Shapes (one layer, one decode step):

- ``query``: ``[q_heads, head_dim]``, the query heads of KV head ``h`` being rows
  ``h * group .. h * group + group - 1`` (the transformers GQA layout);
- ``centroids``: ``[kv_heads, m, K, head_dim / m]``;
- ``codes``: ``[kv_heads, tokens, m]`` uint8.

The score of token ``t`` for KV head ``h`` is PQCache's
``sum_j (sum_g q_{h,g,j}) . centroids[h, j, codes[h, t, j]]``: the queries of a
GQA group are summed (one selection per KV head), and each subspace's dot
products come from a lookup table of ``K`` entries computed once per step.
"""

from __future__ import annotations

import torch

from kvstore.errors import ConfigError


def check_pq_shapes(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate shapes; return ``(kv_heads, group, m, K, sub_dim)``."""
    if query.ndim != 2 or centroids.ndim != 4 or codes.ndim != 3:
        raise ConfigError("expected query [q_heads, D], centroids [kv_heads, m, K, D/m], codes [kv_heads, N, m]")
    kv_heads, m, k, sub = centroids.shape
    q_heads, dim = query.shape
    if q_heads % kv_heads or dim != m * sub or codes.shape[0] != kv_heads or codes.shape[2] != m:
        raise ConfigError(
            f"shapes disagree: query {list(query.shape)}, centroids {list(centroids.shape)}, codes {list(codes.shape)}"
        )
    if codes.dtype != torch.uint8:
        raise ConfigError(f"codes must be uint8, got {codes.dtype}")
    if query.device != codes.device or centroids.device != codes.device:
        raise ConfigError(f"query ({query.device}), centroids ({centroids.device}) and codes ({codes.device}) "
                          "must be on one device")  # fmt: skip
    return kv_heads, q_heads // kv_heads, m, k, sub


def check_token_range(codes: torch.Tensor, start: int, stop: int | None) -> int:
    """Validate ``[start, stop)`` against the coded tokens (``stop=None``: all); return ``stop``."""
    stop = codes.shape[1] if stop is None else stop
    if not 0 <= start <= stop <= codes.shape[1]:
        raise ConfigError(f"token range [{start}, {stop}) is outside the {codes.shape[1]} coded tokens")
    return stop


def check_k(k: int, candidates: int) -> None:
    """``k`` must lie in ``[0, candidates]``."""
    if not 0 <= k <= candidates:
        raise ConfigError(f"k={k} must lie in [0, {candidates}] (the candidate tokens)")


def pq_lut_reference(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Lookup tables ``[kv_heads, m, K]`` fp32: group-summed query . every centroid."""
    kv_heads, m, _, sub = centroids.shape
    q = query.float().reshape(kv_heads, -1, m, sub).sum(1)  # [kv_heads, m, sub]
    return torch.einsum("hms,hmks->hmk", q, centroids.float())


def pq_scores_reference(
    query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Approximate scores ``[kv_heads, stop - start]`` fp32 of tokens ``[start, stop)``.

    Codes ``>= K`` (never written by :class:`~kvstore.retrieval.pq.PQIndex`) are read as
    ``K - 1``, as the kernels read them."""
    _, _, _, n_centroids, _ = check_pq_shapes(query, centroids, codes)
    stop = check_token_range(codes, start, stop)
    lut = pq_lut_reference(query, centroids)
    idx = codes[:, start:stop].long().clamp_(max=n_centroids - 1).transpose(1, 2)  # [kv_heads, m, n]
    return torch.gather(lut, 2, idx).sum(1)


def pq_topk_reference(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    start: int = 0,
    stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` tokens of ``[start, stop)`` by PQ score, per KV head.

    Returns ``(indices [kv_heads, k] int64, absolute token positions, unordered;
    scores [kv_heads, stop - start] fp32)``.
    """
    scores = pq_scores_reference(query, centroids, codes, start, stop)
    check_k(k, scores.shape[1])
    return scores.topk(k, dim=1, sorted=False).indices + start, scores


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys in ``[0, 2**32)`` of fp32 ``scores`` (``-0.0`` and ``0.0``
    equal; NaN, whatever its bits, the lowest, 0): what the select kernel compares, so ties
    and NaN rank the same on every device."""
    scores = scores.float()
    bits = (scores + 0.0).view(torch.int32).long()
    keys = torch.where(bits >= 0, bits + (1 << 31), -1 - bits)
    return keys.masked_fill_(scores.isnan(), 0)


def order_selection(scores: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """Positions ``[kv_heads, k]`` (int64, ascending, offset by ``start``) of each row's ``k``
    highest ``scores``; ties at the k-th score go to the lowest positions."""
    rows, n = scores.shape
    check_k(k, n)
    if k == 0:
        return torch.empty(rows, 0, dtype=torch.int64, device=scores.device)
    keys = score_keys(scores)
    kth = keys.topk(k, dim=1).values[:, -1:]
    above = keys > kth
    tie = keys == kth
    take = above | (tie & (tie.cumsum(1) <= k - above.sum(1, keepdim=True)))
    return take.nonzero()[:, 1].reshape(rows, k) + start


def pq_select_reference(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """The ``k`` tokens of ``[start, stop)`` with the highest PQ score per KV head, as
    ascending positions ``[kv_heads, k]`` int64; ties at the k-th score go to the lowest
    positions (the semantics of :func:`kvstore.kernels.pq_select.pq_select_triton`)."""
    return order_selection(pq_scores_reference(query, centroids, codes, start, stop), k, start)


def gather_kv_reference(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected tokens' keys and values ``[kv_heads, k, head_dim]`` from ``[kv_heads, N, head_dim]``."""
    if keys.shape != values.shape or keys.ndim != 3 or indices.ndim != 2 or indices.shape[0] != keys.shape[0]:
        raise ConfigError("expected keys/values [kv_heads, N, D] and indices [kv_heads, k]")
    idx = indices.to(keys.device, torch.long)[..., None].expand(-1, -1, keys.shape[2])
    return torch.gather(keys, 1, idx), torch.gather(values, 1, idx)
