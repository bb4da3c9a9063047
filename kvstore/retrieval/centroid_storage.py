"""How PQ centroids are stored: the formats, their buffers, and parsing them back.

Centroids ``[layers, kv_heads, m, 2**bits, sub]`` are a fixed cost per context
(for SmolLM2 at PQCache's m=2, b=6: 64 x 32 values per layer, head and
sub-space), so their precision decides whether loading the PQ objects stays a
small fraction of loading the KV. Formats:

- ``q4`` / ``q3`` (default ``q4``): per channel (layer, head, sub-space, dimension)
  an affine grid over the 2**bits centroids, ``lo + step * q`` with ``q`` in
  ``[0, 2**N)``, bit-packed; ``lo`` and ``step`` fp16. Keys have per-channel
  offsets and outlier channels, which a per-channel grid follows and a
  per-centroid scale does not (measurements in ``benchmarks/RESULTS.md``).
- ``int8``: symmetric per centroid, with an fp16 scale per centroid.
- ``float16`` / ``float32``: as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kvstore.errors import ConfigError, FormatError
from kvstore.retrieval import pq

FORMATS = ("q3", "q4", "int8", "float16", "float32")
DEFAULT_FORMAT = "q4"
_F16_TINY = torch.finfo(torch.float16).tiny


def _grid_bits(fmt: str) -> int:
    return int(fmt[1:])


def encode(centroids: torch.Tensor, fmt: str) -> dict[str, torch.Tensor | np.ndarray]:
    """The buffers that store ``centroids`` (fp32, ``[layers, kv_heads, m, k, sub]``) in format ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"centroid format must be one of {FORMATS}, got {fmt!r}")
    centroids = centroids.detach().float().cpu()
    if fmt.startswith("q"):
        levels = (1 << _grid_bits(fmt)) - 1
        lo = centroids.amin(-2).to(torch.float16)
        step = ((centroids.amax(-2) - lo.float()) / levels).to(torch.float16)
        if not (torch.isfinite(lo).all() and torch.isfinite(step).all()):
            raise ConfigError(f"centroids beyond the fp16 range cannot be stored as {fmt}: use float32")
        q = torch.round((centroids - lo.float()[..., None, :]) / step.float().clamp_min(_F16_TINY)[..., None, :])
        packed = pq.pack_codes(q.clamp_(0, levels).to(torch.uint8), _grid_bits(fmt))
        return {"centroids": packed, "centroid_offsets": lo, "centroid_steps": step}
    if fmt == "int8":
        scale = (centroids.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
        if not torch.isfinite(scale).all():
            raise ConfigError("centroids beyond the fp16 range cannot be stored as int8: use float32")
        q = torch.round(centroids / scale.float().clamp_min(_F16_TINY)).clamp_(-127, 127).to(torch.int8)
        return {"centroids": q, "centroid_scales": scale[..., 0]}
    return {"centroids": centroids.to(getattr(torch, fmt))}


def buffer_names(fmt: str) -> tuple[str, ...]:
    """The buffers (exactly these) of a centroids object in format ``fmt``."""
    if fmt.startswith("q"):
        return ("centroids", "centroid_offsets", "centroid_steps")
    return ("centroids", "centroid_scales") if fmt == "int8" else ("centroids",)


def decode(fmt: str, tensor: Callable[[str], torch.Tensor], raw: Callable[[str], memoryview],
           dims: tuple[int, int, int, int, int]) -> torch.Tensor:
    """fp32 centroids of shape ``dims`` from a stored object's buffers (``tensor``/``raw`` read one by
    name); raises :class:`FormatError` unless every buffer has exactly the expected dtype and shape."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown PQ centroid format {fmt!r}")
    if fmt.startswith("q"):
        channels = dims[:3] + dims[4:]
        lo, step = tensor("centroid_offsets"), tensor("centroid_steps")
        for name, t in (("offsets", lo), ("steps", step)):
            if t.dtype != torch.float16 or tuple(t.shape) != channels:
                raise FormatError(f"PQ centroid {name} are {t.dtype}{list(t.shape)}, expected float16{list(channels)}")
        count = int(np.prod(dims))
        q = pq.unpack_codes(np.frombuffer(raw("centroids"), dtype=np.uint8), _grid_bits(fmt), count)
        out = lo.float()[..., None, :] + step.float()[..., None, :] * q.reshape(dims).float()
    else:
        centroids = tensor("centroids")
        want = torch.int8 if fmt == "int8" else getattr(torch, fmt)
        if centroids.dtype != want or tuple(centroids.shape) != dims:
            raise FormatError(f"PQ centroids are {centroids.dtype}{list(centroids.shape)}, expected {want}{list(dims)}")
        out = centroids.float()
        if fmt == "int8":
            scales = tensor("centroid_scales")
            if scales.dtype != torch.float16 or tuple(scales.shape) != dims[:-1]:
                raise FormatError("PQ centroid scales are malformed")
            out = out * scales.float()[..., None]
    if not torch.isfinite(out).all():
        raise FormatError("PQ centroids are not finite")
    return out
