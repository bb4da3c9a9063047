"""The per-model profile of ``kvcodec3``: learned bases of the KV, levels, symbol models.

``kvcodec3`` codes a chunk's KV in decorrelated coordinates instead of channel by channel.
Per *transform group* (a run of consecutive layers of one attention kind, all heads):

* keys: RoPE undone (:mod:`kvstore.codecs.rope`), each channel weighted by how strongly
  the queries read it (``key_weight``: ``1 / kvcodec's key step``, averaged over each RoPE
  pair so that it commutes with the rotation), the group's layers and heads concatenated
  into one vector per token and projected on the group's principal components;
* values: divided by their per-(layer, head, token) RMS rounded to a quarter octave (the
  scale code, coded as in ``kvcodec``), then concatenated and projected the same way.

Coordinates are quantized with one step per level (``beta`` for keys, ``gamma`` for
values, in those weighted units: the same quantities as ``kvcodec``'s levels) and coded
by the rANS coder with one model per coordinate and level from this profile. Components
too weak to matter at the finest level are not stored (the bases are truncated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from kvstore.codecs.base import profile_content_id
from kvstore.codecs.kvcodec_profile import (
    PRECISION,
    ZERO,
    Level,
    LevelTables,
    open_profile,
    parse_levels,
    read_tables,
    table_buffers,
    to_symbols,
    value_scale_codes,
    value_steps,
)
from kvstore.codecs.pca import Basis, fit_basis
from kvstore.codecs.rope import RotaryTable, rotate
from kvstore.codecs.symbol_model import FrequencyTable, count_symbols
from kvstore.errors import CodecError, FormatError
from kvstore.format import container

KIND = "kvcodec3-profile"
#: layers per transform group by default: measured on SmolLM2 (benchmarks/RESULTS.md)
DEFAULT_GROUP_LAYERS = 5
#: a component is kept when its calibration standard deviation exceeds this fraction of the
#: finest level's step (weaker ones quantize to zero at every level)
KEEP_STD_OVER_STEP = 0.25
#: a token whose energy outside the profile's components exceeds this many times the calibration
#: mean ... (an outlier the bases would lose: stored exactly)
UNEXPLAINED_OVER_EXPECTED = 16.0
#: ... and this many times the quantization noise the level adds to every token anyway
UNEXPLAINED_OVER_NOISE = 4.0
#: energy outside the components below this share of a token's own is never counted as lost
LOST_SHARE = 1e-3
#: at most this share of a chunk's tokens is stored exactly: each costs 16 bits per element, and
#: a profile that fits the text poorly would otherwise flag most tokens at the finest levels
MAX_EXACT_SHARE = 1 / 32
MAX_DIM = 1 << 16
#: the context's first tokens stored exactly by default (the attention sink). More were measured
#: to change nothing (SmolLM2, held-out text: benchmarks/RESULTS.md); a later token the bases cannot
#: represent is stored exactly anyway (:meth:`TransformProfile.lost_tokens`)
SINK_TOKENS = 1


@dataclass(frozen=True)
class TransformProfile:
    """Everything ``kvcodec3`` needs besides a chunk's own bytes."""

    layers: int
    kv_heads: int
    head_dim: int
    groups: tuple[tuple[int, ...], ...]  # the layers of each transform group; every layer in one
    key_weight: torch.Tensor  # [L, H, D] float32
    rope: RotaryTable
    key_bases: tuple[Basis, ...]  # per group: len(group) * H * D features
    value_bases: tuple[Basis, ...]
    levels: tuple[Level, ...]
    tables: tuple[LevelTables, ...]  # keys: sum of key ranks models; values: sum of value ranks; scales: L*H
    sink_tokens: int = SINK_TOKENS
    calibration: dict[str, Any] | None = None
    #: [2, groups] float32: the mean energy per calibration token (keys, values) outside each
    #: group's kept components (None: zeros, an untruncated basis)
    unexplained: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        L, H, D = self.shape
        if self.unexplained is None:
            object.__setattr__(self, "unexplained", torch.zeros(2, len(self.groups)))
        u = self.unexplained
        if u.dtype != torch.float32 or tuple(u.shape) != (2, len(self.groups)) or not bool(torch.isfinite(u).all()) \
                or bool((u < 0).any()):  # fmt: skip
            raise CodecError("a kvcodec3 profile's unexplained energies must be finite, >= 0, [2, groups]")
        if sorted(layer for group in self.groups for layer in group) != list(range(L)) or not all(self.groups):
            raise CodecError(f"transform groups {list(self.groups)} do not cover each of {L} layers once")
        for group, kb, vb in zip(self.groups, self.key_bases, self.value_bases, strict=True):
            if kb.features != len(group) * H * D or vb.features != len(group) * H * D:
                raise CodecError("a transform basis does not match its group's features")
        if tuple(self.key_weight.shape) != (L, H, D) or (self.rope.layers, self.rope.head_dim) != (L, D):
            raise CodecError("key weights or RoPE table do not match the profile's dimensions")
        for t in self.tables:
            if (t.keys.num_models, t.values.num_models, t.scales.num_models) != (
                    self.key_rank, self.value_rank, L * H):  # fmt: skip
                raise CodecError("a level's symbol models do not match the profile's ranks")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.layers, self.kv_heads, self.head_dim

    @property
    def key_rank(self) -> int:
        return sum(b.rank for b in self.key_bases)

    @property
    def value_rank(self) -> int:
        return sum(b.rank for b in self.value_bases)

    def select_layers(self, layers: Sequence[int]) -> TransformProfile:
        """The profile of a union of whole transform groups (a layer group stored on its own),
        its layers in the order given."""
        index = list(layers)
        position = {layer: i for i, layer in enumerate(index)}
        picked = [g for g, group in enumerate(self.groups) if group[0] in position]
        if len(position) != len(index) or sorted(index) != sorted(layer for g in picked for layer in self.groups[g]):
            raise CodecError(f"layers {index} are not a union of whole transform groups {list(self.groups)}")
        k_ends = np.cumsum([0] + [b.rank for b in self.key_bases])
        v_ends = np.cumsum([0] + [b.rank for b in self.value_bases])
        k_rows = np.concatenate([np.arange(k_ends[g], k_ends[g + 1]) for g in picked])
        v_rows = np.concatenate([np.arange(v_ends[g], v_ends[g + 1]) for g in picked])
        heads = np.arange(self.layers * self.kv_heads).reshape(self.layers, -1)[index].reshape(-1)

        def rows(table: FrequencyTable, picked_rows: np.ndarray) -> FrequencyTable:
            return FrequencyTable(table.freqs[picked_rows], table.precision)

        return TransformProfile(
            len(index), self.kv_heads, self.head_dim,
            tuple(tuple(position[layer] for layer in self.groups[g]) for g in picked),
            self.key_weight[index].contiguous(), self.rope.select_layers(index),
            tuple(self.key_bases[g] for g in picked), tuple(self.value_bases[g] for g in picked), self.levels,
            tuple(LevelTables(rows(t.keys, k_rows), rows(t.values, v_rows), rows(t.scales, heads))
                  for t in self.tables),
            self.sink_tokens, self.calibration, self.unexplained[:, picked].contiguous())

    # -- the transform ----------------------------------------------------------
    @staticmethod
    def _group_rows(x: torch.Tensor, group: tuple[int, ...]) -> torch.Tensor:
        """``[L, H, T, D]`` -> the group's ``[T, len(group) * H * D]`` feature rows."""
        part = x[group[0]:group[0] + 1] if len(group) == 1 else x[list(group)]
        return part.permute(2, 0, 1, 3).reshape(x.shape[2], -1)

    def key_coordinates(self, keys: torch.Tensor, start: int, *,
                        lost: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Coordinates ``[T, key_rank]`` (float32) of keys ``[L, H, T, D]`` at positions ``start ..``,
        and each token's energy outside each group's components ``[T, groups]`` (see :meth:`lost_tokens`;
        ``lost=False``: None, without the reconstruction that measures it)."""
        return self._project(key_features(keys, self.rope, self.key_weight, start), self.key_bases, lost)

    def level_ranks(self, level: Level) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """How many leading components of each group's key and value basis ``level`` codes: those
        whose calibration spread exceeds :data:`KEEP_STD_OVER_STEP` of its step (the others
        quantize to zero nearly always: they cost decode work, and bits, for nothing)."""
        def ranks(bases: tuple[Basis, ...], step: float) -> tuple[int, ...]:
            return tuple(max(1, int((b.variances.sqrt() > KEEP_STD_OVER_STEP * step).sum())) for b in bases)

        return ranks(self.key_bases, level.beta), ranks(self.value_bases, level.gamma)

    def coordinate_rows(self, ranks: tuple[int, ...], bases: tuple[Basis, ...]) -> np.ndarray:
        """Indices, into all of the profile's coordinates, of each group's first ``ranks``."""
        ends = np.cumsum([0] + [b.rank for b in bases])
        return np.concatenate([np.arange(ends[g], ends[g] + r) for g, r in enumerate(ranks)])

    def keys_from_coordinates(self, y: torch.Tensor, start: int, ranks: tuple[int, ...] | None = None) -> torch.Tensor:
        """Keys ``[L, H, T, D]`` (float32) from coordinates ``[T, sum(ranks)]``: each group's first
        ``ranks`` (default all)."""
        x = self._reconstruct(y, self.key_bases, ranks)
        x.div_(self.key_weight.to(y.device)[:, :, None])
        return rotate(x, self.rope, start)

    def value_coordinates(self, values: torch.Tensor, *,
                          lost: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:  # fmt: skip
        """Coordinates ``[T, value_rank]`` of values ``[L, H, T, D]``, their energy outside each
        group's components (as :meth:`key_coordinates`), and the values' scale codes ``[L, H, T]``."""
        x, codes = value_features(values)
        return (*self._project(x, self.value_bases, lost), codes)

    def _project(self, x: torch.Tensor, bases: tuple[Basis, ...],
                 lost: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Each group's coordinates of the features ``x`` ``[L, H, T, D]`` and (``lost``) each
        token's energy outside the group's components ``[T, groups]`` (0 where under
        :data:`LOST_SHARE` of the token's own: the fp16 components' rounding alone leaves about 1e-6)."""
        parts, left = [], []
        for group, b in zip(self.groups, bases):
            rows = self._group_rows(x, group)
            y = b.project(rows)
            parts.append(y)
            if lost:
                outside = (rows - b.reconstruct(y)).pow_(2).sum(dim=1)
                total = (rows - b.mean.to(rows.device)).pow_(2).sum(dim=1)
                left.append(torch.where(outside > LOST_SHARE * total, outside, 0.0))
        return torch.cat(parts, dim=1), torch.stack(left, dim=1) if lost else None

    def lost_tokens(self, keys: tuple[torch.Tensor, torch.Tensor], values: tuple[torch.Tensor, torch.Tensor],
                    level: Level, *, sinks: int = 0) -> torch.Tensor:  # fmt: skip
        """``[T]`` flags: tokens whose energy outside the components ``level`` codes, in some group,
        is :data:`UNEXPLAINED_OVER_EXPECTED` times the calibration mean there and
        :data:`UNEXPLAINED_OVER_NOISE` times the quantization noise the level puts in every
        token of that group: outliers the level would lose, which the codec stores exactly;
        at most :data:`MAX_EXACT_SHARE` of the tokens (rounded up), the farthest over first.
        ``keys`` / ``values``: ``(coordinates, energy left outside the profile)`` as the
        coordinate methods return them; the first ``sinks`` tokens (stored apart) are never flagged."""
        rk, rv = self.level_ranks(level)
        (yk, left_k), (yv, left_v) = keys, values
        over = torch.zeros(yk.shape[0], device=yk.device)  # the largest lost / threshold over groups
        for y, left, expected, bases, ranks, step in (
                (yk, left_k, self.unexplained[0], self.key_bases, rk, level.beta),
                (yv, left_v, self.unexplained[1], self.value_bases, rv, level.gamma)):  # fmt: skip
            at = 0
            for g, (b, r) in enumerate(zip(bases, ranks)):
                lost = left[:, g] + y[:, at + r:at + b.rank].pow(2).sum(dim=1)
                mean = float(expected[g]) + float(b.variances[r:].sum())
                threshold = max(UNEXPLAINED_OVER_EXPECTED * mean, UNEXPLAINED_OVER_NOISE * r * step * step / 12, 1e-30)
                over = torch.maximum(over, lost / threshold)
                at += b.rank
        over[:sinks] = 0
        flags = over > 1
        cap = math.ceil(MAX_EXACT_SHARE * over.shape[0])
        if int(flags.sum()) > cap:
            flags = torch.zeros_like(flags)
            flags[torch.topk(over, cap).indices] = True
        return flags

    def values_from_coordinates(self, y: torch.Tensor, codes: torch.Tensor,
                                ranks: tuple[int, ...] | None = None) -> torch.Tensor:  # fmt: skip
        """Values ``[L, H, T, D]`` (float32) from coordinates (as :meth:`keys_from_coordinates`) and scale codes."""
        x = self._reconstruct(y, self.value_bases, ranks)
        return x.mul_(value_steps(codes.float(), 1.0)[..., None])

    def _reconstruct(self, y: torch.Tensor, bases: tuple[Basis, ...], ranks: tuple[int, ...] | None) -> torch.Tensor:
        L, H, D = self.shape
        T = y.shape[0]
        out = torch.empty(L, H, T, D, dtype=torch.float32, device=y.device)
        at = 0
        for g, (group, b) in enumerate(zip(self.groups, bases)):
            r = b.rank if ranks is None else ranks[g]
            rows = b.reconstruct(y[:, at:at + r]).reshape(T, len(group), H, D).permute(1, 2, 0, 3)
            if len(group) == 1:
                out[group[0]] = rows[0]
            else:
                out[list(group)] = rows
            at += r
        return out

    def roundtrip(self, keys: torch.Tensor, values: torch.Tensor, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and reconstruct a whole context's KV (positions from 0; the sinks kept exact)
        at ``level``'s steps, without entropy coding: what calibration measures."""
        yk, left_k = self.key_coordinates(keys, 0)
        yv, left_v, codes = self.value_coordinates(values)
        exact = self.lost_tokens((yk, left_k), (yv, left_v), level, sinks=self.sink_tokens)
        rk, rv = self.level_ranks(level)
        yk = dequantized(yk[:, self.coordinate_rows(rk, self.key_bases)], level.beta)
        yv = dequantized(yv[:, self.coordinate_rows(rv, self.value_bases)], level.gamma)
        k = self.keys_from_coordinates(yk, 0, rk)
        v = self.values_from_coordinates(yv, codes, rv)
        exact[:self.sink_tokens] = True
        k[:, :, exact], v[:, :, exact] = keys[:, :, exact].float(), values[:, :, exact].float()
        return k, v

    # -- storage ----------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialize as a container (no pickle)."""
        return self._serialized

    @cached_property
    def _serialized(self) -> bytes:
        buffers: dict[str, object] = {"key_weight": self.key_weight, "rope_inv_freq": self.rope.inv_freq,
                                      "rope_scaling": self.rope.scaling, "unexplained": self.unexplained}
        for g, (kb, vb) in enumerate(zip(self.key_bases, self.value_bases)):
            for name, b in (("k", kb), ("v", vb)):
                buffers[f"g{g}_{name}_mean"] = b.mean
                buffers[f"g{g}_{name}_basis"] = b.components
                buffers[f"g{g}_{name}_variance"] = b.variances
        buffers.update(table_buffers(self.tables))
        meta = {
            "layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "sink_tokens": self.sink_tokens, "groups": [list(g) for g in self.groups],
            "ranks": [[kb.rank, vb.rank] for kb, vb in zip(self.key_bases, self.value_bases)],
            "levels": [[lv.beta, lv.gamma] for lv in self.levels], "table_compression": "zlib",
        }
        if self.calibration is not None:
            meta["calibration"] = self.calibration
        return container.encode(buffers, kind=KIND, meta=meta)  # type: ignore[arg-type]

    @property
    def profile_id(self) -> str:
        return profile_content_id(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> TransformProfile:
        """Parse and validate a stored profile."""
        obj, (L, H, D, sinks) = open_profile(data, KIND, even_head_dim=True)
        meta = obj.header.meta
        groups, ranks = meta.get("groups"), meta.get("ranks")
        if not (isinstance(groups, list) and isinstance(ranks, list) and 1 <= len(groups) == len(ranks) <= L
                and all(isinstance(g, list) and 1 <= len(g) <= L and all(type(x) is int and 0 <= x < L for x in g)
                        for g in groups)
                and all(isinstance(r, list) and len(r) == 2 and all(type(x) is int and 0 < x <= MAX_DIM for x in r)
                        for r in ranks)):
            raise FormatError("kvcodec3 profile groups are malformed")
        levels = parse_levels(meta.get("levels"))
        try:
            key_weight = _tensor(obj, "key_weight", torch.float32, (L, H, D))
            rope = RotaryTable(_tensor(obj, "rope_inv_freq", torch.float32, (L, D // 2)),
                               _tensor(obj, "rope_scaling", torch.float32, (L,)))
            key_bases, value_bases = [], []
            for g, (group, (rk, rv)) in enumerate(zip(groups, ranks)):
                p = len(group) * H * D
                for name, rank, out in (("k", rk, key_bases), ("v", rv, value_bases)):
                    out.append(Basis(_tensor(obj, f"g{g}_{name}_mean", torch.float32, (p,)),
                                     _tensor(obj, f"g{g}_{name}_basis", torch.float16, (p, rank)),
                                     _tensor(obj, f"g{g}_{name}_variance", torch.float32, (rank,))))
            if not bool(torch.isfinite(key_weight).all()) or not bool((key_weight > 0).all()):
                raise FormatError("kvcodec3 profile key weights must be finite and positive")
            tables = read_tables(obj, len(levels), (sum(r[0] for r in ranks), sum(r[1] for r in ranks), L * H))
            return cls(L, H, D, tuple(tuple(g) for g in groups), key_weight, rope, tuple(key_bases),
                       tuple(value_bases), levels, tables, sinks, _calibration(meta.get("calibration")),
                       _tensor(obj, "unexplained", torch.float32, (2, len(groups))))
        except CodecError as exc:
            raise FormatError(f"kvcodec3 profile is malformed: {exc}") from None


def _tensor(obj: container.Container, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    t = obj.tensor(name)
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise FormatError(f"kvcodec3 profile buffer {name} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}")
    return t


def _calibration(raw: Any) -> dict[str, Any] | None:
    if raw is not None and not isinstance(raw, dict):
        raise FormatError("kvcodec3 profile calibration record is malformed")
    return raw


def transform_groups(layer_kinds: Sequence[Any], group_layers: int) -> tuple[tuple[int, ...], ...]:
    """The layers of each transform group: layers of one kind (sliding-window layers of a
    window, full-attention layers, ...: fetched apart, so never tied by a transform), in
    order, at most ``group_layers`` per group."""
    if type(group_layers) is not int or group_layers < 1:
        raise CodecError(f"group_layers must be a positive int, got {group_layers!r}")
    by_kind: dict[Any, list[int]] = {}
    for layer, kind in enumerate(layer_kinds):
        by_kind.setdefault(kind, []).append(layer)
    groups = [tuple(layers[i:i + group_layers]) for layers in by_kind.values()
              for i in range(0, len(layers), group_layers)]
    return tuple(sorted(groups))


def key_features(keys: torch.Tensor, rope: RotaryTable, weight: torch.Tensor, start: int) -> torch.Tensor:
    """Keys ``[L, H, T, D]`` at positions ``start ..`` as the transform sees them (float32): RoPE
    undone, each channel times its ``weight`` ``[L, H, D]``."""
    return rotate(keys.float(), rope, start, inverse=True).mul_(weight.to(keys.device)[:, :, None])


def value_features(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``[L, H, T, D]`` as the transform sees them (float32: each (layer, head, token) row
    divided by its scale), and those rows' scale codes ``[L, H, T]``."""
    v = values.float()
    codes = value_scale_codes(v)
    return v / value_steps(codes, 1.0)[..., None], codes


def outside_symbols(residuals: torch.Tensor) -> torch.Tensor:
    """Where integer residuals fall outside the 8-bit symbols (stored exactly, as patches)."""
    return (residuals < -ZERO) | (residuals > 255 - ZERO)


def dequantized(y: torch.Tensor, step: float) -> torch.Tensor:
    """What the codec stores of coordinates ``y`` at ``step``: rounded to the step, exact where
    the residual needs a patch."""
    residuals = torch.round(y / step)
    return torch.where(outside_symbols(residuals), y, residuals * step)


def pair_weights(key_unit: torch.Tensor) -> torch.Tensor:
    """Key weights ``[L, H, D]`` from ``kvcodec``'s key steps (``1 / sqrt(query energy)``):
    the query energy averaged over each RoPE pair ``(i, i + D/2)``, which a rotation mixes."""
    energy = key_unit.float().pow(-2)
    L, H, D = energy.shape
    pair = energy.view(L, H, 2, D // 2).mean(dim=2, keepdim=True).expand(L, H, 2, D // 2)
    return pair.reshape(L, H, D).sqrt().contiguous()


def fit_transform(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    rope: RotaryTable,
    key_weight: torch.Tensor,
    groups: tuple[tuple[int, ...], ...],
    sink_tokens: int = SINK_TOKENS,
) -> TransformProfile:
    """The bases of each transform group, fitted on calibration contexts' KV (``samples``:
    ``(keys, values)`` ``[L, H, T, D]`` of contexts starting at position 0; their sinks are
    left out). Untruncated and without levels: :func:`with_levels` completes it."""
    if not samples:
        raise CodecError("fit_transform needs at least one calibration context")
    L, H, _, D = samples[0][0].shape
    weight = key_weight.float().contiguous()
    if tuple(weight.shape) != (L, H, D):
        raise CodecError(f"key weights {list(weight.shape)} do not match the KV's {[L, H, D]}")
    key_rows: list[list[torch.Tensor]] = [[] for _ in groups]
    value_rows: list[list[torch.Tensor]] = [[] for _ in groups]
    for keys, values in samples:
        k = key_features(keys, rope, weight, 0)
        v, _ = value_features(values)
        for g, group in enumerate(groups):
            key_rows[g].append(TransformProfile._group_rows(k, group)[sink_tokens:])
            value_rows[g].append(TransformProfile._group_rows(v, group)[sink_tokens:])
    key_bases = tuple(fit_basis(torch.cat(rows)) for rows in key_rows)
    value_bases = tuple(fit_basis(torch.cat(rows)) for rows in value_rows)
    return TransformProfile(L, H, D, groups, weight, rope, key_bases, value_bases, (), (), sink_tokens)


def with_levels(
    fitted: TransformProfile,
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    levels: Sequence[Level],
    *,
    calibration: dict[str, Any] | None = None,
) -> TransformProfile:
    """``fitted`` with its ``levels``: the bases truncated to the components the finest level
    can code (:data:`KEEP_STD_OVER_STEP`) and every level's symbol models counted on ``samples``."""
    if not levels:
        raise CodecError("a kvcodec3 profile needs at least one level")
    finest_k, finest_v = min(lv.beta for lv in levels), min(lv.gamma for lv in levels)

    def keep(b: Basis, step: float) -> Basis:
        rank = int((b.variances.sqrt() > KEEP_STD_OVER_STEP * step).sum())
        return b.truncated(max(rank, 1))

    profile = TransformProfile(
        fitted.layers, fitted.kv_heads, fitted.head_dim, fitted.groups, fitted.key_weight, fitted.rope,
        tuple(keep(b, finest_k) for b in fitted.key_bases), tuple(keep(b, finest_v) for b in fitted.value_bases),
        (), (), fitted.sink_tokens)
    s = fitted.sink_tokens
    coords = [(profile.key_coordinates(k, 0, lost=False)[0][s:], *profile.value_coordinates(v, lost=False))
              for k, v in samples]
    yk = torch.cat([c[0] for c in coords])
    yv = torch.cat([c[1][s:] for c in coords])
    codes = torch.cat([c[3][:, :, s:] for c in coords], dim=2)
    unexplained = torch.zeros(2, len(fitted.groups))
    for which, (bases, full) in enumerate(((profile.key_bases, fitted.key_bases),
                                           (profile.value_bases, fitted.value_bases))):
        for g, (kept, whole) in enumerate(zip(bases, full)):
            unexplained[which, g] = float(whole.variances[kept.rank:].sum())
    L, H = fitted.layers, fitted.kv_heads
    scale_sym = to_symbols(codes).reshape(L * H, -1, 1).numpy()
    scale_models = np.arange(L * H).reshape(L * H, 1)
    scales = FrequencyTable.from_counts(count_symbols(scale_sym, scale_models, L * H), PRECISION)
    tables = []
    for level in levels:
        per = []
        for y, step in ((yk, level.beta), (yv, level.gamma)):
            sym = to_symbols(torch.round(y / step)).T.contiguous().unsqueeze(-1).numpy()  # [R, N, 1]
            models = np.arange(sym.shape[0]).reshape(-1, 1)
            per.append(FrequencyTable.from_counts(count_symbols(sym, models, sym.shape[0]), PRECISION))
        tables.append(LevelTables(per[0], per[1], scales))
    return TransformProfile(profile.layers, profile.kv_heads, profile.head_dim, profile.groups, profile.key_weight,
                            profile.rope, profile.key_bases, profile.value_bases, tuple(levels), tuple(tables),
                            profile.sink_tokens, calibration, unexplained)
