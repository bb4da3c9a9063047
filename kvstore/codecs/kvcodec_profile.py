"""The per-model profile of the ``kvcodec`` codec, computed once and stored once.

Keys are quantized with an absolute step per (layer, kv head, channel) chosen
from the *queries* that will read them: an error ``e_c`` in key channel ``c``
moves an attention logit by ``q_c e_c / sqrt(d)``, so the step that spends bits
where they matter is ``step_c = beta / sqrt(E[q_c^2])`` (the mean over the
query heads of the GQA group, queries after RoPE). With uniform quantization
the logit noise is then ``beta / sqrt(12)`` in every layer and head whatever
the model. Without query statistics the step falls back to ``beta * std_c``.

Values are quantized per token (step ``gamma * sigma_t``, with ``sigma_t`` the
token's RMS over the head's channels, rounded to a quarter octave so that it
costs a few entropy-coded bits).

The profile holds, for every level, the symbol statistics of the entropy coder
(one model per (layer, head, channel) for keys and values, one per (layer,
head) for value scales), measured on calibration KV. Chunks then carry no
tables at all, however small they are.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from kvstore.codecs.base import profile_content_id
from kvstore.codecs.symbol_model import FrequencyTable, count_symbols
from kvstore.errors import CodecError, FormatError
from kvstore.format import container

KIND = "kvcodec-profile"
ZERO = 128  # symbol of a zero residual; symbols are uint8 in [0, 256)
SCALE_STEPS_PER_OCTAVE = 4
PRECISION = 15
TABLE_HEADER_BYTES = 16
MAX_LEVEL_FACTOR = 1e6  # a stored level's step factors are finite and at most this


@dataclass(frozen=True, slots=True)
class Level:
    """One quality level: key step factor ``beta`` and value step factor ``gamma``."""

    beta: float
    gamma: float


#: best first; level 2 is the default (see kvstore/codecs/README.md for measured sizes)
DEFAULT_LEVELS = (
    Level(0.25, 0.2),
    Level(0.6, 0.5),
    Level(1.0, 0.85),
    Level(1.5, 1.2),
    Level(2.2, 1.7),
    Level(3.2, 2.4),
)


def quantize_keys(keys: torch.Tensor, center: torch.Tensor, step: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Integer residuals ``round((k - center) / step)`` (unclamped, float). ``inplace``: overwrite
    ``keys`` (a float32 scratch copy) instead of allocating temporaries; the same values."""
    if inplace:
        return keys.sub_(center[:, :, None]).div_(step[:, :, None]).round_()
    return torch.round((keys - center[:, :, None]) / step[:, :, None])


def value_scale_codes(values: torch.Tensor) -> torch.Tensor:
    """Per-(layer, head, token) scale exponents, quarter octaves of the token RMS, as ints."""
    rms = values.pow(2).mean(dim=-1).sqrt().clamp_min(2.0**-24)
    return torch.round(torch.log2(rms) * SCALE_STEPS_PER_OCTAVE).clamp(-ZERO, 255 - ZERO)


def value_steps(codes: torch.Tensor, gamma: float) -> torch.Tensor:
    """The value step of each (layer, head, token) from its scale code."""
    return gamma * torch.exp2(codes / SCALE_STEPS_PER_OCTAVE)


