"""Decode a ``kvcodec`` chunk with the kernel pipeline: rANS decode + dequantization into
``[L, H, T, D]``, in Triton kernels (``backend="triton"``: CUDA, or the interpreter) or in
their torch versions (``backend="torch"``: any device).

:func:`decode_kvcodec_kernels` computes what :meth:`kvstore.codecs.kvcodec.KVCodec.decode`
computes, bit for bit when that runs on the same CUDA device (the arithmetic is the
same float32 multiply then add, without FMA contraction, rounded once to the output
dtype), with the entropy decoding and dequantization in Triton kernels:

1. host: the three rANS headers (``k``, ``v``, ``scales``) get the checks of
   :func:`kvstore.codecs.rans.decode`; the streams go to the device in one copy (through
   a pinned staging buffer) unless they are device tensors already;
2. device, token-major chunks (format version 1): *fused* plan (when the scale stream is
   short: at most 1/16 of the steps per lane of the key/value streams): decode ``scales``
   to codes, then one launch decodes ``k`` straight into fp16/bf16 keys and ``v`` straight
   into values; *split* plan (otherwise, e.g. as version 1 writes them, every stream with
   lanes of ~4096 symbols): one launch decodes ``k`` into keys, ``v`` into uint8 symbols and
   ``scales`` into codes concurrently, then one elementwise pass turns the value symbols
   into values (:func:`kvstore.kernels.dequantize.dequantize_rowscale`);
3. patches and sink tokens (checked and copied to the device once, in
   :func:`prepare_kvcodec`) overwrite their elements: torch indexing on the device, so a
   decode of a prepared chunk queues its work without waiting for the GPU until step 4;
4. one synchronization reads the kernels' error flags; any corrupt stream raises
   :class:`~kvstore.errors.FormatError`.

*Channel-major* chunks (kvcodec format version 2, its default: ``k``/``v`` coded as
``[L*H*D, T, 1]`` with one model per row, so the 32 lanes of a warp share one model and a
table lookup touches one or two cache lines instead of 32) have their own plan: one launch
decodes the three streams to uint8, then
:func:`kvstore.kernels.dequantize.dequantize_kv_channel_major` transposes and dequantizes.
The layout follows the codec's ``version`` (chunks stored without one are token-major,
version 1, and take the fused or split plan); a stream whose header disagrees is rejected.

``backend="torch"`` runs the same plan with the pure-torch references of
:mod:`kvstore.kernels.torch_ops` (any device; slow).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvstore.codecs.kvcodec_profile import ZERO, value_steps
from kvstore.codecs.rans import HEADER_BYTES, StreamInfo, as_bytes
from kvstore.errors import CodecError, FormatError
from kvstore.format.container import Container
from kvstore.kernels.dequantize import dequantize_kv_channel_major, dequantize_rowscale
from kvstore.kernels.derived import derived
from kvstore.kernels.rans_decode import (
    DEFAULT_CONFIG,
    MODE_AFFINE,
    MODE_ROWSCALE,
    MODE_SYMBOL,
    DecodeConfig,
    LaunchStream,
    check_errors,
    check_stream,
    decode_tables,
    plan_rans_launch,
    upload_streams,
)

__all__ = [
    "PreparedChunk",
    "decode_kvcodec_kernels",
    "decode_prepared",
    "prepare_kvcodec",
]

STREAMS = ("k", "v", "scales")
#: the fused plan decodes the scale stream first; worth it when that costs at most ~1/16 of the rest
FUSED_STEP_RATIO = 16


@dataclass
class PreparedChunk:
    """A chunk's streams checked on the host and resident on the device, ready to decode."""

    codec: Any
    shape: tuple[int, int, int, int]
    device: torch.device
    data: torch.Tensor  # uint8, the three streams
    infos: tuple[StreamInfo, StreamInfo, StreamInfo]
    offsets: tuple[int, int, int]
    pad_bytes: torch.Tensor | None  # device streams: their padding bytes, checked on the device
    patches: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sinks: tuple[torch.Tensor, torch.Tensor] | None
    layout: str = "token"  # "token": k/v as [L*H, T, D]; "channel": [L*H*D, T, 1]
    last_err: torch.Tensor | None = None  # per-group error words of the last decode
    launches: dict = field(default_factory=dict)  # ((plan, step), DecodeConfig) -> RansLaunch


