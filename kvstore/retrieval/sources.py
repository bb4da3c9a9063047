"""Where retrieval attention's selected K/V come from: straight from the store.

:class:`~kvstore.retrieval.attention.TensorSource` serves tensors in GPU or host
memory; :class:`StoreSource` serves a stored context by fetching, on demand,
only the chunk objects that hold the selected tokens (each chunk once, verified
against the context's manifest like :meth:`KVStore.get <kvstore.store.KVStore.get>`
does) and gathering the rows from them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from kvstore.errors import ContextNotFoundError, IncompleteContextError
from kvstore.format import container
from kvstore.format.chunk import ChunkIdentity, decode_chunk
from kvstore.format.dtypes import torch_dtype
from kvstore.format.keys import as_token_array
from kvstore.format.manifest import Manifest
from kvstore.kernels.pq_torch import gather_kv_reference
from kvstore.sync import LoopThread

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, Any]], Any]


class StoreSource:
    """A stored context's K/V, fetched chunk by chunk as selections need them.

    Build with :meth:`open`. ``run`` runs a coroutine to completion from the decoding
    thread: by default a private event-loop thread (fine for memory and file stores);
    for clients bound to an event loop (Redis, S3) pass a runner on that loop.
    Fetched chunks are kept in host memory, so each is fetched at most once.
    """

    def __init__(self, kvstore: Any, manifest: Manifest, tokens: np.ndarray, *, level: int = 0,
                 device: str | torch.device = "cpu", run: Runner | None = None) -> None:
        self.kvstore = kvstore
        self.manifest = manifest
        self.tokens = tokens
        self.level = level
        self.device = torch.device(device)
        self._thread = LoopThread() if run is None else None
        self._run = run if run is not None else self._thread.run  # type: ignore[union-attr]
        dtype = torch_dtype(manifest.dtype)[0]
        shape = (manifest.layers, manifest.kv_heads, manifest.num_tokens, manifest.head_dim)
        self._keys = torch.empty(shape, dtype=dtype)
        self._values = torch.empty(shape, dtype=dtype)
        self._have = np.zeros(len(manifest.chunks), dtype=bool)
        self.bytes_fetched = 0

    @classmethod
    async def open(cls, kvstore: Any, model_id: str, tokens: Sequence[int] | torch.Tensor | np.ndarray, *,
                   level: int = 0, device: str | torch.device = "cpu", run: Runner | None = None) -> StoreSource:
        """A source over the stored context ``tokens`` (its manifest is read and its codec profiles loaded)."""
        manifest = await kvstore.manifest(model_id, tokens)
        if manifest is None:
            raise ContextNotFoundError(f"no stored context of {len(tokens)} tokens for model {model_id!r}")
        await kvstore.load_profiles(manifest)
        return cls(kvstore, manifest, as_token_array(tokens), level=level, device=device, run=run)

    @property
    def chunks_fetched(self) -> int:
        return int(self._have.sum())

    async def fetch_chunks(self, chunks: Sequence[int]) -> None:
        """Fetch, verify and decode the given chunks (those not fetched yet)."""
        todo = [i for i in dict.fromkeys(int(c) for c in chunks) if not self._have[i]]
        limit = asyncio.Semaphore(self.kvstore.max_concurrency)

        async def one(i: int) -> None:
            entry = self.manifest.chunks[i]
            expected = entry.objects[self.level]
            async with limit:
                blob = await self.kvstore.store.get(expected.key)
            if blob is None:
                raise IncompleteContextError(f"chunk {i} ({expected.key}) is missing from the store")
            head = container.decode_header(memoryview(blob)[: container.head_bytes_needed(blob)], len(blob))
            if len(blob) != expected.size or head.checksum != expected.checksum:
                raise IncompleteContextError(f"chunk {i} ({expected.key}) is not the object the manifest recorded")
            m = self.manifest
            ident = ChunkIdentity(m.fingerprint, entry.hash, entry.start, self.tokens[entry.start:entry.stop],
                                  m.layers, m.kv_heads, m.head_dim, self._keys.dtype)
            k, v = await asyncio.to_thread(decode_chunk, blob, ident, torch.device("cpu"))
            self._keys[:, :, entry.start:entry.stop] = k
            self._values[:, :, entry.start:entry.stop] = v
            self._have[i] = True
            self.bytes_fetched += len(blob)

        await asyncio.gather(*(one(i) for i in todo))

    def gather(self, layer: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[kv_heads, k, head_dim]`` of the stored tokens ``indices [kv_heads, k]``."""
        idx = indices.detach().to("cpu", torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.manifest.num_tokens):
            raise IndexError(f"token index outside the stored {self.manifest.num_tokens} tokens")
        needed = np.unique((idx // self.manifest.chunk_tokens).numpy())
        if not self._have[needed].all():
            self._run(self.fetch_chunks(needed.tolist()))
        k, v = gather_kv_reference(self._keys[layer], self._values[layer], idx)
        return k.to(self.device), v.to(self.device)

    def close(self) -> None:
        """Stop the private event-loop thread, if any."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
