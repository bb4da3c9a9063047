"""The facade an application calls: put, lookup and get a context's KV.

A context is (model id, token ids). ``put`` cuts it into chunks of
``chunk_tokens``, encodes each chunk at every configured level, stores each as
its own checksummed object (create-only: a chunk another context already
stored is shared, not rewritten) and writes the context's manifest last.
``lookup`` says how many leading tokens of a prompt are stored, at chunk
granularity, so a prompt that starts with a stored context reuses its prefix.
``get`` returns the KV of exactly the tokens asked for, verified end to end:
every object's checksums, its model fingerprint, its token ids and its shape;
anything else raises, so wrong KV never reaches the model. With ``pq=...``,
``put`` also stores the context's PQ centroids and codes (retrieval attention,
:mod:`kvstore.retrieval`), listed in the manifest; ``get_pq`` loads them
without fetching any KV.

Bound to a model (``KVStore(url, model=model)``), a store prefills contexts itself
(``put(tokens)``), stores the model's ``kvcodec3`` (or ``kvcodec``) levels with a profile
calibrated once per model and shared through the store, and ``load(tokens)`` returns a ready cache.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np
import torch

from kvstore import metrics
from kvstore.backends import open_store
from kvstore.backends.base import RangeRequest, Store, check_ttl
from kvstore.backends.signed import SignedStore
from kvstore.codecs.base import Codec, codec_class, get_codec, profile_content_id, register_profile
from kvstore.cuda_streams import caller_stream, on_stream, resolve_device
from kvstore.decode_threads import in_decode_thread
from kvstore.errors import (
    ChecksumError,
    ClosedStoreError,
    ConcurrentWriteError,
    ConfigError,
    ContextNotFoundError,
    FormatError,
    IncompleteContextError,
    MissingObjectError,
)
from kvstore.format import container
from kvstore.format import manifest as manifest_format
from kvstore.format.chunk import ChunkIdentity, content_hash, decode_chunk, encode_chunk, group_identity
from kvstore.format.default_profile import default_profile_from_bytes, default_profile_to_bytes
from kvstore.format.dtypes import dtype_name, torch_dtype
from kvstore.format.keys import KeyScheme, as_token_array, chunk_bounds, chunk_hashes, model_fingerprint
from kvstore.format.layout import (
    CacheLayout,
    LayerGroup,
    continuation_start,
    layout_from_bytes,
    layout_of_kv,
    layout_to_bytes,
)
from kvstore.format.manifest import ChunkEntry, ChunkObject, LevelSpec, Manifest, PQEntry, check_recorded_object
from kvstore.format.signed import KeyLike, SigningKeys
from kvstore.format.state_chunk import STATE_TAG, decode_state_chunk, encode_state_chunk, group_tag
from kvstore.kv import KV, check_kv, group_outputs, prefix_kv, stack_span, token_tensor
from kvstore.leases import collector_lease, wait_for_collectors
from kvstore.model_adapter import ModelAdapter, Tokens, as_model_adapter
from kvstore.retrieval import pq as pq_index
from kvstore.retrieval import store as pq_store

log = logging.getLogger("kvstore")
T = TypeVar("T")
R = TypeVar("R")

LevelLike = str | tuple[str, dict[str, Any]] | Codec
PUT_ATTEMPTS = 3  # a put whose manifest lists objects replaced since is redone this often
SLIDING_CHUNKS = ("all", "last_window")
#: a bound store without calibration texts calibrates on its first put: on four contexts of its first
#: 8,192 tokens (a kvcodec3 profile) when it has that many, else on its first 2,048 (a kvcodec profile)
CALIBRATION_TOKENS = 8192
CALIBRATION_CONTEXT_TOKENS = 2048
MIN_CALIBRATION_TOKENS = 16


def profile_levels(profile_bytes: bytes, levels: int, key: str) -> list[Codec]:
    """The ``levels`` codecs of a stored default profile (``kvcodec3`` or ``kvcodec``, by its kind)."""
    from kvstore.codecs.kvcodec import KVCodec
    from kvstore.codecs.kvcodec3 import KVCodec3
    from kvstore.codecs.kvcodec3_profile import KIND as TRANSFORM_KIND
    from kvstore.codecs.kvcodec3_profile import TransformProfile
    from kvstore.codecs.kvcodec_profile import KVCodecProfile

    if container.decode_header(profile_bytes, len(profile_bytes)).kind == TRANSFORM_KIND:
        transform = TransformProfile.from_bytes(profile_bytes)
        codecs: list[Codec] = [KVCodec3(transform, i) for i in range(min(levels, len(transform.levels)))]
    else:
        profile = KVCodecProfile.from_bytes(profile_bytes)
        codecs = [KVCodec(profile, i) for i in range(min(levels, len(profile.levels)))]
    if len(codecs) != levels:
        raise FormatError(f"the model's stored codec profile {key} has {len(codecs)} levels, not {levels}")
    return codecs


def make_codec(level: LevelLike) -> Codec:
    """A codec from a name, a ``(name, params)`` pair or a codec instance."""
    if isinstance(level, Codec):
        return level
    if isinstance(level, str):
        return get_codec(level)
    if isinstance(level, tuple) and len(level) == 2 and isinstance(level[1], dict):
        return get_codec(level[0], level[1])
    raise ConfigError(f"a level is a codec name, (name, params) or a Codec, got {level!r}")


def _object_entry(key: str, header: container.Header) -> ChunkObject:
    return ChunkObject(key, header.total_bytes, container.PREFIX_BYTES + header.header_bytes, header.checksum)


def _header(data: bytes | memoryview) -> container.Header:
    """The container header of a whole stored object (read from its first bytes)."""
    return container.decode_header(memoryview(data)[: container.head_bytes_needed(data)])


def _describe(key: str, data: bytes) -> ChunkObject:
    """The manifest entry of an object we just encoded."""
    return _object_entry(key, _header(data))


@dataclass(frozen=True, slots=True)
class _Plan:
    """A request's tokens, their chunking and keys."""

    fingerprint: str
    tokens: np.ndarray
    bounds: list[tuple[int, int]]
    hashes: list[str]


@functools.lru_cache(maxsize=64)
def _parsed_manifest(data: bytes) -> tuple[Manifest, np.ndarray]:
    """:func:`manifest_format.from_bytes`, remembered for the last manifests read: a server
    reading the same contexts again skips parsing bytes identical to ones already checked
    (a failed parse raises every time)."""
    manifest, tokens = manifest_format.from_bytes(data)
    tokens.setflags(write=False)  # shared by every read of these bytes
    return manifest, tokens


def _is_header_of(head: bytes | None, ours: ChunkObject) -> bool | None:
    """Whether ``head``, the first ``ours.header_bytes`` bytes read at ``ours.key``, begins the
    very object ``ours`` records (its size and header checksum, which covers every buffer's);
    ``False`` for an absent object, ``None`` for an unreadable header."""
    if head is None:
        return False
    try:
        header = container.decode_header(memoryview(head))
    except FormatError:
        return None
    return header.checksum == ours.checksum and header.total_bytes == ours.size