def _getter(obj_or_buffers: Container | Mapping[str, Any]):
    if isinstance(obj_or_buffers, Container):
        names = set(obj_or_buffers.header.buffers)
        return names, obj_or_buffers.raw, obj_or_buffers.tensor
    if not isinstance(obj_or_buffers, Mapping):
        raise CodecError(f"expected a Container or a mapping of buffers, got {type(obj_or_buffers).__name__}")
    names = set(obj_or_buffers)

    def get(name: str) -> Any:
        if name not in obj_or_buffers:
            raise FormatError(f"kvcodec chunk has no buffer {name!r} (has {sorted(names)})")
        return obj_or_buffers[name]

    def tensor(name: str) -> torch.Tensor:
        value = get(name)
        if not isinstance(value, torch.Tensor):
            raise FormatError(f"kvcodec buffer {name!r} must be a tensor")
        return value

    return names, get, tensor


def _device_stream_info(t: torch.Tensor, table, model_map, shape) -> tuple[StreamInfo, int]:
    """Header checks of a stream already on the device: the header is copied back (48 bytes)."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise FormatError("a device-resident rANS stream must be a 1-D uint8 tensor")
    n = t.numel()
    fake = np.zeros(n, dtype=np.uint8)  # calloc'd: only the header page is touched
    head = min(n, HEADER_BYTES)
    fake[:head] = t[:head].cpu().numpy()
    info, _ = check_stream(fake, table, model_map, shape=shape)
    return info, info.words_offset + 2 * info.num_words


def profile_tensors(codec, device: torch.device) -> dict[str, torch.Tensor]:
    """The codec level's key steps and centers and value step table on ``device`` (cached per profile)."""
    prof = codec.profile
    cache = derived(prof, "gpu_steps")
    key = (codec.level, device)
    hit = cache.get(key)
    if hit is None:
        level = prof.levels[codec.level]
        hit = {
            "scale": prof.key_step(codec.level).reshape(-1).contiguous().to(device),
            "bias": prof.key_center.reshape(-1).contiguous().to(device),
            "vtab": value_steps(torch.arange(256, device=device, dtype=torch.float32) - ZERO, level.gamma).contiguous(),
        }
        cache[key] = hit
    return hit


