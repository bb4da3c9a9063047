"""Registers the Triton implementations of the codecs' CUDA paths (:mod:`kvstore.codecs.devices`).

Imported by the codecs on their first request for a CUDA implementation; registers
nothing where Triton cannot be imported, so CUDA tensors then take the codecs' torch paths.
"""

from __future__ import annotations

from typing import Any

import torch

from kvstore.codecs.devices import register_impl
from kvstore.kernels.support import triton_available


def _encode_kvcodec(codec: Any, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> Any:
    from kvstore.kernels.kvcodec_encode import encode_kvcodec_kernels  # quantize + rANS encode on the GPU

    return encode_kvcodec_kernels(codec, keys, values, start=start)


def _decode_kvcodec(codec: Any, obj: Any, shape: tuple[int, int, int, int], dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from kvstore.kernels.kvcodec_decode import decode_kvcodec_kernels  # rANS decode + dequantize on the GPU

    return decode_kvcodec_kernels(obj, codec, shape, dtype, device)


def _decode_kvcodec3(codec: Any, obj: Any, shape: tuple[int, int, int, int], dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from kvstore.kernels.kvcodec3_decode import decode_kvcodec3_kernels  # rANS decode + fused inverse transform

    return decode_kvcodec3_kernels(codec, obj, shape, dtype, device)


if triton_available():
    register_impl("kvcodec", "cuda", "encode", _encode_kvcodec)
    register_impl("kvcodec", "cuda", "decode", _decode_kvcodec)
    register_impl("kvcodec3", "cuda", "decode", _decode_kvcodec3)
