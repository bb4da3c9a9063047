"""A store in a local directory: one file per key, written atomically.

Writes go to a temporary file in the target directory and are then renamed
into place (``os.replace``), or hard-linked for ``create_only`` (``os.link``
fails if the key exists), so a reader never sees a partial value. A TTL is
kept in a small sidecar file under ``<root>/.ttl/``; expired values read as
absent and are removed lazily or by ``kvstore gc``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from kvstore.backends.base import (
    ByteRequest,
    BytesLike,
    Entry,
    Store,
    check_ttl,
    is_valid_key,
    slice_bounds,
    validate_key,
    validate_prefix,
)
from kvstore.errors import BackendError, ConfigError, InvalidKeyError

TTL_DIR = ".ttl"
INLINE_READ_BYTES = 4 << 20  # values up to this size are read on the event loop's thread
TMP_MARK = ".tmp-"  # in the names of files being written (``.<name>.tmp-<hex>``), never keys
#: longest key segment: a file name, and its temporary ``.<name>.tmp-<32 hex>`` twin, must fit 255 bytes
MAX_NAME_LENGTH = 255 - 1 - len(TMP_MARK) - 32


class LocalStore(Store):
    """Keys map to files under ``root``; ``file:///abs/path`` opens one.

    ``fsync=True`` flushes each value to disk before it becomes visible (slower;
    off by default because a lost cache entry is recomputed, never misread).
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create store directory {self.root}: {exc}") from exc
        if not self.root.is_dir():
            raise ConfigError(f"{self.root} is not a directory")

    def _path(self, key: str) -> Path:
        """The file of ``key``. :func:`validate_key` keeps it under ``root`` and away from the
        store's own ``.ttl`` directory and temporary files (their names start with ``.``)."""
        validate_key(key)
        if any(len(segment) > MAX_NAME_LENGTH for segment in key.split("/")):
            raise InvalidKeyError(f"key {key!r}: a local store's key segments are at most {MAX_NAME_LENGTH} characters")
        return self.root / key

    def _ttl_path(self, key: str) -> Path:
        return self.root / TTL_DIR / key

    # -- blocking helpers, run in a worker thread ---------------------------------
    def _expired(self, key: str) -> bool:
        try:
            expires_at = float(self._ttl_path(key).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return False
        except (OSError, ValueError):
            return False  # unreadable sidecar: keep the value rather than lose it
        if time.time() < expires_at:
            return False
        self._remove(key)
        return True

    def _remove(self, key: str) -> None:
        for path in (self._path(key), self._ttl_path(key)):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass

    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if self._expired(key):
                    return None
                if byte_range is None:
                    return f.read()
                size = os.fstat(f.fileno()).st_size
                start, stop = slice_bounds(byte_range, size)
                f.seek(start)
                return f.read(stop - start)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _write_temp(self, path: Path, value: BytesLike) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(value)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        return tmp

    def _write(self, key: str, value: BytesLike, ttl: float | None, create_only: bool) -> bool:
        path = self._path(key)
        if create_only and path.exists() and not self._expired(key):
            return False
        tmp = self._write_temp(path, value)
        try:
            if create_only:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    if not self._expired(key):
                        return False
                    os.link(tmp, path)  # the old value just expired and was removed
            else:
                os.replace(tmp, path)
                tmp = None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        ttl_path = self._ttl_path(key)
        if ttl is None:
            ttl_path.unlink(missing_ok=True)
        else:
            ttl_tmp = self._write_temp(ttl_path, repr(time.time() + ttl).encode())
            os.replace(ttl_tmp, ttl_path)
        return True

    def _keep(self, key: str, ttl: float | None) -> bool:
        path = self._path(key)
        if not path.is_file() or self._expired(key):
            return False
        try:
            os.utime(path)  # in use again: its age (gc's grace period) counts from now
        except FileNotFoundError:
            return False
        ttl_path = self._ttl_path(key)
        try:
            expires_at = float(ttl_path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return True  # no expiry: nothing to extend
        except (OSError, ValueError):
            expires_at = 0.0
        if ttl is None:
            ttl_path.unlink(missing_ok=True)
        elif time.time() + ttl > expires_at:
            ttl_tmp = self._write_temp(ttl_path, repr(time.time() + ttl).encode())
            os.replace(ttl_tmp, ttl_path)
        return True

    def _list(self, prefix: str) -> list[str]:
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir
            # no key has a segment starting with ".": skip the .ttl directory, temporary
            # files and anything else that is not a key (foreign files, editor droppings)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                key = key.replace(os.sep, "/")
                if key.startswith(prefix) and is_valid_key(key) and not self._expired(key):
                    keys.append(key)
        return keys

    # -- the async interface -----------------------------------------------------
    async def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        path = self._path(key)  # validates
        try:
            small = path.stat().st_size <= INLINE_READ_BYTES
        except OSError:
            small = True  # absent (or unreadable): _read answers at once
        if small:
            # a page-cache read of a few MiB takes less than the hop to a worker thread
            try:
                return self._read(key, byte_range)
            except OSError as exc:
                raise BackendError(f"local store I/O failed: {exc}") from exc
        return await self._io(self._read, key, byte_range)

    async def put(
        self, key: str, value: BytesLike, *, ttl: float | None = None, create_only: bool = False
    ) -> bool:
        self._path(key)  # validates
        return await self._io(self._write, key, value, check_ttl(ttl), create_only)

    async def keep(self, key: str, ttl: float | None) -> bool:
        validate_key(key)
        return await self._io(self._keep, key, check_ttl(ttl))

    async def delete(self, key: str) -> None:
        self._path(key)  # validates
        await self._io(self._remove, key)

    async def exists(self, key: str) -> bool:
        self._path(key)  # validates
        return await self._io(lambda: self._path(key).is_file() and not self._expired(key))

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        validate_prefix(prefix)
        for key in await self._io(self._list, prefix):
            yield key

    # -- housekeeping (kvstore gc): ages from mtimes, TTL sidecars, temporary files ----------
    age_note = ""
    expiry_note = ""

    def _expiry(self, key: str) -> float | None:
        try:
            return float(self._ttl_path(key).read_text())
        except (OSError, ValueError):
            return None

    def _entries(self, prefix: str) -> list[Entry]:
        """Keys with the seconds since their file's last write (``keep`` touches it), read
        without removing anything."""
        now = time.time()
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            rel_dir = "" if rel_dir == "." else rel_dir
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if not key.startswith(prefix) or not is_valid_key(key):
                    continue
                try:
                    mtime = os.stat(os.path.join(dirpath, name)).st_mtime
                except FileNotFoundError:
                    continue
                expires_at = self._expiry(key)
                if expires_at is None or now < expires_at:
                    found.append(Entry(key, max(0.0, now - mtime)))
        return found

    def _expired_keys(self) -> list[str]:
        """Keys whose TTL sidecar has passed (the value may already be gone)."""
        ttl_root = self.root / TTL_DIR
        now = time.time()
        keys = []
        for dirpath, _, filenames in os.walk(ttl_root):
            for name in filenames:
                if name.startswith(".") and TMP_MARK in name:
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), ttl_root).replace(os.sep, "/")
                expires_at = self._expiry(key)
                if is_valid_key(key) and expires_at is not None and now >= expires_at:
                    keys.append(key)
        return keys

    def _remove_expired(self, keys: list[str]) -> int:
        removed = 0
        for key in keys:
            expires_at = self._expiry(key)  # read again: the key may have been rewritten since
            if expires_at is not None and time.time() >= expires_at:
                self._remove(key)
                removed += 1
        return removed

    def _stale_temp_files(self, grace: float) -> list[str]:
        now = time.time()
        found = []
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(".") and TMP_MARK in name:
                    path = Path(dirpath) / name
                    try:
                        if now - path.stat().st_mtime >= grace:
                            found.append(str(path))
                    except FileNotFoundError:
                        continue
        return found

    def _remove_temp_file(self, path: str) -> None:
        temp = Path(path)
        if not (temp.name.startswith(".") and TMP_MARK in temp.name and temp.is_relative_to(self.root)):
            raise ConfigError(f"{path} is not a temporary file of {self.root}")
        temp.unlink(missing_ok=True)

    async def entries(self, prefix: str = "") -> list[Entry]:
        validate_prefix(prefix)
        return await self._io(self._entries, prefix)

    async def expired_keys(self) -> list[str]:
        return await self._io(self._expired_keys)

    async def remove_expired(self, keys: list[str]) -> int:
        return await self._io(self._remove_expired, keys)

    async def stale_temp_files(self, grace: float) -> list[str]:
        return await self._io(self._stale_temp_files, grace)

    async def remove_temp_file(self, path: str) -> None:
        await self._io(self._remove_temp_file, path)

    @staticmethod
    async def _io(fn, *args):  # type: ignore[no-untyped-def]
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise BackendError(f"local store I/O failed: {exc}") from exc


def _from_url(url: str, **options: bool) -> LocalStore:
    from kvstore.backends import local_path_from_url

    unknown = set(options) - {"fsync"}
    if unknown:
        raise ConfigError(f"unknown options for a local store: {sorted(unknown)}")
    return LocalStore(local_path_from_url(url), **options)
