"""Encode a ``kvcodec`` chunk with the kernel pipeline: quantization + rANS encoding, in Triton
kernels or (``backend="torch"``) their torch versions, on the KV's device.

:func:`encode_kvcodec_kernels` returns what :meth:`kvstore.codecs.kvcodec.KVCodec.encode`
returns for KV on the CPU, without copying the KV off the GPU:

1. quantization on the KV's device: by default one fused Triton pass
   (:func:`kvstore.kernels.quantize.quantize_kvcodec_gpu`: the KV read once, symbols written
   in the codec's stream layout); ``quantize="torch"`` runs
   :meth:`~kvstore.codecs.kvcodec.KVCodec.quantize_tensors` instead (the torch operations
   the CPU encoder runs, ~20 passes over fp32 temporaries);
2. one launch of :func:`kvstore.kernels.rans_encode.rans_encode_launch` codes the ``k``,
   ``v`` and ``scales`` streams concurrently, then :func:`~kvstore.kernels.rans_encode.assemble`
   (one synchronization for the word counts) lays the streams out on the device;
3. the streams (a fraction of the fp16 KV's size) come to the host in one
   pinned copy, as uint8 arrays; the sink and patch buffers stay tensors on the device
   (the container copies them when it serializes the chunk).

For the same symbols the streams are byte-identical to the CPU encoder's, so the CPU and GPU
decoders read both. Quantization on a GPU may round a rare value scale code differently
from the CPU (``log2`` and the RMS reduction are not correctly rounded alike): the chunk is
then a valid encoding of the same KV with that token's step a quarter octave apart.
``backend="torch"`` runs the torch reference of the rANS encoder instead (any device; slow;
off CUDA the quantization is then the torch one too).
"""

from __future__ import annotations

from typing import Any

import torch

from kvstore.errors import CodecError
from kvstore.format.container import BufferLike
from kvstore.kernels.derived import derived
from kvstore.kernels.quantize import quantize_kvcodec_gpu
from kvstore.kernels.support import interpreter_supported
from kvstore.kernels.rans_decode import interpreter_active
from kvstore.kernels.rans_encode import DEFAULT_CONFIG, EncodeConfig, StreamPlan, encode_streams, plan_stream

__all__ = ["encode_kvcodec_kernels", "stream_plans"]


def stream_plans(codec: Any, tokens: int, lane_symbols: int | None = None) -> list[StreamPlan]:
    """The codec's three stream plans for a chunk of ``tokens`` tokens (cached per codec)."""
    cache = derived(codec, "encode_plans")
    key = (int(tokens), lane_symbols)
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = [plan_stream(spec.shape, spec.table, spec.model_map, spec.group_size)
                            for spec in codec.streams(tokens, lane_symbols=lane_symbols)]  # fmt: skip
    return hit


def encode_kvcodec_kernels(
    codec: Any,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    start: int = 0,
    config: EncodeConfig = DEFAULT_CONFIG,
    backend: str = "triton",
    lane_symbols: int | None = None,
    to_host: bool = True,
    quantize: str | None = None,
) -> dict[str, BufferLike]:
    """``codec.encode(keys, values, start=start)`` on the KV's device (see the module doc).

    ``lane_symbols``: see :meth:`~kvstore.codecs.kvcodec.KVCodec.streams`. ``to_host=False``
    leaves the three streams as uint8 tensors on the device (``decode_kvcodec_kernels`` reads
    them there). ``quantize``: "triton" (the fused kernel), "torch", or None: "triton" where
    Triton runs (CUDA, or the interpreter), else "torch"."""
    if codec.profile.value_dim is not None:
        raise CodecError("the kvcodec kernels encode equal key and value widths; KVCodec.encode encodes "
                         "other layouts (MLA) on the CPU")
    if quantize is None:
        interpreted = interpreter_active() and interpreter_supported()
        quantize = "triton" if keys.device.type == "cuda" or interpreted else "torch"
    if quantize == "triton":
        k_sym, v_sym, s_sym, raw = quantize_kvcodec_gpu(codec, keys, values, start=start)
    elif quantize == "torch":
        k_sym, v_sym, s_sym, raw = codec.quantize_tensors(keys, values, start=start)
    else:
        raise CodecError(f"quantize must be 'triton' or 'torch', got {quantize!r}")
    plans = stream_plans(codec, keys.shape[2], lane_symbols)
    encoded = encode_streams([k_sym, v_sym, s_sym], plans, config=config, backend=backend)
    streams = encoded.to_host() if to_host else encoded.tensors()
    buffers: dict[str, BufferLike] = dict(raw)
    for name, data in zip(("k", "v", "scales"), streams, strict=True):
        buffers[name] = data
    return buffers
