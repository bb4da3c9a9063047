"""``kvcodec3``: transform-coded KV (see ``kvstore/codecs/README.md``, "kvcodec3").

Per chunk: keys (RoPE undone, query-weighted) and values (per-token scaled) projected on
the profile's learned bases of each transform group, every coordinate quantized with the
level's step and entropy-coded by the rANS coder under its own profiled symbol model
(channel-major: one model per stream row); value scale codes as in ``kvcodec``. The
context's first ``sink_tokens`` tokens are stored raw, as are the rare coordinates whose
residual falls outside the 8-bit symbol range ("patches", in coordinates). Levels keep
``kvcodec``'s meaning: 0 the best, 2 the default, each calibrated to a quality target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kvstore.codecs import rans
from kvstore.codecs.base import ProfiledCodec, register_codec
from kvstore.codecs.devices import find_impl
from kvstore.codecs.kvcodec3_profile import TransformProfile, outside_symbols
from kvstore.codecs.kvcodec_profile import ZERO, to_symbols
from kvstore.codecs.rope import position_buffer, read_position
from kvstore.codecs.symbol_model import FrequencyTable
from kvstore.errors import CodecError, FormatError
from kvstore.format.container import BufferLike, Container

DEFAULT_LEVEL = 2
LANE_SYMBOLS = 1024
SCALE_LANE_SYMBOLS = LANE_SYMBOLS // 4
MAX_LAYERS = 4096
_SUBSETS: dict[tuple[str, tuple[int, ...]], TransformProfile] = {}


def _group_size(rows: int, tokens: int, lane: int) -> int | None:
    n = rows * tokens
    return rans.default_group_size(n, lane) if n else None


@register_codec
class KVCodec3(ProfiledCodec):
    """The transform codec. ``profile``: a :class:`TransformProfile` (or the id of a registered
    one); ``level``: an index into its levels, 0 the best; ``layers``: the model layers this
    codec codes (a layer group stored on its own: whole transform groups)."""

    name = "kvcodec3"
    profile_kind = TransformProfile
    model_profile: TransformProfile

    def __init__(self, profile: TransformProfile | str, level: int = DEFAULT_LEVEL, *,
                 layers: Sequence[int] | None = None) -> None:  # fmt: skip
        profile = self._bind_profile(profile)
        if type(level) is not int or not 0 <= level < len(profile.levels):
            raise CodecError(f"level must be an int in [0, {len(profile.levels)}), got {level!r}")
        self.layers: tuple[int, ...] | None = None
        if layers is not None and list(layers) != list(range(profile.layers)):
            self.layers = tuple(layers)
            key = (self.profile_id, self.layers)
            if key not in _SUBSETS:
                _SUBSETS[key] = profile.select_layers(self.layers)
            profile = _SUBSETS[key]
        self.profile: TransformProfile = profile  # of this codec's layers
        self.level = level
        #: how many leading components of each group's key and value basis the level codes
        self.ranks = profile.level_ranks(profile.levels[level])
        #: the symbol model (profile table row) of each row of the ``k`` / ``v`` / ``scales`` streams
        self.key_models = profile.coordinate_rows(self.ranks[0], profile.key_bases).reshape(-1, 1)
        self.value_models = profile.coordinate_rows(self.ranks[1], profile.value_bases).reshape(-1, 1)
        self.scale_models = np.arange(profile.layers * profile.kv_heads).reshape(-1, 1)

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"profile": self.profile_id, "level": self.level}
        if self.layers is not None:
            params["layers"] = list(self.layers)
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> KVCodec3:
        if not {"profile", "level"} <= set(params) <= {"profile", "level", "layers"} \
                or not isinstance(params["profile"], str):  # fmt: skip
            raise FormatError(f"bad kvcodec3 parameters {dict(params)!r}"[:300])
        layers = params.get("layers")
        if layers is not None and not (isinstance(layers, list) and layers and len(layers) <= MAX_LAYERS
                                       and all(type(i) is int for i in layers) and len(set(layers)) == len(layers)):
            raise FormatError(f"bad kvcodec3 layer list {layers!r}"[:200])
        try:
            return cls(params["profile"], params["level"], layers=layers)
        except CodecError as exc:
            raise FormatError(f"bad kvcodec3 parameters {dict(params)!r}: {exc}"[:300]) from None

    def for_layers(self, layers: tuple[int, ...], num_layers: int) -> KVCodec3:
        """The codec of one layer group (whole transform groups of the profile)."""
        if list(layers) == list(range(num_layers)):
            return self
        groups = self.__dict__.setdefault("_group_codecs", {})
        if layers not in groups:
            groups[layers] = KVCodec3(self.profile_id, self.level, layers=layers)
        return groups[layers]

    def tables(self) -> tuple[FrequencyTable, FrequencyTable, FrequencyTable]:
        """The level's symbol tables of keys, values and scales (rows: the profile's models)."""
        t = self.profile.tables[self.level]
        return t.keys, t.values, t.scales

    # -- encode -----------------------------------------------------------------
    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        if keys.shape != values.shape or keys.ndim != 4:
            raise CodecError(f"keys {list(keys.shape)} and values {list(values.shape)} must both be [L, H, T, D] "
                             "(kvcodec3 profiles describe equal key and value widths)")
        position = position_buffer(start)
        self.check_shape(tuple(keys.shape))
        for name, t in (("keys", keys), ("values", values)):
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise CodecError(f"kvcodec3 {name}: the KV holds NaN or infinite values, which cannot be quantized")
        prof, level = self.profile, self.profile.levels[self.level]
        L, H, T, _ = keys.shape
        y_keys, left_k = prof.key_coordinates(keys, start)
        y_values, left_v, codes = prof.value_coordinates(values)
        buffers: dict[str, BufferLike] = {"position": position}
        sinks = max(0, min(T, prof.sink_tokens - start))
        if sinks:
            buffers["sink_k"] = keys[:, :, :sinks].contiguous().cpu()
            buffers["sink_v"] = values[:, :, :sinks].contiguous().cpu()
        exact = prof.lost_tokens((y_keys, left_k), (y_values, left_v), level, sinks=sinks)
        exact_index = exact.nonzero().squeeze(1)
        if exact_index.numel():  # tokens the bases cannot represent: stored as they are
            buffers["exact_tokens"] = exact_index.to(torch.int32).cpu()
            buffers["exact_k"] = keys[:, :, exact_index].contiguous().cpu()
            buffers["exact_v"] = values[:, :, exact_index].contiguous().cpu()
        exact[:sinks] = True
        y_keys[exact] = 0  # the cheapest symbols
        y_values[exact] = 0
        key_table, value_table, scale_table = self.tables()
        for name, y, step, table, models in (("k", y_keys, level.beta, key_table, self.key_models),
                                             ("v", y_values, level.gamma, value_table, self.value_models)):
            rows = y.T[torch.from_numpy(models[:, 0]).to(y.device)].contiguous()  # [R, T]: this level's coordinates
            residuals = torch.round(rows / step)
            outside = outside_symbols(residuals).reshape(-1).nonzero().squeeze(1)
            if outside.numel():
                buffers[f"{name}_patch_index"] = outside.to(torch.int32).cpu()
                buffers[f"{name}_patch_value"] = rows.reshape(-1)[outside].cpu()
            symbols = to_symbols(residuals, inplace=True).cpu().numpy()[..., None]
            buffers[name] = rans.encode(symbols, table, models, group_size=_group_size(rows.shape[0], T, LANE_SYMBOLS))
        scale_symbols = to_symbols(codes).reshape(L * H, T, 1).cpu().numpy()
        buffers["scales"] = rans.encode(scale_symbols, scale_table, self.scale_models,
                                        group_size=_group_size(L * H, T, SCALE_LANE_SYMBOLS))
        return buffers

    # -- decode -----------------------------------------------------------------
    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
        *, value_dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_shape(shape)
        if value_dim is not None and value_dim != shape[3]:
            raise CodecError(f"kvcodec3 profiles describe equal key and value widths, not {shape[3]} and {value_dim}")
        impl = find_impl(self.name, device.type, "decode")  # the Triton kernels on CUDA
        if impl is not None:
            return impl(self, obj, shape, dtype, device)
        prof, level = self.profile, self.profile.levels[self.level]
        L, H, T, D = shape
        start = read_position(obj, "kvcodec3")
        key_table, value_table, scale_table = self.tables()
        coordinates = []
        for name, table, models, step in (("k", key_table, self.key_models, level.beta),
                                          ("v", value_table, self.value_models, level.gamma)):
            R = models.shape[0]
            symbols = rans.decode(obj.raw(name), table, models, shape=(R, T, 1))
            rows = (torch.from_numpy(symbols).reshape(R, T).to(device).float() - ZERO).mul_(step)
            self.apply_patches(obj, name, rows)
            coordinates.append(rows.T)
        scales = rans.decode(obj.raw("scales"), scale_table, self.scale_models, shape=(L * H, T, 1))
        codes = (torch.from_numpy(scales).to(device).to(torch.int16) - ZERO).reshape(L, H, T)
        keys = prof.keys_from_coordinates(coordinates[0], start, self.ranks[0]).to(dtype)
        values = prof.values_from_coordinates(coordinates[1], codes, self.ranks[1]).to(dtype)
        self.apply_exact(obj, keys, values, start)
        return keys, values

    @staticmethod
    def apply_patches(obj: Container, name: str, rows: torch.Tensor) -> None:
        """Write the chunk's patches of stream ``name`` (checked) into its coordinates ``rows``."""
        buffers = obj.header.buffers
        index_name, value_name = f"{name}_patch_index", f"{name}_patch_value"
        if index_name not in buffers and value_name not in buffers:
            return
        index, value = obj.tensor(index_name), obj.tensor(value_name)
        if (index.dtype != torch.int32 or value.dtype != torch.float32 or index.ndim != 1 or value.shape != index.shape
                or not bool(torch.isfinite(value).all())
                or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows.numel()))):
            raise FormatError(f"kvcodec3 {name} patches are malformed")
        rows.view(-1)[index.to(rows.device).long()] = value.to(rows.device)

    def apply_exact(self, obj: Container, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Overwrite the sinks and the tokens stored exactly with their stored KV."""
        L, H, T, D = keys.shape
        expected = max(0, min(T, self.profile.sink_tokens - start))
        buffers = obj.header.buffers
        if bool(expected) != ("sink_k" in buffers or "sink_v" in buffers):
            raise FormatError(f"kvcodec3 chunk at position {start} should hold {expected} sink tokens")
        if expected:
            for name, out in (("sink_k", keys), ("sink_v", values)):
                t = obj.tensor(name)
                if t.dtype != out.dtype or tuple(t.shape) != (L, H, expected, D):
                    raise FormatError(f"kvcodec3 sink buffer {t.dtype}{list(t.shape)} does not fit the chunk")
                out[:, :, :expected] = t.to(out.device)
        if "exact_tokens" in buffers or "exact_k" in buffers or "exact_v" in buffers:
            index = obj.tensor("exact_tokens")
            n = index.shape[0] if index.ndim == 1 else -1
            if index.dtype != torch.int32 or n < 1 or int(index.min()) < expected or int(index.max()) >= T:
                raise FormatError("kvcodec3 exact token indices are malformed")
            for name, out in (("exact_k", keys), ("exact_v", values)):
                t = obj.tensor(name)
                if t.dtype != out.dtype or tuple(t.shape) != (L, H, n, D):
                    raise FormatError(f"kvcodec3 {name} buffer {t.dtype}{list(t.shape)} does not fit the chunk")
                out[:, :, index.to(out.device).long()] = t.to(out.device)
