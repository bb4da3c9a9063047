"""A linear-attention layer group's object of a chunk: the group's states after the chunk.

Kind ``kv-chunk``, like every chunk object, with the same identity meta (model, chunk
hash and span, layer group, dtype of the context's KV, content chain), so that it is
verified, listed, collected and inspected like the others. Its codec is ``state``: the
tensors stored as they are, at every level (one object per chunk, shared by the levels),
because a state is read once per load and any error in it carries into every later
token. Buffers: ``conv`` ``[layers, conv_channels, conv_width]`` and ``recurrent``
``[layers, heads, key_dim, value_dim]``, each in the dtype the model keeps it in.
"""

from __future__ import annotations

import torch

from kvstore.errors import FormatError
from kvstore.format import container
from kvstore.format.chunk import KIND, ChunkIdentity, check_identity, chunk_meta
from kvstore.format.layout import LayerSpec
from kvstore.kv import KV_DTYPES

#: the ``codec`` entry of a state object's header
STATE_CODEC = {"name": "state", "params": {}}
#: the key segment of state objects (in place of a level's codec tag: every level shares them)
STATE_TAG = "state"


def group_tag(level_tag: str, spec: LayerSpec | None) -> str:
    """The key segment of a layer group's objects at the level tagged ``level_tag``: the
    level's own, or :data:`STATE_TAG` for a linear group (``spec=None``: a store without a
    layout object, one per-token group)."""
    return level_tag if spec is None or spec.per_token else STATE_TAG


def encode_state_chunk(ident: ChunkIdentity, conv: torch.Tensor, recurrent: torch.Tensor) -> bytes:
    """A state object: the group's stacked convolution and recurrent states after the chunk."""
    return container.encode(
        {"tokens": ident.tokens, "conv": conv.detach().contiguous(), "recurrent": recurrent.detach().contiguous()},
        kind=KIND,
        codec=STATE_CODEC,
        meta=chunk_meta(ident),
    )


def decode_state_chunk(data: bytes | memoryview | container.Container, ident: ChunkIdentity, spec: LayerSpec,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a state object against ``ident`` and its group's layer ``spec``; return its
    ``(conv, recurrent)`` states, one row per layer of the group, on ``device``."""
    obj = data if isinstance(data, container.Container) else container.decode(data)
    check_identity(obj, ident)
    if obj.header.codec != STATE_CODEC:
        raise FormatError(f"a linear-attention group's object is coded by {obj.header.codec.get('name')!r}, "
                          "not 'state'")
    out = []
    for name, shape in zip(("conv", "recurrent"), spec.state_shapes()):
        if name not in obj.header.buffers:
            raise FormatError(f"state object lacks its {name!r} buffer")
        t = obj.tensor(name)
        if t.dtype not in KV_DTYPES or tuple(t.shape) != (ident.layers, *shape):
            raise FormatError(f"state object's {name} buffer is {t.dtype} {list(t.shape)}, not "
                              f"{[ident.layers, *shape]}")
        out.append(t.to(device))
    return out[0], out[1]
