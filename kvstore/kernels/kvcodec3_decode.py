"""Decode a ``kvcodec3`` chunk with the kernel pipeline (``backend="triton"``: CUDA, or the
interpreter; ``backend="torch"``: the same steps in torch, on any device).

1. host: the three rANS headers (``k``, ``v``, ``scales``) get the checks of
   :func:`kvstore.codecs.rans.decode`; the streams go to the device in one copy;
2. device: one launch of the rANS decoder turns the three streams into uint8 symbols
   (the level's symbol models, a subset of the profile's, are gathered once into device
   tables of their own, so that every stream row reads its own table row);
3. device, per transform group and K / V: one kernel dequantizes the group's symbols,
   multiplies them with the group's components on tensor cores (fp16 inputs, fp32
   accumulation; the residuals are small integers, exact in fp16, and the step is applied
   after the product), adds the mean and writes the group's layers of ``[L, H, T, D]``
   with the key weights divided out and RoPE redone at the chunk's positions, or with each
   value row's scale applied (:func:`reconstruct_group`). A stream with patches (rare
   coordinates beyond the symbol range) is dequantized in torch first and read as float32;
4. sinks and the tokens stored exactly overwrite theirs; one synchronization reads the
   rANS error flags (:class:`~kvstore.errors.FormatError` for a corrupt stream).

The result matches :meth:`kvstore.codecs.kvcodec3.KVCodec3.decode` up to float rounding
(the order of the GEMM's sums, fp16 tensor-core products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from kvstore.codecs.kvcodec_profile import SCALE_STEPS_PER_OCTAVE, ZERO
from kvstore.codecs.rans import as_bytes
from kvstore.codecs.rope import read_position
from kvstore.codecs.symbol_model import FrequencyTable
from kvstore.errors import CodecError
from kvstore.format.container import Container
from kvstore.kernels.derived import derived
from kvstore.kernels.rans_decode import kernel_for
from kvstore.kernels.rans_streams import (
    MODE_SYMBOL,
    LaunchStream,
    check_errors,
    check_stream,
    decode_tables,
    upload_streams,
)
from kvstore.kernels.support import cdiv, next_power_of_2

BLOCK_T = 64
BLOCK_R = 32


@dataclass(frozen=True)
class GroupTensors:
    """One transform group's decode inputs on a device (built once per codec and device)."""

    layers: torch.Tensor  # [G] int32: the output layer of each of the group's layers
    rows: tuple[int, int]  # the group's rows [first, end) in the level's coordinate stream
    components: torch.Tensor  # [rank, P] float16: the level's leading components, one per row
    mean: torch.Tensor  # [P] float32
    weight: torch.Tensor  # [P] float32: keys' weights (ones for values)
    inv_freq: torch.Tensor  # [G, D/2] float32 (keys; zeros for values)
    rope_scale: torch.Tensor  # [G] float32


@dataclass(frozen=True)
class CodecTensors:
    """A ``kvcodec3`` codec's level on a device: its symbol tables and each group's tensors."""

    #: DecodeTables of keys, values, scales: the level's rows of the profile's tables, so that
    #: stream row ``r`` reads table row ``r`` (the rANS kernel's fast path for identity maps)
    tables: tuple[Any, Any, Any]
    keys: tuple[GroupTensors, ...]
    values: tuple[GroupTensors, ...]


