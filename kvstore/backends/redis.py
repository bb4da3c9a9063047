"""Stores in Redis and Redis Cluster, on ``redis.asyncio`` (with hiredis).

``redis://host:port/db`` (``rediss://`` for TLS) opens a :class:`RedisStore`
on one server; ``redis+cluster://host:port`` (``rediss+cluster://``) opens a
:class:`RedisClusterStore`, which finds the other nodes itself. Options:

- ``prefix``: a namespace for every key (stored as ``<prefix><key>``; a prefix
  not ending in ``/`` or ``:`` gets a ``/`` so that ``a`` and ``ab`` stay apart);
- ``retry``: a :class:`~kvstore.backends.retry.RetryPolicy` (redis-py's own
  retries are off, so attempts never multiply);
- ``max_connections`` (default 32; per node on a cluster) and ``pool_timeout``
  (seconds a coroutine waits for a free connection; single server only);
- ``password``, ``username``, ``socket_timeout``, ``socket_connect_timeout``,
  ``health_check_interval``, ``client_name`` and the TLS options
  ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``,
  ``ssl_check_hostname``... as redis-py names them.

Semantics: ``put`` is ``SET`` (``PX`` for a TTL, ``NX`` for ``create_only``),
so Redis itself expires values; a byte range is read by a small Lua script
that tells a missing key from an empty value in one atomic step; ``list`` is
``SCAN MATCH`` on the escaped prefix (on every primary of a cluster);
``delete`` is ``UNLINK``. Connection failures, timeouts, unparsable replies,
``LOADING``, ``TRYAGAIN`` and ``CLUSTERDOWN`` raise
:class:`~kvstore.errors.TransientBackendError` and are retried here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from kvstore.backends.base import (
    ByteRequest,
    BytesLike,
    Entry,
    RangeRequest,
    Store,
    check_ttl,
    is_valid_key,
    validate_key,
    validate_prefix,
)
from kvstore.backends.retry import RetryPolicy, with_retries
from kvstore.errors import BackendError, ConfigError, TransientBackendError

T = TypeVar("T")

DEFAULT_MAX_CONNECTIONS = 32
SCAN_COUNT = 1000
# fmt: off
_CONNECTION_OPTIONS = frozenset({
    "password", "username", "credential_provider", "client_name", "protocol",
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "socket_keepalive_options",
    "socket_read_size", "health_check_interval",
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data",
    "ssl_check_hostname", "ssl_min_version", "ssl_ciphers", "ssl_password",
})
# fmt: on
_DEFAULTS = {"socket_timeout": 30.0, "socket_connect_timeout": 5.0}

# KEYS[1]; ARGV: "suffix", length  |  "range", start, end-or-"" -- Python slice semantics.
_RANGE_SCRIPT = """
local n = redis.call('STRLEN', KEYS[1])
if n == 0 and redis.call('EXISTS', KEYS[1]) == 0 then return false end
local start, stop = 0, n
if ARGV[1] == 'suffix' then
  start = math.max(0, n - tonumber(ARGV[2]))
else
  start = tonumber(ARGV[2])
  if ARGV[3] ~= '' then stop = math.min(tonumber(ARGV[3]), n) end
end
if stop <= start then return '' end
return redis.call('GETRANGE', KEYS[1], start, stop - 1)
"""


_IDLETIME_BATCH = 500  # OBJECT IDLETIME commands per pipeline
GET_MANY_BATCH = 256  # reads per get_many pipeline


def _range_args(byte_range: ByteRequest) -> tuple[Any, ...]:
    """The range script's ARGV for ``byte_range``."""
    if isinstance(byte_range, RangeRequest):
        return "range", byte_range.start, "" if byte_range.end is None else byte_range.end
    return "suffix", byte_range.length


