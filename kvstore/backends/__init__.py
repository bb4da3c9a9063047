"""Byte-store backends, opened from a URL.

=====================================  ==========================================
URL                                    backend
=====================================  ==========================================
``memory://``                          :class:`~kvstore.backends.memory.MemoryStore`
``file:///abs/path`` or a plain path   :class:`~kvstore.backends.local.LocalStore`
``s3://bucket/prefix``                 :class:`~kvstore.backends.fsspec.FsspecStore` (s3fs)
``redis://host:port/db``, ``rediss://`` :class:`~kvstore.backends.redis.RedisStore`
``redis+cluster://host:port``          :class:`~kvstore.backends.redis.RedisClusterStore`
=====================================  ==========================================
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import unquote, urlsplit

from kvstore.backends.base import (
    ByteRequest,
    BytesLike,
    RangeRequest,
    Store,
    SuffixRequest,
    validate_key,
)
from kvstore.backends.retry import RetryPolicy
from kvstore.errors import ConfigError

__all__ = [
    "ByteRequest",
    "BytesLike",
    "RangeRequest",
    "RetryPolicy",
    "Store",
    "SuffixRequest",
    "open_store",
    "validate_key",
]

# scheme -> "module:factory"; a factory takes (url, **storage_options) and returns a Store
_BACKENDS: dict[str, str] = {
    "memory": "kvstore.backends.memory:MemoryStore",
    "file": "kvstore.backends.local:_from_url",
    "s3": "kvstore.backends.fsspec:FsspecStore.from_url",
    "redis": "kvstore.backends.redis:RedisStore.from_url",
    "rediss": "kvstore.backends.redis:RedisStore.from_url",
    "redis+cluster": "kvstore.backends.redis:RedisClusterStore.from_url",
    "rediss+cluster": "kvstore.backends.redis:RedisClusterStore.from_url",
}


# scheme -> the extra that installs its client library
_EXTRAS = {"s3": "s3", "redis": "redis", "rediss": "redis", "redis+cluster": "redis", "rediss+cluster": "redis"}
_CLIENT_PACKAGES = frozenset({"s3fs", "aiobotocore", "botocore", "aiohttp", "fsspec", "redis", "hiredis"})


def open_store(url: str, **storage_options: Any) -> Store:
    """Open the byte store named by ``url``.

    ``storage_options`` go to the backend (for S3: ``endpoint_url``, ``key``,
    ``secret``, ``client_kwargs``...; for Redis: ``password``, ``ssl_ca_certs``...).
    A string without a scheme is a local directory path.
    """
    if isinstance(url, Store):
        return url
    if not isinstance(url, str) or not url:
        raise ConfigError(f"store URL must be a non-empty string, got {url!r}")
    scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    target = _BACKENDS.get(scheme)
    if target is None:
        raise ConfigError(f"unknown store URL scheme {scheme!r} in {url!r}; known: {sorted(_BACKENDS)}")
    module_name, _, attr = target.partition(":")
    factory: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    if scheme == "memory":
        if storage_options:
            raise ConfigError(f"memory:// takes no options, got {sorted(storage_options)}")
        return factory(url)
    try:
        return factory(url, **storage_options)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in _CLIENT_PACKAGES:
            raise
        raise ConfigError(f"{scheme}:// needs {exc.name}, which is not installed: "
                          f"pip install 'kvstore[{_EXTRAS.get(scheme, 'all')}]'") from exc


def local_path_from_url(url: str) -> str:
    """The directory path of a ``file://`` URL or plain path."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(f"file URLs must be local (file:///path), got {url!r}")
    if not parts.path:
        raise ConfigError(f"file URL has no path: {url!r}")
    return unquote(parts.path)
