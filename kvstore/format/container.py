"""The container: one stored object = a small checksummed header + raw buffers.

Layout (all integers little-endian)::

    0   4  magic  b"KVS\\x00"
    4   2  format version (1)
    6   2  reserved, zero
    8   4  header length H in bytes (at most MAX_HEADER_BYTES)
    12  4  reserved, zero
    16  8  xxh3-64 of bytes [0, 16) followed by the H header bytes
    24  H  header: UTF-8 JSON object (see below)
    ..     zero padding to a multiple of ALIGN
    D      data: the buffers, each starting at D + its offset

The header JSON holds ``kind`` (what the object is), ``codec`` (name and
parameters), ``meta`` (small free-form JSON), ``data_bytes`` (the length of the
data section) and ``buffers``: a list of ``{name, dtype, shape, offset, nbytes,
xxh3}``. Everything is validated before anything is allocated: the header size
cap, the header checksum, JSON types, dtype x shape == nbytes, offsets inside
the data section without overlap or overflow. A buffer's bytes are returned
only after their xxh3-64 matches. Like safetensors, no code is ever
deserialized; unlike it, every byte is covered by a checksum.

A reader with byte ranges needs one GET for the prefix and header (its size is
known from the manifest, or ``DEFAULT_HEAD_BYTES`` is read and a second GET
made only for larger headers) and one GET per buffer it wants.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from kvstore.errors import ChecksumError, FormatError
from kvstore.format.dtypes import dtype_name, torch_dtype
from kvstore.format.signed import is_signed

MAGIC = b"KVS\x00"
VERSION = 1
PREFIX = struct.Struct("<4sHHIIQ")  # magic, version, reserved, header length, reserved, checksum
PREFIX_BYTES = PREFIX.size  # 24
ALIGN = 64
MAX_HEADER_BYTES = 4 << 20
MAX_BUFFERS = 4096
MAX_NDIM = 8
#: the largest data section, and the largest extent of a buffer's shape (torch sizes are int64)
MAX_INT = 2**63 - 1
#: integer header fields beyond this are refused outright, so sums of them stay small enough to print
_MAX_FIELD = 2**256
DEFAULT_HEAD_BYTES = 16 << 10

BufferLike = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The xxh3-64 checksum used for every buffer and header."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True, slots=True)
class BufferSpec:
    """Where one buffer lies in the data section and what it holds."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    xxh3: int


@dataclass(frozen=True, slots=True)
class Header:
    """A validated container header."""

    kind: str
    codec: dict[str, Any]
    meta: dict[str, Any]
    buffers: dict[str, BufferSpec]
    header_bytes: int  # length of the JSON header
    data_start: int  # absolute offset of the data section
    data_bytes: int
    checksum: int  # the header checksum, a fingerprint of the whole object

    @property
    def total_bytes(self) -> int:
        """The size of the whole object."""
        return self.data_start + self.data_bytes

    def buffer_range(self, name: str) -> tuple[int, int]:
        """Absolute ``[start, stop)`` of buffer ``name`` in the object."""
        spec = self.buffers[name]
        start = self.data_start + spec.offset
        return start, start + spec.nbytes


