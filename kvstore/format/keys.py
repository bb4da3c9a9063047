"""The key scheme: model fingerprints and prefix-chained chunk hashes.

A context is identified by (model fingerprint, token ids). Its tokens are cut
into chunks of ``chunk_tokens``; chunk *i*'s hash covers the previous chunk's
hash, its length and its token ids, so two contexts that share a prefix share
the keys (and so the stored objects) of that prefix's whole chunks, and no two
different token prefixes can share a key. Keys use BLAKE2b (a cryptographic
hash): a tenant cannot craft tokens that collide with another's chunk.

Layout under a namespace ``ns``::

    ns/<model fingerprint>/chunks/<chunk hash>/<level tag>   one chunk at one level (one layer group)
    ns/<model fingerprint>/chunks/<chunk hash>/<level tag>+<group>   ... of one of several layer groups
    ns/<model fingerprint>/chunks/<chunk hash>/<level tag>[+<group>]=<checksum>   another writer's bytes
    ns/<model fingerprint>/layout                          the model's cache layout
    ns/<model fingerprint>/profile                         the codec profile a bound store uses
    ns/<model fingerprint>/contexts/<context hash>           a context's manifest
    ns/<model fingerprint>/profiles/<profile id>             a codec's per-model profile
    ns/<model fingerprint>/pq/<context hash>/<config tag>/   a context's PQ centroids and codes
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.backends.base import validate_key
from kvstore.errors import ConfigError

HASH_BYTES = 16
MAX_TOKEN_ID = 2**31 - 1
_HEX = re.compile(r"[0-9a-f]{32}")
_VERSION = re.compile(r"[0-9a-f]{16}")


def model_fingerprint(model_id: str) -> str:
    """A fixed-length key segment naming a model (any string identifying weights + tokenizer)."""
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"model_id must be a non-empty string, got {model_id!r}")
    return hashlib.blake2b(model_id.encode(), digest_size=HASH_BYTES, person=b"kvstore-model").hexdigest()


def as_token_array(tokens: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    """Token ids as a 1-D little-endian int32 array, validated."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    try:
        array = np.asarray(tokens)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tokens must be a sequence of ints: {exc}") from None
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise ConfigError(f"tokens must be 1-D (or [1, n]), got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(f"token ids must be integers, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > MAX_TOKEN_ID):
        raise ConfigError("token ids must lie in [0, 2**31)")
    return array.astype("<i4", copy=False)


def chunk_bounds(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk; the last one may be shorter."""
    return [(s, min(s + chunk_tokens, num_tokens)) for s in range(0, num_tokens, chunk_tokens)]


def chunk_hashes(fingerprint: str, tokens: np.ndarray, chunk_tokens: int) -> list[str]:
    """The chained hash of every chunk of ``tokens`` (hex strings)."""
    previous = bytes.fromhex(fingerprint)
    hashes = []
    for start, stop in chunk_bounds(len(tokens), chunk_tokens):
        h = hashlib.blake2b(previous, digest_size=HASH_BYTES, person=b"kvstore-chunk")
        h.update((stop - start).to_bytes(8, "little"))
        h.update(tokens[start:stop].tobytes())
        previous = h.digest()
        hashes.append(h.hexdigest())
    return hashes


def is_hash(text: object) -> bool:
    """Whether ``text`` looks like a fingerprint or chunk hash."""
    return isinstance(text, str) and _HEX.fullmatch(text) is not None


#: how many deletes of contexts with the same first chunk may run at once (one lease slot each)
LEASE_SLOTS = 4


@dataclass(frozen=True, slots=True)
class KeyScheme:
    """Where a namespace's objects live on a byte store."""

    namespace: str = "kvstore"

    def __post_init__(self) -> None:
        validate_key(self.namespace)

    def model_prefix(self, fingerprint: str) -> str:
        return f"{self.namespace}/{fingerprint}/"

    def chunk_key(self, fingerprint: str, chunk_hash: str, level_tag: str, group: str = "") -> str:
        """One chunk's object at one level, of layer ``group`` (empty for a one-group layout)."""
        suffix = f"+{group}" if group else ""
        return validate_key(f"{self.namespace}/{fingerprint}/chunks/{chunk_hash}/{level_tag}{suffix}")

    @staticmethod
    def chunk_version(base_key: str, checksum: int) -> str:
        """Where a writer stores its own bytes of a chunk whose ``base_key`` holds another
        writer's (objects are never replaced): the base key and the object's header checksum."""
        return validate_key(f"{base_key}={checksum:016x}")

    @staticmethod
    def is_chunk_version(key: str, base_key: str) -> bool:
        """Whether ``key`` is ``base_key`` or a version of it (:meth:`chunk_version`)."""
        return key == base_key or (key.startswith(base_key + "=") and _VERSION.fullmatch(key[len(base_key) + 1:])
                                   is not None)

    def lease_keys(self, fingerprint: str | None = None, first_chunk: str | None = None) -> list[str]:
        """The collector lease of the namespace (one key, held by ``gc``), or the lease slots
        of the contexts of one model that start with the chunk ``first_chunk`` (held by their
        ``delete``s, one slot each): see :mod:`kvstore.leases`. Contexts that share any
        chunk share their first one (chunk hashes are chained), so a delete and a put that
        could touch the same object always meet at the same slots."""
        if fingerprint is None:
            return [validate_key(f"{self.namespace}/collecting")]
        return [validate_key(f"{self.namespace}/{fingerprint}/collecting/{first_chunk}/{slot}")
                for slot in range(LEASE_SLOTS)]

    def layout_key(self, fingerprint: str) -> str:
        """The model's cache layout (written once, create-only, by the first put)."""
        return validate_key(f"{self.namespace}/{fingerprint}/layout")

    def default_profile_key(self, fingerprint: str) -> str:
        """The codec profile stores bound to the model encode with (create-only, first calibration)."""
        return validate_key(f"{self.namespace}/{fingerprint}/profile")

    def manifest_key(self, fingerprint: str, context_hash: str) -> str:
        return validate_key(f"{self.namespace}/{fingerprint}/contexts/{context_hash}")

    def profile_key(self, fingerprint: str, profile_id: str) -> str:
        return validate_key(f"{self.namespace}/{fingerprint}/profiles/{profile_id}")

    def pq_prefix(self, fingerprint: str, context_hash: str, config_tag: str) -> str:
        """The folder of a context's PQ objects (``centroids`` and ``codes/<chunk hash>``)."""
        return validate_key(f"{self.namespace}/{fingerprint}/pq/{context_hash}/{config_tag}")
