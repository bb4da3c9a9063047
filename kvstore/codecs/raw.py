"""``raw``: the KV's own bytes (fp16/bf16/fp32), the lossless baseline."""

from __future__ import annotations

import numpy as np
import torch

from kvstore.codecs.base import Codec, kv_shapes, register_codec
from kvstore.errors import FormatError
from kvstore.format.container import BufferLike, Container
from kvstore.format.dtypes import dtype_name


@register_codec
class RawCodec(Codec):
    """Stores keys and values as they are: no loss, no compression."""

    name = "raw"

    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        return {"k": keys, "v": values}

    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
        *, value_dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for name, buffer_shape in zip(("k", "v"), kv_shapes(shape, value_dim)):
            _check_buffer(obj, name, buffer_shape, dtype)
            out.append(obj.tensor(name).to(device, non_blocking=True))
        return out[0], out[1]

    def decode_into(self, obj: Container, out_keys: torch.Tensor, out_values: torch.Tensor) -> None:
        """On the CPU, the stored bytes are copied once, straight into the output views."""
        if out_keys.device.type != "cpu" or out_values.device.type != "cpu":
            return super().decode_into(obj, out_keys, out_values)
        for name, out in (("k", out_keys), ("v", out_values)):
            _check_buffer(obj, name, tuple(out.shape), out.dtype)
            source = np.frombuffer(obj.raw(name), dtype=np.uint8)  # checksummed, not copied
            target = out.view(torch.uint8).numpy()  # the output's own memory, its strides kept
            np.copyto(target, source.reshape(target.shape))


def _check_buffer(obj: Container, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise :class:`FormatError` unless buffer ``name`` holds ``dtype`` values of ``shape``."""
    spec = obj.header.buffers.get(name)
    if spec is None or tuple(spec.shape) != tuple(shape) or spec.dtype != dtype_name(dtype):
        found = "missing" if spec is None else f"{spec.dtype}{list(spec.shape)}"
        raise FormatError(f"raw buffer {name!r} is {found}, expected {dtype}{list(shape)}")
