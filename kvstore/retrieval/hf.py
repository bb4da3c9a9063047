"""Hugging Face transformers decoding with retrieval attention (PQCache) over a PQ index.

:func:`retrieval_attention` registers an attention function through
transformers' ``AttentionInterface`` (name ``kvstore_retrieval``) and switches a
model to it for the ``with`` block. Inside, every attention layer:

- layers the index does not cover (sliding-window layers: their window is already a
  small set of tokens) run the model's own attention implementation unchanged;
- keeps PQ codes for all its cached tokens: the context's from the
  :class:`~kvstore.retrieval.pq.PQIndex` (trained once at prefill, or loaded
  from the store), later tokens encoded with the same centroids as they come;
- for one query (a decode step) selects sinks + window + PQ top-k with the
  kernels and gathers only those tokens' K and V: from the live cache (GPU or
  host memory) or, for the context's tokens, from a
  :class:`~kvstore.retrieval.attention.KVSource` such as
  :class:`~kvstore.retrieval.sources.StoreSource` (the stored chunks);
- for many queries at once (teacher forcing) gives each position its own causal
  selection through a mask, which is exactly what decoding those tokens one by
  one would attend to.

transformers' ``DynamicCache`` still holds every token's KV: this integration
measures quality and exercises the data path; it does not shrink GPU memory.
Batch size 1, no padding.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvstore.errors import ConfigError
from kvstore.integrations.hf import cache_kwarg, cache_to_kv, kv_to_cache, prefill
from kvstore.integrations.hf_attention import own_attention, use_attention
from kvstore.kernels import gather_tokens
from kvstore.kv import KV
from kvstore.retrieval import pq
from kvstore.retrieval.attention import (
    DEFAULT_RETRIEVAL,
    KVSource,
    RetrievalConfig,
    attend,
    causal_mask,
    masked_attention,
    rerank_selection,
    retrieval_mask,
    select_tokens,
    topk_recall,
)

ATTENTION_NAME = "kvstore_retrieval"
_ACTIVE: contextvars.ContextVar[RetrievalSession | None] = contextvars.ContextVar("kvstore_retrieval", default=None)
_FALLBACK: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvstore_retrieval_fallback", default=None)


@dataclass
class RetrievalStats:
    """Per-layer sums collected when a session runs with ``collect=True``."""

    recall_sum: dict[int, float] = field(default_factory=dict)
    recall_n: dict[int, int] = field(default_factory=dict)
    err_sq: dict[int, float] = field(default_factory=dict)
    ref_sq: dict[int, float] = field(default_factory=dict)
    attended: int = 0
    visible: int = 0

    def recall_by_layer(self) -> dict[int, float]:
        """Per layer, the mean recall over heads and steps."""
        return {i: self.recall_sum[i] / self.recall_n[i] for i in self.recall_sum if self.recall_n[i]}

    def recall(self) -> float:
        """Mean over layers of the mean recall over heads and steps."""
        per_layer = list(self.recall_by_layer().values())
        return sum(per_layer) / len(per_layer) if per_layer else float("nan")

    def attention_rel_error(self) -> float:
        """Mean over layers of ``||out_retrieval - out_full|| / ||out_full||``."""
        per_layer = [(self.err_sq[i] / self.ref_sq[i]) ** 0.5 for i in self.err_sq if self.ref_sq[i] > 0]
        return sum(per_layer) / len(per_layer) if per_layer else float("nan")


class RetrievalSession:
    """The PQ state of one context being decoded with retrieval attention.

    Parameters:
        index: the context's PQ index (its first ``index.num_tokens`` tokens).
        config: the attention budget.
        source: where decode steps gather the context's selected K/V from
            (``None``: the live cache).
        collect: also compute full attention and the exact top-k to fill :attr:`stats`.
    """

    def __init__(
        self, index: pq.PQIndex, config: RetrievalConfig = DEFAULT_RETRIEVAL, *,
        source: KVSource | None = None, collect: bool = False,
    ) -> None:
        self.index = index
        self.config = config
        self.source = source
        self.collect = collect
        self.stats = RetrievalStats()
        self._codes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: codes and keys after the index
        self._centroids: dict[int, torch.Tensor] = {}
        self.order = index.channel_order()

    def centroids(self, layer: int, device: torch.device) -> torch.Tensor:
        c = self._centroids.get(layer)
        if c is None or c.device != device:
            c = self._centroids[layer] = self.index.centroids[self._row(layer)].to(device, torch.float32)
        return c

    def _row(self, layer: int) -> int:
        row = self.index.row(layer)
        if row is None:
            raise ConfigError(f"layer {layer} is not in the PQ index")
        return row

    def covers(self, layer: int) -> bool:
        """Whether retrieval attention runs in ``layer`` (the index covers it)."""
        return self.index.row(layer) is not None

    def codes_for(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Codes ``[kv_heads, T, m]`` of the ``T`` cached keys: the index's for its tokens, then
        the later keys encoded with the same centroids. Codes of later keys are reused across
        calls only while those keys are unchanged (a new continuation is re-encoded, never
        scored with a previous one's codes)."""
        total, stored = keys.shape[1], self.index.num_tokens
        base = self.index.codes[self._row(layer)][:, : min(total, stored)].to(keys.device)
        if total <= stored:
            return base
        cached = self._codes.get(layer)
        if cached is not None:
            codes, seen = cached
            n = min(seen.shape[1], total - stored)
            if seen.device != keys.device or not torch.equal(seen[:, :n], keys[:, stored:stored + n]):
                codes, seen = codes[:, :0], seen[:, :0]
            else:
                codes, seen = codes[:, :n], seen[:, :n]
        else:
            codes = base[:, :0]
            seen = keys[:, stored:stored]
        have = stored + seen.shape[1]
        if have < total:
            new = keys[:, have:total]
            codes = torch.cat([codes, pq.encode(new, self.centroids(layer, keys.device), self.order).to(codes.device)], 1)
            seen = torch.cat([seen, new.detach().clone()], dim=1)
        self._codes[layer] = (codes, seen)
        return torch.cat([base, codes], dim=1)

    # -- the attention function --------------------------------------------------
    def attention(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  scaling: float) -> torch.Tensor:
        """Retrieval attention for ``query [q_heads, L, D]`` over ``keys/values [kv_heads, T, D]``."""
        length, total = query.shape[1], keys.shape[1]
        codes = self.codes_for(layer, keys)
        centroids = self.centroids(layer, keys.device)
        if length == 1:
            return self._decode(layer, query[:, 0], keys, values, codes, centroids, scaling)[:, None]
        positions = torch.arange(total - length, total, device=query.device)
        approx = pq.decode(codes, centroids, self.order)
        mask = retrieval_mask(query, approx, positions, self.config, keys)
        out = masked_attention(query, keys, values, mask, scaling)
        if self.collect:
            full = masked_attention(query, keys, values, causal_mask(positions, total), scaling)
            self._record(layer, out, full, topk_recall(query, keys, approx, positions, self.config))
            self.stats.attended += int(mask.sum())
            self.stats.visible += int(keys.shape[0] * (positions + 1).sum())
        return out

    def _decode(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                codes: torch.Tensor, centroids: torch.Tensor, scaling: float) -> torch.Tensor:
        total = keys.shape[1]
        indices = select_tokens(query, centroids, codes, total, self.config, self.order)
        k_sel, v_sel = gather_tokens(keys, values, indices)
        if self.source is not None:  # the context's tokens come from the source, later ones from the cache
            stored = self.index.num_tokens
            from_source = (indices < stored)[..., None]
            if bool(from_source.any()):
                k_src, v_src = self.source.gather(layer, indices.clamp(max=stored - 1))
                k_sel = torch.where(from_source, k_src.to(k_sel.device, k_sel.dtype), k_sel)
                v_sel = torch.where(from_source, v_src.to(v_sel.device, v_sel.dtype), v_sel)
        k_sel, v_sel, indices = rerank_selection(query, k_sel, v_sel, indices, total, self.config)
        out = attend(query, k_sel, v_sel, scaling)
        if self.collect:
            positions = torch.tensor([total - 1], device=query.device)
            full = masked_attention(query[:, None], keys, values, causal_mask(positions, total), scaling)[:, 0]
            approx = pq.decode(codes, centroids, self.order)
            self._record(layer, out, full, topk_recall(query[:, None], keys, approx, positions, self.config))
            self.stats.attended += indices.numel()
            self.stats.visible += keys.shape[0] * total
        return out

    def _record(self, layer: int, out: torch.Tensor, full: torch.Tensor, recall: torch.Tensor) -> None:
        s = self.stats
        s.err_sq[layer] = s.err_sq.get(layer, 0.0) + float((out.float() - full.float()).square().sum())
        s.ref_sq[layer] = s.ref_sq.get(layer, 0.0) + float(full.float().square().sum())
        s.recall_sum[layer] = s.recall_sum.get(layer, 0.0) + float(recall.sum())
        s.recall_n[layer] = s.recall_n.get(layer, 0) + recall.numel()


