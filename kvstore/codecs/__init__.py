"""Tensors <-> bytes: the codec registry and the built-in codecs."""

from kvstore.codecs.base import Codec, codec_names, get_codec, register_codec

__all__ = ["Codec", "codec_names", "get_codec", "register_codec"]
