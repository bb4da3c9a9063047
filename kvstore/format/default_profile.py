"""The object that holds a model's default codec profile (``<ns>/<fingerprint>/profile``).

A store bound to a model (``KVStore(url, model=...)``) encodes with the profile it
finds here, or calibrates one and writes it here create-only, so every writer of a
model shares one profile. The object is a container naming its model and the
profile's content id, with the profile's bytes as its one buffer; contexts list the
content-addressed copy (``profiles/<id>``) as before, so ``gc`` never needs this one.
"""

from __future__ import annotations

from kvstore.codecs.base import profile_content_id
from kvstore.errors import ChecksumError, FormatError
from kvstore.format import container

KIND = "kv-default-profile"


def default_profile_to_bytes(profile_bytes: bytes, fingerprint: str) -> bytes:
    """The stored object of the model ``fingerprint``'s default profile."""
    meta = {"fingerprint": fingerprint, "profile": profile_content_id(profile_bytes)}
    return container.encode({"profile": profile_bytes}, kind=KIND, meta=meta)


def default_profile_from_bytes(data: bytes | memoryview, fingerprint: str) -> tuple[str, bytes]:
    """The profile's content id and bytes from a stored default-profile object, verified
    (checksums, its model, its content id)."""
    obj = container.decode(data)
    if obj.header.kind != KIND:
        raise FormatError(f"expected a {KIND} object, found {obj.header.kind!r}")
    if obj.header.meta.get("fingerprint") != fingerprint:
        raise FormatError("default profile object belongs to another model")
    profile = bytes(obj.raw("profile"))
    profile_id = obj.header.meta.get("profile")
    if profile_content_id(profile) != profile_id:
        raise ChecksumError("default profile does not match its content id")
    return profile_id, profile
