"""Tensors <-> bytes: the codec registry and the built-in codecs."""

from kvstore.codecs.base import KVCodec, codec_names, get_codec, register_codec

# the built-in codecs register themselves on import
from kvstore.codecs import cachegen_ref, int8, kivi, kvcodec, raw  # noqa: E402, F401  isort: skip

__all__ = ["KVCodec", "codec_names", "get_codec", "register_codec"]
