"""``kvcodec``: the project's multi-level KV codec (see ``kvstore/codecs/README.md``).

Per chunk: keys quantized with query-aware absolute steps around a profiled
per-channel center, values quantized per token, value scales as quarter-octave
exponents; all three symbol streams entropy-coded with the interleaved rANS
coder under per-model symbol statistics from the profile (so a chunk carries
no tables). The context's first ``sink_tokens`` tokens (attention sinks) are
stored raw, as are the rare elements whose residual falls outside the 8-bit
symbol range ("patches").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstore.codecs import rans
from kvstore.codecs.base import KVCodec, profile_content_id, register_codec, register_profile, registered_profile
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
from kvstore.kernels import use_triton
from kvstore.format.container import BufferLike, Container

DEFAULT_LEVEL = 2


@dataclass(frozen=True)
class Quantized:
    """A chunk's uint8 symbol streams (``[L*H, T, D]``, ``[L*H, T, D]``, ``[L*H, T, 1]``)
    and the buffers stored as they are (sinks, patches)."""

    keys: np.ndarray
    values: np.ndarray
    scales: np.ndarray
    raw: dict[str, BufferLike]


def _patches(residuals: torch.Tensor, originals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and original values of residuals outside the symbol range."""
    mask = (residuals < -ZERO) | (residuals > 255 - ZERO)
    index = mask.reshape(-1).nonzero().squeeze(1)
    return index.to(torch.int32), originals.reshape(-1)[index]