def _norm_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def prepare_kvcodec(
    obj_or_buffers: Container | Mapping[str, Any], codec, shape: tuple[int, int, int, int], device
) -> PreparedChunk:
    """Host-side checks and the upload of a chunk's streams (see the module doc)."""
    device = _norm_device(device)
    codec.check_shape(tuple(shape))
    if codec.profile.value_dim is not None:
        raise CodecError("the kvcodec kernels decode equal key and value widths; KVCodec.decode decodes "
                         "other layouts (MLA) with torch operations on the device")
    L, H, T, D = (int(v) for v in shape)
    names, get, tensor = _getter(obj_or_buffers)
    values = [get(name) for name in STREAMS]
    layout = "channel" if codec.channel_major else "token"
    specs = [(spec.name, spec.table, spec.model_map, spec.shape) for spec in codec.streams(T)]
    pads: list[torch.Tensor] = []
    if all(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values):
        infos, parts, offsets, pos = [], [], [], 0
        for v, (_, table, mm, shp) in zip(values, specs, strict=True):
            info, end = _device_stream_info(v, table, mm, shp)
            infos.append(info)
            pads.append(v[end:])
            offsets.append(pos)
            padded = -(-v.numel() // 64) * 64
            parts.append(torch.nn.functional.pad(v.to(device), (0, padded - v.numel())))
            pos += padded
        data = torch.cat(parts)
    else:
        raws, infos = [], []
        for v, (_, table, mm, shp) in zip(values, specs, strict=True):
            raw = as_bytes(v.cpu().numpy() if isinstance(v, torch.Tensor) else v)
            info, _ = check_stream(raw, table, mm, shape=shp)
            raws.append(raw)
            infos.append(info)
        data, offsets = upload_streams(raws, device)
    patches = {}
    for name in ("k", "v"):
        index_name, value_name = f"{name}_patch_index", f"{name}_patch_value"
        if index_name in names or value_name in names:
            patches[name] = _prepare_patches(name, tensor(index_name), tensor(value_name), L * H * T * D, device)
    sinks = None
    if "sink_k" in names or "sink_v" in names:
        sinks = _prepare_sinks(tensor("sink_k"), tensor("sink_v"), (L, H, T, D), device)
    pad_bytes = torch.cat([p.reshape(-1) for p in pads]) if pads else None
    return PreparedChunk(codec, (L, H, T, D), device, data, tuple(infos), tuple(offsets), pad_bytes, patches, sinks,
                         layout)  # fmt: skip


def _steps(info: StreamInfo) -> int:
    return -(-info.group_size // 32)


def _rans(chunk: PreparedChunk, key: tuple, backend: str, config: DecodeConfig, streams, tables, **outputs):
    """Queue one rANS launch of ``streams()`` with ``tables()`` (callables: built only when needed).
    Triton: planned once per chunk, layout and config (:class:`RansLaunch`), then only run;
    torch: the reference launch."""
    if backend == "torch":
        from kvstore.kernels.torch_ops import rans_decode_launch_ref

        cache = profile_tensors(chunk.codec, chunk.device)
        return rans_decode_launch_ref(chunk.data, streams(), tables(), aff_scale=cache["scale"],
                                      aff_bias=cache["bias"], vtab=cache["vtab"], config=config, **outputs)  # fmt: skip
    launch = chunk.launches.get((key, config))
    if launch is None:
        cache = profile_tensors(chunk.codec, chunk.device)
        launch = chunk.launches[(key, config)] = plan_rans_launch(
            chunk.data, streams(), tables(), aff_scale=cache["scale"], aff_bias=cache["bias"], vtab=cache["vtab"],
            config=config,
        )  # fmt: skip
    return launch.run(**outputs)


def decode_prepared(
    chunk: PreparedChunk,
    dtype: torch.dtype,
    *,
    plan: str = "auto",
    config: DecodeConfig = DEFAULT_CONFIG,
    backend: str = "triton",
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a :class:`PreparedChunk` into ``(keys, values)`` ``[L, H, T, D]`` of ``dtype``.

    ``plan``: "auto", "fused" or "split" (module doc; channel-major chunks have their own).
    ``check=False`` skips the final synchronization and error check (the caller then checks ``chunk.last_err``).
    The host's work before the first kernel starts is kept short (the launches are planned
    once per chunk): with ``check`` the GPU waits for it at every chunk (timings in
    ``benchmarks/kernels_notes.md``).
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise CodecError(f"kvcodec decodes to fp16, bf16 or fp32, not {dtype}")
    if backend == "triton":
        rowscale, channel = dequantize_rowscale, dequantize_kv_channel_major
    elif backend == "torch":
        from kvstore.kernels.torch_ops import dequantize_kv_channel_major_ref, dequantize_rowscale_ref

        rowscale, channel = dequantize_rowscale_ref, dequantize_kv_channel_major_ref
    else:
        raise CodecError(f"backend must be 'triton' or 'torch', got {backend!r}")
    codec, device = chunk.codec, chunk.device
    L, H, T, D = chunk.shape
    n = L * H * T * D
    ik, iv, isc = chunk.infos
    ok, ov, osc = chunk.offsets

    def tables(*which: int) -> Callable[[], list]:
        def build() -> list:
            level = codec.profile.tables[codec.level]
            all3 = (level.keys, level.values, level.scales)
            return [decode_tables(all3[i], device) for i in which]

        return build

    if chunk.layout == "channel":
        plan = "channel"
    elif plan == "auto":
        plan = "fused" if _steps(isc) * FUSED_STEP_RATIO <= max(_steps(ik), _steps(iv)) else "split"
    elif plan not in ("fused", "split"):
        raise CodecError(f"plan must be 'auto', 'fused' or 'split', got {plan!r}")
    gk, gv, gs = ik.num_groups, iv.num_groups, isc.num_groups
    # the kernel writes every group's error word (tests/test_kernels_rans.py poisons them): no fill
    alloc = torch.empty if backend == "triton" and gk + gv + gs else torch.zeros
    err = alloc(max(1, gk + gv + gs), dtype=torch.int32, device=device)
    if plan == "channel":
        # the decode first (the GPU idles until it is queued), the output while it runs
        u8 = torch.empty(2 * n + L * H * T, dtype=torch.uint8, device=device)
        _rans(chunk, ("channel",), backend, config, lambda: [
            LaunchStream(ik, ok, 0, MODE_SYMBOL, 0, identity=True), LaunchStream(iv, ov, 1, MODE_SYMBOL, n, identity=True),
            LaunchStream(isc, osc, 2, MODE_SYMBOL, 2 * n, identity=True)], tables(0, 1, 2), out_u8=u8, err=err)  # fmt: skip
        out = torch.empty((2, L, H, T, D), dtype=dtype, device=device)
        cache = profile_tensors(codec, device)
        channel(u8[: 2 * n].view(2, L * H, D, T), u8[2 * n :], cache["scale"], cache["bias"], cache["vtab"], out)
    else:
        out = torch.empty((2, L, H, T, D), dtype=dtype, device=device)
        k_st = lambda: LaunchStream(ik, ok, 0, MODE_AFFINE, 0, identity=True)  # noqa: E731
        if plan == "fused":
            codes = torch.empty(L * H * T, dtype=torch.uint8, device=device)
            _rans(chunk, ("fused", 1), backend, config, lambda: [LaunchStream(isc, osc, 0, MODE_SYMBOL, 0, identity=True)],
                  tables(2), out_u8=codes, err=err[gk + gv :])  # fmt: skip
            _rans(chunk, ("fused", 2), backend, config,
                  lambda: [k_st(), LaunchStream(iv, ov, 1, MODE_ROWSCALE, n, identity=True)], tables(0, 1),
                  out_f=out.view(-1), codes=codes, err=err[: gk + gv])  # fmt: skip
        else:
            # symbols of v and codes of scales go to one uint8 buffer: v at [0, n), codes after
            u8 = torch.empty(n + L * H * T, dtype=torch.uint8, device=device)
            _rans(chunk, ("split",), backend, config, lambda: [
                k_st(), LaunchStream(iv, ov, 1, MODE_SYMBOL, 0, identity=True),
                LaunchStream(isc, osc, 2, MODE_SYMBOL, n, identity=True)], tables(0, 1, 2),
                out_f=out.view(-1), out_u8=u8, err=err)  # fmt: skip
            rowscale(u8[:n], u8[n:], profile_tensors(codec, device)["vtab"], D, out[1].view(-1))
    keys, values = out[0], out[1]
    for name, target in (("k", keys), ("v", values)):
        if name in chunk.patches:
            _apply_patches(name, *chunk.patches[name], target, dtype)
    if chunk.sinks is not None:
        _apply_sinks(chunk.sinks, keys, values, dtype)
    chunk.last_err = err
    if check:
        if chunk.pad_bytes is not None and chunk.pad_bytes.numel() and bool(chunk.pad_bytes.any()):
            raise FormatError("rANS stream: non-zero padding after the words")
        check_errors(err)
    return keys, values


def _prepare_patches(name: str, index: torch.Tensor, value: torch.Tensor, numel: int, device) -> tuple:
    """Checked (as ``KVCodec.decode`` checks them, but the value dtype, checked at decode) and on the device."""
    if (index.dtype != torch.int32 or index.ndim != 1 or value.shape != index.shape
            or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel))):  # fmt: skip
        raise FormatError(f"kvcodec {name} patches are malformed")
    return index.to(device, torch.int64, non_blocking=True), value.to(device, non_blocking=True)