class RedisStoreBase(Store):
    """The commands shared by the single-server and the cluster store."""

    #: bounds the commands in flight, where the client's pool would fail rather than wait
    _slots: asyncio.Semaphore | None = None

    def __init__(
        self, client: Any, *, prefix: str = "", retry: RetryPolicy | None = None, url: str
    ) -> None:
        self.client = client
        self.prefix = _normalize_prefix(prefix)
        self.retry = retry or RetryPolicy()
        self.url = url
        self._prefix_bytes = self.prefix.encode()
        self._range_sha: str | None = None

    def _name(self, key: str) -> bytes:
        return self._prefix_bytes + validate_key(key).encode()

    async def _call(self, what: str, key: str, operation: Callable[[], Awaitable[T]]) -> T:
        async def once() -> T:
            try:
                await self._ready()
                async with self._slots or contextlib.nullcontext():
                    return await operation()
            except Exception as exc:
                raise _translate(exc, f"redis {what} {self.prefix}{key} at {self.url}") from exc

        return await with_retries(once, self.retry, f"redis {what} {key}")

    async def _ready(self) -> None:
        """Prepare the client before its first command (nothing to do on one server)."""

    async def _range(self, name: bytes, byte_range: ByteRequest) -> bytes | None:
        from redis.exceptions import NoScriptError

        args = _range_args(byte_range)
        if self._range_sha is None:
            self._range_sha = await self.client.script_load(_RANGE_SCRIPT)
        try:
            return await self.client.evalsha(self._range_sha, 1, name, *args)
        except NoScriptError:  # flushed, restarted, or a node that never saw it
            return await self.client.eval(_RANGE_SCRIPT, 1, name, *args)

    async def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        name = self._name(key)
        if byte_range is None:
            return await self._call("get", key, lambda: self.client.get(name))
        return await self._call("get", key, lambda: self._range(name, byte_range))

    async def get_many(self, requests: Sequence[tuple[str, ByteRequest | None]]) -> list[bytes | None]:
        """One pipeline per :data:`GET_MANY_BATCH` requests (one round trip per node)."""
        named = [(self._name(key), byte_range) for key, byte_range in requests]
        replies: list[bytes | None] = []
        for start in range(0, len(named), GET_MANY_BATCH):
            batch = named[start:start + GET_MANY_BATCH]

            async def read(batch: list[tuple[bytes, ByteRequest | None]] = batch) -> list[Any]:
                async with self.client.pipeline(transaction=False) as pipe:
                    for name, byte_range in batch:
                        if byte_range is None:
                            pipe.get(name)
                        else:  # EVAL, not EVALSHA: a pipeline cannot fall back per command
                            pipe.eval(_RANGE_SCRIPT, 1, name, *_range_args(byte_range))
                    return await pipe.execute()

            first = requests[start][0]
            replies += await self._call("get_many", f"{first} (and {len(batch) - 1} more)", read)
        for (key, _), reply in zip(requests, replies):
            if reply is not None and not isinstance(reply, bytes):
                raise BackendError(f"redis get_many {self.prefix}{key} at {self.url}: unexpected reply {type(reply).__name__}")
        return replies

    async def put(
        self, key: str, value: BytesLike, *, ttl: float | None = None, create_only: bool = False
    ) -> bool:
        name = self._name(key)
        ttl = check_ttl(ttl)
        px = None if ttl is None else max(1, math.ceil(ttl * 1000))
        data = _flat(value)
        written = await self._call(
            "put", key, lambda: self.client.set(name, data, px=px, nx=create_only)
        )
        return bool(written)

    async def keep(self, key: str, ttl: float | None) -> bool:
        name = self._name(key)
        ttl = check_ttl(ttl)
        if ttl is None:  # PERSIST answers 0 both for "no such key" and "had no expiry"
            await self._call("keep", key, lambda: self.client.persist(name))
            return bool(await self._call("keep", key, lambda: self.client.exists(name)))
        px = max(1, math.ceil(ttl * 1000))
        # GT: only a later expiry is set (a key without one keeps none); answers 0 then too
        await self._call("keep", key, lambda: self.client.pexpire(name, px, gt=True))
        return bool(await self._call("keep", key, lambda: self.client.exists(name)))

    async def delete(self, key: str) -> None:
        name = self._name(key)
        await self._call("delete", key, lambda: self.client.execute_command("UNLINK", name))

    async def exists(self, key: str) -> bool:
        name = self._name(key)
        return bool(await self._call("exists", key, lambda: self.client.exists(name)))

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        validate_prefix(prefix)
        pattern = _glob_escape(self._prefix_bytes + prefix.encode()) + b"*"
        start = len(self._prefix_bytes)

        async def scan() -> set[bytes]:  # a full SCAN, retried as a whole; SCAN may repeat keys
            return {name async for name in self.client.scan_iter(match=pattern, count=SCAN_COUNT)}

        for name in await self._call("list", prefix + "*", scan):
            key = name[start:].decode("utf-8", "replace")
            if is_valid_key(key):
                yield key


    # -- housekeeping (kvstore gc): ages from OBJECT IDLETIME; Redis expires keys itself --------
    age_note = "Redis reports no idle time for some keys (an LFU maxmemory-policy?)"
    expiry_note = "Redis removes expired keys itself"

    async def entries(self, prefix: str = "") -> list[Entry]:
        """Ages are ``OBJECT IDLETIME``: time since the last access, never more than the real
        age (so a grace period stays safe); unknown under an LFU eviction policy."""
        keys = [key async for key in self.list(prefix)]
        ages: list[float | None] = []
        for start in range(0, len(keys), _IDLETIME_BATCH):
            batch = keys[start:start + _IDLETIME_BATCH]

            async def idle(batch: list[str] = batch) -> list[Any]:
                async with self.client.pipeline(transaction=False) as pipe:
                    for key in batch:
                        pipe.object("idletime", self._name(key))
                    return await pipe.execute(raise_on_error=False)

            for reply in await self._call("object idletime", batch[0] + "...", idle):
                ages.append(float(reply) if isinstance(reply, int) else None)
        return [Entry(key, age) for key, age in zip(keys, ages)]


