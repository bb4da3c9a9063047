"""``raw``: the KV's own bytes (fp16/bf16/fp32), the lossless baseline."""

from __future__ import annotations

import torch

from kvstore.codecs.base import Codec, kv_shapes, register_codec
from kvstore.errors import FormatError
from kvstore.format.container import BufferLike, Container


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
        for name, shape in zip(("k", "v"), kv_shapes(shape, value_dim)):
            tensor = obj.tensor(name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise FormatError(
                    f"raw buffer {name!r} is {tensor.dtype}{list(tensor.shape)}, expected {dtype}{list(shape)}"
                )
            out.append(tensor.to(device, non_blocking=True))
        return out[0], out[1]
