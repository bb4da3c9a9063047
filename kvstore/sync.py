"""A blocking wrapper of :class:`~kvstore.store.KVStore` for code without an event loop.

The async clients underneath (redis-py, s3fs/aiobotocore) are bound to the
event loop they were created on, so every call runs on one private loop in a
daemon thread, as fsspec does for its sync API.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

import torch

from kvstore.codecs.base import Codec
from kvstore.cuda_streams import current_stream_if_cuda, with_stream_of
from kvstore.errors import ClosedStoreError
from kvstore.format.layout import CacheLayout
from kvstore.format.manifest import Manifest
from kvstore.kv import KV
from kvstore.model_adapter import Tokens
from kvstore.retrieval.pq import PQConfig, PQIndex
from kvstore.store import KVStore

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kvstore-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result; GPU work it queues is ordered
        with the calling thread's current CUDA stream (:mod:`kvstore.cuda_streams`)."""
        coro = with_stream_of(current_stream_if_cuda(), coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        """Stop the loop and join its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SyncKVStore:
    """The same calls as :class:`KVStore`, blocking. Takes the same arguments.

    Use as a context manager or call :meth:`close` when done.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._closed = False
        self._loop = LoopThread()
        try:
            # built on the loop's thread so clients bind to that loop
            self._store = self._loop.run(self._build(*args, **kwargs))
        except BaseException:
            self._loop.stop()
            raise

    @staticmethod
    async def _build(*args: Any, **kwargs: Any) -> KVStore:
        return KVStore(*args, **kwargs)

    @property
    def store(self) -> KVStore:
        """The wrapped async store."""
        return self._store

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run the coroutine ``make()`` builds on the loop; refused (nothing built) once closed."""
        if self._closed:
            raise ClosedStoreError("this SyncKVStore is closed")
        return self._loop.run(make())

    def submit(self, make: Callable[[KVStore], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T]:
        """Start the coroutine ``make(store)`` on the store's loop and return at once: a future
        of its result (for callers that must not block, such as an engine's scheduler)."""
        if self._closed:
            raise ClosedStoreError("this SyncKVStore is closed")
        return asyncio.run_coroutine_threadsafe(make(self._store), self._loop.loop)

    def put(self, model_id: str | Tokens, tokens: Tokens | None = None, kv: KV | None = None, *,
            layout: CacheLayout | None = None, ttl: float | None = None, pq: PQConfig | PQIndex | None = None,
            pq_centroid_format: str = "q4", sliding_from: int = 0) -> Manifest:
        """See :meth:`KVStore.put`."""
        return self._run(lambda: self._store.put(model_id, tokens, kv, layout=layout, ttl=ttl, pq=pq,
                                                 pq_centroid_format=pq_centroid_format, sliding_from=sliding_from))

    def stored_levels(self, model_id: str) -> list[Codec] | None:
        """See :meth:`KVStore.stored_levels`."""
        return self._run(lambda: self._store.stored_levels(model_id))

    def lookup(self, model_id: str | Tokens, tokens: Tokens | None = None, *, level: int | None = None) -> int:
        """See :meth:`KVStore.lookup`."""
        return self._run(lambda: self._store.lookup(model_id, tokens, level=level))

    def get(self, model_id: str | Tokens, tokens: Tokens | None = None, *, level: int | None = None,
            device: str | torch.device = "cpu", sliding_window_only: bool = True,
            continue_at: int | None = None, out: KV | None = None) -> KV:
        """See :meth:`KVStore.get`."""
        return self._run(lambda: self._store.get(model_id, tokens, level=level, device=device,
                                                 sliding_window_only=sliding_window_only, continue_at=continue_at,
                                                 out=out))

    def load(self, tokens: Tokens, *, level: int | None = None, device: str | torch.device = "cpu") -> tuple[int, Any]:
        """See :meth:`KVStore.load`."""
        return self._run(lambda: self._store.load(tokens, level=level, device=device))

    def get_pq(self, model_id: str | Tokens, tokens: Tokens | None = None, *,
               device: str | torch.device = "cpu") -> PQIndex | None:
        """See :meth:`KVStore.get_pq`."""
        return self._run(lambda: self._store.get_pq(model_id, tokens, device=device))

    def manifest(self, model_id: str | Tokens, tokens: Tokens | None = None) -> Manifest | None:
        """See :meth:`KVStore.manifest`."""
        return self._run(lambda: self._store.manifest(model_id, tokens))

    def delete(self, model_id: str | Tokens, tokens: Tokens | None = None) -> bool:
        """See :meth:`KVStore.delete`."""
        return self._run(lambda: self._store.delete(model_id, tokens))

    def close(self) -> None:
        """Close the store and stop its loop thread; later calls raise :class:`ClosedStoreError`."""
        self._closed = True
        if self._loop.thread.is_alive():
            try:
                self._loop.run(self._store.close())
            finally:
                self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