class RedisStore(RedisStoreBase):
    """Values are string keys on one Redis server, shared through a blocking connection pool."""

    def __init__(
        self,
        client: Any,
        pool: Any,
        *,
        prefix: str = "",
        retry: RetryPolicy | None = None,
        url: str,
    ) -> None:
        super().__init__(client, prefix=prefix, retry=retry, url=url)
        self.pool = pool

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "",
        retry: RetryPolicy | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_timeout: float | None = 20.0,
        **options: Any,
    ) -> RedisStore:
        """Open ``redis://[user:password@]host:port/db`` or ``rediss://...``."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ConfigError(f"expected redis://host:port/db or rediss://..., got {url!r}")
        if not (parts.path.strip("/") or "0").isdigit():
            raise ConfigError(f"the path of a Redis URL is the database number, got {url!r}")
        kwargs = _connection_options(options, max_connections)
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, timeout=pool_timeout, retry=Retry(NoBackoff(), 0), **kwargs
            )
        except ValueError as exc:  # e.g. a db that is not a number
            raise ConfigError(f"invalid Redis URL {url!r}: {exc}") from exc
        client = aioredis.Redis(connection_pool=pool)
        return cls(client, pool, prefix=prefix, retry=retry, url=_public_url(url))

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.aclose()


class RedisClusterStore(RedisStoreBase):
    """Values are spread over the primaries of a Redis Cluster (no multi-key commands are used).

    redis-py's cluster client raises when a node's pool is exhausted, so at most
    ``max_connections`` commands are in flight at once; the others wait their turn.
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "",
        retry: RetryPolicy | None = None,
        url: str,
        max_connections: int,
    ) -> None:
        super().__init__(client, prefix=prefix, retry=retry, url=url)
        self._slots = asyncio.Semaphore(max_connections)
        self._initialized = False
        self._init_lock = asyncio.Lock()

    async def _ready(self) -> None:
        # Discover the cluster once, before commands run concurrently: redis-py's lazy
        # discovery under concurrent first commands can tear down connections in use.
        if self._initialized:
            return
        async with self._init_lock:
            if not self._initialized:
                await self.client.initialize()
                self._initialized = True

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "",
        retry: RetryPolicy | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        **options: Any,
    ) -> RedisClusterStore:
        """Open ``redis+cluster://[user:password@]host:port`` or ``rediss+cluster://...``."""
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        parts = urlsplit(url)
        scheme = {"redis+cluster": "redis", "rediss+cluster": "rediss"}.get(parts.scheme)
        if scheme is None or not parts.hostname:
            raise ConfigError(f"expected redis+cluster://host:port, got {url!r}")
        if parts.path.strip("/") not in ("", "0"):
            raise ConfigError(f"Redis Cluster has only database 0, got {url!r}")
        node_url = urlunsplit((scheme, parts.netloc, "", parts.query, ""))
        kwargs = _connection_options(options, max_connections)
        client = RedisCluster.from_url(node_url, retry=Retry(NoBackoff(), 0), **kwargs)
        return cls(
            client,
            prefix=prefix,
            retry=retry,
            url=_public_url(url),
            max_connections=max_connections,
        )

    async def close(self) -> None:
        await self.client.aclose()


