"""A Hugging Face causal LM as a :class:`~kvstore.model_adapter.ModelAdapter`, for
``KVStore(url, model=model)``."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from kvstore.errors import ConfigError
from kvstore.format.layout import CacheLayout
from kvstore.integrations.hf import Tokens, cache_layout, extract_kv, hf_model_id, kv_to_cache
from kvstore.kv import KV

log = logging.getLogger(__name__)
_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """The lock that runs of one model object take: calibration swaps the model's attention
    function for one that records queries, so no other forward may run meanwhile."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


class HFModel:
    """``model`` (a ``transformers`` causal LM) and, for calibration texts given as
    strings, its ``tokenizer``. ``model_id``: the id its KV is stored under; by default
    :func:`~kvstore.integrations.hf.hf_model_id`, which hashes the model's config and
    parameters once (pass the id when the weights are hashed elsewhere, e.g.
    ``hf_model_id(config, folder_weights_digest(folder))`` for a model folder)."""

    def __init__(self, model: Any, tokenizer: Any = None, *, model_id: str | None = None) -> None:
        if not hasattr(model, "config"):
            raise ConfigError(f"HFModel needs a transformers model (with a config), got {type(model).__name__}")
        if model_id is not None and (not isinstance(model_id, str) or not model_id):
            raise ConfigError(f"model_id must be a non-empty str, got {model_id!r}")
        self.model = model
        self.tokenizer = tokenizer
        self._model_id = model_id

    @cached_property
    def model_id(self) -> str:
        """The id the store keys this model's KV by."""
        return self._model_id if self._model_id is not None else hf_model_id(self.model)

    def cache_layout(self) -> CacheLayout:
        """What each layer caches, read from the model's config."""
        return cache_layout(self.model)

    def prefill(self, tokens: Tokens, *, states_every: int | None = None) -> KV:
        """The KV of ``tokens``, every token of every layer (linear-attention states after
        the last token and every multiple of ``states_every``)."""
        with model_lock(self.model):
            return extract_kv(self.model, tokens, states_every=states_every)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        if self.tokenizer is None:
            raise ConfigError("calibration texts given as strings need the model's tokenizer: "
                              "pass HFModel(model, tokenizer) as the store's model, or token ids")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def calibrate(self, contexts: Sequence[Tokens]) -> Any:
        """The model's codec profile calibrated on ``contexts`` (minutes on a CPU): ``kvcodec3``'s
        when they hold :data:`~kvstore.integrations.hf_profile.MIN_TRANSFORM_TOKENS` tokens or more
        (its bases need that much text to hold on other text) and its transform can undo the
        model's RoPE, else ``kvcodec``'s."""
        from kvstore.integrations.hf_profile import MIN_TRANSFORM_TOKENS, profile_model, transform_profile_model
        from kvstore.integrations.hf_rope import rotary_table

        with model_lock(self.model):
            if sum(len(c) for c in contexts) >= MIN_TRANSFORM_TOKENS:
                try:
                    rotary_table(self.model)
                except ConfigError as exc:
                    log.info("calibrating kvcodec, not kvcodec3: %s", exc)
                else:
                    return transform_profile_model(self.model, contexts)
            return profile_model(self.model, contexts)

    def to_cache(self, kv: KV, num_tokens: int) -> Any:
        """A ``DynamicCache`` holding ``kv`` as the cache of a ``num_tokens``-token context."""
        return kv_to_cache(self.model, kv, num_tokens=num_tokens)
