"""A store in an S3 bucket (or any S3-compatible server), through s3fs.

``s3://bucket/prefix`` opens one; keys live at ``bucket/prefix/<key>``, so a
plain s3fs or boto3 client sees every value at the path it expects. Storage
options go to ``s3fs.S3FileSystem`` (``endpoint_url``, ``key``, ``secret``,
``client_kwargs``, ``config_kwargs``; MinIO wants
``config_kwargs={"s3": {"addressing_style": "path"}}``), plus ``retry``.

Reads call ``get_object`` on s3fs's aiobotocore client directly: one request
returns the body with the object's metadata (s3fs's own ``cat`` adds a HEAD).
Byte ranges are ranged GETs. ``create_only`` is an S3 conditional write
(``If-None-Match: *``): the server, not the client, picks the one winner.

**TTL.** S3 has no per-object expiry. A TTL is recorded in the object's user
metadata (``x-amz-meta-kvstore-expires-at``, epoch seconds); expired objects
read as absent. Listing cannot see metadata, so a put with a TTL first writes
an empty *hint* object ``<prefix>/~ttl/<key>@<expiry ms>`` (never a valid key);
``list`` asks S3 only about keys with a hint already past its time. Nothing
deletes expired objects by itself: :meth:`FsspecStore.gc` (``kvstore gc``)
removes them and their hints, and a bucket lifecycle rule ("expire objects N
days after creation", N >= the longest TTL used) is the server-side backstop.

**Errors and retries.** A missing key reads as ``None``; throttling, 5xx and
connection failures raise :class:`~kvstore.errors.TransientBackendError` and
are retried here with capped backoff. s3fs and botocore retries are turned
off unless the caller configures them (``config_kwargs={"retries": ...}``),
so the attempts never multiply beyond ``retry.attempts`` x botocore's (aiohttp
still resends an idempotent request once when the server drops the connection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kvstore.backends.base import (
    ByteRequest,
    BytesLike,
    Entry,
    RangeRequest,
    Store,
    SuffixRequest,
    check_ttl,
    is_valid_key,
    validate_key,
    validate_prefix,
)
from kvstore.backends.retry import RetryPolicy, with_retries
from kvstore.errors import (
    BackendError,
    ConfigError,
    InvalidKeyError,
    TransientBackendError,
)

T = TypeVar("T")

EXPIRES_META = "kvstore-expires-at"
HINT_DIR = "~ttl/"
_HINT_MARK = "@"
_HEAD_CONCURRENCY = 16
# fmt: off
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "OperationAborted", "ConditionalRequestConflict",
    "RequestLimitExceeded", "TooManyRequestsException", "500", "502", "503", "504",
})
# fmt: on


class FsspecStore(Store):
    """Values are objects under ``bucket/prefix`` of an S3 API, read and written with s3fs."""

    def __init__(
        self,
        fs: Any,
        bucket: str,
        prefix: str = "",
        *,
        retry: RetryPolicy | None = None,
        url: str | None = None,
    ) -> None:
        self.fs = fs
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.retry = retry or RetryPolicy()
        self.url = url or f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._bucket_checked = False

    @classmethod
    def from_url(
        cls, url: str, *, retry: RetryPolicy | None = None, **storage_options: Any
    ) -> FsspecStore:
        """Open ``s3://bucket[/prefix]``; ``storage_options`` go to ``s3fs.S3FileSystem``."""
        import s3fs

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"expected s3://bucket[/prefix], got {url!r}")
        if "@" in parts.netloc or parts.query or parts.fragment:
            raise ConfigError(
                f"put credentials and options in storage_options, not the URL: {url!r}"
            )
        prefix = parts.path.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidKeyError as exc:
                raise ConfigError(f"invalid prefix in {url!r}: {exc}") from exc
        for reserved in ("asynchronous", "loop"):
            storage_options.pop(reserved, None)
        config = dict(storage_options.pop("config_kwargs", None) or {})
        config.setdefault("retries", {"total_max_attempts": 1})  # we retry, at one layer
        config.setdefault("max_pool_connections", 32)
        storage_options.setdefault("skip_instance_cache", True)
        try:
            fs = s3fs.S3FileSystem(asynchronous=True, config_kwargs=config, **storage_options)
        except TypeError as exc:
            raise ConfigError(f"bad storage options for {url!r}: {exc}") from None
        fs.retries = 1  # s3fs's own retry loop: off
        return cls(
            fs, parts.netloc, prefix, retry=retry, url=f"s3://{parts.netloc}/{prefix}".rstrip("/")
        )

    # -- helpers -----------------------------------------------------------------
    def _path(self, key: str) -> str:
        return self._root + validate_key(key)

    async def _client(self) -> Any:
        return await self.fs.set_session()

    async def _call(self, what: str, key: str, operation: Callable[[], Awaitable[T]]) -> T:
        async def once() -> T:
            try:
                return await operation()
            except Exception as exc:
                raise self._translate(exc, what, key) from exc

        return await with_retries(once, self.retry, f"s3 {what} {key}")

    def _translate(self, exc: BaseException, what: str, key: str) -> BaseException:
        if isinstance(exc, BackendError | ConfigError):
            return exc
        where = f"s3://{self.bucket}/{self._root}{key}"
        client_error = _client_error(exc)
        if client_error is not None:
            error = client_error.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = error.get("Message") or str(client_error)
            if code == "NoSuchBucket":
                return BackendError(
                    f"S3 bucket {self.bucket!r} does not exist at {self._endpoint()} ({what} {where})"
                )
            if code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
                return TransientBackendError(f"S3 {what} {where}: {code} {message} (transient)")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return BackendError(f"S3 {what} {where}: permission denied ({code}: {message})")
            return BackendError(f"S3 {what} {where} failed: {code} {message}")
        if _is_transient(exc):
            return TransientBackendError(
                f"S3 {what} {where}: {type(exc).__name__}: {exc} (transient)"
            )
        return BackendError(f"S3 {what} {where} failed: {type(exc).__name__}: {exc}")

    def _endpoint(self) -> str:
        return str(self.fs.endpoint_url or self.fs.client_kwargs.get("endpoint_url") or "AWS S3")

    async def _check_bucket(self) -> None:
        """After a bare 404 (HEAD has no error body), tell a missing bucket from a missing key."""
        if self._bucket_checked:
            return
        client = await self._client()
        try:
            await client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchBucket"):
                raise BackendError(
                    f"S3 bucket {self.bucket!r} does not exist at {self._endpoint()}"
                ) from exc
            raise
        self._bucket_checked = True

    async def _head(self, key: str) -> dict[str, Any] | None:
        """The object's HEAD response, or ``None`` if it is absent."""
        client = await self._client()
        try:
            return await client.head_object(Bucket=self.bucket, Key=self._path(key))
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey"):
                await self._check_bucket()
                return None
            raise

    async def _live_head(self, key: str) -> dict[str, Any] | None:
        head = await self._head(key)
        return None if head is None or head_expired(head) else head

    # -- the async interface -----------------------------------------------------
    async def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        path = self._path(key)
        header = _range_header(byte_range)
        if header == "":  # an empty range: only existence matters
            exists = await self.exists(key)
            return b"" if exists else None

        async def once() -> bytes | None:
            client = await self._client()
            extra = {"Range": header} if header else {}
            try:
                response = await client.get_object(Bucket=self.bucket, Key=path, **extra)
            except Exception as exc:
                code = _error_code(exc)
                if code in ("NoSuchKey", "404"):
                    return None
                if code == "InvalidRange":  # the range starts at or past the end
                    return b"" if await self._live_head(key) is not None else None
                raise
            body = response["Body"]
            try:
                if head_expired(response):
                    return None
                return await body.read()
            finally:
                body.close()

        return await self._call("get", key, once)

    async def put(
        self, key: str, value: BytesLike, *, ttl: float | None = None, create_only: bool = False
    ) -> bool:
        path = self._path(key)
        ttl = check_ttl(ttl)
        data = value if isinstance(value, bytes | bytearray) else bytes(value)
        extra: dict[str, Any] = {}
        if ttl is not None:
            expires_at = time.time() + ttl
            extra["Metadata"] = {EXPIRES_META: f"{expires_at:.3f}"}
            hint = f"{self._root}{HINT_DIR}{key}{_HINT_MARK}{int(expires_at * 1000)}"
            await self._call("put", key, lambda: self.fs._pipe_file(f"{self.bucket}/{hint}", b""))

        async def once() -> bool:
            mode = "create" if create_only else "overwrite"
            try:
                await self.fs._pipe_file(f"{self.bucket}/{path}", data, mode=mode, **extra)
            except FileExistsError:  # s3fs's translation of 412 If-None-Match
                return False
            except Exception as exc:
                if create_only and _error_code(exc) in ("PreconditionFailed", "412"):
                    return False
                raise
            return True

        written = await self._call("put", key, once)
        if not written and create_only:
            # the object that won may have expired: S3 still holds it, so remove it and retry once
            head = await self._call("put", key, lambda: self._head(key))
            if head is not None and head_expired(head):
                await self._call("put", key, lambda: self._delete_if_unchanged(key, head))
                written = await self._call("put", key, once)
        return written

    async def _delete_if_unchanged(self, key: str, head: dict[str, Any]) -> bool:
        """Delete an expired object unless it was replaced since ``head`` was read."""
        client = await self._client()
        try:
            await client.delete_object(
                Bucket=self.bucket, Key=self._path(key), IfMatch=head["ETag"]
            )
            return True
        except Exception as exc:
            code = _error_code(exc)
            if code in ("PreconditionFailed", "NoSuchKey", "404", "412"):
                return False
            if code in ("NotImplemented", "InvalidArgument"):  # no conditional deletes here
                current = await self._head(key)
                if current is not None and current.get("ETag") == head.get("ETag"):
                    await client.delete_object(Bucket=self.bucket, Key=self._path(key))
                    return True
                return False
            raise

    async def keep(self, key: str, ttl: float | None) -> bool:
        ttl = check_ttl(ttl)
        head = await self._call("keep", key, lambda: self._live_head(key))
        if head is None:
            return False
        raw = (head.get("Metadata") or {}).get(EXPIRES_META)
        try:
            expires_at = None if raw is None else float(raw)
        except ValueError:
            expires_at = 0.0
        if expires_at is None or (ttl is not None and time.time() + ttl <= expires_at):
            return True  # already lives long enough
        value = await self.get(key)  # S3 changes metadata only by rewriting: the same bytes, a later expiry
        if value is None:
            return False
        await self.put(key, value, ttl=ttl)
        return True

    async def delete(self, key: str) -> None:
        path = self._path(key)

        async def once() -> None:
            client = await self._client()
            await client.delete_object(Bucket=self.bucket, Key=path)

        await self._call("delete", key, once)

    async def exists(self, key: str) -> bool:
        validate_key(key)
        return await self._call("exists", key, lambda: self._live_head(key)) is not None

    async def _list_paths(self, prefix: str) -> AsyncIterator[str]:
        """Object keys (full S3 keys) starting with ``prefix``, a page at a time."""
        client = await self._client()
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        where = prefix[len(self._root) :] + "*"
        while True:
            page = await self._call("list", where, lambda: client.list_objects_v2(**request))
            for item in page.get("Contents", ()):
                yield item["Key"]
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    async def _hints(self, prefix: str) -> dict[str, list[int]]:
        """Keys starting with ``prefix`` that were given a TTL -> their hinted expiries (ms)."""
        hints: dict[str, list[int]] = {}
        start = len(self._root) + len(HINT_DIR)
        async for path in self._list_paths(f"{self._root}{HINT_DIR}{prefix}"):
            key, mark, expires_ms = path[start:].rpartition(_HINT_MARK)
            if mark and expires_ms.isdigit():
                hints.setdefault(key, []).append(int(expires_ms))
        return hints

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        validate_prefix(prefix)
        hints = await self._hints(prefix)
        now_ms = time.time() * 1000
        suspect: list[str] = []
        async for path in self._list_paths(self._root + prefix):
            key = path[len(self._root) :]
            if not is_valid_key(key):
                continue  # TTL hints, foreign objects, "directory" markers
            if any(expires <= now_ms for expires in hints.get(key, ())):
                suspect.append(key)  # a hinted expiry has passed: ask S3 whether it still lives
            else:
                yield key
        semaphore = asyncio.Semaphore(_HEAD_CONCURRENCY)

        async def live(key: str) -> bool:
            async with semaphore:
                return await self.exists(key)

        for key, alive in zip(suspect, await asyncio.gather(*map(live, suspect))):
            if alive:
                yield key

    async def gc(self) -> int:
        """Delete expired objects and stale TTL hints; return how many objects were deleted.

        An object replaced since it was found expired is kept (conditional delete).
        """
        client = await self._client()
        now_ms = time.time() * 1000
        removed = 0
        start = len(self._root) + len(HINT_DIR)
        stale = [
            p
            async for p in self._list_paths(self._root + HINT_DIR)
            if _hint_expired(p[start:], now_ms)
        ]
        semaphore = asyncio.Semaphore(_HEAD_CONCURRENCY)

        async def collect(hint_path: str) -> None:
            nonlocal removed
            key = hint_path[start:].rpartition(_HINT_MARK)[0]
            async with semaphore:
                head = await self._call("gc", key, lambda: self._head(key))
                if head is not None and head_expired(head):
                    removed += await self._call(
                        "gc", key, lambda: self._delete_if_unchanged(key, head)
                    )
                await self._call(
                    "gc", key, lambda: client.delete_object(Bucket=self.bucket, Key=hint_path)
                )

        await asyncio.gather(*map(collect, stale))
        return removed

    # -- housekeeping (kvstore gc): ages from LastModified, expiry from TTL hints --------------
    age_note = ""
    expiry_note = ""

    async def entries(self, prefix: str = "") -> list[Entry]:
        validate_prefix(prefix)
        client = await self._client()
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._root + prefix}
        now = time.time()
        found: dict[str, float] = {}
        while True:
            page = await self._call("list", prefix + "*", lambda: client.list_objects_v2(**request))
            for item in page.get("Contents", ()):
                key = item["Key"][len(self._root):]
                if is_valid_key(key):
                    found[key] = max(0.0, now - item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                break
            request["ContinuationToken"] = page["NextContinuationToken"]
        expired = set(await self._expired_under(prefix))
        return [Entry(key, age) for key, age in found.items() if key not in expired]

    async def _expired_under(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` whose TTL hint has passed and whose object S3 still holds, expired."""
        now_ms = time.time() * 1000
        suspects = [key for key, stamps in (await self._hints(prefix)).items() if any(s <= now_ms for s in stamps)]
        semaphore = asyncio.Semaphore(_HEAD_CONCURRENCY)

        async def expired(key: str) -> bool:
            async with semaphore:
                head = await self._call("head", key, lambda: self._head(key))
            return head is not None and head_expired(head)

        return [key for key, gone in zip(suspects, await asyncio.gather(*map(expired, suspects))) if gone]

    async def expired_keys(self) -> list[str]:
        return await self._expired_under("")

    async def remove_expired(self, keys: list[str]) -> int:
        return await self.gc()  # every expired object and stale hint (conditional deletes)

    async def close(self) -> None:
        creator = getattr(self.fs, "_s3creator", None)
        if getattr(self.fs, "_s3", None) is not None and creator is not None:
            await creator.__aexit__(None, None, None)
            self.fs._s3 = None


# -- module helpers ----------------------------------------------------------------


def _range_header(request: ByteRequest | None) -> str | None:
    """The HTTP Range header for ``request``: ``None`` for the whole value, ``""`` for no bytes."""
    if request is None:
        return None
    if isinstance(request, SuffixRequest):
        return f"bytes=-{request.length}" if request.length else ""
    assert isinstance(request, RangeRequest)
    if request.end is None:
        return f"bytes={request.start}-"
    if request.end <= request.start:
        return ""
    return f"bytes={request.start}-{request.end - 1}"


def head_expired(response: dict[str, Any]) -> bool:
    """Whether an object's HEAD response carries a lifetime that has passed."""
    value = (response.get("Metadata") or {}).get(EXPIRES_META)
    if value is None:
        return False
    try:
        return time.time() >= float(value)
    except ValueError:
        return False  # unreadable: keep the value rather than lose it


def _hint_expired(name: str, now_ms: float) -> bool:
    _, mark, expires_ms = name.rpartition(_HINT_MARK)
    return bool(mark) and expires_ms.isdigit() and int(expires_ms) <= now_ms


def _client_error(exc: BaseException) -> Any:
    """The botocore ``ClientError`` behind ``exc`` (s3fs raises it as an OSError's cause)."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return exc
    return exc.__cause__ if isinstance(exc.__cause__, ClientError) else None


def _error_code(exc: BaseException) -> str:
    """The S3 error code (``NoSuchKey``, ``404``...) of ``exc``, or ``""``."""
    error = _client_error(exc)
    return "" if error is None else str(error.response.get("Error", {}).get("Code", ""))


def _is_transient(exc: BaseException) -> bool:
    import aiohttp
    from botocore import exceptions as bx
    from botocore.parsers import ResponseParserError

    transient = (
        bx.ConnectionError,
        bx.HTTPClientError,
        bx.IncompleteReadError,
        # a body that fails the checksum S3 sent with it was damaged on the way: read it again
        getattr(bx, "FlexibleChecksumError", bx.IncompleteReadError),
        ResponseParserError,
        aiohttp.ClientError,
        ConnectionError,
        TimeoutError,
    )
    return isinstance(exc, transient) or isinstance(exc.__cause__, transient)
