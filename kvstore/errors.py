"""The project's exception hierarchy.

Every error kvstore raises on purpose derives from :class:`KVStoreError`, so an
application can catch one type. Subclasses also derive from the builtin that
best describes them (``OSError`` for I/O, ``ValueError`` for bad data,
``KeyError`` for absent contexts) so generic handlers keep working.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Root of every error raised by kvstore."""


class ConfigError(KVStoreError, ValueError):
    """A URL, option or argument given by the caller is invalid."""


class InvalidKeyError(ConfigError):
    """A store key is malformed or would escape its prefix."""


class BackendError(KVStoreError, OSError):
    """A byte-store operation failed and was not (or could not be) retried."""


class TransientBackendError(BackendError):
    """A byte-store operation failed in a way that may succeed if retried
    (connection reset, timeout, throttling, server busy)."""


class ConcurrentWriteError(BackendError):
    """A put kept finding the objects its manifest lists replaced or removed by
    concurrent writers (or deletes) and gave up. Readers of that context then get
    :class:`IncompleteContextError` (never wrong KV) until a put completes."""


class FormatError(KVStoreError, ValueError):
    """A stored object is malformed: bad header, sizes or offsets, truncated."""


class ChecksumError(FormatError):
    """A stored object's bytes do not match the checksum recorded when written."""


class ContextNotFoundError(KVStoreError, KeyError):
    """No stored KV covers the requested tokens."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class IncompleteContextError(FormatError):
    """A manifest names a chunk object that is missing or does not match it."""


class MissingObjectError(IncompleteContextError):
    """An object the manifest lists is not in the store (removed since it was written)."""


class CodecError(KVStoreError, ValueError):
    """A codec was misconfigured or given tensors it cannot encode."""


class ClosedStoreError(KVStoreError, RuntimeError):
    """A store was used after :meth:`close`."""


class KVMismatchError(ConfigError):
    """KV whose layer count, heads, head size or length does not fit the model it is given to."""


class ModelNotAvailableError(KVStoreError):
    """The requested model (or what is needed to convert it) is not installed on this machine."""


class SignatureError(ChecksumError):
    """An object of a signed store has no valid MAC under any accepted key: it was forged,
    altered, moved from another key, or written by a writer without the key."""
