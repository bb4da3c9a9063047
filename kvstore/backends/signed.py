"""A signed store: every value written carries a keyed MAC, and reads return only values
whose MAC checks under an accepted key (:mod:`kvstore.format.signed`).

It wraps any other backend. A reader with the key so rejects anything a writer without
it forged or altered, and any value moved from another key. A MAC covers a whole value,
so a byte-range read fetches the whole value, checks it and returns the range.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from kvstore.backends.base import ByteRequest, BytesLike, Entry, Store, slice_bounds, validate_key
from kvstore.format.signed import ENVELOPE_BYTES, SigningKeys

#: values at least this large are MACed in a worker thread (hashlib releases the GIL)
THREAD_BYTES = 1 << 20


class SignedStore(Store):
    """Signs what it writes to ``inner`` with ``keys.current``; checks what it reads."""

    def __init__(self, inner: Store, keys: SigningKeys) -> None:
        self.inner = inner
        self.keys = keys
        self.url = inner.url

    async def _in_thread_if_large(self, size: int, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn, *args) if size >= THREAD_BYTES else fn(*args)

    async def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        return await self._opened(key, await self.inner.get(validate_key(key)), byte_range)

    async def get_many(self, requests: Sequence[tuple[str, ByteRequest | None]]) -> list[bytes | None]:
        values = await self.inner.get_many([(validate_key(key), None) for key, _ in requests])
        return [await self._opened(key, data, byte_range) for (key, byte_range), data in zip(requests, values)]

    async def _opened(self, key: str, data: bytes | None, byte_range: ByteRequest | None) -> bytes | None:
        """``byte_range`` of the payload of the signed value ``data`` read at ``key``, once its MAC checks."""
        if data is None:
            return None
        payload = await self._in_thread_if_large(len(data), self.keys.open, key, data)
        start, stop = slice_bounds(byte_range, payload.nbytes)
        return bytes(payload[start:stop])

    async def put(self, key: str, value: BytesLike, *, ttl: float | None = None, create_only: bool = False) -> bool:
        validate_key(key)
        view = memoryview(value).cast("B")
        envelope = await self._in_thread_if_large(view.nbytes, self.keys.envelope, key, view)
        return await self.inner.put(key, b"".join((envelope, view)), ttl=ttl, create_only=create_only)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    def list(self, prefix: str = "") -> AsyncIterator[str]:
        return self.inner.list(prefix)

    async def keep(self, key: str, ttl: float | None) -> bool:
        return await self.inner.keep(key, ttl)

    async def close(self) -> None:
        await self.inner.close()

    # housekeeping reads timestamps and removes whole objects: the backend's own answers
    @property
    def age_note(self) -> str:
        return self.inner.age_note

    @property
    def expiry_note(self) -> str:
        return self.inner.expiry_note

    async def entries(self, prefix: str = "") -> list[Entry]:
        return await self.inner.entries(prefix)

    async def expired_keys(self) -> list[str]:
        return await self.inner.expired_keys()

    async def remove_expired(self, keys: list[str]) -> int:
        return await self.inner.remove_expired(keys)

    async def stale_temp_files(self, grace: float) -> list[str]:
        return await self.inner.stale_temp_files(grace)

    async def remove_temp_file(self, path: str) -> None:
        await self.inner.remove_temp_file(path)

    def __repr__(self) -> str:
        return f"SignedStore({self.inner!r})"


__all__ = ["ENVELOPE_BYTES", "SignedStore"]