def _data_start(header_bytes: int) -> int:
    return -(-(PREFIX_BYTES + header_bytes) // ALIGN) * ALIGN


def _as_bytes_view(buf: BufferLike) -> tuple[memoryview, str, tuple[int, ...]]:
    if isinstance(buf, torch.Tensor):
        t = buf.detach().contiguous().cpu()
        name = dtype_name(t.dtype)
        if t.numel() == 0:  # an empty tensor may keep zero strides that a byte view refuses
            return memoryview(b""), name, tuple(t.shape)
        # flatten first: a 0-d tensor cannot be viewed as bytes of another size
        return memoryview(t.reshape(-1).view(torch.uint8).numpy()), name, tuple(t.shape)
    if isinstance(buf, np.ndarray):
        return _as_bytes_view(torch.from_numpy(np.ascontiguousarray(buf)))
    view = memoryview(buf).cast("B")
    return view, "uint8", (view.nbytes,)


def encode(
    buffers: Mapping[str, BufferLike],
    *,
    kind: str,
    codec: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialize ``buffers`` (tensors, arrays or bytes) into one container object."""
    if len(buffers) > MAX_BUFFERS:
        raise FormatError(f"too many buffers ({len(buffers)} > {MAX_BUFFERS})")
    views: list[memoryview] = []
    specs: list[dict[str, Any]] = []
    offset = 0
    for name, buf in buffers.items():
        view, dtype, shape = _as_bytes_view(buf)
        pad = -offset % ALIGN
        if pad:
            views.append(memoryview(bytes(pad)))
            offset += pad
        specs.append(
            {"name": name, "dtype": dtype, "shape": list(shape), "offset": offset,
             "nbytes": view.nbytes, "xxh3": checksum(view)}
        )
        views.append(view)
        offset += view.nbytes
    header = json.dumps(
        {"kind": kind, "codec": dict(codec or {"name": "none"}), "meta": dict(meta or {}),
         "data_bytes": offset, "buffers": specs},
        separators=(",", ":"),
        allow_nan=False,
    ).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise FormatError(f"header of {len(header)} bytes exceeds the {MAX_HEADER_BYTES}-byte cap")
    start = _data_start(len(header))
    prefix_wo_sum = PREFIX.pack(MAGIC, VERSION, 0, len(header), 0, 0)[:16]
    digest = xxhash.xxh3_64(prefix_wo_sum)
    digest.update(header)
    prefix = PREFIX.pack(MAGIC, VERSION, 0, len(header), 0, digest.intdigest())
    padding = bytes(start - PREFIX_BYTES - len(header))
    return b"".join([prefix, header, padding, *views])


def header_length(prefix: bytes | memoryview) -> int:
    """The JSON header length from the first 24 bytes, validated against the cap."""
    if len(prefix) < PREFIX_BYTES:
        raise FormatError(f"object truncated: {len(prefix)} bytes, a container needs at least {PREFIX_BYTES}")
    if is_signed(prefix):
        raise FormatError("a signed object: open the store with its signing key (KVStore(..., signing_key=...))")
    _, _, _, length, _, _ = PREFIX.unpack_from(prefix)
    if length > MAX_HEADER_BYTES:
        raise FormatError(f"header claims {length} bytes, over the {MAX_HEADER_BYTES}-byte cap")
    return length


def head_bytes_needed(prefix: bytes | memoryview) -> int:
    """How many leading bytes of the object hold the prefix and the whole header."""
    return PREFIX_BYTES + header_length(prefix)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise FormatError(message)


def _nonneg_int(value: Any, what: str, limit: int = _MAX_FIELD) -> int:
    if not (type(value) is int and 0 <= value <= limit):
        shown = "a huge integer" if isinstance(value, int) and value.bit_length() > 256 else repr(value)[:80]
        raise FormatError(f"{what} must be a non-negative integer (at most {limit}), got {shown}")
    return value


def decode_header(head: bytes | memoryview, object_size: int | None = None) -> Header:
    """Parse and validate the prefix + header at the start of ``head``.

    ``head`` must hold at least :func:`head_bytes_needed` bytes. ``object_size``,
    when known, is checked against the sizes the header declares.
    """
    length = header_length(head)
    if len(head) < PREFIX_BYTES + length:
        raise FormatError(f"object truncated inside its header ({len(head)} < {PREFIX_BYTES + length} bytes)")
    magic, version, reserved_a, _, reserved_b, stored_sum = PREFIX.unpack_from(head)
    header_raw = bytes(head[PREFIX_BYTES:PREFIX_BYTES + length])
    digest = xxhash.xxh3_64(bytes(head[:16]))
    digest.update(header_raw)
    if digest.intdigest() != stored_sum:
        raise ChecksumError("container header checksum mismatch: the object is corrupt (or not a kvstore object)")
    _require(magic == MAGIC, f"not a kvstore container (magic {magic!r})")
    _require(version == VERSION, f"unsupported container version {version} (this library reads {VERSION})")
    _require(reserved_a == 0 and reserved_b == 0, "container prefix: reserved fields must be zero")
    try:
        doc = json.loads(header_raw)
    except (ValueError, RecursionError) as exc:
        # ValueError: bad JSON or UTF-8, or an integer beyond Python's digit limit;
        # RecursionError: arrays or objects nested beyond the interpreter's recursion limit
        raise FormatError(f"container header is not valid JSON: {str(exc)[:200]}") from None
    _require(isinstance(doc, dict), "container header must be a JSON object")
    kind, codec, meta = doc.get("kind"), doc.get("codec"), doc.get("meta")
    _require(isinstance(kind, str), "header field 'kind' must be a string")
    _require(isinstance(codec, dict) and isinstance(codec.get("name"), str), "header field 'codec' must be an object with a name")
    _require(isinstance(meta, dict), "header field 'meta' must be an object")
    data_bytes = _nonneg_int(doc.get("data_bytes"), "data_bytes", MAX_INT)
    data_start = _data_start(length)
    if object_size is not None:
        _require(
            object_size == data_start + data_bytes,
            f"object is {object_size} bytes but its header declares {data_start + data_bytes}",
        )
    raw_buffers = doc.get("buffers")
    _require(isinstance(raw_buffers, list) and len(raw_buffers) <= MAX_BUFFERS, "header field 'buffers' must be a list")
    buffers: dict[str, BufferSpec] = {}
    spans: list[tuple[int, int]] = []
    for item in raw_buffers:
        _require(isinstance(item, dict), "each buffer entry must be an object")
        name = item.get("name")
        _require(isinstance(name, str) and name not in buffers, f"buffer name {name!r} missing or repeated")
        dtype = item.get("dtype")
        _, itemsize = torch_dtype(dtype)
        shape = item.get("shape")
        _require(isinstance(shape, list) and len(shape) <= MAX_NDIM, f"buffer {name}: bad shape {shape!r}")
        dims = tuple(_nonneg_int(d, f"buffer {name} dimension") for d in shape)
        offset = _nonneg_int(item.get("offset"), f"buffer {name} offset")
        nbytes = _nonneg_int(item.get("nbytes"), f"buffer {name} nbytes")
        # Python ints do not overflow; compare before anything is allocated.
        _require(math.prod(dims) * itemsize == nbytes, f"buffer {name}: {dtype} x {list(dims)} != {nbytes} bytes")
        _require(offset + nbytes <= data_bytes, f"buffer {name} [{offset}, {offset + nbytes}) lies outside the {data_bytes}-byte data section")
        # an empty buffer may still name huge dimensions, which torch cannot make strides for
        _require(math.prod(max(d, 1) for d in dims) * itemsize <= MAX_INT, f"buffer {name}: shape {list(dims)} is too large")
        xxh = item.get("xxh3")
        _require(type(xxh) is int and 0 <= xxh < 2**64, f"buffer {name}: bad checksum field")
        buffers[name] = BufferSpec(name, dtype, dims, offset, nbytes, xxh)
        spans.append((offset, offset + nbytes))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        _require(start >= end, "buffers overlap in the data section")
    return Header(kind, codec, meta, buffers, length, data_start, data_bytes, stored_sum)


def verified(spec: BufferSpec, data: bytes | memoryview) -> memoryview:
    """Check a buffer's bytes against its spec and checksum; return them as a view."""
    if len(data) != spec.nbytes:
        raise FormatError(f"buffer {spec.name}: got {len(data)} bytes, expected {spec.nbytes} (truncated object?)")
    if checksum(data) != spec.xxh3:
        raise ChecksumError(f"buffer {spec.name}: checksum mismatch, the stored object is corrupt")
    return memoryview(data)


def to_tensor(spec: BufferSpec, data: bytes | memoryview) -> torch.Tensor:
    """A verified buffer as a tensor of its dtype and shape (one copy, writable)."""
    view = verified(spec, data)
    dtype, _ = torch_dtype(spec.dtype)
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(view), dtype=torch.uint8)
    return raw.view(dtype).reshape(spec.shape)


@dataclass(frozen=True, slots=True)
class Container:
    """A whole object in memory, header validated; buffers verified on access."""

    header: Header
    data: memoryview

    def raw(self, name: str) -> memoryview:
        """Buffer ``name``'s verified bytes."""
        start, stop = self._range(name)
        return verified(self.header.buffers[name], self.data[start:stop])

    def tensor(self, name: str) -> torch.Tensor:
        """Buffer ``name`` as a tensor (verified)."""
        start, stop = self._range(name)
        return to_tensor(self.header.buffers[name], self.data[start:stop])

    def _range(self, name: str) -> tuple[int, int]:
        if name not in self.header.buffers:
            raise FormatError(f"container has no buffer {name!r} (has {sorted(self.header.buffers)})")
        return self.header.buffer_range(name)


def _check_padding(header: Header, view: memoryview) -> None:
    """Padding is not checksummed, so it must be zero for a corrupt byte there to be caught."""
    covered = sorted(header.buffer_range(name) for name in header.buffers)
    position = PREFIX_BYTES + header.header_bytes
    for start, stop in [*covered, (header.total_bytes, header.total_bytes)]:
        if start > position and np.frombuffer(view[position:start], dtype=np.uint8).any():
            raise ChecksumError("non-zero padding between container sections: the stored object is corrupt")
        position = max(position, stop)


def decode(data: bytes | bytearray | memoryview) -> Container:
    """Validate a whole object and wrap it; buffers are checksummed when read."""
    view = memoryview(data).cast("B")
    header = decode_header(view[: head_bytes_needed(view)], object_size=view.nbytes)
    _check_padding(header, view)
    return Container(header, view)
