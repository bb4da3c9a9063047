"""The per-context manifest: which chunk objects make up a stored context.

A manifest is itself a container (kind ``kv-manifest``): its header ``meta``
holds the fields below and its one buffer holds the context's token ids. It is
written after every chunk object it lists, so a reader that finds it finds a
complete context, and it records each chunk object's size and header checksum
so a reader detects a chunk that was replaced or damaged since. A context put
with PQ codes also lists its PQ objects (``pq``: configuration, centroids object,
one codes object per chunk), written before the manifest like the chunks.

Version 2 adds the model's cache layout (:mod:`kvstore.format.layout`) and stores
each chunk as one object per (level, layer group); a chunk entry lists its objects
level by level, group by group, and, where some (level, group) objects were not
stored (sliding layers kept for the last window only), the ``[level, group]`` of
each. Version 1 manifests (one group, equal key and value widths) still load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvstore.backends.base import validate_key
from kvstore.errors import ConfigError, FormatError, IncompleteContextError
from kvstore.format import container
from kvstore.format.dtypes import torch_dtype
from kvstore.format.keys import chunk_bounds, is_hash
from kvstore.format.layout import CacheLayout

KIND = "kv-manifest"
VERSION = 2
VERSIONS = (1, 2)
MAX_LEVELS = 64
MAX_TIMESTAMP = 1e12  # seconds since the epoch: year ~33,700


@dataclass(frozen=True, slots=True)
class LevelSpec:
    """One quality level: a codec name and its parameters (level 0 is the best)."""

    codec: str
    params: dict[str, Any] = field(default_factory=dict)
    tag: str = ""


@dataclass(frozen=True, slots=True)
class ChunkObject:
    """One stored chunk object (a chunk at one level)."""

    key: str
    size: int
    header_bytes: int  # bytes to read for the container prefix + header
    checksum: int  # the container's header checksum


@dataclass(frozen=True, slots=True)
class ChunkEntry:
    """One chunk of the context: its hash, token span and its stored objects, one per
    (level, layer group), level by level (with one group, ``objects[level]``).

    ``slots`` names the ``(level, group)`` of each object when they are not the full grid
    (``None``: every level of every group, in order)."""

    hash: str
    start: int
    stop: int
    objects: tuple[ChunkObject, ...]
    slots: tuple[tuple[int, int], ...] | None = None

    def object_at(self, level: int, group: int = 0, groups: int = 1) -> ChunkObject | None:
        """The object of ``group`` (of ``groups``) at ``level``, or ``None`` if it was not stored."""
        if self.slots is None:
            index = level * groups + group
            return self.objects[index] if 0 <= group < groups and 0 <= index < len(self.objects) else None
        for obj, slot in zip(self.objects, self.slots):
            if slot == (level, group):
                return obj
        return None


@dataclass(frozen=True, slots=True)
class PQEntry:
    """The PQ objects stored beside the context's KV (retrieval attention): the
    configuration they were built with, the centroids object and one codes object per chunk."""

    config: dict[str, Any]
    centroids: ChunkObject
    codes: tuple[ChunkObject, ...]

    @property
    def objects(self) -> tuple[ChunkObject, ...]:
        """Every PQ object, centroids first."""
        return (self.centroids, *self.codes)

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a reader needs to fetch and decode a stored context."""

    model_id: str
    fingerprint: str
    num_tokens: int
    chunk_tokens: int
    layout: CacheLayout
    dtype: str
    levels: tuple[LevelSpec, ...]
    chunks: tuple[ChunkEntry, ...]
    created_at: float = field(default_factory=time.time)
    pq: PQEntry | None = None

    @property
    def layers(self) -> int:
        return self.layout.num_layers

    @property
    def kv_heads(self) -> int:
        """KV heads of the first layer (of every layer in a uniform layout)."""
        return self.layout.layers[0].kv_heads

    @property
    def head_dim(self) -> int:
        """Key width of the first layer (of every layer in a uniform layout)."""
        return self.layout.layers[0].key_dim

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of a uniform layout; :class:`FormatError` otherwise."""
        if not self.layout.is_uniform:
            raise FormatError(f"this context's layers differ ({self.layout.describe()}): no single shape")
        return self.layers, self.kv_heads, self.head_dim

    def object_at(self, chunk: int, level: int, group: int = 0) -> ChunkObject | None:
        """Chunk ``chunk``'s object of layer group ``group`` at ``level`` (``None``: not stored)."""
        return self.chunks[chunk].object_at(level, group, len(self.layout.groups))

    def level_bytes(self, level: int) -> int:
        """Total stored bytes of the context at ``level``."""
        groups = len(self.layout.groups)
        return sum(obj.size for chunk in self.chunks for g in range(groups)
                   if (obj := chunk.object_at(level, g, groups)) is not None)

    def to_bytes(self, tokens: np.ndarray) -> bytes:
        """Serialize with the context's token ids."""
        meta = {
            "version": VERSION,
            "model_id": self.model_id,
            "fingerprint": self.fingerprint,
            "num_tokens": self.num_tokens,
            "chunk_tokens": self.chunk_tokens,
            "layout": self.layout.to_dict(),
            "dtype": self.dtype,
            "created_at": self.created_at,
            "levels": [{"codec": lv.codec, "params": lv.params, "tag": lv.tag} for lv in self.levels],
            "chunks": [_chunk_doc(c) for c in self.chunks],
        }
        if self.pq is not None:
            meta["pq"] = {"config": self.pq.config, "centroids": _object_list(self.pq.centroids),
                          "codes": [_object_list(o) for o in self.pq.codes]}
        return container.encode({"tokens": tokens}, kind=KIND, meta=meta)


