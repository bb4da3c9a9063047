"""The byte-store interface every backend implements.

A store maps string keys to immutable byte values. It knows nothing of tensors:
the format layer above it decides what the bytes mean. Modelled on zarr-python
v3's ``Store``: async methods, byte ranges as small frozen dataclasses, and a
missing key reads as ``None`` rather than raising.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeAlias

from kvstore.errors import ConfigError, InvalidKeyError

BytesLike: TypeAlias = bytes | bytearray | memoryview

MAX_KEY_LENGTH = 1024
GET_MANY_CONCURRENCY = 32  # reads in flight in the default Store.get_many
_SEGMENT = re.compile(r"[A-Za-z0-9._=+-]+", re.ASCII)


@dataclass(frozen=True, slots=True)
class RangeRequest:
    """Bytes ``[start, end)`` of a value; ``end=None`` reads to the end."""

    start: int
    end: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.start, int) or self.start < 0:
            raise ConfigError(f"range start must be a non-negative int, got {self.start!r}")
        if self.end is not None and (not isinstance(self.end, int) or self.end < self.start):
            raise ConfigError(f"range end must be an int >= start, got {self.end!r}")


@dataclass(frozen=True, slots=True)
class SuffixRequest:
    """The last ``length`` bytes of a value (the whole value if it is shorter)."""

    length: int

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 0:
            raise ConfigError(f"suffix length must be a non-negative int, got {self.length!r}")


ByteRequest: TypeAlias = RangeRequest | SuffixRequest


def slice_bounds(request: ByteRequest | None, size: int) -> tuple[int, int]:
    """Resolve ``request`` against a value of ``size`` bytes to ``(start, stop)``.

    Ranges past the end are clipped, as HTTP range requests are.
    """
    if request is None:
        return 0, size
    if isinstance(request, SuffixRequest):
        return max(0, size - request.length), size
    start = min(request.start, size)
    stop = size if request.end is None else min(request.end, size)
    return start, stop


def validate_key(key: str) -> str:
    """Check that ``key`` is ``segment/segment/...`` of safe characters.

    Rejects empty segments and segments that start with ``.`` (so ``.``, ``..``
    and the names a backend keeps for itself, such as the local store's
    ``.ttl`` directory and ``.<name>.tmp-*`` files) so that no key can escape the
    store's root or prefix or alias a backend's bookkeeping on any backend, and
    glob characters so that listing by prefix on Redis cannot match keys outside
    the prefix.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"key must be a non-empty string, got {key!r}"[:200])
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"key longer than {MAX_KEY_LENGTH} characters")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment.startswith("."):
            raise InvalidKeyError(
                f"invalid key {key!r}: segments must be non-empty, not start with '.', "
                "and use only letters, digits and . _ = + -"
            )
    return key


def is_valid_key(key: str) -> bool:
    """Whether ``key`` passes :func:`validate_key` (for filtering listings of foreign objects)."""
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


def validate_prefix(prefix: str) -> str:
    """Check a listing prefix: empty, or a valid key optionally ending in ``/``."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


MAX_TTL = 100 * 365.25 * 86400  # a century: beyond it, no backend's expiry arithmetic is safe


def check_ttl(ttl: float | None) -> float | None:
    """Validate a time-to-live in seconds (``None`` means no expiry)."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
        raise ConfigError(f"ttl must be a positive, finite number of seconds (at most {MAX_TTL:.0f}), got {ttl!r}")
    return float(ttl)


@dataclass(frozen=True, slots=True)
class Entry:
    """A live object and its age in seconds (``None``: the backend cannot tell)."""

    key: str
    age: float | None


class Store(ABC):
    """An async key -> bytes store.

    Contract (checked by :class:`kvstore.testing.StoreTests` on every backend):

    - ``get`` of a missing or expired key returns ``None``;
    - ``put`` replaces a value atomically: readers see the old or the new value,
      never a mix; with ``create_only=True`` it writes only if the key is absent
      and returns whether it wrote;
    - transient failures are retried with capped backoff inside the backend;
      anything else raises a :class:`kvstore.errors.KVStoreError` subclass.
    """

    #: the URL the store was opened from (credentials removed)
    url: str

    @abstractmethod
    async def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """Return the value at ``key`` (or the requested byte range), or ``None``."""

    async def get_many(self, requests: Sequence[tuple[str, ByteRequest | None]]) -> list[bytes | None]:
        """``get`` of each ``(key, byte_range)``, in order (``None`` for a missing key). A backend
        that can send them in one round trip does (Redis: a pipeline); by default they are
        read concurrently, at most :data:`GET_MANY_CONCURRENCY` at a time."""
        slots = asyncio.Semaphore(GET_MANY_CONCURRENCY)

        async def one(key: str, byte_range: ByteRequest | None) -> bytes | None:
            async with slots:
                return await self.get(key, byte_range)

        return list(await asyncio.gather(*(one(key, byte_range) for key, byte_range in requests)))

    @abstractmethod
    async def put(
        self,
        key: str,
        value: BytesLike,
        *,
        ttl: float | None = None,
        create_only: bool = False,
    ) -> bool:
        """Store ``value`` at ``key``; expire it after ``ttl`` seconds if given.

        Returns ``True`` when written, ``False`` when ``create_only`` found the
        key already present (nothing is changed then).
        """

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether ``key`` holds a live (unexpired) value."""

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[str]:
        """Yield every live key starting with ``prefix``, in no particular order."""

    @abstractmethod
    async def keep(self, key: str, ttl: float | None) -> bool:
        """Make the value at ``key`` live at least ``ttl`` more seconds (``None``: no expiry),
        never shortening its life; returns whether the key holds a value.

        For values shared by several writers (content-addressed objects): each writer's
        lifetime must hold, whoever wrote first. Every backend implements it: its expiry
        is its own."""

    async def close(self) -> None:
        """Release connections and other resources; the store is unusable after."""

    # -- housekeeping: what ``kvstore gc`` asks of a backend. The defaults describe a backend
    # that records no write times and collects no expired objects; a backend that can do
    # more overrides them, in its own terms and without side effects on reads.

    @property
    def age_note(self) -> str:
        """Why :meth:`entries` may report no ages here (``""``: it reports them)."""
        return f"{type(self).__name__} does not record when objects were written"

    @property
    def expiry_note(self) -> str:
        """How this backend collects expired objects (``""``: :meth:`expired_keys` finds them)."""
        return f"{type(self).__name__}: no expiry collection"

    async def entries(self, prefix: str = "") -> list[Entry]:
        """Every live key starting with ``prefix``, with its age where the backend can tell it
        (ages never exceed the real age, so a grace period measured on them stays safe)."""
        return [Entry(key, None) async for key in self.list(prefix)]

    async def expired_keys(self) -> list[str]:
        """Objects whose lifetime has passed but which still take space."""
        return []

    async def remove_expired(self, keys: list[str]) -> int:
        """Remove those of ``keys`` that are still expired (re-checked); returns how many went."""
        return 0

    async def stale_temp_files(self, grace: float) -> list[str]:
        """Left-over partial writes older than ``grace`` seconds (paths, for a report)."""
        return []

    async def remove_temp_file(self, path: str) -> None:
        """Remove one of :meth:`stale_temp_files`; raises :class:`~kvstore.errors.BackendError` on failure."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
