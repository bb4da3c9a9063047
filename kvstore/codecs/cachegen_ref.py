"""``cachegen_ref``: the public CacheGen recipe (Liu et al., SIGCOMM 2024, arXiv 2310.07240), as a baseline.

What CacheGen's reference code (LMCache's ``cachegen_encoder.py``) does, and so
what this codec does:

* **Quantization per token over all heads.** The heads of a layer are merged
  into ``channels = kv_heads * head_dim`` and every (layer, token) row is scaled
  by its absolute maximum over those channels (not per head). With ``bins``
  for the layer and ``c = bins // 2 - 1``, a value codes as
  ``round(x * c / absmax) + c`` in ``[0, 2c]``: 31 levels at 32 bins, 15 at 16.
  Error per value is at most ``absmax / (2c)``.
* **Coarser bins in deeper layers.** Keys get ``high_bins`` (32) in the first
  ``key_high_layers`` layers (default ``layers // 3``: 10 of 30 or 32 layers,
  as LMCache's 10-of-32 setting) and ``low_bins`` (16) after; values get
  ``high_bins`` in the first ``value_high_layers`` (2) layers. ``bins`` (e.g. 32)
  overrides the schedule with one value for every layer of keys and values.
* **Per-chunk symbol statistics, stored with the chunk.** One distribution per
  (layer, channel) counted over the chunk's tokens, entropy coding with it.
  CacheGen stores a 33-entry int16 CDF per (layer, channel); here a
  :class:`~kvstore.codecs.symbol_model.FrequencyTable` (2 bytes per symbol, only
  the ``2c + 1`` symbols the layer's bins can produce; absent symbols get
  frequency 0) is stored per group of layers that share a bin count, and the
  symbols are coded by the project's rANS coder instead of torchac's
  arithmetic coder (both within a fraction of a percent of the table's entropy).
  The table bytes are part of the chunk and of its size, as in CacheGen.
* The per-token maxima are stored as fp16 (LMCache keeps them in the KV dtype,
  fp32 in its older CPU path), fp32 only for values beyond fp16's range.

Not implemented, on purpose: the paper's delta-to-anchor coding (tokens coded as
differences to an anchor token of their group) is described in the paper but
absent from its code. Also not copied: LMCache's special case for models with
fewer than 10 layers (32 bins everywhere); pass ``bins=32`` for that.

Buffers: ``k_scale``/``v_scale`` ``[layers, tokens]`` and, per distinct bin count
``b`` of the schedule, ``{k,v}_table_{b}`` (frequency table bytes) and
``{k,v}_stream_{b}`` (rANS stream of the symbols ``[n_layers_b, tokens, channels]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kvstore.codecs import _quant as q
from kvstore.codecs import rans
from kvstore.codecs.base import Codec, kv_shapes, register_codec
from kvstore.codecs.symbol_model import (
    MAX_PRECISION,
    MIN_PRECISION,
    FrequencyTable,
    count_symbols,
)
from kvstore.errors import CodecError, FormatError
from kvstore.format.container import BufferLike, Container

MIN_BINS, MAX_BINS = 4, 256
MAX_LAYERS = 1 << 16


def half_range(bins: int) -> int:
    """CacheGen's ``c = bins // 2 - 1``: codes span ``[0, 2c]``."""
    return bins // 2 - 1


def _layer_groups(bins: list[int]) -> list[tuple[int, list[int]]]:
    """``(bin count, layers using it)`` in order of first use."""
    groups: dict[int, list[int]] = {}
    for layer, b in enumerate(bins):
        groups.setdefault(b, []).append(layer)
    return list(groups.items())


def _check_bins(value: Any, what: str) -> int:
    b = q.check_int(value, what, MIN_BINS, MAX_BINS)
    if b % 2:
        raise CodecError(f"{what} must be even, got {b}")
    return b