def to_symbols(residuals: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Residuals as uint8 symbols around ``ZERO`` (clamped; the codec patches what was clamped).
    ``inplace``: clamp and shift ``residuals`` itself (a float scratch tensor) on the way."""
    if inplace:
        return residuals.clamp_(-ZERO, 255 - ZERO).add_(ZERO).to(torch.uint8)
    return (residuals.clamp(-ZERO, 255 - ZERO) + ZERO).to(torch.uint8)


@dataclass(frozen=True)
class LevelTables:
    """Entropy-coder models of one level."""

    keys: FrequencyTable  # L*H*D models
    values: FrequencyTable  # L*H*Dv models
    scales: FrequencyTable  # L*H models


@dataclass(frozen=True)
class KVCodecProfile:
    """Everything ``kvcodec`` needs besides a chunk's own bytes. ``head_dim`` is the key
    width; ``value_dim`` the value width where it differs (an MLA latent in the key slot,
    its rotary key in the value slot), ``None`` where it is ``head_dim``."""

    layers: int
    kv_heads: int
    head_dim: int
    key_center: torch.Tensor  # [L, H, D] float32
    key_unit: torch.Tensor  # [L, H, D] float32: the key step at beta = 1
    levels: tuple[Level, ...]
    tables: tuple[LevelTables, ...]
    sink_tokens: int = 4
    #: how the levels were calibrated on the model (targets, measured figures), if they were
    calibration: dict[str, Any] | None = None
    value_dim: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.layers, self.kv_heads, self.head_dim

    @property
    def value_width(self) -> int:
        """The value width (``head_dim`` unless ``value_dim`` says otherwise)."""
        return self.head_dim if self.value_dim is None else self.value_dim

    def key_step(self, level: int) -> torch.Tensor:
        return self.key_unit * self.levels[level].beta

    def select_layers(self, layers: Sequence[int]) -> KVCodecProfile:
        """The profile of a subset of the model's layers (a layer group stored on its own):
        their key centers, steps and symbol models, in the order given."""
        index = list(layers)
        if not index or any(type(i) is not int or not 0 <= i < self.layers for i in index):
            raise CodecError(f"layers must be indices into the profile's {self.layers} layers, got {index!r}")
        def per_layer(width: int) -> np.ndarray:
            return np.arange(self.layers * self.kv_heads * width).reshape(self.layers, -1)[index].reshape(-1)

        def rows(table: FrequencyTable, picked: np.ndarray) -> FrequencyTable:
            return FrequencyTable(table.freqs[picked], table.precision)

        k_rows, v_rows, s_rows = per_layer(self.head_dim), per_layer(self.value_width), per_layer(1)
        tables = tuple(LevelTables(rows(t.keys, k_rows), rows(t.values, v_rows), rows(t.scales, s_rows))
                       for t in self.tables)
        return KVCodecProfile(len(index), self.kv_heads, self.head_dim, self.key_center[index].contiguous(),
                              self.key_unit[index].contiguous(), self.levels, tables, self.sink_tokens,
                              self.calibration, self.value_dim)

    def to_bytes(self) -> bytes:
        """Serialize as a container (no pickle); once per profile, which is immutable (every
        codec built from it names it by the content hash of these bytes)."""
        return self._serialized

    @cached_property
    def _serialized(self) -> bytes:
        buffers: dict[str, object] = {"key_center": self.key_center, "key_unit": self.key_unit,
                                      **table_buffers(self.tables)}
        meta = {
            "layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "sink_tokens": self.sink_tokens,
            "levels": [[lv.beta, lv.gamma] for lv in self.levels],
            "table_compression": "zlib",
        }
        if self.calibration is not None:
            meta["calibration"] = self.calibration
        if self.value_dim is not None:  # absent where equal: profiles written before it keep their bytes
            meta["value_dim"] = self.value_dim
        return container.encode(buffers, kind=KIND, meta=meta)  # type: ignore[arg-type]

    @property
    def profile_id(self) -> str:
        """A content hash naming this profile (the key segment it is stored under)."""
        return profile_content_id(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> KVCodecProfile:
        """Parse and validate a stored profile."""
        obj, (layers, kv_heads, head_dim, sink_tokens) = open_profile(data, KIND)
        meta = obj.header.meta
        levels = parse_levels(meta.get("levels"))
        center, unit = obj.tensor("key_center"), obj.tensor("key_unit")
        for t in (center, unit):
            if t.dtype != torch.float32 or tuple(t.shape) != (layers, kv_heads, head_dim):
                raise FormatError("profile key tensors do not match its dimensions")
        if not bool(torch.isfinite(center).all()) or not bool((unit > 0).all()) or not bool(torch.isfinite(unit).all()):
            raise FormatError("profile key steps must be finite and positive")
        value_dim = meta.get("value_dim")
        if value_dim is not None and not (type(value_dim) is int and 0 < value_dim <= 1 << 16 and value_dim != head_dim):
            raise FormatError("profile value width is malformed")
        width = head_dim if value_dim is None else value_dim
        tables = read_tables(obj, len(levels), (layers * kv_heads * head_dim, layers * kv_heads * width,
                                                layers * kv_heads))
        calibration = meta.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise FormatError("profile calibration record is malformed")
        return cls(layers, kv_heads, head_dim, center, unit, levels, tables, sink_tokens, calibration, value_dim)


def open_profile(data: bytes | memoryview, kind: str, *,
                 even_head_dim: bool = False) -> tuple[container.Container, tuple[int, int, int, int]]:  # fmt: skip
    """A stored profile's container, checked to be of ``kind``, and its ``(layers, kv_heads,
    head_dim, sink_tokens)`` (``even_head_dim``: required even, as RoPE pairs its halves)."""
    obj = container.decode(data)
    if obj.header.kind != kind:
        raise FormatError(f"expected a {kind} object, found {obj.header.kind!r}")
    dims = [obj.header.meta.get(k) for k in ("layers", "kv_heads", "head_dim", "sink_tokens")]
    if not all(type(d) is int and 0 <= d <= 1 << 16 for d in dims) or 0 in dims[:3] or (even_head_dim and dims[2] % 2):
        raise FormatError(f"{kind} dimensions are malformed")
    return obj, (dims[0], dims[1], dims[2], dims[3])


def parse_levels(raw: Any) -> tuple[Level, ...]:
    """A profile's stored ``[[beta, gamma], ...]`` (1 to 16 levels, factors in (0, 1e6])."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= 16:
        raise FormatError("profile levels are malformed")
    levels = []
    for lv in raw:
        if not (isinstance(lv, list) and len(lv) == 2
                and all(type(x) in (int, float) and 0 < x <= MAX_LEVEL_FACTOR for x in lv)):
            raise FormatError("profile level entry is malformed (two factors in (0, 1e6])")
        levels.append(Level(float(lv[0]), float(lv[1])))
    return tuple(levels)


