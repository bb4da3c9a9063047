"""``kvtc_ref``: KVTC's published recipe (Staniszewski et al., ICLR 2026, arXiv 2511.01815), as a baseline.

What KV Cache Transform Coding does, and so what this codec does:

* **One PCA basis per model, calibrated once**: keys (RoPE undone, :mod:`kvstore.codecs.rope`)
  and values, each concatenated across all layers and heads into one vector per token,
  centered on their calibration mean and projected on their principal components
  (:mod:`kvstore.codecs.pca`; randomized SVD for very wide models). The bases live in the
  model's profile (kind ``kvtc-profile``), not in the chunks.
* **Bit allocation** over the PCA coordinates for a budget of ``bits`` per element: widths
  ``b_i`` in ``[0, 8]`` minimising ``sum_i var_i * 4**-b_i`` with ``sum_i b_i <= bits * p``;
  trailing coordinates get zero bits and are not stored. KVTC solves it by dynamic
  programming; the objective is separable and convex in each ``b_i``, so taking the
  largest marginal gains first (what this codec does) reaches the same optimum.
* **Uniform quantization** of each coded coordinate over its range in the chunk (fp16 min
  and max per coordinate, stored with the chunk), codes bit-packed per width and
  compressed with **DEFLATE** (zlib).
* **Attention sinks stored exactly** (the context's first ``sink_tokens``).

Not implemented: KVTC also keeps the most recent 128 tokens exact; a stored chunk does not
know whether it ends its context, and the measurement that motivated this codec found the
window never paid for its bytes at 2K tokens (issue #23).

Buffers: ``position`` (int64 [1]: the chunk's first position, for RoPE), ``k_range`` /
``v_range`` (fp16 ``[2, r]``: min and max of each coded coordinate), ``k_codes`` /
``v_codes`` (DEFLATE of the packed codes, widths ascending), ``sink_k`` / ``sink_v``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from kvstore.codecs import _quant as q
from kvstore.codecs.base import Codec, ProfiledCodec, register_codec
from kvstore.codecs.kvcodec_profile import open_profile
from kvstore.codecs.pca import Basis, fit_basis
from kvstore.codecs.rope import RotaryTable, position_buffer, read_position, rotate
from kvstore.errors import CodecError, FormatError
from kvstore.format import container
from kvstore.format.container import BufferLike, Container

KIND = "kvtc-profile"
MAX_BITS = 8
MAX_BUDGET = 8.0


@dataclass(frozen=True)
class KVTCProfile:
    """KVTC's per-model calibration: the RoPE table and a key and a value basis over all layers."""

    layers: int
    kv_heads: int
    head_dim: int
    rope: RotaryTable
    key_basis: Basis
    value_basis: Basis
    sink_tokens: int = 4

    def __post_init__(self) -> None:
        p = self.layers * self.kv_heads * self.head_dim
        if self.key_basis.features != p or self.value_basis.features != p:
            raise CodecError(f"kvtc bases must have {p} features")
        if (self.rope.layers, self.rope.head_dim) != (self.layers, self.head_dim):
            raise CodecError("the kvtc profile's RoPE table does not match its dimensions")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.layers, self.kv_heads, self.head_dim

    def to_bytes(self) -> bytes:
        return self._serialized

    @cached_property
    def _serialized(self) -> bytes:
        buffers: dict[str, object] = {"rope_inv_freq": self.rope.inv_freq, "rope_scaling": self.rope.scaling}
        for name, b in (("k", self.key_basis), ("v", self.value_basis)):
            buffers[f"{name}_mean"], buffers[f"{name}_basis"], buffers[f"{name}_variance"] = (
                b.mean, b.components, b.variances)
        meta = {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "sink_tokens": self.sink_tokens}
        return container.encode(buffers, kind=KIND, meta=meta)  # type: ignore[arg-type]

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> KVTCProfile:
        obj, (L, H, D, sinks) = open_profile(data, KIND, even_head_dim=True)
        p = L * H * D

        def tensor(name: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
            t = obj.tensor(name)
            if t.dtype != dtype or t.ndim != ndim:
                raise FormatError(f"kvtc profile buffer {name} is {t.dtype}{list(t.shape)}")
            return t

        try:
            rope = RotaryTable(tensor("rope_inv_freq", torch.float32, 2), tensor("rope_scaling", torch.float32, 1))
            bases = [Basis(tensor(f"{n}_mean", torch.float32, 1), tensor(f"{n}_basis", torch.float16, 2),
                           tensor(f"{n}_variance", torch.float32, 1)) for n in ("k", "v")]
        except CodecError as exc:
            raise FormatError(f"kvtc profile is malformed: {exc}") from None
        if bases[0].features != p:
            raise FormatError(f"kvtc profile bases do not have the {p} features its dimensions give")
        try:
            return cls(L, H, D, rope, bases[0], bases[1], sinks)
        except CodecError as exc:
            raise FormatError(f"kvtc profile is malformed: {exc}") from None


def build_kvtc_profile(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rope: RotaryTable,
    *,
    sink_tokens: int = 4,
    max_bits: float = 4.0,
) -> KVTCProfile:
    """Calibrate KVTC on contexts' KV (``samples``: ``(keys, values)`` ``[L, H, T, D]`` from
    position 0); the bases keep the components a budget of ``max_bits`` per element codes."""
    if not samples:
        raise CodecError("build_kvtc_profile needs at least one calibration context")
    L, H, _, D = samples[0][0].shape
    keys = torch.cat([_rows(rotate(k.float(), rope, 0, inverse=True))[sink_tokens:] for k, _ in samples])
    values = torch.cat([_rows(v.float())[sink_tokens:] for _, v in samples])
    bases = []
    for x in (keys, values):
        b = fit_basis(x)
        widths = allocate_bits(b.variances, max_bits * x.shape[1])
        bases.append(b.truncated(max(1, int((widths > 0).sum()))))
    return KVTCProfile(L, H, D, rope, bases[0], bases[1], sink_tokens)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[L, H, T, D]`` -> ``[T, L*H*D]``: every layer and head of a token in one vector."""
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1)


def allocate_bits(variances: torch.Tensor, budget: float) -> np.ndarray:
    """Integer widths ``[r]`` in ``[0, 8]`` minimising ``sum var_i 4**-b_i`` under ``sum b_i <= budget``:
    the ``budget`` largest marginal gains ``0.75 var_i 4**-b`` (decreasing in ``b``, so the
    chosen increments of each coordinate are its first ones)."""
    var = variances.double().clamp_min(0).numpy()
    gains = 0.75 * var[:, None] * 4.0 ** -np.arange(MAX_BITS)[None, :]
    total = min(int(math.floor(budget)), gains.size)
    if total <= 0:
        return np.zeros(len(var), dtype=np.int64)
    threshold = np.partition(gains.reshape(-1), gains.size - total)[gains.size - total]
    chosen = gains > threshold
    ties = total - int(chosen.sum())  # equal gains at the threshold: the earliest coordinates first
    if ties > 0:
        at = np.flatnonzero((gains == threshold).reshape(-1))[:ties]
        chosen.reshape(-1)[at] = True
    return chosen.sum(axis=1).astype(np.int64)


@register_codec
class KVTCRefCodec(ProfiledCodec):
    """KVTC: PCA across layers and heads, bit allocation, uniform quantization, DEFLATE."""

    name = "kvtc_ref"
    profile_kind = KVTCProfile
    model_profile: KVTCProfile

    def __init__(self, profile: KVTCProfile | str, bits: float = 1.0) -> None:
        self.profile = profile = self._bind_profile(profile)  # every layer: the model's profile
        if type(bits) not in (int, float) or not 0 < bits <= MAX_BUDGET:
            raise CodecError(f"kvtc bits per element must be a number in (0, {MAX_BUDGET}], got {bits!r}")
        self.bits = float(bits)
        p = profile.layers * profile.kv_heads * profile.head_dim
        self._widths = tuple(allocate_bits(b.variances, self.bits * p)
                             for b in (profile.key_basis, profile.value_basis))

    @property
    def params(self) -> dict[str, Any]:
        return {"profile": self.profile_id, "bits": self.bits}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> KVTCRefCodec:
        if set(params) != {"profile", "bits"} or not isinstance(params["profile"], str):
            raise FormatError(f"bad kvtc_ref parameters {dict(params)!r}"[:300])
        try:
            return cls(params["profile"], params["bits"])
        except CodecError as exc:
            raise FormatError(f"bad kvtc_ref parameters: {exc}") from None

    def for_layers(self, layers: tuple[int, ...], num_layers: int) -> Codec:
        if list(layers) != list(range(num_layers)):
            raise CodecError("kvtc_ref's basis spans every layer: it cannot code a layer group on its own")
        return self

    def check_layout(self, layout: Any) -> None:
        shapes = {(s.kv_heads, s.key_dim, s.value_dim, s.slots, s.kind, s.window) for s in layout.layers}
        spec = layout.layers[0]
        if len(shapes) != 1 or spec.key_dim != spec.value_dim or spec.slots != "kv" \
                or (layout.num_layers, spec.kv_heads, spec.key_dim) != self.model_profile.shape:  # fmt: skip
            raise CodecError(f"kvtc_ref codes models whose layers are all alike and match its profile "
                             f"{self.model_profile.shape}, not {layout.describe()}")

    def encode(self, keys: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> dict[str, BufferLike]:
        L, H, T, D = q.check_kv(keys, values)
        self.check_shape((L, H, T, D))
        position = position_buffer(start)
        q.check_finite(keys, "kvtc keys")
        q.check_finite(values, "kvtc values")
        prof = self.profile
        out: dict[str, BufferLike] = {"position": position}
        sinks = max(0, min(T, prof.sink_tokens - start))
        if sinks:
            out["sink_k"] = keys[:, :, :sinks].contiguous()
            out["sink_v"] = values[:, :, :sinks].contiguous()
        features = (rotate(keys.float(), prof.rope, start, inverse=True), values.float())
        for name, x, basis, widths in zip(("k", "v"), features, (prof.key_basis, prof.value_basis), self._widths):
            coded = np.flatnonzero(widths)
            y = basis.project(_rows(x), len(coded))
            y[:sinks] = 0  # stored exactly: they neither set the ranges nor need codes
            coded_rows = y[sinks:] if sinks < T else y
            low = q.round_down(coded_rows.amin(dim=0), torch.float16)
            high = q.round_up(coded_rows.amax(dim=0), torch.float16)
            if not (bool(torch.isfinite(low).all()) and bool(torch.isfinite(high).all())):
                raise CodecError(f"kvtc {name}: a coordinate's range exceeds fp16, which stores it")
            levels = torch.from_numpy((1 << widths[coded]) - 1).float()
            span = (high.float() - low.float()).clamp_min(1e-30)
            codes = torch.round((y - low.float()) / span * levels).clamp_(min=0).minimum(levels).to(torch.uint8)
            packed = [q.pack_codes(codes[:, widths[coded] == b].T.contiguous(), int(b)).numpy()
                      for b in range(1, MAX_BITS + 1) if (widths[coded] == b).any()]
            out[f"{name}_range"] = torch.stack([low, high])
            out[f"{name}_codes"] = zlib.compress(np.concatenate(packed).tobytes() if packed else b"", 6)
        return out

    def decode(
        self, obj: Container, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
        *, value_dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_shape(shape)
        if value_dim is not None and value_dim != shape[3]:
            raise CodecError("kvtc_ref codes equal key and value widths")
        L, H, T, D = shape
        prof = self.profile
        start = read_position(obj, "kvtc")
        parts = []
        for name, basis, widths in zip(("k", "v"), (prof.key_basis, prof.value_basis), self._widths):
            coded = np.flatnonzero(widths)
            bounds = q.read(obj, f"{name}_range", (torch.float16,), (2, len(coded))).float()
            sizes = [(int(b), int((widths[coded] == b).sum())) for b in range(1, MAX_BITS + 1)]
            total = sum(q.packed_bytes(n * T, b) for b, n in sizes if n)
            raw = _inflate(obj.raw(f"{name}_codes"), total)
            codes = torch.empty(T, len(coded))
            at = 0
            for b, n in sizes:
                if not n:
                    continue
                size = q.packed_bytes(n * T, b)
                part = q.unpack_codes(torch.from_numpy(np.frombuffer(raw, np.uint8, size, at).copy()), b, n * T)
                codes[:, widths[coded] == b] = part.view(n, T).T.float()
                at += size
            levels = torch.from_numpy((1 << widths[coded]) - 1).float()
            span = bounds[1] - bounds[0]
            if not bool(torch.isfinite(bounds).all()) or bool((span < 0).any()):
                raise FormatError(f"kvtc {name}_range holds non-finite or inverted ranges")
            y = codes.mul_(span / levels).add_(bounds[0]).to(device)
            x = basis.reconstruct(y)
            parts.append(x.reshape(T, L, H, D).permute(1, 2, 0, 3))
        keys = rotate(parts[0].contiguous(), prof.rope, start).to(dtype)
        values = parts[1].to(dtype)
        sinks = max(0, min(T, prof.sink_tokens - start))
        if sinks:
            for name, out in (("sink_k", keys), ("sink_v", values)):
                t = obj.tensor(name)
                if t.dtype != dtype or tuple(t.shape) != (L, H, sinks, D):
                    raise FormatError(f"kvtc sink buffer {t.dtype}{list(t.shape)} does not fit the chunk")
                out[:, :, :sinks] = t.to(device)
        return keys, values


def _inflate(data: memoryview, size: int) -> bytes:
    """DEFLATE-decompress exactly ``size`` bytes (refusing more, less, or trailing data)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, size)
    except zlib.error as exc:
        raise FormatError(f"kvtc codes do not inflate: {exc}") from None
    if len(out) != size or inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise FormatError(f"kvtc codes inflate to another size than their {size} bytes, or are truncated")
    return out