class KVStore:
    """Stores and loads the KV caches of contexts on any byte store.

    Parameters:
        store: a :class:`~kvstore.backends.base.Store` or a URL for
            :func:`~kvstore.backends.open_store` (``memory://``, ``file:///path``,
            ``s3://bucket/prefix``, ``redis://host:port/db``...).
        model: bind the store to a model: a Hugging Face causal LM, a
            model with its tokenizer and id (``.model``, ``.tokenizer``, ``.model_id``) or
            any :class:`~kvstore.model_adapter.ModelAdapter`. Calls may then leave out the
            model id (``put(tokens)``, ``lookup(tokens)``, ``get(tokens)``), ``put`` prefills
            when given no KV, and :meth:`load` returns a ready cache.
        chunk_tokens: tokens per chunk (256 by default): the unit of storage,
            prefix sharing and streaming.
        levels: the quality levels each chunk is stored at, best first: codec
            names, ``(name, params)`` pairs or codec instances; or ``"auto"`` (the
            default with a model, ``("raw",)`` without): the six levels of the model's
            profile, so that level *i* is the profile codec's level *i*. The profile is read
            from the store (``<namespace>/<model>/profile``) or, on the model's first put
            anywhere, calibrated and stored there create-only, so that every writer of the
            model shares it. The Hugging Face adapter calibrates a ``kvcodec3`` profile on
            8,192 tokens or more (``calibrate`` texts, or four contexts of a first put's first
            ``CALIBRATION_TOKENS``), else a ``kvcodec`` one (on the texts, or on the first
            put's first 2,048 tokens).
        default_level: the level ``get``, ``lookup`` and ``load`` use when not told: the
            codecs' default (2) with ``levels="auto"``, else 0 (the best).
        calibrate: with ``levels="auto"``, the texts (strings, which need the model's
            tokenizer) or token id sequences a missing profile is calibrated on.
        namespace: the key prefix under which everything is stored.
        ttl: default time-to-live in seconds of stored objects (``None``: none).
        max_concurrency: how many object reads or writes one call keeps in flight.
        storage_options: passed to ``open_store`` when ``store`` is a URL.
        sliding_chunks: which chunks of sliding-window (and chunked-attention) layers a
            ``put`` stores: ``"all"`` (default), so that a prefix ending at any chunk
            boundary continues exactly, or ``"last_window"``, only the chunks that the
            context's end attends: smaller, but then only prefixes whose own window was
            stored (the whole context, and prefixes of other contexts sharing the chunks)
            can be loaded; ``lookup`` reports accordingly. A linear-attention layer's states
            are stored after every chunk the KV holds them for (``"all"``), or after the
            last chunk only (``"last_window"``).
        signing_key: sign every object written and accept only objects signed with an
            accepted key (a ``bytes`` or ``str`` secret of at least 16 bytes, shared by the
            fleet's readers and writers): see "Trust model" in the README.
        accepted_keys: further keys whose objects are accepted (not written with): the
            previous keys during a key rotation.
    """

    def __init__(
        self,
        store: Store | str = "memory://",
        *,
        model: Any = None,
        chunk_tokens: int = 256,
        levels: Sequence[LevelLike] | str | None = None,
        default_level: int | None = None,
        calibrate: Sequence[str | Tokens] | None = None,
        namespace: str = "kvstore",
        ttl: float | None = None,
        max_concurrency: int = 16,
        storage_options: dict[str, Any] | None = None,
        sliding_chunks: str = "all",
        signing_key: KeyLike | None = None,
        accepted_keys: Sequence[KeyLike] = (),
    ) -> None:
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens <= 0:
            raise ConfigError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
        if not isinstance(max_concurrency, int) or max_concurrency <= 0:
            raise ConfigError(f"max_concurrency must be a positive int, got {max_concurrency!r}")
        self.model: ModelAdapter | None = as_model_adapter(model) if model is not None else None
        self.auto_levels = (self.model is not None) if levels is None else (levels == "auto")
        if self.auto_levels:
            if self.model is None:
                raise ConfigError("levels='auto' calibrates the model's levels: it needs KVStore(url, model=...)")
            from kvstore.codecs.kvcodec import DEFAULT_LEVEL
            from kvstore.codecs.kvcodec_profile import DEFAULT_LEVELS

            self.codecs: list[Codec] = []  # the model's profile's levels, from its profile on first use
            self.num_levels = len(DEFAULT_LEVELS)
            default = DEFAULT_LEVEL
        else:
            levels = ("raw",) if levels is None else levels
            if isinstance(levels, str | Codec) or len(levels) == 0:
                raise ConfigError("levels must be 'auto' or a non-empty sequence of codecs, best first")
            self.codecs = [make_codec(level) for level in levels]
            if len({c.tag for c in self.codecs}) != len(self.codecs):
                raise ConfigError("levels must be distinct codec configurations")
            self.num_levels = len(self.codecs)
            default = 0
        if default_level is not None:
            self._check_level(default_level, self.num_levels)
        self.default_level = default if default_level is None else default_level
        if calibrate is not None and (not self.auto_levels or isinstance(calibrate, str | bytes) or not calibrate):
            raise ConfigError("calibrate takes a non-empty sequence of texts or token id sequences, "
                              "and applies to levels='auto'")
        self._calibrate = list(calibrate) if calibrate is not None else None
        self._binding = asyncio.Lock()
        if signing_key is None and accepted_keys:
            raise ConfigError("accepted_keys needs a signing_key")
        keys = SigningKeys.of(signing_key, accepted_keys) if signing_key is not None else None  # before opening
        self.store = store if isinstance(store, Store) else open_store(store, **(storage_options or {}))
        if keys is not None:
            self.store = SignedStore(self.store, keys)
        self.chunk_tokens = chunk_tokens
        self.keys = KeyScheme(namespace)
        self.ttl = check_ttl(ttl)
        self.max_concurrency = max_concurrency
        if sliding_chunks not in SLIDING_CHUNKS:
            raise ConfigError(f"sliding_chunks must be one of {SLIDING_CHUNKS}, got {sliding_chunks!r}")
        self.sliding_chunks = sliding_chunks
        self._profiles_loaded: set[str] = set()
        self._layouts: dict[str, CacheLayout] = {}  # fingerprint -> its verified stored layout
        self._closed = False

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> KVStore:
        """``KVStore(url, **kwargs)``: open a store by URL."""
        return cls(url, **kwargs)

    # -- helpers ------------------------------------------------------------------
    def _plan(self, model_id: str, tokens: Sequence[int] | torch.Tensor | np.ndarray) -> _Plan:
        if self._closed:
            raise ClosedStoreError("this KVStore is closed")
        fingerprint = model_fingerprint(model_id)
        array = as_token_array(tokens)
        if array.size == 0:
            raise ConfigError("tokens must not be empty")
        bounds = chunk_bounds(len(array), self.chunk_tokens)
        return _Plan(fingerprint, array, bounds, chunk_hashes(fingerprint, array, self.chunk_tokens))

    def _context(self, model_id: str | Tokens, tokens: Tokens | None) -> tuple[str, Tokens]:
        """A call's (model id, tokens): with a bound model the id may be left out, and is
        then the model's; levels calibrated for the bound model serve no other model."""
        if isinstance(model_id, str):
            if tokens is None:
                raise ConfigError("tokens are missing")
            if self.auto_levels and self.model is not None and model_id != self.model.model_id:
                raise ConfigError(f"this store's levels are calibrated for model {self.model.model_id!r}, "
                                  f"not {model_id!r}: open another KVStore for it")
            return model_id, tokens
        if self.model is None:
            raise ConfigError("a call without a model id needs a store bound to a model: KVStore(url, model=...)")
        if tokens is not None:
            raise ConfigError("give either (model_id, tokens) or, on a store bound to a model, (tokens)")
        return self.model.model_id, model_id

    def _level(self, level: int | None) -> int:
        level = self.default_level if level is None else level
        self._check_level(level, self.num_levels)
        return level

    async def _bind_levels(self, fingerprint: str, first_context: np.ndarray | None) -> bool:
        """Build the model's codec levels (``levels="auto"``) from the profile stored for it,
        or from one calibrated now and stored create-only (another writer's, if it stored one
        first). ``False``: no profile is stored and ``first_context`` is ``None`` (a read:
        nothing of the model can be stored at these levels yet)."""
        if self.codecs:
            return True
        assert self.model is not None
        async with self._binding:
            if self.codecs:
                return True
            key = self.keys.default_profile_key(fingerprint)
            profile_bytes = await self._default_profile(fingerprint)
            if profile_bytes is None:
                contexts = await self._calibration_contexts(first_context)
                if contexts is None:
                    return False
                log.info("calibrating the codec profile of model %s on %d contexts", self.model.model_id, len(contexts))
                ours = (await asyncio.to_thread(self.model.calibrate, contexts)).to_bytes()
                stored = await self.store.put(key, default_profile_to_bytes(ours, fingerprint), create_only=True)
                # another writer stored one first: every writer uses it
                profile_bytes = ours if stored else (await self._default_profile(fingerprint) or ours)
            self.codecs = profile_levels(profile_bytes, self.num_levels, key)
        return True

    async def _default_profile(self, fingerprint: str) -> bytes | None:
        """The codec profile a bound store calibrated for the model ``fingerprint`` and stored
        (``None`` where none is stored)."""
        key = self.keys.default_profile_key(fingerprint)
        data = await self.store.get(key)
        if data is None:
            return None
        try:
            return default_profile_from_bytes(data, fingerprint)[1]
        except FormatError as exc:
            raise type(exc)(f"the model's stored codec profile {key} is damaged ({exc}); "
                            "delete it to calibrate a new one") from exc

    async def stored_levels(self, model_id: str) -> list[Codec] | None:
        """The codec levels calibrated for ``model_id`` by a store bound to it
        (``levels="auto"``) and stored here, best first: for a writer that cannot calibrate
        the model itself (an engine's connector) to store and read its KV at the same levels.
        ``None`` where no profile of the model is stored."""
        if self._closed:
            raise ClosedStoreError("this KVStore is closed")
        fingerprint = model_fingerprint(model_id)
        profile_bytes = await self._default_profile(fingerprint)
        if profile_bytes is None:
            return None
        from kvstore.codecs.kvcodec_profile import DEFAULT_LEVELS

        return profile_levels(profile_bytes, len(DEFAULT_LEVELS), self.keys.default_profile_key(fingerprint))

    async def _calibration_contexts(self, first_context: np.ndarray | None) -> list[Tokens] | None:
        """What a missing profile is calibrated on: ``calibrate``, else the first put's tokens."""
        assert self.model is not None
        if self._calibrate is not None:
            model = self.model
            return await asyncio.to_thread(
                lambda: [model.tokenize(c) if isinstance(c, str) else as_token_array(c) for c in self._calibrate])
        if first_context is None:
            return None
        if len(first_context) < MIN_CALIBRATION_TOKENS:
            raise ConfigError(f"the model's first put ({len(first_context)} tokens) is too short to calibrate its "
                              f"codec profile on (at least {MIN_CALIBRATION_TOKENS}): pass calibrate= texts")
        if len(first_context) < CALIBRATION_TOKENS:
            return [first_context[:CALIBRATION_CONTEXT_TOKENS]]
        return [first_context[i:i + CALIBRATION_CONTEXT_TOKENS]
                for i in range(0, CALIBRATION_TOKENS, CALIBRATION_CONTEXT_TOKENS)]

    def _check_level(self, level: int, available: int) -> None:
        if type(level) is not int or not 0 <= level < available:
            raise ConfigError(f"level must be an int in [0, {available}), got {level!r}")

    async def _bounded(self, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        limit = asyncio.Semaphore(self.max_concurrency)

        async def run(job: Callable[[], Awaitable[T]]) -> T:
            async with limit:
                return await job()

        return list(await asyncio.gather(*(run(job) for job in jobs)))

    # -- write --------------------------------------------------------------------
    async def put(
        self,
        model_id: str | Tokens,
        tokens: Tokens | None = None,
        kv: KV | None = None,
        *,
        layout: CacheLayout | None = None,
        ttl: float | None = None,
        pq: pq_index.PQConfig | pq_index.PQIndex | None = None,
        pq_centroid_format: str = "q4",
        sliding_from: int = 0,
    ) -> Manifest:
        """Store the KV of ``tokens`` (per layer ``(key, value)``, each ``[kv_heads, tokens, dim]``,
        every layer covering every token) at every level; returns the manifest written.
        Chunks already stored are shared.

        On a store bound to a model, ``put(tokens)`` prefills the KV with the model
        (``put(tokens, kv)`` stores the given one), and the layout is the model's; a model
        with linear-attention layers keeps their states after every
        :meth:`~kvstore.format.layout.CacheLayout.states_interval` tokens (and the last).

        ``layout``: the model's :class:`~kvstore.format.layout.CacheLayout` (from
        :func:`kvstore.integrations.hf.cache_layout`); needed when layers differ in kind or
        shape, otherwise every layer is taken as full attention. The first put of a model
        stores its layout; a later put with another layout for the same ``model_id`` raises
        :class:`ConfigError`. Each chunk is stored as one object per (level, layer group).

        ``pq``: also store PQ centroids and codes of the keys for retrieval attention,
        either a ready :class:`~kvstore.retrieval.pq.PQIndex` (e.g. trained during
        prefill) or a :class:`~kvstore.retrieval.pq.PQConfig` to train one here (the
        keys must be the ones the model attends to, after RoPE, as Hugging Face caches
        hold them). ``pq_centroid_format``: how the centroids are stored, see
        :mod:`kvstore.retrieval.centroid_storage` (``q4`` by default).

        ``sliding_from``: the first token that sliding-window (and chunked-attention) layers'
        KV holds, for an engine that frees the blocks behind its windows (vLLM's hybrid
        allocator): their chunks that start before it are not stored, and their KV there is
        not read (it may be anything). It must leave the chunks that the context's end
        attends, else :class:`ConfigError`.

        After writing the manifest, ``put`` waits until no ``gc`` or ``delete`` of its model
        is running (:mod:`kvstore.leases`), then re-reads the header of every object it
        lists: a concurrent writer of the same chunks (in another dtype, say), a ``delete``
        or ``gc`` may have replaced or removed one in between, and the put is then redone
        (:class:`~kvstore.errors.ConcurrentWriteError` after ``PUT_ATTEMPTS``)."""
        if not isinstance(model_id, str) and kv is None:
            tokens, kv = None, tokens  # put(tokens, kv) on a bound store
        model_id, tokens = self._context(model_id, tokens)
        plan = self._plan(model_id, tokens)
        if layout is not None and not isinstance(layout, CacheLayout):
            raise ConfigError(f"layout must be a CacheLayout or None, got {type(layout).__name__}")
        if kv is None:
            if self.model is None or model_id != self.model.model_id:
                raise ConfigError("put without kv prefills with the store's model: bind one with "
                                  "KVStore(url, model=...) and leave out the model id")
            # a linear-attention model keeps its states after some chunks, so that prefixes continue there
            model_layout = self.model.cache_layout()
            every = {"states_every": model_layout.states_interval(self.chunk_tokens)} if model_layout.has_linear else {}
            kv = await asyncio.to_thread(self.model.prefill, plan.tokens, **every)
        if layout is None and self.model is not None and model_id == self.model.model_id:
            layout = self.model.cache_layout()
        layout = layout if layout is not None else layout_of_kv(kv)
        check_kv(kv, len(plan.tokens), layout)
        self._check_sliding_from(sliding_from, layout, len(plan.tokens))
        ttl = self.ttl if ttl is None else check_ttl(ttl)
        if pq is not None and not isinstance(pq, pq_index.PQConfig | pq_index.PQIndex):
            raise ConfigError(f"pq must be a PQConfig, a PQIndex or None, got {type(pq).__name__}")
        if pq is not None and pq_centroid_format not in pq_store.CENTROID_FORMATS:
            raise ConfigError(f"pq_centroid_format must be one of {pq_store.CENTROID_FORMATS}, got {pq_centroid_format!r}")
        pq_layers = self._pq_layers(layout) if pq is not None else None
        if self.auto_levels:
            await self._bind_levels(plan.fingerprint, plan.tokens)
        for codec in self.codecs:
            codec.check_layout(layout)  # before any write: a codec that cannot take these layers says so now
        await self._store_layout(plan.fingerprint, layout, ttl)
        # KV on a GPU: every read of it (and of the PQ index) is queued on the caller's stream
        stream = caller_stream(token_tensor(kv).device)
        if isinstance(pq, pq_index.PQConfig):  # once, not per attempt
            keys = [kv[i][0] for i in pq_layers] if pq_layers is not None else [k for k, _ in kv]
            pq = await asyncio.to_thread(on_stream(stream, pq_index.build_index), keys, pq, layer_ids=pq_layers)
        if pq is not None and (pq.codes.is_cuda or pq.centroids.is_cuda):  # written from host memory
            on_gpu = pq.codes if pq.codes.is_cuda else pq.centroids
            pq = await asyncio.to_thread(on_stream(caller_stream(on_gpu.device), pq.to), "cpu")
        # the chain: each chunk's objects record its content hash and the previous chunk's (of
        # what is stored: sliding layers' KV before ``sliding_from`` is not)
        windowed = frozenset(i for i, spec in enumerate(layout.layers) if spec.window is not None)
        contents = await asyncio.to_thread(
            on_stream(stream, lambda: [content_hash(kv, start, stop, skip=windowed if start < sliding_from else ())
                                       for start, stop in plan.bounds]))
        stale: list[str] = []
        for attempt in range(PUT_ATTEMPTS):
            manifest = await self._put_once(model_id, plan, kv, layout, contents, ttl, pq, pq_centroid_format, stream,
                                            sliding_from)
            # a collector (gc, delete) still deciding from manifests read before ours was written
            # may remove what we re-used: wait it out, then check (kvstore.leases)
            listed = {obj.key for chunk in manifest.chunks for obj in chunk.objects}
            listed |= {obj.key for obj in manifest.pq.objects} if manifest.pq is not None else set()
            leases = self.keys.lease_keys() + self.keys.lease_keys(plan.fingerprint, plan.hashes[0])
            await wait_for_collectors(self.store, leases, listed)
            stale = await self._changed_objects(manifest)
            if not stale:
                return manifest
            log.warning("put of %d tokens: %d listed objects are unreadable, or were replaced or removed by a "
                        "concurrent writer (attempt %d of %d), e.g. %s", len(plan.tokens), len(stale), attempt + 1, PUT_ATTEMPTS, stale[0])
        raise ConcurrentWriteError(
            f"put of {len(plan.tokens)} tokens: its objects kept reading back unreadable, replaced or removed "
            f"({len(stale)} after {PUT_ATTEMPTS} attempts, e.g. {stale[0]})"
        )

    async def _changed_objects(self, manifest: Manifest) -> list[str]:
        """Keys of the objects the manifest lists that are gone or are not the recorded ones now.

        Checked after the manifest is written: another writer of the same chunks (in another
        dtype, say) may have replaced them, or a delete or gc removed them, in between. Reads
        only each object's header, all in one batch (one round trip where the backend can)."""
        listed = [obj for chunk in manifest.chunks for obj in chunk.objects]
        listed += list(manifest.pq.objects) if manifest.pq is not None else []
        try:
            heads: list[bytes | None] = await self.store.get_many(
                [(obj.key, RangeRequest(0, obj.header_bytes)) for obj in listed])
        except FormatError:  # a signed store refused one of them: find which, one by one
            heads = [b""] * len(listed)
        changed = []
        for obj, head in zip(listed, heads):
            same = _is_header_of(head, obj)
            if same is None:  # unreadable: damaged in transit? read once more
                same = await self._same_object(obj.key, obj)
            if same is not True:
                changed.append(obj.key)
        return changed

    @staticmethod
    def _pq_layers(layout: CacheLayout) -> list[int] | None:
        """The layers PQ retrieval indexes: the full-attention ones (a sliding window is already a
        small set of tokens to attend); ``None`` when that is every layer."""
        full = [i for i, s in enumerate(layout.layers) if s.kind == "full"]
        shapes = {(layout.layers[i].kv_heads, layout.layers[i].key_dim, layout.layers[i].slots) for i in full}
        if not full or len(shapes) != 1 or next(iter(shapes))[2] != "kv":
            raise ConfigError(f"PQ retrieval indexes full-attention layers of one shape with post-RoPE keys; "
                              f"this layout is {layout.describe()}")
        return None if len(full) == layout.num_layers else full

    def _stores_chunk(self, group: LayerGroup, bounds: tuple[int, int], num_tokens: int, sliding_from: int = 0) -> bool:
        """Whether a put of ``num_tokens`` tokens stores ``group``'s object of the chunk ``bounds``
        (sliding-window layers' KV held from token ``sliding_from`` on)."""
        if group.spec.kind == "full":
            return True
        if group.spec.window is not None and bounds[0] < sliding_from:
            return False
        return self.sliding_chunks == "all" or bounds[1] > group.spec.first_needed(num_tokens)

    def _check_sliding_from(self, sliding_from: int, layout: CacheLayout, num_tokens: int) -> None:
        """``sliding_from`` must leave every windowed group the chunks its last window needs."""
        if not isinstance(sliding_from, int) or isinstance(sliding_from, bool) or sliding_from < 0:
            raise ConfigError(f"sliding_from must be a non-negative int, got {sliding_from!r}")
        for group in layout.groups:
            if group.spec.window is None:
                continue
            needed = group.spec.first_needed(num_tokens) // self.chunk_tokens * self.chunk_tokens
            if sliding_from > needed:
                raise ConfigError(f"sliding_from={sliding_from}: layer group {group.name!r} needs its KV from token "
                                  f"{needed} (the chunk its last window of {group.spec.window} starts in) of "
                                  f"{num_tokens}")

    async def _put_once(self, model_id: str, plan: _Plan, kv: KV, layout: CacheLayout, contents: list[str],
                        ttl: float | None, pq: pq_index.PQIndex | None, pq_centroid_format: str,
                        stream: torch.cuda.Stream | None, sliding_from: int = 0) -> Manifest:
        """Write every chunk object (create-only), the PQ objects, then the manifest; the KV is
        read on ``stream`` (the caller's, for KV on a GPU). ``contents``: each chunk's content hash."""
        dtype = token_tensor(kv).dtype
        groups = layout.groups
        stack, encode = on_stream(stream, stack_span), on_stream(stream, encode_chunk)
        encode_states = on_stream(stream, encode_state_chunk)
        n = len(plan.tokens)

        async def store_chunk(i: int) -> list[tuple[tuple[int, int], ChunkObject]]:
            stored = []
            for group in groups:
                if not self._stores_chunk(group, plan.bounds[i], n, sliding_from):
                    continue
                ident = self._identity(plan, i, group, dtype, contents[i], contents[i - 1] if i else "")
                if not group.spec.per_token:  # linear layers: their states after the chunk, where held
                    held = [kv[layer].at(plan.bounds[i][1]) for layer in group.layers]  # type: ignore[attr-defined]
                    if any(pair is None for pair in held):
                        continue
                    obj = await store_states(ident, held)
                    stored += [((level, group.index), obj) for level in range(len(self.codecs))]
                    continue
                keys, values = await asyncio.to_thread(stack, kv, *plan.bounds[i], group.layers)  # once for every level
                for level, codec in enumerate(self.codecs):
                    group_codec = codec.for_layers(layout.token_rows(group.layers), len(layout.token_layers))
                    stored.append(((level, group.index), await store_level(ident, level, group_codec, keys, values)))
            return stored

        async def store_level(ident: ChunkIdentity, level: int, codec: Codec,
                              keys: torch.Tensor, values: torch.Tensor) -> ChunkObject:
            base = self.keys.chunk_key(plan.fingerprint, ident.chunk_hash, self.codecs[level].tag, ident.group)
            return await place(base, await asyncio.to_thread(encode, codec, ident, keys, values), level)

        async def store_states(ident: ChunkIdentity, held: list[tuple[torch.Tensor, torch.Tensor]]) -> ChunkObject:
            """One state object of a linear group's chunk, shared by every level."""
            base = self.keys.chunk_key(plan.fingerprint, ident.chunk_hash, STATE_TAG, ident.group)
            data = await asyncio.to_thread(encode_states, ident, torch.stack([c for c, _ in held]),
                                           torch.stack([r for _, r in held]))
            return await place(base, data, 0)

        async def place(base: str, data: bytes, level: int) -> ChunkObject:
            ours = _describe(base, data)
            # objects are never replaced: the first writer's bytes stay at the base key, a writer of
            # other bytes (other values, dtype...) writes its own version beside them
            for key in (base, self.keys.chunk_version(base, ours.checksum)):
                if await self.store.put(key, data, ttl=ttl, create_only=True):
                    metrics.record_put(level, len(data))
                    return replace(ours, key=key)
                if await self._same_object(key, ours) and await self.store.keep(key, ttl):
                    return replace(ours, key=key)  # shared, and lives long enough now
            raise ConcurrentWriteError(f"chunk object {base}: its version for these bytes holds other bytes")

        for stored in {p[0]: p for c in self.codecs if (p := c.stored_profile()) is not None}.values():
            await self._store_profile(plan.fingerprint, *stored, ttl)
        placed = await self._bounded([lambda i=i: store_chunk(i) for i in range(len(plan.bounds))])
        pq_entry = None
        if pq is not None:
            written = await pq_store.put_pq(self, model_id, plan.tokens, pq, centroid_format=pq_centroid_format, ttl=ttl)
            pq_entry = PQEntry(pq.config.to_dict(), written.centroids, written.codes)
        full_grid = [(level, g) for level in range(len(self.codecs)) for g in range(len(groups))]
        chunks = []
        for i, entries in enumerate(placed):
            entries.sort(key=lambda e: e[0])  # level by level, group by group
            slots = tuple(slot for slot, _ in entries)
            chunks.append(ChunkEntry(plan.hashes[i], *plan.bounds[i], tuple(obj for _, obj in entries),
                                     None if list(slots) == full_grid else slots))
        manifest = Manifest(
            model_id=model_id,
            fingerprint=plan.fingerprint,
            num_tokens=n,
            chunk_tokens=self.chunk_tokens,
            layout=layout,
            dtype=dtype_name(dtype),
            levels=tuple(LevelSpec(c.name, c.params, c.tag) for c in self.codecs),
            chunks=tuple(chunks),
            pq=pq_entry,
        )
        key = self.keys.manifest_key(plan.fingerprint, plan.hashes[-1])
        await self.store.put(key, manifest.to_bytes(plan.tokens), ttl=ttl)
        return manifest

    @staticmethod
    def _identity(plan: _Plan, i: int, group: LayerGroup, dtype: torch.dtype, content: str = "",
                  prev: str = "") -> ChunkIdentity:
        start, stop = plan.bounds[i]
        return group_identity(plan.fingerprint, plan.hashes[i], start, plan.tokens[start:stop], group, dtype,
                              content, prev)

    async def _store_layout(self, fingerprint: str, layout: CacheLayout, ttl: float | None) -> None:
        """Store the model's layout unless present; :class:`ConfigError` if another one is stored.

        A uniform full-attention layout is not stored: readers of a store without a layout
        object take the uniform layout from the chunk headers (as stores written before
        layouts existed hold)."""
        if layout.is_uniform:
            stored = await self._stored_layout(fingerprint)
            if stored is not None and stored != layout:
                raise ConfigError(f"this model id is stored with layout {stored.describe()}, not {layout.describe()}")
            return
        data = layout_to_bytes(layout, fingerprint)
        key = self.keys.layout_key(fingerprint)
        if not await self.store.put(key, data, ttl=ttl, create_only=True):
            stored = await self._stored_layout(fingerprint, cached=False)
            if stored is not None and stored != layout:
                raise ConfigError(f"this model id is stored with layout {stored.describe()}, not {layout.describe()}")
            if not await self.store.keep(key, ttl):  # it must outlive every chunk; gone since: write it again
                await self.store.put(key, data, ttl=ttl)
        self._layouts[fingerprint] = layout

    async def _stored_layout(self, fingerprint: str, *, cached: bool = True) -> CacheLayout | None:
        """The model's stored layout (verified), or ``None`` when the store holds none."""
        if cached and fingerprint in self._layouts:
            return self._layouts[fingerprint]
        data = await self.store.get(self.keys.layout_key(fingerprint))
        if data is None:
            return None
        layout = layout_from_bytes(data, fingerprint)
        self._layouts[fingerprint] = layout
        return layout

    async def _store_profile(self, fingerprint: str, profile_id: str, data: bytes, ttl: float | None) -> None:
        """Store a codec's per-model profile unless present (content-addressed, create-only),
        and make it live at least as long as this put's objects.

        Checked on every put rather than remembered, so a profile removed by ``gc``
        comes back with the next context that needs it.
        """
        key = self.keys.profile_key(fingerprint, profile_id)
        if not await self.store.keep(key, ttl):
            await self.store.put(key, data, ttl=ttl)  # absent (or gone since): content-addressed, same bytes

    async def load_profiles(self, manifest: Manifest) -> None:
        """Fetch and register every codec profile the manifest's levels need (once per store)."""
        for spec in manifest.levels:
            await self._load_profile(manifest.fingerprint, spec.codec, spec.params)

    async def _load_profile(self, fingerprint: str, codec_name: str, params: dict[str, Any]) -> None:
        """Fetch, verify and register the profile a stored codec configuration needs."""
        cls = codec_class(codec_name)
        profile_id = cls.profile_id_of(params)
        if profile_id is None:
            return
        key = self.keys.profile_key(fingerprint, profile_id)
        if key in self._profiles_loaded:
            return
        data = await self.store.get(key)
        if data is None:
            raise IncompleteContextError(f"codec profile {key} is missing from the store")
        if profile_content_id(data) != profile_id:
            metrics.record_checksum_failure("profile")
            raise ChecksumError(f"codec profile {key} does not match its content hash")
        register_profile(profile_id, cls.parse_profile(data))
        self._profiles_loaded.add(key)

    async def _same_object(self, key: str, ours: ChunkObject) -> bool | None:
        """Whether the object at ``key`` is byte for byte ``ours`` (its size and header checksum,
        which covers every buffer's checksum); ``False`` if absent, ``None`` if unreadable
        (a signed store's MAC failure included). Reads only the header."""
        try:
            head = await self.store.get(key, RangeRequest(0, ours.header_bytes))
        except FormatError:  # a signed store's MAC failure
            return None
        return _is_header_of(head, ours)

    # -- read ---------------------------------------------------------------------
    async def lookup(
        self, model_id: str | Tokens, tokens: Tokens | None = None, *, level: int | None = None
    ) -> int:
        """How many leading tokens of ``tokens`` have stored KV at ``level`` (the store's
        ``default_level`` unless given; a multiple of ``chunk_tokens``, or ``len(tokens)``
        when the whole context is stored): every chunk of the full-attention layers up to
        there, the chunks of each sliding-window layer group that a continuation from
        there attends, and each linear-attention group's states after it."""
        model_id, tokens = self._context(model_id, tokens)
        plan = self._plan(model_id, tokens)
        level = self._level(level)
        if self.auto_levels and not await self._bind_levels(plan.fingerprint, None):
            return 0  # no profile stored for the model: nothing of it is stored at its levels
        tag = self.codecs[level].tag
        layout = await self._stored_layout(plan.fingerprint)
        specs = [(g.name, g.spec) for g in layout.groups] if layout is not None else [("", None)]
        keys = [[self.keys.chunk_key(plan.fingerprint, h, group_tag(tag, spec), name) for name, spec in specs]
                for h in plan.hashes]
        flat = await self._bounded([lambda key=key: self.store.exists(key) for row in keys for key in row])
        present = [flat[i * len(specs):(i + 1) * len(specs)] for i in range(len(keys))]
        covered = hits = 0
        for i, (_, stop) in enumerate(plan.bounds):
            if not all(present[i][g] for g, (_, spec) in enumerate(specs) if spec is None or spec.kind == "full"):
                break  # a full-attention chunk is missing: nothing after it can be continued
            hits += 1
            if all(present[j][g] for g, (_, spec) in enumerate(specs) if spec is not None
                   for j in range(spec.first_needed(stop) // self.chunk_tokens, i + 1)):
                covered = stop
        metrics.record_lookup(hits, len(keys) - hits)
        return covered

    async def manifest(self, model_id: str | Tokens, tokens: Tokens | None = None) -> Manifest | None:
        """The manifest of exactly this context, or ``None`` if it was not stored as one."""
        model_id, tokens = self._context(model_id, tokens)
        plan = self._plan(model_id, tokens)
        return await self._read_manifest(model_id, plan)

    async def _read_manifest(self, model_id: str, plan: _Plan) -> Manifest | None:
        data = await self.store.get(self.keys.manifest_key(plan.fingerprint, plan.hashes[-1]))
        if data is None:
            return None
        try:
            manifest, stored_tokens = _parsed_manifest(bytes(data))
        except FormatError:
            metrics.record_checksum_failure("manifest")
            raise
        if manifest.model_id != model_id or manifest.fingerprint != plan.fingerprint:
            raise FormatError(f"manifest belongs to model {manifest.model_id!r}, not {model_id!r}")
        if not np.array_equal(stored_tokens, plan.tokens) or manifest.chunk_tokens != self.chunk_tokens:
            raise FormatError("manifest does not describe the requested tokens")
        self._check_manifest_keys(manifest, plan)
        return manifest

    def _check_manifest_keys(self, manifest: Manifest, plan: _Plan) -> None:
        """Every object a manifest lists must sit where this store writes it: a manifest
        cannot point a reader at another namespace's, model's or chunk's objects."""
        groups = manifest.layout.groups
        for chunk, chunk_hash in zip(manifest.chunks, plan.hashes):
            if chunk.hash != chunk_hash:
                raise FormatError("manifest chunk hashes do not match the requested tokens")
            for level, spec in enumerate(manifest.levels):
                for group in groups:
                    obj = chunk.object_at(level, group.index, len(groups))
                    base = self.keys.chunk_key(plan.fingerprint, chunk_hash, group_tag(spec.tag, group.spec), group.name)
                    if obj is not None and not self.keys.is_chunk_version(obj.key, base):
                        raise FormatError(f"manifest lists chunk object {obj.key} outside its place")
        if manifest.pq is not None:
            folder = self.keys.model_prefix(plan.fingerprint) + f"pq/{plan.hashes[-1]}/"
            if not all(obj.key.startswith(folder) for obj in manifest.pq.objects):
                raise FormatError("manifest lists PQ objects outside the context's PQ folder")

    async def get(
        self,
        model_id: str | Tokens,
        tokens: Tokens | None = None,
        *,
        level: int | None = None,
        device: str | torch.device = "cpu",
        sliding_window_only: bool = True,
        continue_at: int | None = None,
        out: KV | None = None,
    ) -> KV:
        """The KV of exactly ``tokens`` at ``level`` (the store's ``default_level`` unless
        given), on ``device``.

        Full-attention layers hold every token. Sliding-window (and chunked-attention)
        layers hold, with ``sliding_window_only`` (the default), only the *last* tokens:
        those of the chunks that overlap the window a continuation attends, so only those
        chunks are fetched (:func:`kvstore.integrations.hf.kv_to_cache` places them);
        ``sliding_window_only=False`` returns every token there too (stored with
        ``sliding_chunks="all"``). ``continue_at``: the windows kept are those of a
        continuation from that token instead (an engine that loads only a prefix of
        ``tokens``). A sliding layer's tensors end at the last token; they start at a chunk
        boundary at or before its window. A linear-attention layer's entry is its
        :class:`~kvstore.kv.LinearStates` after the last token (read from one object).

        Raises :class:`ContextNotFoundError` if it is not stored (use :meth:`lookup`
        to find a stored prefix), :class:`IncompleteContextError` if the context's
        manifest names a chunk that is gone or changed, and
        :class:`~kvstore.errors.ChecksumError` / :class:`FormatError` for corrupt objects.

        ``out``: the KV an earlier ``get`` returned, for a context of the same length and
        layout on the same device and dtype; its tensors are written and returned instead of
        new ones (a server loading context after context skips allocating the output). After
        an error its contents are undefined. :class:`ConfigError` if it does not fit.

        On a GPU, the KV is written by work queued on the caller's current stream (chunks
        decode in worker threads, on that stream), so the caller's later work on that
        stream sees it complete.
        """
        device = resolve_device(device)
        stream = caller_stream(device)
        model_id, tokens = self._context(model_id, tokens)
        plan = self._plan(model_id, tokens)
        level = self.default_level if level is None else level  # checked against the stored levels
        manifest = await self._read_manifest(model_id, plan)
        if manifest is not None:
            self._check_level(level, len(manifest.levels))
            spec = manifest.levels[level]
            await self._load_profile(plan.fingerprint, spec.codec, spec.params)
            layout: CacheLayout | None = manifest.layout
            tag, codec_name = spec.tag, spec.codec
            level_codec = get_codec(spec.codec, spec.params)
        else:
            self._check_level(level, self.num_levels)
            if self.auto_levels and not await self._bind_levels(plan.fingerprint, None):
                raise ContextNotFoundError(f"nothing of model {model_id!r} is stored (it has no codec profile here)")
            self._check_level(level, len(self.codecs))
            layout = await self._stored_layout(plan.fingerprint)  # None: one uniform group (chunk headers)
            tag, codec_name = self.codecs[level].tag, self.codecs[level].name
            level_codec = self.codecs[level]
        n = len(plan.tokens)
        window_end = continuation_start(continue_at, n)
        groups = layout.groups if layout is not None else None
        found = {"hits": 0, "misses": 0}

        def first_chunk(group: LayerGroup) -> int:  # linear groups: the states after the last chunk
            if not group.spec.per_token:
                return group.spec.first_needed(n) // self.chunk_tokens
            if not sliding_window_only:
                return 0
            return group.spec.first_needed(window_end) // self.chunk_tokens

        # the objects to read: (chunk index, group index) in chunk order within each group
        jobs = ([(i, g.index) for g in groups for i in range(first_chunk(g), len(plan.bounds))]
                if groups is not None else [(i, 0) for i in range(len(plan.bounds))])

        def key_of(j: int) -> str:
            i, g = jobs[j]
            if manifest is not None:
                obj = manifest.object_at(i, level, g)
                if obj is None:
                    raise MissingObjectError(f"context of {n} tokens: chunk {i} of layer group "
                                             f"{manifest.layout.groups[g].name!r} was not stored "
                                             "(sliding_chunks='last_window')")
                return obj.key
            if groups is None:
                return self.keys.chunk_key(plan.fingerprint, plan.hashes[i], tag, "")
            return self.keys.chunk_key(plan.fingerprint, plan.hashes[i], group_tag(tag, groups[g].spec), groups[g].name)

        async def fetch(j: int) -> bytes:
            i, g = jobs[j]
            key = key_of(j)
            started = time.perf_counter()
            blob = await self.store.get(key)
            found["misses" if blob is None else "hits"] += 1
            if blob is None and manifest is not None:
                raise MissingObjectError(f"context of {n} tokens: chunk {i} ({key}) is missing from the store")
            if blob is None:
                raise ContextNotFoundError(
                    f"no stored KV for these {n} tokens of model {model_id!r} "
                    f"(chunk {i} of {len(plan.bounds)} is missing; lookup() finds a stored prefix)"
                )
            metrics.record_get(level, len(blob), time.perf_counter() - started)
            return blob

        def open_object(j: int, data: bytes | container.Container) -> container.Container:
            """The object's container: its header parsed once, checked against the manifest's
            record (buffers are checksummed as the codec reads them)."""
            if isinstance(data, container.Container):
                return data
            obj = container.decode(data)
            if manifest is not None:
                i, g = jobs[j]
                check_recorded_object(obj, manifest.object_at(i, level, g), i)  # type: ignore[arg-type]
            return obj

        try:
            # the first object first: without a manifest its header says the dtype (and, on a
            # store without a layout object, the one group's shape) to allocate
            first = await self._verified(0, fetch, open_object, in_thread=False)  # its header only
            layout, dtype = self._layout_and_dtype(manifest, layout, first.header)
            groups = layout.groups
            base = [plan.bounds[first_chunk(g)][0] for g in groups]
            alloc = on_stream(stream, torch.empty)  # from the caller's stream's pool (this thread's may be another)
            outs = group_outputs(groups, n, base, dtype, device, alloc, out)
            states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # linear group -> its states after n

            group_codecs = [level_codec.for_layers(layout.token_rows(g.layers), len(layout.token_layers)) if g.spec.per_token else None
                            for g in groups]
            chain: dict[int, tuple[str, str]] = {}  # job -> the object's (content, prev)

            def decode(j: int, data: bytes | container.Container) -> None:
                i, g = jobs[j]
                start, stop = plan.bounds[i]
                ident = self._identity(plan, i, groups[g], dtype)
                started = time.perf_counter()
                obj = open_object(j, data)
                pair, codec = outs[g], group_codecs[g]
                if pair is None or codec is None:  # a linear group: its states after the prefix
                    states[g] = decode_state_chunk(obj, ident, groups[g].spec, device)
                else:
                    into = (pair[0][:, :, start - base[g]:stop - base[g]], pair[1][:, :, start - base[g]:stop - base[g]])
                    decode_chunk(obj, ident, device, {"name": codec.name, "params": codec.params},
                                 out=into)  # straight into the output, where the codec can
                if manifest is None:
                    meta = obj.header.meta
                    chain[j] = (str(meta.get("content", "")), str(meta.get("prev", "")))
                metrics.record_decode(codec_name, time.perf_counter() - started)

            decode = on_stream(stream, decode)  # runs in worker threads

            async def fetched_first(j: int) -> container.Container:
                return first

            await self._bounded([lambda: self._verified(0, fetched_first, decode, refetch=fetch)]
                                + [lambda j=j: self._verified(j, fetch, decode) for j in range(1, len(jobs))])
            if manifest is None and not self._chain_holds(jobs, chain):
                await self._follow_chain(jobs, chain, key_of, decode, n)
        finally:
            metrics.record_lookup(found["hits"], found["misses"], op="get")
        return prefix_kv(groups, outs, layout.num_layers, n, states)

    @staticmethod
    def _chain_holds(jobs: list[tuple[int, int]], chain: dict[int, tuple[str, str]]) -> bool:
        """Without a manifest, the objects read must be one writer's chain: every object of a
        chunk records the same content hash, and each chunk the previous one's. Objects stored
        before the chain was recorded carry none: a read of only such objects is not checked,
        one that mixes them with recorded ones fails."""
        content: dict[int, str] = {}
        prev: dict[int, str] = {}
        recorded = [bool(chain[j][0]) for j in range(len(jobs))]
        if any(recorded) and not all(recorded):  # an object without the chain among ones with it: not theirs
            return False
        for j, (i, _) in enumerate(jobs):
            c, p = chain[j]
            if c and (content.setdefault(i, c) != c or prev.setdefault(i, p) != p):
                return False
        return all(prev[i] == content[i - 1] for i in content if i - 1 in content)

    async def _follow_chain(self, jobs: list[tuple[int, int]], chain: dict[int, tuple[str, str]],
                            key_of: Callable[[int], str], decode: Callable[[int, bytes], None], n: int) -> None:
        """Writers of other KV for these tokens raced: the base objects read are of several
        writers. Follow the first chunk's writer instead, chunk by chunk, through the versions
        stored beside each base object (:meth:`KeyScheme.chunk_version`); raise if its chain
        breaks off before the end."""
        want: str | None = None  # the content the next chunk's objects must name as previous
        for i in sorted({i for i, _ in jobs}):
            content = None
            for j in [j for j, (ji, _) in enumerate(jobs) if ji == i]:
                c, p = chain[j]
                if c and (want is None or p == want) and (content is None or c == content):
                    content = c
                    continue
                for key in sorted([k async for k in self.store.list(key_of(j) + "=")]):
                    blob = await self.store.get(key)
                    if blob is None:
                        continue
                    obj = container.decode(blob)
                    meta = obj.header.meta
                    if (want is None or meta.get("prev") == want) and (content is None or meta.get("content") == content):
                        await in_decode_thread(decode, j, obj)
                        content = chain[j][0]
                        break
                else:
                    raise IncompleteContextError(
                        f"the {n} tokens' chunk {i} is stored only by writers of other KV for the chunks before it "
                        "(concurrent puts of different KV); their contexts' own gets read consistently")
            want = content

    @staticmethod
    async def _verified(i: int, fetch: Callable[[int], Awaitable[Any]], decode: Callable[[int, Any], R],
                        refetch: Callable[[int], Awaitable[Any]] | None = None, in_thread: bool = True) -> R:
        """Fetch object ``i``, check and decode it (in a decode thread, or here for work too
        small to hand off); an object that fails verification (damaged in transit, say: Redis
        has no checksum on the wire) is read once more before the error is raised. Returns
        what ``decode`` returns."""
        async def run(blob: Any) -> R:
            return await in_decode_thread(decode, i, blob) if in_thread else decode(i, blob)

        try:
            return await run(await fetch(i))
        except MissingObjectError:
            raise
        except FormatError as exc:
            metrics.record_checksum_failure("chunk")
            log.warning("chunk %d failed verification (%s): reading it again", i, exc)
        try:
            return await run(await (refetch or fetch)(i))
        except FormatError:
            metrics.record_checksum_failure("chunk")
            raise

    @staticmethod
    def _layout_and_dtype(manifest: Manifest | None, layout: CacheLayout | None,
                          first: container.Header) -> tuple[CacheLayout, torch.dtype]:
        """The layout and dtype to decode into: the manifest's, or else the stored layout and
        the first object's recorded dtype (a store without a layout object: one uniform group
        of the first object's recorded shape)."""
        if manifest is not None:
            return manifest.layout, torch_dtype(manifest.dtype)[0]
        meta = first.meta
        dtype = torch_dtype(meta.get("dtype"))[0]
        if layout is not None:
            return layout, dtype
        dims = tuple(meta.get(name) for name in ("layers", "kv_heads", "head_dim"))
        if not all(type(d) is int and d > 0 for d in dims) or "group" in meta:
            raise FormatError("chunk object does not record a valid KV shape")
        try:
            return CacheLayout.uniform(*dims, meta.get("value_dim")), dtype  # type: ignore[arg-type]
        except ConfigError as exc:
            raise FormatError(f"chunk object records an invalid shape: {exc}") from None

    async def get_pq(
        self,
        model_id: str | Tokens,
        tokens: Tokens | None = None,
        *,
        device: str | torch.device = "cpu",
    ) -> pq_index.PQIndex | None:
        """The PQ index (centroids and codes) stored with this context, without fetching any KV;
        ``None`` when the context was stored without PQ.

        Raises :class:`ContextNotFoundError` when the context is not stored, and
        :class:`IncompleteContextError` / :class:`~kvstore.errors.ChecksumError` when a PQ
        object the manifest lists is missing, replaced or damaged."""
        model_id, tokens = self._context(model_id, tokens)
        plan = self._plan(model_id, tokens)
        manifest = await self._read_manifest(model_id, plan)
        if manifest is None:
            raise ContextNotFoundError(f"no stored context of these {len(plan.tokens)} tokens of model {model_id!r}")
        if manifest.pq is None:
            return None
        config = pq_index.PQConfig.from_dict(manifest.pq.config)  # FormatError if invalid
        return await pq_store.get_pq(self, model_id, plan.tokens, config, device=device, expected=manifest.pq)

    async def delete(self, model_id: str | Tokens, tokens: Tokens | None = None) -> bool:
        """Remove a stored context: its manifest, its PQ objects, and the chunk objects it lists
        that no other stored context of the model lists (those stay: never lost). Returns
        whether a manifest was found.

        Reads the model's other manifests to find what they share, holding one of the model's
        collector lease slots (:mod:`kvstore.leases`) that names the objects it may remove: a
        ``put`` that re-uses one of them meanwhile writes it again before it returns (see
        :meth:`put`)."""
        model_id, tokens = self._context(model_id, tokens)
        plan = self._plan(model_id, tokens)
        manifest = await self._read_manifest(model_id, plan)
        if manifest is None:
            return False
        chunk_objects = {obj.key for chunk in manifest.chunks for obj in chunk.objects}
        pq_objects = [obj.key for obj in manifest.pq.objects] if manifest.pq is not None else []
        async with collector_lease(self.store, self.keys.lease_keys(plan.fingerprint, plan.hashes[0]),
                                   candidates=[*chunk_objects, *pq_objects]):
            key = self.keys.manifest_key(plan.fingerprint, plan.hashes[-1])
            await self.store.delete(key)
            shared = await self._listed_by_other_contexts(plan.fingerprint, key)
            keys = sorted(chunk_objects - shared) + pq_objects
            await self._bounded([lambda key=key: self.store.delete(key) for key in keys])
        return True

    async def _listed_by_other_contexts(self, fingerprint: str, except_key: str) -> set[str]:
        """Every chunk object key the model's other manifests list (an unreadable manifest
        protects every chunk of the model: nothing is removed on a guess)."""
        prefix = self.keys.model_prefix(fingerprint) + "contexts/"
        keys = [k async for k in self.store.list(prefix) if k != except_key]

        async def read(key: str) -> set[str] | None:  # None: unreadable
            data = await self.store.get(key)
            if data is None:
                return set()
            try:
                other, _ = manifest_format.from_bytes(data)
            except FormatError:
                return None
            return {obj.key for chunk in other.chunks for obj in chunk.objects}

        found = await self._bounded([lambda key=key: read(key) for key in keys])
        if any(listed is None for listed in found):
            return {k async for k in self.store.list(self.keys.model_prefix(fingerprint) + "chunks/")}
        return set().union(*found)

    async def load(self, tokens: Tokens, *, level: int | None = None,
                   device: str | torch.device = "cpu") -> tuple[int, Any]:
        """On a store bound to a model: ``(n, cache)``, the number of leading tokens of
        ``tokens`` whose KV was loaded and the model's cache holding it (``None`` when
        ``n == 0``), ready for the model to go on from token ``n``: feed it ``tokens[n:]``.

        ``n`` is the stored prefix (:meth:`lookup`) and always less than ``len(tokens)``,
        so that at least one token is left to compute the next logits from (a whole stored
        context loads without its last token, as engines do; on a model with
        linear-attention layers, up to the last stored chunk boundary before it). ``device``: where the KV is
        decoded (the CPU by default; the cache moves it to the model's device)."""
        if self.model is None:
            raise ConfigError("load needs a store bound to a model: KVStore(url, model=...)")
        array = as_token_array(tokens)
        if self.model.cache_layout().has_linear:  # linear states cannot drop a last token: end before it
            stored = await self.lookup(array[:-1], level=level) if len(array) > 1 else 0
        else:
            stored = await self.lookup(array, level=level)
        n = min(stored, len(array) - 1)
        if n <= 0:
            return 0, None
        kv = await self.get(array[:stored], level=level, device=device)
        if stored > n:  # the whole context is stored: its last token is dropped
            kv = [(k[:, :-1], v[:, :-1]) for k, v in kv]
        return n, await asyncio.to_thread(self.model.to_cache, kv, n)

    # -- lifetime -----------------------------------------------------------------
    async def close(self) -> None:
        """Close the underlying byte store; later calls raise :class:`ClosedStoreError`."""
        self._closed = True
        await self.store.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"KVStore({self.store!r}, chunk_tokens={self.chunk_tokens}, levels={[c.tag for c in self.codecs]})"
