"""GPU kernels (Triton), each beside a pure-torch reference with the same signature.

=====================  ==========================================  =====================================
op                     Triton (``kvstore.kernels.<module>``)        reference (``kvstore.kernels.torch_ops``)
=====================  ==========================================  =====================================
rANS decode            ``rans_decode.rans_decode_launch`` /        ``rans_decode_launch_ref`` /
                       ``rans_decode_gpu``                          ``rans_decode_ref``
rANS encode            ``rans_encode.rans_encode_launch`` /        ``rans_encode_launch_ref`` /
                       ``rans_encode_gpu``                          ``rans_encode_ref``
dequantize             ``dequantize.dequantize_rowscale`` /         ``dequantize_rowscale_ref`` /
                       ``dequantize_affine``                        ``dequantize_affine_ref``
kvcodec chunk decode   ``kvcodec_decode.decode_kvcodec_kernels``           the same with ``backend="torch"``
kvcodec chunk encode   ``kvcodec_encode.encode_kvcodec_kernels``        the same with ``backend="torch"``
kvcodec quantization   ``quantize.quantize_kvcodec_gpu``            ``KVCodec.quantize_tensors`` (torch)
kvcodec3 chunk decode  ``kvcodec3_decode.decode_kvcodec3_kernels``  the same with ``backend="torch"``
(inverse transform)    (``reconstruct_group``)                      (``reconstruct_group_ref``)
PQ scores, top-k       ``pq_topk.pq_topk_triton`` /                 ``pq_torch.pq_topk_reference`` /
and gather             ``gather_kv_triton``                         ``gather_kv_reference``
PQ top-k by counting   ``pq_select.pq_select_triton``               ``pq_torch.pq_select_reference``
code combinations
=====================  ==========================================  =====================================

The dispatch helpers here (``decode_rans``, ``encode_rans``, ``decode_kvcodec``,
``select_pq_tokens``, ``gather_tokens``; not named
like the kernel modules, which would shadow them as package attributes) pick Triton on
CUDA devices and the torch reference elsewhere (or when Triton cannot be imported). Importing this package imports
neither Triton nor the kernels; they load on first use. Triton also runs the
kernels on the CPU through its interpreter (``kernel_for`` in ``rans_decode``), which
is what the tests use where there is no GPU; ``python -m kvstore.kernels.compile_check``
compiles every kernel for sm_90 without a GPU and prints registers and main-loop lengths.
"""

from __future__ import annotations

from typing import Any

import torch

from kvstore.kernels.support import (
    MIN_INTERPRETER_VERSION,
    cdiv,
    interpreter_supported,
    next_power_of_2,
    triton_available,
    use_triton,
)

__all__ = [
    "MIN_INTERPRETER_VERSION", "cdiv", "decode_kvcodec", "decode_rans", "encode_rans", "gather_tokens", "interpreter_supported", "next_power_of_2",
    "select_pq_tokens", "triton_available", "use_triton",
]  # fmt: skip


def decode_rans(data, table, model_map=None, *, shape=None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode one rANS stream into uint8 symbols on ``device`` (see ``rans_decode.rans_decode_gpu``)."""
    if use_triton(device):
        from kvstore.kernels.rans_decode import rans_decode_gpu

        return rans_decode_gpu(data, table, model_map, shape=shape, device=device)
    from kvstore.kernels.torch_ops import rans_decode_ref

    return rans_decode_ref(data, table, model_map, shape=shape, device=device)


def encode_rans(symbols: torch.Tensor, table, model_map=None, *, group_size: int | None = None) -> bytes:
    """:func:`kvstore.codecs.rans.encode` of a uint8 tensor on its device (see ``rans_encode.rans_encode_gpu``)."""
    if use_triton(symbols.device):
        from kvstore.kernels.rans_encode import rans_encode_gpu

        return rans_encode_gpu(symbols, table, model_map, group_size=group_size)
    from kvstore.kernels.torch_ops import rans_encode_ref

    return rans_encode_ref(symbols, table, model_map, group_size=group_size)


def decode_kvcodec(obj_or_buffers: Any, codec: Any, shape, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a kvcodec chunk on ``device`` (see ``kvcodec_decode.decode_kvcodec_kernels``)."""
    from kvstore.kernels.kvcodec_decode import decode_kvcodec_kernels

    backend = "triton" if use_triton(device) else "torch"
    return decode_kvcodec_kernels(obj_or_buffers, codec, shape, dtype, device, backend=backend)


def select_pq_tokens(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, k: int,
                     start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The ``k`` tokens of ``[start, stop)`` with the highest PQ score per KV head (see
    ``pq_select.pq_select``; the torch reference off CUDA)."""
    if use_triton(codes.device):
        from kvstore.kernels.pq_select import pq_select

        return pq_select(query, centroids, codes, k, start, stop)
    from kvstore.kernels.pq_torch import pq_select_reference

    return pq_select_reference(query, centroids, codes, k, start, stop)


def gather_tokens(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value rows at ``indices`` per KV head (see ``pq_topk.gather_kv``)."""
    if use_triton(keys.device):
        from kvstore.kernels.pq_topk import gather_kv

        return gather_kv(keys, values, indices)
    from kvstore.kernels.pq_torch import gather_kv_reference

    return gather_kv_reference(keys, values, indices)
