"""PQ codebooks and codes stored beside a context's KV, in the project's container format.

Layout under a :class:`~kvstore.store.KVStore`'s namespace ``ns`` (the context
hash is the chained hash of the context's last chunk, as for its manifest)::

    ns/<fingerprint>/pq/<context hash>/<config tag>/codes/<chunk hash>   kind pq-codes
    ns/<fingerprint>/pq/<context hash>/<config tag>/centroids            kind pq-centroids

``pq-codes`` (one object per KV chunk): the chunk's codes
``[layers, kv_heads, tokens, m]`` packed at ``bits`` bits each; its meta names
the model fingerprint, context, chunk hash (which covers the chunk's token ids
and every token before them) and span, and the xxh3 of the centroids they were
computed with. ``pq-centroids`` (written last, so a reader that finds it finds
every codes object): the centroids ``[layers, kv_heads, m, 2**bits, head_dim/m]``
in one of :mod:`kvstore.retrieval.centroid_storage`'s formats (4-bit per-channel
grids by default) and a listing of the codes objects (key, size, header size,
header checksum), like a manifest. A reader fetches these without touching any KV and needs no
k-means; every byte is checksummed by the container, every object is checked
against the model, the tokens and the listing, and anything off raises
(:class:`~kvstore.errors.ChecksumError`, :class:`~kvstore.errors.FormatError`,
:class:`~kvstore.errors.IncompleteContextError`).

Applications normally go through :meth:`kvstore.store.KVStore.put` with ``pq=...``,
which writes these objects before the context's manifest and lists them there
(so ``gc`` keeps them and ``delete`` removes them), and
:meth:`kvstore.store.KVStore.get_pq`, which checks them against that listing.
Objects written by :func:`put_pq` alone are listed by no manifest: ``gc`` treats
them as orphans once they are older than its grace period.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from kvstore.backends.base import validate_key
from kvstore.cuda_streams import caller_stream, on_stream, resolve_device
from kvstore.errors import ConfigError, FormatError, IncompleteContextError
from kvstore.format import container
from kvstore.format.keys import (
    as_token_array,
    chunk_bounds,
    chunk_hashes,
    model_fingerprint,
)
from kvstore.format.manifest import ChunkObject, PQEntry, check_recorded_object
from kvstore.kv import KV
from kvstore.retrieval import centroid_storage, pq

KIND_CENTROIDS = "pq-centroids"
KIND_CODES = "pq-codes"
VERSION = 2  # 1 held token-id buffers (the chunk hashes cover them) and int8/float centroids only
CENTROID_FORMATS = centroid_storage.FORMATS


@dataclass(frozen=True, slots=True)
class PQObjects:
    """The stored PQ objects of one context: the centroids object and one codes object per chunk."""

    centroids: ChunkObject
    codes: tuple[ChunkObject, ...]

    @property
    def total_bytes(self) -> int:
        return self.centroids.size + sum(o.size for o in self.codes)

    @property
    def keys(self) -> list[str]:
        return [self.centroids.key, *(o.key for o in self.codes)]


@dataclass(frozen=True, slots=True)
class _Context:
    model_id: str
    fingerprint: str
    tokens: np.ndarray
    bounds: list[tuple[int, int]]
    hashes: list[str]
    prefix: str


def _context(kvstore: Any, model_id: str, tokens: Any, config: pq.PQConfig) -> _Context:
    if config.subspaces is None:
        raise ConfigError("the PQ configuration of stored objects names its subspaces: pass the index's "
                          "(index.config) or config.for_head_dim(head_dim)")
    fingerprint = model_fingerprint(model_id)
    array = as_token_array(tokens)
    if array.size == 0:
        raise ConfigError("tokens must not be empty")
    bounds = chunk_bounds(len(array), kvstore.chunk_tokens)
    hashes = chunk_hashes(fingerprint, array, kvstore.chunk_tokens)
    prefix = kvstore.keys.pq_prefix(fingerprint, hashes[-1], config.tag)
    return _Context(model_id, fingerprint, array, bounds, hashes, prefix)


async def stored_config(kvstore: Any, model_id: str, tokens: Any, config: pq.PQConfig) -> pq.PQConfig | None:
    """``config`` with its subspaces as stored for this context (a head-sized config names
    none: the context's PQ folder is listed for the one configuration that matches it), or
    ``None`` when no such objects are stored."""
    if config.subspaces is not None:
        return config
    fingerprint = model_fingerprint(model_id)
    array = as_token_array(tokens)
    if array.size == 0:
        raise ConfigError("tokens must not be empty")
    folder = kvstore.keys.model_prefix(fingerprint) + f"pq/{chunk_hashes(fingerprint, array, kvstore.chunk_tokens)[-1]}/"
    tags = {key[len(folder):].split("/", 1)[0] async for key in kvstore.store.list(folder)}
    matches = []
    for tag in tags:
        m = tag[1:].split("b", 1)[0]
        if tag.startswith("m") and m.isdigit() and 0 < int(m) <= 1024 and replace(config, subspaces=int(m)).tag == tag:
            matches.append(replace(config, subspaces=int(m)))
    if len(matches) > 1:
        raise ConfigError(f"several stored PQ configurations match {config}: name its subspaces")
    return matches[0] if matches else None


def centroids_key(kvstore: Any, model_id: str, tokens: Any, config: pq.PQConfig = pq.DEFAULT_CONFIG) -> str:
    """Where a context's ``pq-centroids`` object lives."""
    return _context(kvstore, model_id, tokens, config).prefix + "/centroids"


def _codes_key(ctx: _Context, i: int) -> str:
    return validate_key(f"{ctx.prefix}/codes/{ctx.hashes[i]}")


def _describe(key: str, data: bytes) -> ChunkObject:
    header = container.decode_header(memoryview(data)[: container.head_bytes_needed(data)])
    return ChunkObject(key, header.total_bytes, container.PREFIX_BYTES + header.header_bytes, header.checksum)


def _codes_meta(ctx: _Context, i: int, index: pq.PQIndex, centroids_sum: int) -> dict[str, Any]:
    start, stop = ctx.bounds[i]
    return {
        "version": VERSION, "fingerprint": ctx.fingerprint, "context": ctx.hashes[-1], "hash": ctx.hashes[i],
        "start": start, "stop": stop, "layers": index.layers, "kv_heads": index.codes.shape[1],
        "subspaces": index.config.subspaces, "bits": index.config.bits, "centroids_xxh3": centroids_sum,
    }


async def put_pq(
    kvstore: Any,
    model_id: str,
    tokens: Sequence[int] | torch.Tensor | np.ndarray,
    index: pq.PQIndex | None = None,
    *,
    kv: KV | None = None,
    config: pq.PQConfig = pq.DEFAULT_CONFIG,
    centroid_format: str = centroid_storage.DEFAULT_FORMAT,
    ttl: float | None = None,
) -> PQObjects:
    """Store a context's PQ index beside its KV; returns what was written.

    Give ``index`` (e.g. trained during prefill), or ``kv`` to train one here with
    ``config``. Codes objects are written first, the centroids object last.
    """
    if index is None:
        if kv is None:
            raise ConfigError("put_pq needs an index or the context's kv to train one")
        index = pq.build_index([k for k, _ in kv], config)
    if centroid_format not in CENTROID_FORMATS:
        raise ConfigError(f"centroid_format must be one of {CENTROID_FORMATS}, got {centroid_format!r}")
    ctx = _context(kvstore, model_id, tokens, index.config)
    if index.num_tokens != len(ctx.tokens):
        raise ConfigError(f"the index covers {index.num_tokens} tokens, the context has {len(ctx.tokens)}")
    ttl = kvstore.ttl if ttl is None else ttl
    buffers = centroid_storage.encode(index.centroids, centroid_format)
    centroids_sum = _centroids_checksum([_bytes_of(buffers[name]) for name in centroid_storage.buffer_names(centroid_format)])
    codes = index.codes.detach().cpu()

    async def store_codes(i: int) -> ChunkObject:
        start, stop = ctx.bounds[i]
        packed = pq.pack_codes(codes[:, :, start:stop].contiguous(), index.config.bits)
        data = container.encode(
            {"codes": packed},
            kind=KIND_CODES, meta=_codes_meta(ctx, i, index, centroids_sum),
        )
        key = _codes_key(ctx, i)
        await kvstore.store.put(key, data, ttl=ttl)
        return _describe(key, data)

    limit = asyncio.Semaphore(kvstore.max_concurrency)

    async def bounded(i: int) -> ChunkObject:
        async with limit:
            return await store_codes(i)

    listing = await asyncio.gather(*(bounded(i) for i in range(len(ctx.bounds))))
    layers, kv_heads, m, _, sub = index.centroids.shape
    meta = {
        "version": VERSION, "model_id": model_id, "fingerprint": ctx.fingerprint, "context": ctx.hashes[-1],
        "num_tokens": len(ctx.tokens), "chunk_tokens": kvstore.chunk_tokens, "layers": layers,
        "kv_heads": kv_heads, "head_dim": m * sub, "config": index.config.to_dict(),
        "centroid_format": centroid_format,
        "codes": [[o.key, o.size, o.header_bytes, o.checksum] for o in listing],
    }
    if index.layer_ids is not None:
        meta["layer_ids"] = list(index.layer_ids)
    data = container.encode(buffers, kind=KIND_CENTROIDS, meta=meta)
    key = ctx.prefix + "/centroids"
    await kvstore.store.put(key, data, ttl=ttl)
    return PQObjects(_describe(key, data), tuple(listing))


def _bytes_of(buffer: torch.Tensor | np.ndarray) -> bytes:
    if isinstance(buffer, torch.Tensor):
        return buffer.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    return np.ascontiguousarray(buffer).tobytes()


def _centroids_checksum(raw: Sequence[bytes | memoryview]) -> int:
    return container.checksum(b"".join(bytes(r) for r in raw))


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise FormatError(message)


def _check_centroids(obj: container.Container, ctx: _Context,
                     config: pq.PQConfig) -> tuple[torch.Tensor, list[ChunkObject], tuple[int, ...] | None]:
    meta = obj.header.meta
    _require(obj.header.kind == KIND_CENTROIDS, f"expected a {KIND_CENTROIDS} object, found {obj.header.kind!r}")
    _require(meta.get("version") == VERSION, f"unsupported PQ object version {meta.get('version')!r}")
    for name, want in (("model_id", ctx.model_id), ("fingerprint", ctx.fingerprint), ("context", ctx.hashes[-1]),
                       ("num_tokens", len(ctx.tokens))):
        _require(meta.get(name) == want, f"PQ centroids object has {name}={meta.get(name)!r}, expected {want!r}")
    _require(pq.PQConfig.from_dict(meta.get("config")) == config, "PQ centroids object has another configuration")
    fmt = meta.get("centroid_format")
    _require(fmt in centroid_storage.FORMATS, f"PQ centroids object has an unknown centroid format {fmt!r}")
    _require(set(obj.header.buffers) == set(centroid_storage.buffer_names(fmt)),
             f"PQ centroids object holds buffers {sorted(obj.header.buffers)}, format {fmt} needs "
             f"{list(centroid_storage.buffer_names(fmt))}")
    head_dim = meta.get("head_dim")
    _require(type(head_dim) is int and head_dim > 0 and head_dim % config.subspaces == 0,
             f"PQ centroids object has a bad head_dim {head_dim!r}")
    layers, kv_heads = meta.get("layers"), meta.get("kv_heads")
    _require(type(layers) is int and layers > 0 and type(kv_heads) is int and kv_heads > 0,
             "PQ centroids object has a bad layer or head count")
    layer_ids = meta.get("layer_ids")
    _require(layer_ids is None or (isinstance(layer_ids, list) and len(layer_ids) == layers
                                   and all(type(i) is int and i >= 0 for i in layer_ids)
                                   and len(set(layer_ids)) == layers), "PQ centroids object has bad layer ids")
    dims = (layers, kv_heads, config.subspaces, config.centroids, head_dim // config.subspaces)
    centroids = centroid_storage.decode(fmt, obj.tensor, obj.raw, dims)
    raw = meta.get("codes")
    _require(isinstance(raw, list) and len(raw) == len(ctx.bounds), "PQ centroids object lists the wrong number of codes objects")
    listing = []
    for i, entry in enumerate(raw):
        _require(isinstance(entry, list) and len(entry) == 4 and entry[0] == _codes_key(ctx, i)
                 and all(type(v) is int and v >= 0 for v in entry[1:]), f"PQ codes listing entry {i} is malformed")
        listing.append(ChunkObject(*entry))
    return centroids, listing, None if layer_ids is None else tuple(layer_ids)


def _check_codes(blob: bytes, expected: ChunkObject, ctx: _Context, i: int, centroids_sum: int,
                 layers: int, kv_heads: int, config: pq.PQConfig) -> torch.Tensor:
    head = container.decode_header(memoryview(blob)[: container.head_bytes_needed(blob)], len(blob))
    if len(blob) != expected.size or head.checksum != expected.checksum:
        raise IncompleteContextError(f"PQ codes object {expected.key} is not the one its centroids object lists")
    obj = container.decode(blob)
    _require(obj.header.kind == KIND_CODES, f"expected a {KIND_CODES} object, found {obj.header.kind!r}")
    start, stop = ctx.bounds[i]
    want = {"version": VERSION, "fingerprint": ctx.fingerprint, "context": ctx.hashes[-1], "hash": ctx.hashes[i],
            "start": start, "stop": stop, "layers": layers, "kv_heads": kv_heads,
            "subspaces": config.subspaces, "bits": config.bits, "centroids_xxh3": centroids_sum}
    for name, value in want.items():
        _require(obj.header.meta.get(name) == value, f"PQ codes object {expected.key} has {name}="
                 f"{obj.header.meta.get(name)!r}, expected {value!r}")
    _require(set(obj.header.buffers) == {"codes"}, f"PQ codes object {expected.key} holds other buffers")
    shape = (layers, kv_heads, stop - start, config.subspaces)
    codes = pq.unpack_codes(np.frombuffer(obj.raw("codes"), dtype=np.uint8), config.bits, int(np.prod(shape)))
    return codes.reshape(shape)


async def get_pq(
    kvstore: Any,
    model_id: str,
    tokens: Sequence[int] | torch.Tensor | np.ndarray,
    config: pq.PQConfig = pq.DEFAULT_CONFIG,
    *,
    device: str | torch.device = "cpu",
    expected: PQEntry | None = None,
) -> pq.PQIndex | None:
    """Load a context's PQ index (centroids as fp32, codes uint8) without fetching any KV;
    ``None`` when no PQ objects were stored for it under ``config``.

    ``expected``: the manifest's record of the objects; the centroids object and its
    codes listing must then be exactly the recorded ones (else
    :class:`~kvstore.errors.IncompleteContextError`). A head-sized ``config`` (no
    subspaces) loads the one stored configuration that matches it."""
    resolved = await stored_config(kvstore, model_id, tokens, config)
    if resolved is None:
        return None
    config = resolved
    ctx = _context(kvstore, model_id, tokens, config)
    key = ctx.prefix + "/centroids"
    data = await kvstore.store.get(key)
    if data is None:
        if expected is not None:
            raise IncompleteContextError(f"PQ centroids object {key} listed by the manifest is missing")
        return None
    if expected is not None:
        if expected.centroids.key != key:
            raise FormatError(f"the manifest lists PQ centroids at {expected.centroids.key}, expected {key}")
        check_recorded_object(data, expected.centroids, "PQ centroids")
    obj = container.decode(data)
    centroids, listing, layer_ids = _check_centroids(obj, ctx, config)
    if expected is not None and tuple(listing) != expected.codes:
        raise IncompleteContextError(f"PQ centroids object {key} lists other codes objects than the manifest")
    names = centroid_storage.buffer_names(obj.header.meta["centroid_format"])
    centroids_sum = _centroids_checksum([obj.raw(name) for name in names])
    layers, kv_heads = centroids.shape[:2]
    limit = asyncio.Semaphore(kvstore.max_concurrency)

    async def fetch(i: int) -> torch.Tensor:
        async with limit:
            blob = await kvstore.store.get(listing[i].key)
        if blob is None:
            raise IncompleteContextError(f"PQ codes object {listing[i].key} is missing from the store")
        return await asyncio.to_thread(_check_codes, blob, listing[i], ctx, i, centroids_sum, layers, kv_heads, config)

    parts = await asyncio.gather(*(fetch(i) for i in range(len(listing))))
    index = pq.PQIndex(config, centroids.to(torch.float32), torch.cat(parts, dim=2), layer_ids)
    device = resolve_device(device)
    return on_stream(caller_stream(device), index.to)(device)  # copies queued on the caller's stream


async def pq_objects(
    kvstore: Any, model_id: str, tokens: Sequence[int] | torch.Tensor | np.ndarray, config: pq.PQConfig = pq.DEFAULT_CONFIG
) -> PQObjects | None:
    """The stored PQ objects of a context (from its verified centroids object), or ``None``."""
    resolved = await stored_config(kvstore, model_id, tokens, config)
    if resolved is None:
        return None
    config = resolved
    ctx = _context(kvstore, model_id, tokens, config)
    key = ctx.prefix + "/centroids"
    data = await kvstore.store.get(key)
    if data is None:
        return None
    _, listing, _ = _check_centroids(container.decode(data), ctx, config)
    return PQObjects(_describe(key, data), tuple(listing))


async def delete_pq(
    kvstore: Any, model_id: str, tokens: Sequence[int] | torch.Tensor | np.ndarray, config: pq.PQConfig = pq.DEFAULT_CONFIG
) -> bool:
    """Remove a context's PQ objects (centroids first, so no reader sees a partial set); whether any existed."""
    resolved = await stored_config(kvstore, model_id, tokens, config)
    if resolved is None:
        return False
    config = resolved
    ctx = _context(kvstore, model_id, tokens, config)
    key = ctx.prefix + "/centroids"
    if not await kvstore.store.exists(key):
        return False
    await kvstore.store.delete(key)
    await asyncio.gather(*(kvstore.store.delete(_codes_key(ctx, i)) for i in range(len(ctx.bounds))))
    return True
