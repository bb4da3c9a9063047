"""Run a function of ours as a transformers model's attention, the model's own beside it.

transformers looks attention functions up by name (``AttentionInterface``) and builds
each layer's mask in the format that name expects (``AttentionMaskInterface``; a name it
does not know gets no mask). :func:`use_attention` switches a model to a function of ours
for a ``with`` block with the masks of the model's own implementation, and
:func:`own_attention` gives that implementation, so our function can hand it the layers
(or the calls) it does not handle itself: sliding windows keep their masks.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from kvstore.errors import ConfigError


def own_attention(module: Any, name: str) -> Callable[..., Any]:
    """The attention function ``name`` as the model would run it (``eager``: its modeling
    module's ``eager_attention_forward``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ConfigError(f"{type(module).__name__}: no attention function {name!r} to hand layers to")
    return eager


@contextlib.contextmanager
def use_attention(model: Any, name: str, function: Callable[..., Any]) -> Iterator[str]:
    """Run ``model`` with ``function`` registered as attention ``name`` inside the block, with
    the masks of its own implementation; yields that implementation's name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    previous = model.config._attn_implementation
    AttentionInterface.register(name, function)
    if previous in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    model.set_attn_implementation(name)
    try:
        yield previous
    finally:
        model.set_attn_implementation(previous)