# -- module helpers ----------------------------------------------------------------


def _connection_options(options: dict[str, Any], max_connections: int) -> dict[str, Any]:
    unknown = set(options) - _CONNECTION_OPTIONS
    if unknown:
        raise ConfigError(
            f"unknown options for a Redis store: {sorted(unknown)}; "
            f"known: prefix, retry, max_connections, pool_timeout, {', '.join(sorted(_CONNECTION_OPTIONS))}"
        )
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ConfigError(f"max_connections must be a positive int, got {max_connections!r}")
    return {**_DEFAULTS, **options, "max_connections": max_connections}


def _normalize_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise ConfigError(f"prefix must be a string, got {prefix!r}")
    if prefix and not prefix.endswith(("/", ":")):
        prefix += "/"
    return prefix


def _public_url(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _flat(value: BytesLike) -> BytesLike:
    """A byte-addressed view of ``value`` without copying it when possible.

    redis-py sends bytes, bytearray and memoryview as they are, but takes a
    memoryview's ``len()``, which counts items, not bytes.
    """
    if isinstance(value, memoryview) and (
        value.ndim != 1 or value.itemsize != 1 or value.format != "B"
    ):
        return value.cast("B") if value.c_contiguous else value.tobytes()
    return value


_GLOB = re.compile(rb"([*?\[\]\\])")


def _glob_escape(pattern: bytes) -> bytes:
    return _GLOB.sub(rb"\\\1", pattern)


def _translate(exc: BaseException, where: str) -> BaseException:
    """Map a redis-py error to :class:`TransientBackendError` or :class:`BackendError`."""
    from redis import exceptions as rx

    if isinstance(exc, BackendError | ConfigError):
        return exc
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return BackendError(f"{where}: authentication failed: {exc}")
    transient = (
        rx.ConnectionError,  # includes BusyLoadingError (LOADING) and MaxConnectionsError
        rx.TimeoutError,
        rx.InvalidResponse,  # a reply damaged on the way; redis-py drops that connection
        rx.TryAgainError,
        rx.ClusterDownError,  # includes MasterDownError
        rx.ReadOnlyError,  # a failover demoted the node we wrote to
        rx.SlotNotCoveredError,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, transient) or (
        isinstance(exc, rx.RedisClusterException) and "connect" in str(exc).lower()
    ):
        return TransientBackendError(f"{where}: {type(exc).__name__}: {exc} (transient)")
    return BackendError(f"{where} failed: {type(exc).__name__}: {exc}")