def _chunk_doc(chunk: ChunkEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {"hash": chunk.hash, "start": chunk.start, "stop": chunk.stop,
                           "objects": [_object_list(o) for o in chunk.objects]}
    if chunk.slots is not None:
        doc["slots"] = [list(slot) for slot in chunk.slots]
    return doc


def _slots(raw: Any, objects: int, levels: int, groups: int) -> tuple[tuple[int, int], ...] | None:
    """A chunk entry's optional ``slots``: absent (the full grid), or distinct ``[level, group]`` pairs."""
    if raw is None:
        if objects != levels * groups:
            raise FormatError("manifest chunk does not list one object per level and layer group")
        return None
    if not isinstance(raw, list) or len(raw) != objects:
        raise FormatError("manifest chunk slots do not match its objects")
    slots = []
    for slot in raw:
        if not (isinstance(slot, list) and len(slot) == 2 and all(type(x) is int for x in slot)
                and 0 <= slot[0] < levels and 0 <= slot[1] < groups):
            raise FormatError("manifest chunk slot is malformed")
        slots.append((slot[0], slot[1]))
    if len(set(slots)) != len(slots):
        raise FormatError("manifest chunk lists one slot twice")
    return tuple(slots)


def _layout(meta: dict[str, Any], version: int) -> CacheLayout:
    if version >= 2:
        return CacheLayout.from_dict(meta.get("layout"))
    dims = [_positive(meta, name) for name in ("layers", "kv_heads", "head_dim")]
    try:
        return CacheLayout.uniform(*dims)
    except ConfigError as exc:
        raise FormatError(f"manifest: {exc}") from None


def _object_list(obj: ChunkObject) -> list[Any]:
    return [obj.key, obj.size, obj.header_bytes, obj.checksum]


def check_recorded_object(obj: bytes | memoryview | container.Container, expected: ChunkObject,
                          what: int | str) -> None:
    """Raise unless ``obj`` (a stored object's bytes, or the container already decoded from
    them) is the very object the manifest recorded (size and header checksum); ``what``
    names it in the error (a chunk index or a description)."""
    if isinstance(obj, container.Container):
        header, size = obj.header, obj.data.nbytes
    else:
        size = len(obj)
        header = container.decode_header(memoryview(obj)[: container.head_bytes_needed(obj)], size)
    if size != expected.size or header.checksum != expected.checksum:
        name = f"chunk {what}" if isinstance(what, int) else what
        raise IncompleteContextError(
            f"{name} ({expected.key}) is not the object the manifest recorded "
            "(replaced or damaged since the context was stored)"
        )


def _field(meta: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = meta.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FormatError(f"manifest field {name!r} is missing or has the wrong type")
    return value


def _positive(meta: dict[str, Any], name: str) -> int:
    value = _field(meta, name, int)
    if value <= 0:
        raise FormatError(f"manifest field {name!r} must be positive, got {value}")
    return value


def _object(raw: Any) -> ChunkObject:
    if not (isinstance(raw, list) and len(raw) == 4):
        raise FormatError("manifest chunk object entry must be [key, size, header_bytes, checksum]")
    key, size, header_bytes, checksum = raw
    if not isinstance(key, str):
        raise FormatError("manifest chunk key must be a string")
    validate_key(key)
    for value in (size, header_bytes, checksum):
        if type(value) is not int or value < 0:
            raise FormatError("manifest chunk sizes and checksums must be non-negative integers")
    if header_bytes > size or checksum >= 2**64:
        raise FormatError("manifest chunk object entry is inconsistent")
    return ChunkObject(key, size, header_bytes, checksum)


def _pq_entry(raw: Any, num_chunks: int) -> PQEntry | None:
    """The optional ``pq`` field: absent, or a configuration and one codes object per chunk."""
    if raw is None:
        return None
    if not (isinstance(raw, dict) and set(raw) == {"config", "centroids", "codes"}
            and isinstance(raw["config"], dict) and isinstance(raw["codes"], list)):
        raise FormatError("manifest pq entry is malformed")
    if len(raw["codes"]) != num_chunks:
        raise FormatError(f"manifest pq entry lists {len(raw['codes'])} codes objects for {num_chunks} chunks")
    return PQEntry(raw["config"], _object(raw["centroids"]), tuple(_object(o) for o in raw["codes"]))


def from_bytes(data: bytes | memoryview) -> tuple[Manifest, np.ndarray]:
    """Parse and validate a stored manifest; returns it with the context's token ids."""
    obj = container.decode(data)
    if obj.header.kind != KIND:
        raise FormatError(f"expected a {KIND} object, found {obj.header.kind!r}")
    meta = obj.header.meta
    version = meta.get("version")
    if type(version) is not int or version not in VERSIONS:
        raise FormatError(f"unsupported manifest version {version!r}")
    layout = _layout(meta, version)
    groups = len(layout.groups)
    num_tokens = _positive(meta, "num_tokens")
    chunk_tokens = _positive(meta, "chunk_tokens")
    fingerprint = _field(meta, "fingerprint", str)
    if not is_hash(fingerprint):
        raise FormatError("manifest fingerprint is malformed")
    dtype = _field(meta, "dtype", str)
    torch_dtype(dtype)
    raw_levels = _field(meta, "levels", list)
    if not 1 <= len(raw_levels) <= MAX_LEVELS:
        raise FormatError(f"manifest must list 1..{MAX_LEVELS} levels")
    levels = []
    for lv in raw_levels:
        if not (isinstance(lv, dict) and isinstance(lv.get("codec"), str)
                and isinstance(lv.get("params"), dict) and isinstance(lv.get("tag"), str)):
            raise FormatError("manifest level entry is malformed")
        levels.append(LevelSpec(lv["codec"], lv["params"], lv["tag"]))
    raw_chunks = _field(meta, "chunks", list)
    needed = -(-num_tokens // chunk_tokens)
    if len(raw_chunks) != needed:  # before building the bounds: num_tokens may claim 2**40
        raise FormatError(f"manifest lists {len(raw_chunks)} chunks, {num_tokens} tokens need {needed}")
    bounds = chunk_bounds(num_tokens, chunk_tokens)
    chunks = []
    for raw, (start, stop) in zip(raw_chunks, bounds):
        if not (isinstance(raw, dict) and raw.get("start") == start and raw.get("stop") == stop
                and is_hash(raw.get("hash")) and isinstance(raw.get("objects"), list)):
            raise FormatError(f"manifest chunk entry for tokens [{start}, {stop}) is malformed")
        if len(raw["objects"]) > len(levels) * groups:
            raise FormatError("manifest chunk lists more objects than levels and layer groups")
        objects = tuple(_object(o) for o in raw["objects"])
        slots = _slots(raw.get("slots"), len(objects), len(levels), groups)
        chunks.append(ChunkEntry(raw["hash"], start, stop, objects, slots))
    pq = _pq_entry(meta.get("pq"), len(bounds))
    tokens = obj.tensor("tokens")
    if tokens.dtype != torch.int32 or tokens.shape != (num_tokens,):
        raise FormatError("manifest token buffer is not int32 of num_tokens")
    created_at = _field(meta, "created_at", (int, float))
    if not 0 <= created_at < MAX_TIMESTAMP:
        raise FormatError(f"manifest created_at {created_at!r} is not a plausible timestamp")
    manifest = Manifest(
        model_id=_field(meta, "model_id", str),
        fingerprint=fingerprint,
        num_tokens=num_tokens,
        chunk_tokens=chunk_tokens,
        layout=layout,
        dtype=dtype,
        levels=tuple(levels),
        chunks=tuple(chunks),
        created_at=float(created_at),
        pq=pq,
    )
    return manifest, tokens.numpy().astype("<i4", copy=False)
