"""Signed objects: a keyed MAC in front of an object's bytes, bound to the key it is stored at.

Layout of a signed object::

    0   8  magic b"KVSIGN\\x00\\x01"
    8   8  key id: the first 8 bytes of SHA-256(b"kvstore key id\\x00" + key)
    16 32  HMAC-SHA256(key, b"kvstore signed object\\x00" + u16 len(name) + name + payload)
    48  ..  payload: the object as an unsigned store holds it

``name`` is the store key (UTF-8), so an object copied to another key, another
context or another namespace fails its check. HMAC-SHA256 rather than keyed BLAKE2b:
with the SHA extensions of current x86 and ARM CPUs it runs faster through Python's
``hashlib`` (measurements in ``benchmarks/RESULTS.md``). The key id only picks which
accepted key to check
with; it reveals nothing of the key.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.errors import ConfigError, SignatureError

MAGIC = b"KVSIGN\x00\x01"
ENVELOPE = struct.Struct("<8s8s32s")
ENVELOPE_BYTES = ENVELOPE.size  # 48
MIN_KEY_BYTES = 16
_DOMAIN = b"kvstore signed object\x00"

KeyLike = bytes | bytearray | str


def _key_bytes(key: KeyLike) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes | bytearray):
        raise ConfigError(f"a signing key is bytes or a str, got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"a signing key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return bytes(key)


def key_id(key: bytes) -> bytes:
    """The 8-byte id under which signed objects name the key that signed them."""
    return hashlib.sha256(b"kvstore key id\x00" + key).digest()[:8]


def is_signed(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` starts like a signed object."""
    return bytes(memoryview(data)[: len(MAGIC)]) == MAGIC


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """The key a signed store writes with and every key it accepts when reading."""

    current: bytes
    accepted: dict[bytes, bytes]  # key id -> key, the current one included

    @classmethod
    def of(cls, signing_key: KeyLike, accepted_keys: Sequence[KeyLike] = ()) -> SigningKeys:
        """Keys for a store that signs with ``signing_key`` and also accepts objects signed
        with ``accepted_keys`` (earlier keys, during a rotation)."""
        if isinstance(accepted_keys, str | bytes | bytearray):
            raise ConfigError("accepted_keys is a sequence of keys, not one key")
        current = _key_bytes(signing_key)
        keys = [current, *(_key_bytes(k) for k in accepted_keys)]
        return cls(current, {key_id(k): k for k in keys})

    def envelope(self, name: str, payload: bytes | bytearray | memoryview) -> bytes:
        """The 48 bytes that go in front of ``payload`` stored at ``name``."""
        return ENVELOPE.pack(MAGIC, key_id(self.current), _mac(self.current, name, payload))

    def open(self, name: str, data: bytes | bytearray | memoryview) -> memoryview:
        """The payload of the signed object ``data`` read from ``name``, once its MAC checks
        under an accepted key; :class:`SignatureError` otherwise."""
        view = memoryview(data).cast("B")
        if view.nbytes < ENVELOPE_BYTES or not is_signed(view):
            raise SignatureError(f"{name}: not a signed object (written without the store's signing key)")
        _, kid, tag = ENVELOPE.unpack_from(view)
        key = self.accepted.get(kid)
        if key is None:
            raise SignatureError(f"{name}: signed with a key this store does not accept (key id {kid.hex()})")
        payload = view[ENVELOPE_BYTES:]
        if not hmac.compare_digest(tag, _mac(key, name, payload)):
            raise SignatureError(f"{name}: MAC mismatch: the object was altered, forged or moved from another key")
        return payload


def _mac(key: bytes, name: str, payload: bytes | bytearray | memoryview) -> bytes:
    encoded = name.encode()
    mac = hmac.new(key, _DOMAIN + struct.pack("<H", len(encoded)) + encoded, hashlib.sha256)
    mac.update(payload)
    return mac.digest()
