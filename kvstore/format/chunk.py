"""A chunk object: one chunk's KV at one level, plus the token ids it belongs to.

Kind ``kv-chunk``. The header ``codec`` names the codec and its parameters; the
``meta`` records the model fingerprint, the chunk hash and span and the KV
shape, and the ``tokens`` buffer holds the chunk's token ids, so a reader can
verify that the object belongs to the model and tokens it asked for before a
single value reaches the model.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from kvstore.codecs.base import Codec, get_codec, kv_shapes
from kvstore.errors import ConfigError, FormatError
from kvstore.format import container
from kvstore.format.dtypes import dtype_name, torch_dtype
from kvstore.format.layout import LayerGroup
from kvstore.kv import LinearStates

KIND = "kv-chunk"


@dataclass(frozen=True, slots=True)
class ChunkIdentity:
    """What a chunk object must be: whose, which tokens, which layer group, which shape.

    ``head_dim`` is the key width; ``value_dim`` the value width where it differs (MLA);
    ``group`` the layer group's name (empty when the model's layout has one group).
    ``content``: a hash of the whole chunk's KV (every layer) as its writer stored it, and
    ``prev`` the previous chunk's (empty for the first): every object of a chunk records
    both, so a reader without a manifest checks that the chunks it assembles are one
    writer's chain. Empty where unknown (objects written before these fields existed)."""

    fingerprint: str
    chunk_hash: str
    start: int
    tokens: np.ndarray  # int32 token ids of the chunk
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    value_dim: int | None = None
    group: str = ""
    content: str = ""
    prev: str = ""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The keys' shape ``[layers, kv_heads, tokens, head_dim]``."""
        return self.layers, self.kv_heads, len(self.tokens), self.head_dim


def group_identity(fingerprint: str, chunk_hash: str, start: int, tokens: np.ndarray, group: LayerGroup,
                   dtype: torch.dtype, content: str = "", prev: str = "") -> ChunkIdentity:
    """The identity of a layer group's object of the chunk ``[start, start + len(tokens))``."""
    spec = group.spec
    return ChunkIdentity(fingerprint, chunk_hash, start, tokens, len(group.layers), spec.kv_heads, spec.key_dim,
                         dtype, spec.value_dim, group.name, content, prev)


def content_hash(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int, stop: int,
                 skip: Collection[int] = ()) -> str:
    """The hash of tokens ``[start, stop)`` of every layer's keys and values (but the layers
    in ``skip``, whose KV there is not stored), and of each linear layer's states after
    ``stop`` (xxh3-128, hex): what a chunk's writer stored, recorded in each of the chunk's
    objects."""
    h = xxhash.xxh3_128()
    for i, entry in enumerate(kv):
        if i in skip:
            continue
        if isinstance(entry, LinearStates):  # a linear layer: its states after the chunk, where held
            for t in entry.at(stop) or ():
                h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy())
            continue
        for t in (entry[0][:, start:stop], entry[1][:, start:stop]):
            part = t.detach().to("cpu").contiguous()
            if part.numel():
                h.update(part.view(torch.uint8).numpy())  # xxhash reads the buffer: no bytes copy
    return h.hexdigest()


def chunk_meta(ident: ChunkIdentity) -> dict[str, object]:
    """The header meta that names a chunk object's model, tokens, layer group and shape."""
    meta: dict[str, object] = {
        "fingerprint": ident.fingerprint,
        "hash": ident.chunk_hash,
        "start": ident.start,
        "stop": ident.start + len(ident.tokens),
        "layers": ident.layers,
        "kv_heads": ident.kv_heads,
        "head_dim": ident.head_dim,
        "dtype": dtype_name(ident.dtype),
    }
    if ident.value_dim is not None and ident.value_dim != ident.head_dim:
        meta["value_dim"] = ident.value_dim
    if ident.group:
        meta["group"] = ident.group
    if ident.content:
        meta["content"], meta["prev"] = ident.content, ident.prev
    return meta


def encode_chunk(codec: Codec, ident: ChunkIdentity, keys: torch.Tensor, values: torch.Tensor) -> bytes:
    """Encode ``[layers, kv_heads, tokens, dim]`` keys and values of one layer group as a chunk object."""
    buffers = codec.encode(keys, values, start=ident.start)
    clash = codec.RESERVED & set(buffers)
    if clash:
        raise FormatError(f"codec {codec.name!r} used reserved buffer names {sorted(clash)}")
    return container.encode(
        {"tokens": ident.tokens, **buffers},
        kind=KIND,
        codec={"name": codec.name, "params": codec.params},
        meta=chunk_meta(ident),
    )


def check_identity(obj: container.Container, ident: ChunkIdentity) -> None:
    """Raise :class:`FormatError` unless ``obj`` is the chunk ``ident`` describes."""
    header = obj.header
    if header.kind != KIND:
        raise FormatError(f"expected a {KIND} object, found {header.kind!r}")
    meta = header.meta
    want_meta = chunk_meta(ident)  # without content and prev when the reader does not know them (yet)
    optional = ("value_dim", "group")
    for name in [*want_meta, *(extra for extra in optional if extra in meta and extra not in want_meta)]:
        want = want_meta.get(name)
        if meta.get(name) != want:
            raise FormatError(f"chunk object has {name}={meta.get(name)!r}, expected {want!r}")
    stored_tokens = obj.tensor("tokens")
    if stored_tokens.dtype != torch.int32 or not np.array_equal(stored_tokens.numpy(), ident.tokens):
        raise FormatError(f"chunk object at tokens [{ident.start}, ...) holds different token ids")


def decode_chunk(
    data: bytes | memoryview | container.Container, ident: ChunkIdentity, device: torch.device,
    codec: Mapping[str, Any] | None = None, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a chunk object (its bytes, or the container already decoded from them) against
    ``ident`` (and, given ``codec`` ``{"name", "params"}``, that it was stored at that codec
    configuration: an object of another level is refused) and decode its keys and values:
    into ``out`` (views into the caller's output, of the chunk's shapes and dtype) when
    given, so that a codec that can writes them in place, else into new tensors."""
    obj = data if isinstance(data, container.Container) else container.decode(data)
    check_identity(obj, ident)
    codec_doc = obj.header.codec
    if codec is not None and codec_doc != dict(codec):
        raise FormatError(f"chunk object is coded by {codec_doc.get('name')!r} {codec_doc.get('params')}, "
                          f"not the level asked for ({codec.get('name')!r} {codec.get('params')})")
    params = codec_doc.get("params", {})
    if not isinstance(params, dict):
        raise FormatError("chunk codec parameters must be an object")
    codec = get_codec(codec_doc["name"], params)
    torch_dtype(dtype_name(ident.dtype))
    value_dim = ident.value_dim if ident.value_dim != ident.head_dim else None
    if out is None:
        return codec.decode(obj, ident.shape, ident.dtype, device, value_dim=value_dim)
    shapes = kv_shapes(ident.shape, value_dim)
    if any(tuple(t.shape) != s or t.dtype != ident.dtype for t, s in zip(out, shapes)):
        raise ConfigError(f"decode_chunk: out must be {ident.dtype} tensors of shapes {shapes}")
    codec.decode_into(obj, *out)
    return out