@register_codec
class CacheGenRefCodec(Codec):
    """CacheGen's quantization + per-chunk per-(layer, channel) entropy coding (no delta coding)."""

    name = "cachegen_ref"

    def __init__(
        self,
        bins: int | None = None,
        key_high_layers: int | None = None,
        value_high_layers: int = 2,
        high_bins: int = 32,
        low_bins: int = 16,
        precision: int = 14,
    ) -> None:
        self.bins = None if bins is None else _check_bins(bins, "cachegen bins")
        self.key_high_layers = (
            None if key_high_layers is None else q.check_int(key_high_layers, "key_high_layers", 0, MAX_LAYERS)
        )
        self.value_high_layers = q.check_int(value_high_layers, "value_high_layers", 0, MAX_LAYERS)
        self.high_bins = _check_bins(high_bins, "high_bins")
        self.low_bins = _check_bins(low_bins, "low_bins")
        self.precision = q.check_int(precision, "precision", MIN_PRECISION, MAX_PRECISION)

    @property
    def params(self) -> dict[str, Any]:
        return {
            "bins": self.bins,
            "key_high_layers": self.key_high_layers,
            "value_high_layers": self.value_high_layers,
            "high_bins": self.high_bins,
            "low_bins": self.low_bins,
            "precision": self.precision,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Codec:
        return q.build(cls, params)

    def schedule(self, layers: int) -> tuple[list[int], list[int]]:
        """Bins per layer for keys and for values."""
        if self.bins is not None:
            return [self.bins] * layers, [self.bins] * layers
        k_high = layers // 3 if self.key_high_layers is None else self.key_high_layers
        key = [self.high_bins if i < k_high else self.low_bins for i in range(layers)]
        value = [self.high_bins if i < self.value_high_layers else self.low_bins for i in range(layers)]
        return key, value

    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        """Encode a chunk (``start``, its position in the context, is not used)."""
        layers, heads, tokens, _ = q.check_kv(keys, values)
        out: dict[str, BufferLike] = {}
        for name, x, bins in zip(("k", "v"), (keys, values), self.schedule(layers)):
            channels = heads * x.shape[3]
            # [layers, heads, tokens, dim] -> [layers, tokens, heads * dim]: heads merged, as CacheGen does
            rows = x.permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            rows = rows.view(layers, tokens, channels)
            absmax = q.abs_max(rows, -1)
            q.check_finite(absmax, f"cachegen {name}")
            scale = q.round_up(absmax, q.param_dtype(absmax))
            c = torch.tensor([half_range(b) for b in bins], dtype=torch.float32, device=rows.device)[:, None, None]
            rows.mul_(c / q.safe_divisor(scale.float()).unsqueeze(-1)).round_().add_(c)
            sym = torch.minimum(rows.clamp_(min=0), 2 * c).to(torch.uint8).cpu().numpy()
            out[f"{name}_scale"] = scale
            for b, idx in _layer_groups(bins):
                part = sym[idx] if len(idx) < layers else sym
                model_map = np.arange(len(idx) * channels, dtype=np.int64).reshape(len(idx), channels)
                counts = count_symbols(part, model_map, model_map.size, 2 * half_range(b) + 1)
                table = FrequencyTable.from_counts(counts, self.precision, min_freq=0)
                out[f"{name}_table_{b}"] = table.to_bytes()
                out[f"{name}_stream_{b}"] = rans.encode(part, table, model_map)
        return out

    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
        *, value_dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layers = shape[0]
        out = []
        for name, bins, part_shape in zip(("k", "v"), self.schedule(layers), kv_shapes(shape, value_dim)):
            _, heads, tokens, dim = part_shape
            channels = heads * dim
            scale = q.read_params(obj, f"{name}_scale", (layers, tokens), nonneg=True)
            sym = np.empty((layers, tokens, channels), dtype=np.uint8)
            for b, idx in _layer_groups(bins):
                table = FrequencyTable.from_bytes(obj.raw(f"{name}_table_{b}"))
                models = len(idx) * channels
                if (table.num_models, table.alphabet) != (models, 2 * half_range(b) + 1):
                    raise FormatError(
                        f"cachegen {name}_table_{b}: {table.num_models} x {table.alphabet} table, expected "
                        f"{models} x {2 * half_range(b) + 1}"
                    )
                model_map = np.arange(len(idx) * channels, dtype=np.int64).reshape(len(idx), channels)
                sym[idx] = rans.decode(
                    obj.raw(f"{name}_stream_{b}"), table, model_map, shape=(len(idx), tokens, channels)
                )
            c = torch.tensor([half_range(b) for b in bins], dtype=torch.float32, device=device)[:, None, None]
            rows = torch.from_numpy(sym).to(device).to(torch.float32)
            rows.sub_(c).mul_((scale.to(device).float() / c.squeeze(-1)).unsqueeze(-1))
            rows = rows.view(layers, tokens, heads, dim).permute(0, 2, 1, 3)
            out.append(rows.to(dtype, memory_format=torch.contiguous_format))
        return out[0], out[1]
