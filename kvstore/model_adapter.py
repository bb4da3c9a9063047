"""What a :class:`~kvstore.store.KVStore` bound to a model (``KVStore(url, model=...)``) uses of it.

A bound store prefills contexts itself (``put(tokens)``), knows the model's id and
cache layout, calibrates the model's codec profile once, and returns ready caches
(``load(tokens)``). Any object with these members works; Hugging Face models (and
objects holding one as ``model`` with its ``tokenizer`` and ``model_id``, as the
evaluation harness's ``LoadedModel`` does) are adapted by
:class:`kvstore.integrations.hf_adapter.HFModel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from kvstore.errors import ConfigError
from kvstore.format.layout import CacheLayout
from kvstore.kv import KV

Tokens = Sequence[int] | torch.Tensor | np.ndarray


@runtime_checkable
class ModelAdapter(Protocol):
    """A model as a store sees it."""

    @property
    def model_id(self) -> str:
        """The id the store keys the model's KV by (must change when its weights do)."""
        ...

    def cache_layout(self) -> CacheLayout:
        """What each layer caches (see :mod:`kvstore.format.layout`)."""
        ...

    def prefill(self, tokens: Tokens, *, states_every: int | None = None) -> KV:
        """The KV of ``tokens``: per layer ``(key, value)``, each ``[kv_heads, tokens, dim]``
        (a linear-attention layer: its :class:`~kvstore.kv.LinearStates` after the last token
        and after every multiple of ``states_every`` tokens)."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (for calibration texts given as strings)."""
        ...

    def calibrate(self, contexts: Sequence[Tokens]) -> Any:
        """A codec profile calibrated on ``contexts``, its six levels meeting the default quality
        targets: a ``kvcodec3`` (:class:`~kvstore.codecs.kvcodec3_profile.TransformProfile`) or a
        ``kvcodec`` one (:class:`~kvstore.codecs.kvcodec_profile.KVCodecProfile`)."""
        ...

    def to_cache(self, kv: KV, num_tokens: int) -> Any:
        """The model's own cache object holding ``kv`` as a ``num_tokens``-token context."""
        ...


def as_model_adapter(model: Any) -> ModelAdapter:
    """``model`` itself if it is a :class:`ModelAdapter`, else a Hugging Face model (or a
    loaded evaluation model) adapted; :class:`ConfigError` for anything else."""
    if isinstance(model, ModelAdapter):
        return model
    from kvstore.integrations.hf_adapter import HFModel

    if hasattr(model, "model") and hasattr(model, "tokenizer") and isinstance(getattr(model, "model_id", None), str):
        return HFModel(model.model, model.tokenizer, model_id=model.model_id)  # a model with its tokenizer and id
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return HFModel(model)
    raise ConfigError(f"model must be a Hugging Face causal LM or a ModelAdapter, got {type(model).__name__}")