def table_buffers(tables: Sequence[LevelTables]) -> dict[str, bytes]:
    """Each level's symbol tables as a profile's buffers ``t{i}_keys`` / ``_values`` /
    ``_scales``, zlib-compressed (the profile's meta says ``"table_compression": "zlib"``)."""
    return {f"t{i}_{name}": zlib.compress(getattr(t, name).to_bytes(), 6)
            for i, t in enumerate(tables) for name in ("keys", "values", "scales")}


def read_tables(obj: container.Container, levels: int, models: tuple[int, int, int]) -> tuple[LevelTables, ...]:
    """The ``levels`` levels' symbol tables :func:`table_buffers` stored in ``obj``, each checked
    to hold ``models`` (keys, values, scales) models; :class:`FormatError` otherwise."""
    if obj.header.meta.get("table_compression") != "zlib":
        raise FormatError("profile tables use an unknown compression")
    tables = []
    for i in range(levels):
        try:
            t = LevelTables(*(FrequencyTable.from_bytes(inflate_table(obj.raw(f"t{i}_{name}"), n))
                              for name, n in zip(("keys", "values", "scales"), models, strict=True)))
        except CodecError as exc:
            raise FormatError(f"profile table {i} is malformed: {exc}") from None
        if (t.keys.num_models, t.values.num_models, t.scales.num_models) != models:
            raise FormatError(f"profile table {i} does not match the profile's dimensions")
        tables.append(t)
    return tuple(tables)


