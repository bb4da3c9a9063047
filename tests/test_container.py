"""The container format: round trips, validation before allocation, checksums."""

import json
import struct

import numpy as np
import pytest
import torch

from kvstore.errors import ChecksumError, FormatError
from kvstore.format import container


def _sample() -> bytes:
    return container.encode(
        {
            "a": torch.arange(24, dtype=torch.float16).reshape(2, 3, 4),
            "b": torch.tensor([1, 2, 3], dtype=torch.int32),
            "c": b"raw bytes",
            "empty": torch.empty(0, 5, dtype=torch.bfloat16),
        },
        kind="test",
        codec={"name": "demo", "params": {"x": 1}},
        meta={"note": "hello"},
    )


def _forge(header: dict, data: bytes = b"") -> bytes:
    """A container with a chosen header and a valid header checksum (a crafted object)."""
    raw = json.dumps(header).encode()
    prefix = struct.pack("<4sHHII", container.MAGIC, container.VERSION, 0, len(raw), 0)
    digest = container.xxhash.xxh3_64(prefix)
    digest.update(raw)
    head = prefix + struct.pack("<Q", digest.intdigest()) + raw
    return head + bytes(-len(head) % container.ALIGN) + data


def test_round_trip_of_every_dtype_and_bytes():
    obj = container.decode(_sample())
    assert obj.header.kind == "test"
    assert obj.header.codec == {"name": "demo", "params": {"x": 1}}
    assert obj.header.meta == {"note": "hello"}
    assert torch.equal(obj.tensor("a"), torch.arange(24, dtype=torch.float16).reshape(2, 3, 4))
    assert obj.tensor("b").tolist() == [1, 2, 3]
    assert bytes(obj.raw("c")) == b"raw bytes"
    assert obj.tensor("empty").shape == (0, 5) and obj.tensor("empty").dtype == torch.bfloat16
    for spec in obj.header.buffers.values():
        assert (obj.header.data_start + spec.offset) % container.ALIGN == 0


def test_tensor_is_writable_copy():
    data = _sample()
    t = container.decode(data).tensor("a")
    t += 1
    assert torch.equal(container.decode(data).tensor("a"), torch.arange(24, dtype=torch.float16).reshape(2, 3, 4))


def test_every_corrupted_byte_is_detected():
    sample = _sample()
    for position in range(len(sample)):
        data = bytearray(sample)
        data[position] ^= 0x5A
        with pytest.raises(FormatError) as info:
            obj = container.decode(bytes(data))
            for name in obj.header.buffers:
                obj.raw(name)
        # the header-length field may instead read as an oversized or truncated header
        if not 8 <= position < 12:
            assert isinstance(info.value, ChecksumError), (position, info.value)


def test_truncated_object_is_rejected():
    data = _sample()
    for cut in (0, 10, 23, 30, len(data) - 1):
        with pytest.raises(FormatError, match="truncated|declares"):
            container.decode(data[:cut])


def test_header_over_cap_is_rejected_before_reading_it():
    data = bytearray(_sample())
    struct.pack_into("<I", data, 8, container.MAX_HEADER_BYTES + 1)
    with pytest.raises(FormatError, match="cap"):
        container.decode(bytes(data))


def test_buffer_claiming_a_terabyte_is_rejected_without_allocating():
    one_tb = 1 << 40
    forged = _forge({
        "kind": "x", "codec": {"name": "raw"}, "meta": {}, "data_bytes": one_tb,
        "buffers": [{"name": "k", "dtype": "float16", "shape": [one_tb // 2], "offset": 0, "nbytes": one_tb, "xxh3": 0}],
    })
    with pytest.raises(FormatError, match="declares"):
        container.decode(forged)
    header = container.decode_header(forged)  # a ranged reader sees the header alone...
    with pytest.raises(FormatError, match="expected"):  # ...and refuses the buffer it cannot have
        container.verified(header.buffers["k"], b"\0" * 16)


@pytest.mark.parametrize(
    "bad_buffer, message",
    [
        ({"dtype": "float16", "shape": [4], "offset": 0, "nbytes": 7}, "!="),
        ({"dtype": "float16", "shape": [4], "offset": 60, "nbytes": 8}, "outside"),
        ({"dtype": "float16", "shape": [-4], "offset": 0, "nbytes": 8}, "non-negative"),
        ({"dtype": "pickle", "shape": [4], "offset": 0, "nbytes": 8}, "unknown stored dtype"),
        ({"dtype": "uint8", "shape": [1] * 9, "offset": 0, "nbytes": 1}, "shape"),
        ({"dtype": "uint8", "shape": [8], "offset": 0, "nbytes": 8, "xxh3": -1}, "checksum"),
        ({"dtype": "uint8", "shape": [8], "offset": 1.5, "nbytes": 8}, "offset"),
        ({"dtype": "uint8", "shape": [2**70], "offset": 0, "nbytes": 2**70}, "outside"),
    ],
)
def test_malformed_buffer_entries_are_rejected(bad_buffer, message):
    entry = {"name": "k", "xxh3": 0, **bad_buffer}
    forged = _forge({"kind": "x", "codec": {"name": "raw"}, "meta": {}, "data_bytes": 64, "buffers": [entry]}, bytes(64))
    with pytest.raises(FormatError, match=message):
        container.decode(forged)


def test_overlapping_buffers_are_rejected():
    entries = [
        {"name": "a", "dtype": "uint8", "shape": [16], "offset": 0, "nbytes": 16, "xxh3": 0},
        {"name": "b", "dtype": "uint8", "shape": [16], "offset": 8, "nbytes": 16, "xxh3": 0},
    ]
    forged = _forge({"kind": "x", "codec": {"name": "raw"}, "meta": {}, "data_bytes": 64, "buffers": entries}, bytes(64))
    with pytest.raises(FormatError, match="overlap"):
        container.decode(forged)


@pytest.mark.parametrize("header", [[], {"kind": 1}, {"kind": "x", "codec": {}, "meta": {}, "data_bytes": 0, "buffers": []}])
def test_malformed_headers_are_rejected(header):
    with pytest.raises(FormatError):
        container.decode(_forge(header))


def test_not_json_header_is_rejected():
    raw = b"\xff\xfe not json"
    prefix = struct.pack("<4sHHII", container.MAGIC, container.VERSION, 0, len(raw), 0)
    digest = container.xxhash.xxh3_64(prefix)
    digest.update(raw)
    with pytest.raises(FormatError, match="JSON"):
        container.decode(prefix + struct.pack("<Q", digest.intdigest()) + raw + bytes(64))


def test_ranged_read_of_header_and_one_buffer():
    data = _sample()
    head = data[: container.DEFAULT_HEAD_BYTES]
    header = container.decode_header(head[: container.head_bytes_needed(head)])
    start, stop = header.buffer_range("b")
    t = container.to_tensor(header.buffers["b"], data[start:stop])
    assert t.tolist() == [1, 2, 3]
    assert header.total_bytes == len(data)


def test_numpy_and_noncontiguous_inputs():
    base = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    data = container.encode({"t": base.t(), "n": np.arange(5, dtype=np.int64)}, kind="x")
    obj = container.decode(data)
    assert torch.equal(obj.tensor("t"), base.t().contiguous())
    assert obj.tensor("n").tolist() == [0, 1, 2, 3, 4]
