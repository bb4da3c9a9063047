"""The codec interface and registry: one chunk's KV <-> named buffers.

A codec turns a chunk's keys and values (each ``[layers, kv_heads, tokens,
head_dim]``) into named buffers that the container stores, and back. Its name
and parameters are recorded in the container header, so any stored chunk
decodes without outside configuration. Codecs register by name, one per module.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from kvstore.errors import CodecError, FormatError
from kvstore.format.container import BufferLike, Container

_REGISTRY: dict[str, type[KVCodec]] = {}


class KVCodec(ABC):
    """Encodes and decodes one chunk of KV. Subclasses set ``name`` and register."""

    name: ClassVar[str]
    #: buffer names a codec may not use (the chunk object stores them itself)
    RESERVED: ClassVar[frozenset[str]] = frozenset({"tokens"})

    @property
    def params(self) -> dict[str, Any]:
        """The JSON-serializable parameters that rebuild this codec."""
        return {}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> KVCodec:
        """Rebuild a codec from the parameters stored in a container header."""
        try:
            return cls(**params)
        except TypeError as exc:
            raise FormatError(f"bad parameters for codec {cls.name!r}: {exc}") from None

    @property
    def tag(self) -> str:
        """A short key segment naming this codec and its parameters."""
        text = json.dumps(self.params, sort_keys=True, separators=(",", ":"))
        return f"{self.name}-{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"

    @abstractmethod
    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, BufferLike]:
        """Encode ``[layers, kv_heads, tokens, head_dim]`` keys and values to named buffers."""

    @abstractmethod
    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild keys and values of ``shape`` and ``dtype`` on ``device`` from a verified container."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def register_codec(cls: type[KVCodec]) -> type[KVCodec]:
    """Class decorator: make ``cls`` available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def codec_names() -> list[str]:
    """Names of every registered codec."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_codec(name: str, params: Mapping[str, Any] | None = None) -> KVCodec:
    """Build the codec ``name`` with ``params``; unknown names raise :class:`CodecError`."""
    _load_builtin()
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; registered: {sorted(_REGISTRY)}") from None
    return cls.from_params(params or {})


def _load_builtin() -> None:
    import kvstore.codecs.raw  # noqa: F401  (registers itself)
