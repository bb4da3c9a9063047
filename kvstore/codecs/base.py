"""The codec interface and registry: one chunk's KV <-> named buffers.

A codec turns a chunk's keys and values (each ``[layers, kv_heads, tokens,
head_dim]``) into named buffers that the container stores, and back. Its name
and parameters are recorded in the container header, so any stored chunk
decodes without outside configuration. Codecs register by name, one per module.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from kvstore.errors import CodecError, FormatError
from kvstore.format.container import BufferLike, Container

_REGISTRY: dict[str, type[Codec]] = {}
_PROFILES: dict[str, object] = {}


class Codec(ABC):
    """Encodes and decodes one chunk of KV. Subclasses set ``name`` and register."""

    name: ClassVar[str]
    #: buffer names a codec may not use (the chunk object stores them itself)
    RESERVED: ClassVar[frozenset[str]] = frozenset({"tokens"})

    @property
    def params(self) -> dict[str, Any]:
        """The JSON-serializable parameters that rebuild this codec."""
        return {}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Codec:
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
    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        """Encode ``[layers, kv_heads, tokens, head_dim]`` keys and values to named buffers.

        ``start`` is the position of the chunk's first token in its context (a codec
        may treat the context's first, attention-sink tokens specially).
        """

    @abstractmethod
    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
        *, value_dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild keys of ``shape`` and values (of ``shape`` with its last axis ``value_dim``,
        when the value width differs) as ``dtype`` on ``device`` from a verified container."""

    def decode_into(self, obj: Container, out_keys: torch.Tensor, out_values: torch.Tensor) -> None:
        """Decode a verified container into ``out_keys`` and ``out_values`` (views into the
        caller's output: their shapes, dtype and device say what to decode). By default
        :meth:`decode`, then a copy; a codec that can write its output in place overrides it."""
        value_dim = out_values.shape[-1] if out_values.shape[-1] != out_keys.shape[-1] else None
        keys, values = self.decode(obj, tuple(out_keys.shape), out_keys.dtype, out_keys.device,  # type: ignore[arg-type]
                                   value_dim=value_dim)
        out_keys.copy_(keys)
        out_values.copy_(values)

    def for_layers(self, layers: tuple[int, ...], num_layers: int) -> Codec:
        """This codec configured for a group of the model's ``num_layers`` layers with
        per-token KV (``layers``: their positions among those, see
        :meth:`~kvstore.format.layout.CacheLayout.token_rows`; a layer group's chunks are
        stored apart); codecs without per-layer state return themselves."""
        return self

    def check_layout(self, layout: Any) -> None:
        """Raise :class:`CodecError` if this codec cannot code a model of ``layout`` (a
        :class:`~kvstore.format.layout.CacheLayout`); called before anything is written."""

    # -- per-model profiles: data a codec shares across all chunks of a model ----------
    @classmethod
    def profile_id_of(cls, params: Mapping[str, Any]) -> str | None:
        """The id of the stored profile a codec configuration needs, if any."""
        return None

    @classmethod
    def parse_profile(cls, data: bytes | memoryview) -> object:
        """Parse (and validate) a stored profile of this codec."""
        raise FormatError(f"codec {cls.name!r} has no profiles")

    def stored_profile(self) -> tuple[str, bytes] | None:
        """``(id, bytes)`` of the profile a writer must store once per model, if any."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class ProfiledCodec(Codec):
    """A codec whose chunks name a per-model profile (parameter ``profile``: its content id),
    stored once beside them. ``profile_kind`` is the profile's class (with ``to_bytes``,
    ``from_bytes`` and ``shape`` = (layers, kv heads, head dim)); ``model_profile`` and
    ``profile_id`` are set by :meth:`_bind_profile`; ``profile`` is the profile of the layers
    this codec codes (the model's, or a layer group's rows of it)."""

    profile_kind: ClassVar[type]
    model_profile: Any
    profile_id: str
    profile: Any

    def _bind_profile(self, profile: Any) -> Any:
        """Take ``profile`` (a profile object, registered under its content id, or the id of a
        registered one) as this codec's model profile; returns the profile object."""
        if isinstance(profile, str):
            found = registered_profile(profile)
            if not isinstance(found, self.profile_kind):
                raise FormatError(f"profile {profile!r} is not a {self.name} profile")
            self.model_profile, self.profile_id = found, profile
            return found
        if not isinstance(profile, self.profile_kind):
            raise CodecError(f"{self.name} needs a {self.profile_kind.__name__}, got {type(profile).__name__}")
        self.model_profile, self.profile_id = profile, profile_content_id(profile.to_bytes())
        register_profile(self.profile_id, profile)
        return profile

    @classmethod
    def profile_id_of(cls, params: Mapping[str, Any]) -> str | None:
        value = params.get("profile")
        return value if isinstance(value, str) else None

    @classmethod
    def parse_profile(cls, data: bytes | memoryview) -> Any:
        return cls.profile_kind.from_bytes(data)

    def stored_profile(self) -> tuple[str, bytes] | None:
        return self.profile_id, self.model_profile.to_bytes()  # serialized once per profile

    def check_layout(self, layout: Any) -> None:
        """Refuse (before any write) a model layout the profile cannot code: the profile
        describes the layers with per-token KV (any attention kinds; linear-attention layers
        are stored exactly beside them), all of one shape, and their key and value widths."""
        spec = layout.token_spec()
        if spec is None:
            raise CodecError(f"{self.name} profiles cover models whose layers share one shape, not {layout.describe()}")
        profile = self.model_profile
        value_width = getattr(profile, "value_width", profile.shape[2])
        if (len(layout.token_layers), spec.kv_heads, spec.key_dim, spec.value_dim) != (*profile.shape, value_width):
            raise CodecError(f"the model's layout ({layout.describe()}) does not match the profile's "
                             f"{profile.shape} (values {value_width} wide)")

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """:class:`CodecError` unless ``[layers, heads, tokens, dim]`` fits this codec's profile."""
        L, H, _, D = shape
        if (L, H, D) != self.profile.shape:
            raise CodecError(f"KV of {L} layers x {H} heads x {D} dims does not match the profile's "
                             f"{self.profile.shape}")