@register_codec
class KVCodecV1(KVCodec):
    """The multi-level codec. ``profile``: a :class:`KVCodecProfile` (or the id of a
    registered one); ``level``: an index into the profile's levels, 0 the best."""

    name = "kvcodec"

    def __init__(self, profile: KVCodecProfile | str, level: int = DEFAULT_LEVEL) -> None:
        if isinstance(profile, str):
            profile_id = profile
            profile = registered_profile(profile_id)  # type: ignore[assignment]
            if not isinstance(profile, KVCodecProfile):
                raise FormatError(f"profile {profile_id!r} is not a kvcodec profile")
            self._stored = None
        else:
            self._stored = profile.to_bytes()
            profile_id = profile_content_id(self._stored)
            register_profile(profile_id, profile)
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < len(profile.levels):
            raise CodecError(f"level must be an int in [0, {len(profile.levels)}), got {level!r}")
        self.profile: KVCodecProfile = profile
        self.profile_id = profile_id
        self.level = level
        L, H, D = profile.shape
        self._models = np.arange(L * H * D).reshape(L * H, D)
        self._scale_models = np.arange(L * H).reshape(L * H, 1)

    @property
    def params(self) -> dict[str, Any]:
        return {"profile": self.profile_id, "level": self.level}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> KVCodecV1:
        if set(params) != {"profile", "level"} or not isinstance(params["profile"], str):
            raise FormatError(f"bad kvcodec parameters {dict(params)!r}")
        return cls(params["profile"], params["level"])

    @classmethod
    def profile_id_of(cls, params: Mapping[str, Any]) -> str | None:
        value = params.get("profile")
        return value if isinstance(value, str) else None

    @classmethod
    def parse_profile(cls, data: bytes | memoryview) -> KVCodecProfile:
        return KVCodecProfile.from_bytes(data)

    def stored_profile(self) -> tuple[str, bytes] | None:
        data = self._stored if self._stored is not None else self.profile.to_bytes()
        return self.profile_id, data

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        L, H, _, D = shape
        if (L, H, D) != self.profile.shape:
            raise CodecError(
                f"KV of {L} layers x {H} heads x {D} dims does not match the profile's {self.profile.shape}"
            )

    # -- encode -----------------------------------------------------------------
    def quantize(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> Quantized:
        """The symbol streams and raw side data of a chunk, before entropy coding."""
        if keys.shape != values.shape or keys.ndim != 4:
            raise CodecError(f"keys {list(keys.shape)} and values {list(values.shape)} must both be [L, H, T, D]")
        self._check_shape(tuple(keys.shape))
        L, H, T, D = keys.shape
        device = keys.device
        prof, level = self.profile, self.profile.levels[self.level]
        kf, vf = keys.float(), values.float()
        k_res = quantize_keys(kf, prof.key_center.to(device), prof.key_step(self.level).to(device))
        codes = value_scale_codes(vf)
        v_res = torch.round(vf / value_steps(codes, level.gamma)[..., None])
        sinks = max(0, min(T, prof.sink_tokens - start))
        raw: dict[str, BufferLike] = {}
        if sinks:
            k_res[:, :, :sinks] = 0
            v_res[:, :, :sinks] = 0
            raw["sink_k"] = keys[:, :, :sinks]
            raw["sink_v"] = values[:, :, :sinks]
        for name, res, original in (("k", k_res, keys), ("v", v_res, values)):
            index, patch = _patches(res, original)
            if index.numel():
                raw[f"{name}_patch_index"] = index
                raw[f"{name}_patch_value"] = patch
        flat = (L * H, T, D)
        return Quantized(
            keys=to_symbols(k_res).reshape(flat).cpu().numpy(),
            values=to_symbols(v_res).reshape(flat).cpu().numpy(),
            scales=to_symbols(codes).reshape(L * H, T, 1).cpu().numpy(),
            raw=raw,
        )

    def _streams(self) -> tuple[tuple[str, FrequencyTable, np.ndarray], ...]:
        tables = self.profile.tables[self.level]
        return (("k", tables.keys, self._models), ("v", tables.values, self._models),
                ("scales", tables.scales, self._scale_models))

    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        q = self.quantize(keys, values, start=start)
        buffers = dict(q.raw)
        for (name, table, models), symbols in zip(self._streams(), (q.keys, q.values, q.scales)):
            buffers[name] = rans.encode(symbols, table, models)
        return buffers

    def ideal_bits(self, q: Quantized) -> float:
        """The information content of a chunk's symbols under the profile's models: what
        an ideal entropy coder would emit (for ``entropy_efficiency``)."""
        return sum(ideal_code_bits(symbols, table, models)
                   for (_, table, models), symbols in zip(self._streams(), (q.keys, q.values, q.scales)))

    # -- decode -----------------------------------------------------------------
    @staticmethod
    def _residuals(obj: Container, name: str, table: FrequencyTable, models: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
        symbols = rans.decode(obj.raw(name), table, models, shape=shape)
        return torch.from_numpy(symbols).to(torch.int16) - ZERO

    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_shape(shape)
        if device.type == "cuda" and use_triton(device):
            from kvstore.kernels.kvcodec_gpu import decode_kvcodec_gpu  # Triton rANS decode + dequantize

            return decode_kvcodec_gpu(obj, self, shape, dtype, device)
        L, H, T, D = shape
        prof, level = self.profile, self.profile.levels[self.level]
        (_, k_table, models), (_, v_table, _), (_, s_table, scale_models) = self._streams()
        k_res = self._residuals(obj, "k", k_table, models, (L * H, T, D)).to(device)
        v_res = self._residuals(obj, "v", v_table, models, (L * H, T, D)).to(device)
        codes = self._residuals(obj, "scales", s_table, scale_models, (L * H, T, 1)).to(device)
        step_k = prof.key_step(self.level).to(device)[:, :, None]
        keys = k_res.reshape(L, H, T, D).float() * step_k + prof.key_center.to(device)[:, :, None]
        steps_v = value_steps(codes.reshape(L, H, T).float(), level.gamma)
        values = v_res.reshape(L, H, T, D).float() * steps_v[..., None]
        keys, values = keys.to(dtype), values.to(dtype)
        for name, out in (("k", keys), ("v", values)):
            self._apply_patches(obj, name, out, dtype, device)
        buffers = obj.header.buffers
        if "sink_k" in buffers or "sink_v" in buffers:
            sink_k, sink_v = obj.tensor("sink_k"), obj.tensor("sink_v")
            sinks = sink_k.shape[2] if sink_k.ndim == 4 else -1
            for t in (sink_k, sink_v):
                if t.dtype != dtype or t.ndim != 4 or tuple(t.shape) != (L, H, sinks, D) or not 0 < sinks <= T:
                    raise FormatError(f"kvcodec sink buffer {t.dtype}{list(t.shape)} does not fit the chunk")
            keys[:, :, :sinks] = sink_k.to(device)
            values[:, :, :sinks] = sink_v.to(device)
        return keys, values

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
        out.view(-1)[index.to(device).long()] = value.to(device)