def _attention_forward(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry: ``query [1, q_heads, L, D]``, ``key/value [1, kv_heads, T, D]``
    -> ``([1, L, q_heads, D], None)``."""
    session = _ACTIVE.get()
    if session is None:
        raise ConfigError(f"attention {ATTENTION_NAME!r} used outside a retrieval_attention() block")
    if kwargs.get("sliding_window") is not None or not session.covers(module.layer_idx):
        fallback = _FALLBACK.get()
        assert fallback is not None
        return own_attention(module, fallback)(module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        raise ConfigError(f"layer {module.layer_idx} softcaps its logits or has attention sinks, which "
                          "retrieval attention does not model")
    if query.shape[0] != 1:
        raise ConfigError("retrieval attention supports batch size 1 only")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = session.attention(module.layer_idx, query[0], key[0], value[0], scale)
    return out.transpose(0, 1)[None].to(query.dtype), None


@contextlib.contextmanager
def retrieval_attention(model: Any, session: RetrievalSession) -> Iterator[RetrievalSession]:
    """Run ``model``'s attention layers as retrieval attention over ``session`` inside the block
    (layers the index does not cover run the model's own attention)."""
    with use_attention(model, ATTENTION_NAME, _attention_forward) as previous:
        token, fallback = _ACTIVE.set(session), _FALLBACK.set(previous)
        try:
            yield session
        finally:
            _ACTIVE.reset(token)
            _FALLBACK.reset(fallback)


def build_session(
    kv: KV, pq_config: pq.PQConfig = pq.DEFAULT_CONFIG, config: RetrievalConfig = DEFAULT_RETRIEVAL, **kwargs: Any
) -> RetrievalSession:
    """Train a PQ index on a context's keys (where they are) and wrap it in a session.
    ``layers``: the model layers to index (default: every layer)."""
    layers = kwargs.pop("layers", None)
    keys = [kv[i][0] for i in layers] if layers is not None else [k for k, _ in kv]
    return RetrievalSession(pq.build_index(keys, pq_config, layer_ids=layers), config, **kwargs)


def generate_retrieval(
    model: Any,
    context_tokens: Sequence[int] | torch.Tensor,
    max_new_tokens: int = 16,
    *,
    kv: KV | None = None,
    session: RetrievalSession | None = None,
    pq_config: pq.PQConfig = pq.DEFAULT_CONFIG,
    config: RetrievalConfig = DEFAULT_RETRIEVAL,
) -> tuple[list[int], RetrievalSession]:
    """Greedy decoding with retrieval attention after a context.

    ``kv`` is the context's KV (prefilled with full attention when None); ``session``
    brings a PQ index (e.g. loaded from the store; trained on ``kv`` when None). Every
    new token is decoded one step at a time through :meth:`RetrievalSession.attention`.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(context_tokens, dtype=torch.long).reshape(-1).to(device)
    if kv is None:
        _, cache = prefill(model, ids)
        kv = [(k.clone(), v.clone()) for k, v in cache_to_kv(cache)]
    if session is None:
        session = build_session(kv, pq_config, config)
    cache = kv_to_cache(model, [(k[:, :-1], v[:, :-1]) for k, v in kv]) if len(ids) > 1 else kv_to_cache(model, None)
    out: list[int] = []
    step = ids[-1:]
    with torch.no_grad(), retrieval_attention(model, session):
        for _ in range(max_new_tokens):
            logits = model(input_ids=step[None], **{cache_kwarg(model): cache}, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            step = torch.tensor([token], device=ids.device)
    return out, session
