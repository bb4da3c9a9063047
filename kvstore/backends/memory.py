"""An in-process store: a dict. For tests, demos and caches that live as long as the process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from kvstore.backends.base import (
    ByteRequest,
    BytesLike,
    Store,
    check_ttl,
    slice_bounds,
    validate_key,
    validate_prefix,
)


class MemoryStore(Store):
    """Values live in a dict of this instance; ``memory://`` opens a new, empty one."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._values: dict[str, tuple[bytes, float | None]] = {}

    def _live(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at is not None and time.monotonic() >= expires_at:
            del self._values[key]
            return None
        return value

    async def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        value = self._live(validate_key(key))
        if value is None or byte_range is None:
            return value
        start, stop = slice_bounds(byte_range, len(value))
        return value[start:stop]

    async def put(
        self, key: str, value: BytesLike, *, ttl: float | None = None, create_only: bool = False
    ) -> bool:
        validate_key(key)
        ttl = check_ttl(ttl)
        if create_only and self._live(key) is not None:
            return False
        expires_at = None if ttl is None else time.monotonic() + ttl
        self._values[key] = (bytes(value), expires_at)
        return True

    async def keep(self, key: str, ttl: float | None) -> bool:
        ttl = check_ttl(ttl)
        value = self._live(validate_key(key))
        if value is None:
            return False
        expires_at = self._values[key][1]
        if expires_at is not None:
            self._values[key] = (value, None if ttl is None else max(expires_at, time.monotonic() + ttl))
        return True

    async def delete(self, key: str) -> None:
        self._values.pop(validate_key(key), None)

    async def exists(self, key: str) -> bool:
        return self._live(validate_key(key)) is not None

    expiry_note = ""

    async def expired_keys(self) -> list[str]:
        now = time.monotonic()
        return [k for k, (_, expires_at) in list(self._values.items()) if expires_at is not None and now >= expires_at]

    async def remove_expired(self, keys: list[str]) -> int:
        return sum(self._live(key) is None for key in keys)  # _live drops an expired entry

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        validate_prefix(prefix)
        for key in [k for k in self._values if k.startswith(prefix)]:
            if self._live(key) is not None:
                yield key