def codec_tensors(codec: Any, device: torch.device) -> CodecTensors:
    """The level's tables and every group's tensors for ``codec`` on ``device`` (cached)."""
    cache = derived(codec, "kvcodec3_tensors")
    hit = cache.get(device)
    if hit is not None:
        return hit
    prof = codec.profile
    key_table, value_table, scale_table = codec.tables()
    host = (FrequencyTable(key_table.freqs[codec.key_models[:, 0]], key_table.precision),
            FrequencyTable(value_table.freqs[codec.value_models[:, 0]], value_table.precision),
            scale_table)  # fmt: skip
    L, H, D = prof.shape

    def groups(bases: tuple, ranks: tuple[int, ...], keys: bool) -> tuple[GroupTensors, ...]:
        out, at = [], 0
        for group, basis, rank in zip(prof.groups, bases, ranks, strict=True):
            index = list(group)
            weight = prof.key_weight[index].reshape(-1) if keys else torch.ones(len(group) * H * D)
            inv_freq = prof.rope.inv_freq[index] if keys else torch.zeros(len(group), D // 2)
            scale = prof.rope.scaling[index] if keys else torch.ones(len(group))
            out.append(GroupTensors(
                torch.tensor(index, dtype=torch.int32, device=device), (at, at + rank),
                basis.components[:, :rank].T.contiguous().to(device), basis.mean.to(device),
                weight.float().contiguous().to(device), inv_freq.float().contiguous().to(device),
                scale.float().contiguous().to(device)))  # fmt: skip
            at += rank
        return tuple(out)

    hit = CodecTensors(tuple(decode_tables(t, device) for t in host),  # type: ignore[arg-type]
                       groups(prof.key_bases, codec.ranks[0], True), groups(prof.value_bases, codec.ranks[1], False))
    cache[device] = hit
    return hit


def reconstruct_group(
    source: torch.Tensor,
    group: GroupTensors,
    out: torch.Tensor,
    *,
    step: float,
    start: int = 0,
    codes: torch.Tensor | None = None,
    heads: int,
) -> None:
    """Write one transform group's layers of ``out`` ``[L, H, T, D]`` (any strides) from its
    coordinates ``source`` ``[rank, T]``: uint8 symbols (residual + ``ZERO``) or float32 residuals
    (coordinates / ``step``). Keys (``codes`` None): divided by the weights, RoPE redone at
    positions ``start ..``; values: each ``(layer, head, token)`` row times ``2 ** (code / 4)``,
    ``codes`` the uint8 scale symbols ``[L * H, T]``."""
    rank, T = source.shape
    D = out.shape[3]
    if source.dtype not in (torch.uint8, torch.float32) or group.components.shape[0] != rank or source.stride(1) != 1:
        raise CodecError(f"reconstruct_group: bad coordinates {source.dtype}{list(source.shape)}")
    half = D // 2
    kernel = kernel_for(_reconstruct_kernel, out.device)
    grid = (cdiv(T, BLOCK_T), group.layers.numel() * heads)
    kernel[grid](
        source, source.stride(0), group.components, group.mean, group.weight, group.layers, group.inv_freq,
        group.rope_scale, codes if codes is not None else source, codes.stride(0) if codes is not None else 0,
        out, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        T, rank, heads, start, float(step),
        KEYS=codes is None, SYMBOLS=source.dtype == torch.uint8, HALF=half,
        HALF_P=max(16, next_power_of_2(half)), BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, ZERO_SYM=ZERO,
        SCALE_STEPS=SCALE_STEPS_PER_OCTAVE,
    )  # fmt: skip


def reconstruct_group_ref(
    source: torch.Tensor,
    group: GroupTensors,
    out: torch.Tensor,
    *,
    step: float,
    start: int = 0,
    codes: torch.Tensor | None = None,
    heads: int,
) -> None:
    """:func:`reconstruct_group` in torch (float32 throughout)."""
    rank, T = source.shape
    D = out.shape[3]
    y = source.float() - ZERO if source.dtype == torch.uint8 else source
    x = torch.addmm(group.mean, y.T * step, group.components.float())  # [T, P]
    x = x.div_(group.weight).view(T, -1, heads, D).permute(1, 2, 0, 3)  # [G, H, T, D]
    layers = group.layers.long()
    if codes is None:
        angle = group.inv_freq[:, None, :] * torch.arange(start, start + T, device=x.device, dtype=torch.float32)[None, :, None]
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        a, b = x[..., : D // 2], x[..., D // 2 :]
        x = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1) * group.rope_scale[:, None, None, None]
    else:
        code = codes.view(-1, heads, T)[layers].float() - ZERO
        x = x * torch.exp2(code / SCALE_STEPS_PER_OCTAVE)[..., None]
    out[layers] = x.to(out.dtype)


def decode_kvcodec3_kernels(
    codec: Any,
    obj: Container,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    backend: str = "triton",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a verified ``kvcodec3`` chunk (``codec`` the chunk's codec, ``shape`` its
    ``[L, H, T, D]``) on ``device``; into ``out`` (keys, values views) when given."""
    if backend not in ("triton", "torch"):
        raise CodecError(f"backend must be 'triton' or 'torch', got {backend!r}")
    device = torch.device(device)
    codec.check_shape(shape)
    start = read_position(obj, "kvcodec3")
    symbols, err = upload_symbol_streams(codec, obj, shape[2], device).decode(backend)
    if out is None:
        out = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
    reconstruct_chunk(codec, symbols, out, start, obj=obj, backend=backend)
    codec.apply_exact(obj, out[0], out[1], start)
    if err is not None:
        check_errors(err)
    return out


@dataclass(frozen=True)
class SymbolStreams:
    """A chunk's ``k``, ``v`` and ``scales`` streams checked on the host and copied to the
    device: :meth:`decode` queues their rANS decode (one launch)."""

    data: torch.Tensor
    streams: tuple[LaunchStream, ...]
    tables: tuple[Any, ...]
    total: int  # symbols of the three streams

    def decode(self, backend: str = "triton") -> tuple[torch.Tensor, torch.Tensor | None]:
        """One uint8 tensor of the symbols (rows of ``k``, then ``v``, then ``scales``) and the
        launch's error words (None for an empty chunk; not read here: no synchronization)."""
        symbols = torch.empty(self.total, dtype=torch.uint8, device=self.data.device)
        if not self.total:
            return symbols, None
        if backend == "triton":
            from kvstore.kernels.rans_decode import rans_decode_launch as launch
        else:
            from kvstore.kernels.torch_ops import rans_decode_launch_ref as launch
        return symbols, launch(self.data, list(self.streams), list(self.tables), out_u8=symbols)


def upload_symbol_streams(codec: Any, obj: Container, tokens: int, device: torch.device) -> SymbolStreams:
    """Check the chunk's streams against the codec's level (as :func:`kvstore.codecs.rans.decode`
    does) and copy them to ``device``."""
    tensors = codec_tensors(codec, device)
    raws = [as_bytes(obj.raw(name)) for name in ("k", "v", "scales")]
    models = (codec.key_models, codec.value_models, codec.scale_models)
    infos = [check_stream(raw, table, model_map, shape=(model_map.shape[0], tokens, 1))[0]  # the profile's tables
             for raw, table, model_map in zip(raws, codec.tables(), models, strict=True)]  # fmt: skip
    data, offsets = upload_streams([np.frombuffer(r, dtype=np.uint8) for r in raws], device)
    streams, at = [], 0
    for i, (info, offset, m) in enumerate(zip(infos, offsets, models, strict=True)):
        streams.append(LaunchStream(info, offset, i, MODE_SYMBOL, at, identity=True))
        at += m.shape[0] * tokens
    return SymbolStreams(data, tuple(streams), tensors.tables, at)


def reconstruct_chunk(codec: Any, symbols: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor], start: int, *,
                      obj: Container | None = None, backend: str = "triton") -> None:  # fmt: skip
    """Every transform group's keys and values into ``out`` ``[L, H, T, D]`` from the chunk's
    decoded ``symbols`` (:meth:`SymbolStreams.decode`), the patches of ``obj`` applied (the sinks and
    exact tokens are the caller's)."""
    keys, values = out
    L, H, T, _ = keys.shape
    level = codec.profile.levels[codec.level]
    tensors = codec_tensors(codec, keys.device)
    nk, nv = codec.key_models.shape[0], codec.value_models.shape[0]
    key_symbols = symbols[: nk * T].view(nk, T)
    value_symbols = symbols[nk * T : (nk + nv) * T].view(nv, T)
    codes = symbols[(nk + nv) * T :].view(L * H, T)
    reconstruct = reconstruct_group if backend == "triton" else reconstruct_group_ref
    for name, source, groups, step, target, scale_codes in (
            ("k", key_symbols, tensors.keys, level.beta, keys, None),
            ("v", value_symbols, tensors.values, level.gamma, values, codes)):  # fmt: skip
        if obj is not None and (f"{name}_patch_index" in obj.header.buffers or f"{name}_patch_value" in obj.header.buffers):
            source = source.float() - ZERO
            codec.apply_patches(obj, name, source)  # coordinates: in units of the step below
            source.view(-1)[obj.tensor(f"{name}_patch_index").to(source.device).long()] /= step
        for group in groups:
            first, end = group.rows
            reconstruct(source[first:end], group, target, step=step, start=start, codes=scale_codes, heads=H)


# ----------------------------------------------------------------------------- the kernel


@triton.jit
def _reconstruct_kernel(
    src_ptr, src_row_stride, comp_ptr, mean_ptr, weight_ptr, layer_ptr, inv_freq_ptr, rope_scale_ptr,
    code_ptr, code_row_stride, out_ptr, so_l, so_h, so_t, so_d,
    T, R, H, start, step,
    KEYS: tl.constexpr, SYMBOLS: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, ZERO_SYM: tl.constexpr, SCALE_STEPS: tl.constexpr,
):  # fmt: skip
    """One program: ``BLOCK_T`` tokens of one (layer, head) of the group. The head's two halves
    (RoPE pairs channel ``i`` with ``i + D/2``) accumulate apart, so the rotation is the epilogue."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)  # layer-in-group * H + head
    li = pid_h // H
    head = pid_h % H
    P = tl.num_programs(1) * (2 * HALF)  # features of the group
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    p_lo = pid_h * (2 * HALF) + d
    p_hi = p_lo + HALF
    acc_lo = tl.zeros([BLOCK_T, HALF_P], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_T, HALF_P], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        j = r0 + tl.arange(0, BLOCK_R)
        j_ok = j < R
        ptrs = src_ptr + j[None, :] * src_row_stride + t[:, None]
        mask = t_ok[:, None] & j_ok[None, :]
        c_mask = j_ok[:, None] & d_ok[None, :]
        c_lo = tl.load(comp_ptr + j[:, None] * P + p_lo[None, :], mask=c_mask, other=0.0)
        c_hi = tl.load(comp_ptr + j[:, None] * P + p_hi[None, :], mask=c_mask, other=0.0)
        if SYMBOLS:  # residuals in [-ZERO, 255 - ZERO]: exact in fp16
            s = tl.load(ptrs, mask=mask, other=ZERO_SYM)
            y = (s.to(tl.int32) - ZERO_SYM).to(tl.float16)
            acc_lo = tl.dot(y, c_lo, acc_lo)
            acc_hi = tl.dot(y, c_hi, acc_hi)
        else:  # patched coordinates: float32 products
            y = tl.load(ptrs, mask=mask, other=0.0)
            acc_lo = tl.dot(y, c_lo.to(tl.float32), acc_lo, input_precision="ieee")
            acc_hi = tl.dot(y, c_hi.to(tl.float32), acc_hi, input_precision="ieee")
    x_lo = acc_lo * step + tl.load(mean_ptr + p_lo, mask=d_ok, other=0.0)[None, :]
    x_hi = acc_hi * step + tl.load(mean_ptr + p_hi, mask=d_ok, other=0.0)[None, :]
    layer = tl.load(layer_ptr + li)
    if KEYS:
        x_lo = x_lo / tl.load(weight_ptr + p_lo, mask=d_ok, other=1.0)[None, :]
        x_hi = x_hi / tl.load(weight_ptr + p_hi, mask=d_ok, other=1.0)[None, :]
        freq = tl.load(inv_freq_ptr + li * HALF + d, mask=d_ok, other=0.0)
        angle = (start + t).to(tl.float32)[:, None] * freq[None, :]
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        scale = tl.load(rope_scale_ptr + li)
        out_lo = (x_lo * cos - x_hi * sin) * scale
        out_hi = (x_hi * cos + x_lo * sin) * scale
    else:
        code = tl.load(code_ptr + (layer * H + head) * code_row_stride + t, mask=t_ok, other=ZERO_SYM)
        row_scale = tl.exp2((code.to(tl.float32) - ZERO_SYM) / SCALE_STEPS)[:, None]
        out_lo = x_lo * row_scale
        out_hi = x_hi * row_scale
    base = out_ptr + layer.to(tl.int64) * so_l + head * so_h + t[:, None].to(tl.int64) * so_t
    omask = t_ok[:, None] & d_ok[None, :]
    tl.store(base + d[None, :] * so_d, out_lo.to(out_ptr.dtype.element_ty), mask=omask)
    tl.store(base + (d[None, :] + HALF) * so_d, out_hi.to(out_ptr.dtype.element_ty), mask=omask)
