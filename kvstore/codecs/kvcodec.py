"""``kvcodec``: the project's multi-level KV codec (see ``kvstore/codecs/README.md``).

Per chunk: keys quantized with query-aware absolute steps around a profiled
per-channel center, values quantized per token, value scales as quarter-octave
exponents; all three symbol streams entropy-coded with the interleaved rANS
coder under per-model symbol statistics from the profile (so a chunk carries
no tables). The context's first ``sink_tokens`` tokens (attention sinks) are
stored raw, as are the rare elements whose residual falls outside the 8-bit
symbol range ("patches").

Stream layout (the ``version`` parameter, see ``README.md``): version 2, the default, codes
keys and values channel-major (``[L*H*D, T, 1]``, one model per row, lanes of ~1,024
symbols) so that a GPU warp's 32 lanes share one model; version 1, token-major
(``[L*H, T, D]``), is what chunks stored without a version hold, and is still read and
written. KV on a CUDA device is encoded and decoded by the Triton kernels of
:mod:`kvstore.kernels` where they are registered (:mod:`kvstore.codecs.devices`; for the
same symbols, the same rANS bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstore.codecs import rans
from kvstore.codecs.base import ProfiledCodec, register_codec
from kvstore.codecs.kvcodec_profile import (
    ZERO,
    KVCodecProfile,
    quantize_keys,
    to_symbols,
    value_scale_codes,
    value_steps,
)
from kvstore.codecs.symbol_model import FrequencyTable, ideal_code_bits
from kvstore.errors import CodecError, FormatError
from kvstore.format.container import BufferLike, Container
from kvstore.codecs.devices import find_impl

DEFAULT_LEVEL = 2
#: the chunk bitstream layout, recorded as the codec parameter ``version`` (absent = 1):
#: 1 = keys/values token-major ``[L*H, T, D]`` (model per (l*H + h, d)), rANS lanes of ~4,096 symbols;
#: 2 = channel-major ``[L*H*D, T, 1]`` (one model per row), lanes of ~LANE_SYMBOLS symbols.
FORMAT_VERSION = 2
VERSIONS = (1, 2)
#: symbols per rANS lane of the key/value streams (version 2): a quarter of version 1's 4,096,
#: for 4x the GPU parallelism at a small cost in size (``benchmarks/kernels_notes.md``)
LANE_SYMBOLS = 1024
#: symbols per lane of the value scale stream (version 2): its lanes end with the key/value lanes
SCALE_LANE_SYMBOLS = LANE_SYMBOLS // 4


@dataclass(frozen=True)
class StreamSpec:
    """One rANS stream of a chunk: its buffer name, table, model map, symbol shape and the
    group size an encoder uses (decoders read the group size from the stream header)."""

    name: str
    table: FrequencyTable
    model_map: np.ndarray
    shape: tuple[int, int, int]
    group_size: int | None


@dataclass(frozen=True)
class Quantized:
    """A chunk's uint8 symbol streams in the codec's stream layout (keys and values
    ``[L*H*D, T, 1]`` for version 2, ``[L*H, T, D]`` for version 1; scales ``[L*H, T, 1]``)
    and the buffers stored as they are (sinks, patches)."""

    keys: np.ndarray
    values: np.ndarray
    scales: np.ndarray
    raw: dict[str, BufferLike]


def _patches(residuals: torch.Tensor, originals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and original values of residuals outside the symbol range, NaN included
    (a NaN is in no range), so that every non-finite input shows up among the patches."""
    outside = torch.logical_not((residuals >= -ZERO).logical_and_(residuals <= 255 - ZERO))
    index = outside.reshape(-1).nonzero().squeeze(1)
    return index.to(torch.int32), originals.reshape(-1)[index]


def _refuse_non_finite(name: str, values: torch.Tensor) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise CodecError(f"kvcodec {name}: the KV holds NaN or infinite values, which cannot be quantized")