def kv_shapes(shape: tuple[int, int, int, int], value_dim: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The key and value shapes of a chunk: ``shape`` and ``shape`` with its last axis ``value_dim``."""
    return tuple(shape), (*shape[:3], shape[3] if value_dim is None else value_dim)


def profile_content_id(data: bytes | memoryview) -> str:
    """The content hash that names a stored profile (its key segment), checked on load."""
    return hashlib.blake2b(data, digest_size=16, person=b"kvstore-profile").hexdigest()


def register_profile(profile_id: str, profile: object) -> None:
    """Make a parsed profile available to codecs built from stored parameters."""
    _PROFILES[profile_id] = profile


def registered_profile(profile_id: str) -> object:
    """A profile registered with :func:`register_profile`; :class:`FormatError` if absent."""
    try:
        return _PROFILES[profile_id]
    except KeyError:
        raise FormatError(f"codec profile {profile_id!r} is not loaded (it is read from the store with the KV)") from None


def codec_class(name: str) -> type[Codec]:
    """The registered codec class ``name``."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; registered: {sorted(_REGISTRY)}") from None


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def codec_names() -> list[str]:
    """Names of every registered codec."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_codec(name: str, params: Mapping[str, Any] | None = None) -> Codec:
    """Build the codec ``name`` with ``params``; unknown names raise :class:`CodecError`."""
    return codec_class(name).from_params(params or {})


#: modules whose codecs register themselves when imported: loaded on the first lookup, by
#: name (the codecs import this module), and not before, since ``kvcodec`` brings numba
BUILTIN_CODECS = ("kvstore.codecs.cachegen_ref", "kvstore.codecs.int8", "kvstore.codecs.kivi",
                  "kvstore.codecs.kvcodec", "kvstore.codecs.kvcodec3", "kvstore.codecs.kvtc_ref", "kvstore.codecs.raw")


def _load_builtin() -> None:
    for module in BUILTIN_CODECS:
        importlib.import_module(module)