def _prepare_sinks(sink_k: torch.Tensor, sink_v: torch.Tensor, shape, device) -> tuple:
    L, H, T, D = shape
    n_sink = sink_k.shape[2] if sink_k.ndim == 4 else -1
    for t in (sink_k, sink_v):
        if t.dtype != sink_k.dtype or t.ndim != 4 or tuple(t.shape) != (L, H, n_sink, D) or not 0 < n_sink <= T:
            raise FormatError(f"kvcodec sink buffer {t.dtype}{list(t.shape)} does not fit the chunk")
    return sink_k.to(device, non_blocking=True), sink_v.to(device, non_blocking=True)


def _apply_patches(name: str, index: torch.Tensor, value: torch.Tensor, out: torch.Tensor, dtype) -> None:
    if value.dtype != dtype:
        raise FormatError(f"kvcodec {name} patches are malformed")
    if index.numel():
        out.view(-1)[index] = value


def _apply_sinks(sinks, keys: torch.Tensor, values: torch.Tensor, dtype) -> None:
    sink_k, sink_v = sinks
    if sink_k.dtype != dtype:
        raise FormatError(f"kvcodec sink buffer {sink_k.dtype}{list(sink_k.shape)} does not fit the chunk")
    n_sink = sink_k.shape[2]
    keys[:, :, :n_sink] = sink_k
    values[:, :, :n_sink] = sink_v


def decode_kvcodec_kernels(
    obj_or_buffers: Container | Mapping[str, Any],
    codec,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    plan: str = "auto",
    config: DecodeConfig = DEFAULT_CONFIG,
    backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``KVCodec.decode(obj, shape, dtype, device)`` returns, decoded on ``device``.

    ``obj_or_buffers``: the chunk's :class:`Container` (buffers are checksum-verified as
    they are read) or a mapping of its buffers as ``codec.encode`` returned them (the
    three streams may also be uint8 tensors already on the device). Raises
    :class:`FormatError` for a corrupt chunk, :class:`CodecError` for a shape that does
    not fit the codec's profile.
    """
    chunk = prepare_kvcodec(obj_or_buffers, codec, shape, device)
    return decode_prepared(chunk, dtype, plan=plan, config=config, backend=backend)