def inflate_table(data: memoryview, models: int) -> bytes:
    """Decompress a stored frequency table, refusing output beyond its largest valid size."""
    limit = TABLE_HEADER_BYTES + models * 256 * 4
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise FormatError(f"profile table does not inflate: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise FormatError("profile table inflates beyond its declared size or is truncated")
    return out


def build_profile(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    query_energy: torch.Tensor | None = None,
    levels: Sequence[Level] = DEFAULT_LEVELS,
    sink_tokens: int = 4,
    calibration: Any = None,
) -> KVCodecProfile:
    """Profile a model from calibration KV.

    ``samples``: contexts' ``(keys, values)``, each ``[layers, kv_heads, tokens, head_dim]``
    (values may be of another width; the first ``sink_tokens`` of each are left out, as the
    codec stores them raw).
    ``query_energy``: ``E[q^2]`` per (layer, kv head, channel) of the post-RoPE queries,
    averaged over each GQA group (as :func:`kvstore.integrations.hf_profile.profile_model` captures it);
    ``None`` falls back to per-channel key standard deviations.
    ``calibration``: how the levels were calibrated on the model (its targets and measured
    figures are recorded in the profile's ``calibration`` field), if they were.
    """
    if not samples:
        raise CodecError("build_profile needs at least one calibration sample")
    keys = torch.cat([k[:, :, sink_tokens:].float().cpu() for k, _ in samples], dim=2)
    values = torch.cat([v[:, :, sink_tokens:].float().cpu() for _, v in samples], dim=2)
    if keys.shape[:3] != values.shape[:3] or keys.ndim != 4 or keys.shape[2] == 0:
        raise CodecError(f"calibration keys {list(keys.shape)} and values {list(values.shape)} do not match")
    layers, kv_heads, _, head_dim = keys.shape
    value_dim = values.shape[3]
    center = keys.mean(dim=2)
    if query_energy is None:
        unit = keys.std(dim=2).clamp_min(1e-6)
    else:
        if tuple(query_energy.shape) != (layers, kv_heads, head_dim):
            raise CodecError(f"query_energy must be [layers, kv_heads, head_dim] = {[layers, kv_heads, head_dim]}")
        unit = 1.0 / query_energy.float().cpu().clamp_min(1e-12).sqrt()
    models = np.arange(layers * kv_heads * head_dim).reshape(layers * kv_heads, head_dim)
    value_models = np.arange(layers * kv_heads * value_dim).reshape(layers * kv_heads, value_dim)
    scale_models = np.arange(layers * kv_heads).reshape(layers * kv_heads, 1)
    tables = []
    codes = value_scale_codes(values)
    scale_sym = to_symbols(codes).reshape(layers * kv_heads, -1, 1).numpy()
    scale_table = FrequencyTable.from_counts(count_symbols(scale_sym, scale_models, layers * kv_heads), PRECISION)
    for level in levels:
        k_sym = to_symbols(quantize_keys(keys, center, unit * level.beta)).reshape(layers * kv_heads, -1, head_dim).numpy()
        v_res = torch.round(values / value_steps(codes, level.gamma)[..., None])
        v_sym = to_symbols(v_res).reshape(layers * kv_heads, -1, value_dim).numpy()
        tables.append(LevelTables(
            FrequencyTable.from_counts(count_symbols(k_sym, models, models.size), PRECISION),
            FrequencyTable.from_counts(count_symbols(v_sym, value_models, value_models.size), PRECISION),
            scale_table,
        ))
    record = None
    if calibration is not None:
        record = {"targets_pct": [float(t) for t in calibration.targets_pct],
                  "measured_pct": [round(float(m), 4) for m in calibration.measured_pct],
                  "key_layer_factors": [round(float(f), 4) for f in calibration.key_layer_factors]}
    return KVCodecProfile(layers, kv_heads, head_dim, center.contiguous(), unit.contiguous(),
                          tuple(levels), tuple(tables), sink_tokens, record,
                          None if value_dim == head_dim else value_dim)