_BITS_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element width (numpy has no bfloat16)."""
    return t.view(_BITS_OF_WIDTH[t.element_size()])


def _rows_view(out: torch.Tensor) -> np.ndarray | None:
    """``out`` ([L, H, T, D], CPU) as a numpy ``[L*H, T, D]`` integer view of its memory, or
    None where its layer and head axes do not merge (then it cannot be written in place)."""
    L, H, T, D = out.shape
    try:
        return _as_bits(out.view(L * H, T, D)).numpy()
    except RuntimeError:
        return None


MAX_LAYERS = 4096
_SUBSETS: dict[tuple[str, tuple[int, ...]], KVCodecProfile] = {}


def _layer_subset(profile_id: str, profile: KVCodecProfile, layers: tuple[int, ...]) -> KVCodecProfile:
    """``profile.select_layers(layers)``, built once per profile and layer group."""
    key = (profile_id, layers)
    hit = _SUBSETS.get(key)
    if hit is None:
        hit = _SUBSETS[key] = profile.select_layers(layers)
    return hit


@register_codec
class KVCodec(ProfiledCodec):
    """The multi-level codec. ``profile``: a :class:`KVCodecProfile` (or the id of a
    registered one); ``level``: an index into the profile's levels, 0 the best;
    ``version``: the stream layout it writes and reads (:data:`FORMAT_VERSION` by default;
    chunks stored without a version are read as version 1)."""

    name = "kvcodec"
    profile_kind = KVCodecProfile
    model_profile: KVCodecProfile

    def __init__(self, profile: KVCodecProfile | str, level: int = DEFAULT_LEVEL, *,
                 version: int = FORMAT_VERSION, layers: Sequence[int] | None = None) -> None:  # fmt: skip
        profile = self._bind_profile(profile)
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < len(profile.levels):
            raise CodecError(f"level must be an int in [0, {len(profile.levels)}), got {level!r}")
        if type(version) is not int or version not in VERSIONS:
            raise CodecError(f"kvcodec format version must be one of {VERSIONS}, got {version!r}")
        self.layers: tuple[int, ...] | None = None
        if layers is not None and list(layers) != list(range(profile.layers)):
            self.layers = tuple(layers)
            profile = _layer_subset(self.profile_id, profile, self.layers)
        self.profile: KVCodecProfile = profile  # of this codec's layers
        self.level = level
        self.version = version
        L, H, D = profile.shape
        self._key_models, self._value_models = (
            np.arange(L * H * width).reshape((L * H, width) if version == 1 else (L * H * width, 1))
            for width in (D, profile.value_width))
        self._scale_models = np.arange(L * H).reshape(L * H, 1)

    @property
    def channel_major(self) -> bool:
        """Whether keys and values are coded channel-major (version >= 2)."""
        return self.version >= 2

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"profile": self.profile_id, "level": self.level}
        if self.version != 1:  # version 1 chunks were written before the field existed
            params["version"] = self.version
        if self.layers is not None:
            params["layers"] = list(self.layers)
        return params

    def for_layers(self, layers: tuple[int, ...], num_layers: int) -> KVCodec:
        """The codec of one layer group: the profile's rows of those layers."""
        if list(layers) == list(range(num_layers)):
            return self
        groups = self.__dict__.setdefault("_group_codecs", {})
        if layers not in groups:  # the profile is registered under its id: no re-serialization
            groups[layers] = KVCodec(self.profile_id, self.level, version=self.version, layers=layers)
        return groups[layers]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> KVCodec:
        if not {"profile", "level"} <= set(params) <= {"profile", "level", "version", "layers"} or not isinstance(
            params["profile"], str
        ):
            raise FormatError(f"bad kvcodec parameters {dict(params)!r}")
        layers = params.get("layers")
        if layers is not None and not (isinstance(layers, list) and layers and len(layers) <= MAX_LAYERS
                                       and all(type(i) is int for i in layers) and len(set(layers)) == len(layers)):
            raise FormatError(f"bad kvcodec layer list {layers!r}"[:200])
        version = params.get("version", 1)
        if "version" in params and (type(version) is not int or version not in VERSIONS or version == 1):
            raise FormatError(f"unsupported kvcodec format version {version!r} (this reader knows {VERSIONS})")
        try:
            return cls(params["profile"], params["level"], version=version, layers=layers)
        except CodecError as exc:
            raise FormatError(f"bad kvcodec parameters {dict(params)!r}: {exc}") from None

    def streams(self, tokens: int, *, lane_symbols: int | None = None) -> tuple[StreamSpec, StreamSpec, StreamSpec]:
        """The ``k``, ``v`` and ``scales`` streams of a chunk of ``tokens`` tokens.

        ``lane_symbols``: symbols per lane of the key/value streams (scales: a quarter),
        overriding the version's default (:data:`LANE_SYMBOLS`; rANS's 4,096 for version 1,
        on every stream); any value decodes, the group size is in each stream's header."""
        L, H, D = self.profile.shape
        Dv, T = self.profile.value_width, int(tokens)
        tables = self.profile.tables[self.level]
        k_shape, v_shape = ((L * H * d, T, 1) if self.channel_major else (L * H, T, d) for d in (D, Dv))
        s_shape = (L * H, T, 1)
        if lane_symbols is None:
            kv_lane = LANE_SYMBOLS if self.channel_major else rans.DEFAULT_LANE_SYMBOLS
            s_lane = SCALE_LANE_SYMBOLS if self.channel_major else rans.DEFAULT_LANE_SYMBOLS
        else:
            kv_lane, s_lane = int(lane_symbols), max(8, int(lane_symbols) // 4)

        def group(shape: tuple[int, int, int], lane: int) -> int | None:
            n = shape[0] * shape[1] * shape[2]
            return rans.default_group_size(n, lane) if n else None

        return (
            StreamSpec("k", tables.keys, self._key_models, k_shape, group(k_shape, kv_lane)),
            StreamSpec("v", tables.values, self._value_models, v_shape, group(v_shape, kv_lane)),
            StreamSpec("scales", tables.scales, self._scale_models, s_shape, group(s_shape, s_lane)),
        )

    # -- encode -----------------------------------------------------------------
    def quantize_tensors(
        self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, BufferLike]]:
        """The chunk's key, value and scale symbols (uint8, contiguous, in the stream layout
        of :meth:`streams`) on the device of ``keys``, and the raw side buffers (sinks,
        patches). Torch operations only: the CPU and GPU encoders share them."""
        if keys.ndim != 4 or values.shape != (*keys.shape[:3], self.profile.value_width):
            raise CodecError(f"keys {list(keys.shape)} and values {list(values.shape)} must be [L, H, T, D] and "
                             f"[L, H, T, {self.profile.value_width}] (the profile's value width)")
        self.check_shape(tuple(keys.shape))
        L, H, T, D = keys.shape
        Dv = values.shape[3]
        device = keys.device
        prof, level = self.profile, self.profile.levels[self.level]
        k_res = quantize_keys(keys.to(torch.float32, copy=True), prof.key_center.to(device),
                              prof.key_step(self.level).to(device), inplace=True)  # fmt: skip
        vf = values.to(torch.float32, copy=True)
        codes = value_scale_codes(vf)
        v_res = vf.div_(value_steps(codes, level.gamma)[..., None]).round_()
        sinks = max(0, min(T, prof.sink_tokens - start))
        raw: dict[str, BufferLike] = {}
        if sinks:
            k_res[:, :, :sinks] = 0
            v_res[:, :, :sinks] = 0
            raw["sink_k"] = keys[:, :, :sinks]
            raw["sink_v"] = values[:, :, :sinks]
            _refuse_non_finite("keys", raw["sink_k"])
            _refuse_non_finite("values", raw["sink_v"])
        # NaN or inf would decode as wrong values. Outside the sinks, each one leaves a residual
        # out of range (a NaN or infinite value also ruins its token's scale), so checking the
        # patches, a small fraction of the chunk, checks every value.
        for name, res, original in (("k", k_res, keys), ("v", v_res, values)):
            index, patch = _patches(res, original)
            _refuse_non_finite("keys" if name == "k" else "values", patch)
            if index.numel():
                raw[f"{name}_patch_index"] = index
                raw[f"{name}_patch_value"] = patch
        k_sym = to_symbols(k_res, inplace=True)
        del k_res
        v_sym = to_symbols(v_res, inplace=True)
        del v_res, vf
        if self.channel_major:  # [L, H, T, D] -> [L*H*D, T, 1]: each (layer, head, channel) row of T tokens
            k_sym = k_sym.reshape(L * H, T, D).transpose(1, 2).contiguous()
            v_sym = v_sym.reshape(L * H, T, Dv).transpose(1, 2).contiguous()
        spec_k, spec_v, spec_s = self.streams(T)
        return (k_sym.reshape(spec_k.shape), v_sym.reshape(spec_v.shape), to_symbols(codes).reshape(spec_s.shape),
                raw)  # fmt: skip

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> Quantized:
        """The symbol streams (numpy, stream layout) and raw side data of a chunk, before entropy coding."""
        k_sym, v_sym, s_sym, raw = self.quantize_tensors(keys, values, start=start)
        return Quantized(k_sym.cpu().numpy(), v_sym.cpu().numpy(), s_sym.cpu().numpy(), raw)

    def entropy_code(self, q: Quantized, *, lane_symbols: int | None = None) -> dict[str, BufferLike]:
        """A quantized chunk's buffers: its raw side buffers and the three rANS streams (CPU
        encoder). ``lane_symbols``: see :meth:`streams`."""
        buffers = dict(q.raw)
        T = q.scales.shape[1]
        for spec, symbols in zip(self.streams(T, lane_symbols=lane_symbols), (q.keys, q.values, q.scales),
                                 strict=True):  # fmt: skip
            buffers[spec.name] = rans.encode(symbols, spec.table, spec.model_map, group_size=spec.group_size)
        return buffers

    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        impl = find_impl(self.name, keys.device.type, "encode") if self.profile.value_dim is None else None
        if impl is not None:  # the Triton kernels on CUDA (for equal key and value widths)
            return impl(self, keys, values, start=start)
        return self.entropy_code(self.quantize(keys, values, start=start))

    def ideal_bits(self, q: Quantized) -> float:
        """The information content of a chunk's symbols under the profile's models: what
        an ideal entropy coder would emit (for ``entropy_efficiency``)."""
        specs = self.streams(q.scales.shape[1])
        return sum(ideal_code_bits(symbols, spec.table, spec.model_map)
                   for spec, symbols in zip(specs, (q.keys, q.values, q.scales), strict=True))  # fmt: skip

    # -- decode -----------------------------------------------------------------
    @staticmethod
    def _residuals(obj: Container, spec: StreamSpec) -> torch.Tensor:
        symbols = rans.decode(obj.raw(spec.name), spec.table, spec.model_map, shape=spec.shape)
        return torch.from_numpy(symbols).to(torch.int16) - ZERO

    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
        *, value_dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_shape(shape)
        Dv = shape[3] if value_dim is None else value_dim
        if Dv != self.profile.value_width:
            raise CodecError(f"values {Dv} wide do not match the profile's value width {self.profile.value_width}")
        impl = find_impl(self.name, device.type, "decode") if self.profile.value_dim is None else None
        if impl is not None:  # the Triton kernels on CUDA (for equal key and value widths)
            return impl(self, obj, shape, dtype, device)
        if self.channel_major and device.type == "cpu":
            keys = torch.empty(shape, dtype=dtype)
            values = torch.empty((*shape[:3], Dv), dtype=dtype)
            self._decode_cpu_into(obj, keys, values, _rows_view(keys), _rows_view(values))  # type: ignore[arg-type]
            return keys, values
        L, H, T, D = shape
        prof, level = self.profile, self.profile.levels[self.level]
        spec_k, spec_v, spec_s = self.streams(T)
        k_res = self._residuals(obj, spec_k)
        v_res = self._residuals(obj, spec_v)
        if self.channel_major:  # [L*H*D, T, 1] -> [L*H, T, D]
            k_res = k_res.reshape(L * H, D, T).transpose(1, 2).contiguous()
            v_res = v_res.reshape(L * H, Dv, T).transpose(1, 2).contiguous()
        k_res, v_res = k_res.to(device), v_res.to(device)
        codes = self._residuals(obj, spec_s).to(device)
        step_k = prof.key_step(self.level).to(device)[:, :, None]
        keys = k_res.reshape(L, H, T, D).float() * step_k + prof.key_center.to(device)[:, :, None]
        steps_v = value_steps(codes.reshape(L, H, T).float(), level.gamma)
        values = v_res.reshape(L, H, T, Dv).float() * steps_v[..., None]
        keys, values = keys.to(dtype), values.to(dtype)
        self._apply_sides(obj, keys, values)
        return keys, values

    def decode_into(self, obj: Container, out_keys: torch.Tensor, out_values: torch.Tensor) -> None:
        """On the CPU (format version 2), decode straight into the caller's views: each output
        element is written once, by the rANS decoder through a dequantizing lookup table."""
        if self.channel_major and out_keys.device.type == "cpu" and out_keys.shape[:3] == out_values.shape[:3] \
                and out_values.shape[3] == self.profile.value_width and out_keys.dtype == out_values.dtype:
            rows_k, rows_v = _rows_view(out_keys), _rows_view(out_values)
            if rows_k is not None and rows_v is not None:
                self.check_shape(tuple(out_keys.shape))
                self._decode_cpu_into(obj, out_keys, out_values, rows_k, rows_v)
                return
        super().decode_into(obj, out_keys, out_values)

    def _decode_cpu_into(self, obj: Container, keys: torch.Tensor, values: torch.Tensor,
                         rows_k: np.ndarray, rows_v: np.ndarray) -> None:  # fmt: skip
        """Version 2 on the CPU: scales first, then keys and values decoded through their lookup
        tables into ``rows_k`` / ``rows_v`` (the ``[L*H, T, D]`` integer views of ``keys`` /
        ``values``, see :func:`_rows_view`); then the sides, on the tensors."""
        L, H, T, _ = keys.shape
        spec_k, spec_v, spec_s = self.streams(T)
        scales = rans.decode(obj.raw(spec_s.name), spec_s.table, spec_s.model_map, shape=spec_s.shape)
        lut_k, lut_v = self._lookup_tables(keys.dtype)
        for spec, rows, token_lut, lut in ((spec_k, rows_k, None, lut_k),
                                           (spec_v, rows_v, scales.reshape(L * H, T), lut_v)):  # fmt: skip
            width = rows.shape[2]
            rans.decode_rows_through_lut(obj.raw(spec.name), spec.table, rows=L * H * width, tokens=T,
                                         row_width=width, lut=lut, out=rows, token_lut=token_lut)  # fmt: skip
        self._apply_sides(obj, keys, values)

    def _lookup_tables(self, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
        """The dequantizing lookup tables of ``dtype`` (as same-width integers, built once per
        codec and dtype): keys ``[L*H*D, 256]``, the value of each symbol in each row (the
        same arithmetic as the unfused decode); values ``[256, 256]``, by scale symbol."""
        cache = self.__dict__.setdefault("_luts", {})
        if dtype not in cache:
            prof, level = self.profile, self.profile.levels[self.level]
            residual = (torch.arange(256, dtype=torch.int16) - ZERO).float()
            keys = residual[None, :] * prof.key_step(self.level).reshape(-1, 1) + prof.key_center.reshape(-1, 1)
            values = residual[None, :] * value_steps(residual, level.gamma)[:, None]
            cache[dtype] = tuple(_as_bits(t.to(dtype)).numpy() for t in (keys, values))
        return cache[dtype]

    def _apply_sides(self, obj: Container, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the decoded ``keys`` / ``values`` with the chunk's patches and sinks."""
        L, H, T, _ = keys.shape
        dtype, device = keys.dtype, keys.device
        for name, out in (("k", keys), ("v", values)):
            self._apply_patches(obj, name, out, dtype, device)
        buffers = obj.header.buffers
        if "sink_k" in buffers or "sink_v" in buffers:
            sink_k, sink_v = obj.tensor("sink_k"), obj.tensor("sink_v")
            sinks = sink_k.shape[2] if sink_k.ndim == 4 else -1
            for t, out in ((sink_k, keys), (sink_v, values)):
                if t.dtype != dtype or t.ndim != 4 or tuple(t.shape) != (L, H, sinks, out.shape[3]) \
                        or not 0 < sinks <= T:
                    raise FormatError(f"kvcodec sink buffer {t.dtype}{list(t.shape)} does not fit the chunk")
            keys[:, :, :sinks] = sink_k.to(device)
            values[:, :, :sinks] = sink_v.to(device)

    @staticmethod
    def _apply_patches(obj: Container, name: str, out: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        buffers = obj.header.buffers
        index_name, value_name = f"{name}_patch_index", f"{name}_patch_value"
        if index_name not in buffers and value_name not in buffers:
            return
        index, value = obj.tensor(index_name), obj.tensor(value_name)
        if (index.dtype != torch.int32 or value.dtype != dtype or index.ndim != 1 or value.shape != index.shape
                or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= out.numel()))):
            raise FormatError(f"kvcodec {name} patches are malformed")
        if out.is_contiguous():
            out.view(-1)[index.to(device).long()] = value.to(device)
        else:  # a view into the caller's output: the flat index of [L, H, T, D] unravelled
            i = index.to(device).long()
            L, H, T, D = out.shape
            out[i // (H * T * D), i // (T * D) % H, i // D % T, i % D] = value.to(device)
