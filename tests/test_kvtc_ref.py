"""kvtc_ref, KVTC's recipe as a baseline: its bit allocation, round trips, bad bytes."""

import itertools

import numpy as np
import pytest
import torch

from kvstore.codecs.base import get_codec
from kvstore.codecs.kvtc_ref import KVTCProfile, KVTCRefCodec, allocate_bits, build_kvtc_profile
from kvstore.errors import CodecError, FormatError
from kvstore.format import container
from tests.transform_samples import correlated_kv, rope_table


@pytest.fixture(scope="module")
def profile():
    return build_kvtc_profile([correlated_kv(200, s) for s in range(3)], rope_table(), max_bits=4.0)


def round_trip(codec, keys, values, start=0):
    data = container.encode(codec.encode(keys, values, start=start), kind="t")
    return data, codec.decode(container.decode(data), tuple(keys.shape), keys.dtype, torch.device("cpu"))


@pytest.mark.parametrize("budget", [0, 1, 3, 7, 12, 20])
def test_bit_allocation_is_optimal(budget):
    variances = torch.tensor([9.0, 4.0, 2.5, 0.3, 0.01])
    widths = allocate_bits(variances, budget)
    assert widths.sum() <= budget and ((0 <= widths) & (widths <= 8)).all()

    def cost(w):
        return float(sum(v * 4.0 ** -b for v, b in zip(variances.tolist(), w)))

    best = min(cost(w) for w in itertools.product(range(9), repeat=5) if sum(w) <= budget)
    assert cost(widths) == pytest.approx(best)
    assert list(widths) == sorted(widths, reverse=True)  # stronger coordinates never get fewer bits


@pytest.mark.parametrize("start", [0, 300])
def test_more_bits_less_error(profile, start):
    keys, values = correlated_kv(64, seed=9, start=start)
    errors, sizes = [], []
    for bits in (0.05, 0.2, 1.0, 4.0):
        data, (k2, v2) = round_trip(KVTCRefCodec(profile, bits), keys, values, start=start)
        errors.append(float((k2 - keys).pow(2).mean() + (v2 - values).pow(2).mean()))
        sizes.append(len(data))
        if start == 0:
            assert torch.equal(k2[:, :, :4], keys[:, :, :4])  # the sinks, exact
    assert errors == sorted(errors, reverse=True) and sizes == sorted(sizes)
    assert errors[-1] < 1e-3 * float(keys[:, :, 4:].pow(2).mean())


def test_profile_bytes_and_params_rebuild_the_codec(profile):
    assert KVTCProfile.from_bytes(profile.to_bytes()).to_bytes() == profile.to_bytes()
    codec = KVTCRefCodec(profile, 0.5)
    keys, values = correlated_kv(20, seed=1, start=40, dtype=torch.float16)
    data, (k2, v2) = round_trip(codec, keys, values, start=40)
    again = get_codec("kvtc_ref", codec.params).decode(container.decode(data), tuple(keys.shape), torch.float16,
                                                        torch.device("cpu"))
    assert torch.equal(again[0], k2) and torch.equal(again[1], v2)


def test_bad_inputs_and_bytes_are_refused(profile):
    keys, values = correlated_kv(20, seed=2)
    codec = KVTCRefCodec(profile, 1.0)
    for bits in (0, -1, 9, float("nan"), True, "1"):
        with pytest.raises(CodecError):
            KVTCRefCodec(profile, bits)
    with pytest.raises(CodecError):
        codec.for_layers((0, 1), 4)
    with pytest.raises(CodecError, match="fp16"):  # coordinates no stored range could hold
        codec.encode(keys * 1e5, values)
    buffers = codec.encode(keys, values)
    data = container.encode(buffers, kind="t")
    obj = container.decode(data)
    for name in obj.header.buffers:
        start, _ = obj._range(name)
        bad = bytearray(data)
        bad[start] ^= 0x10
        with pytest.raises(FormatError):
            codec.decode(container.decode(bytes(bad)), tuple(keys.shape), keys.dtype, torch.device("cpu"))
    import zlib

    inverted = buffers["k_range"].flip(0).contiguous()
    for name, value in (("k_codes", zlib.compress(b"\0" * 10**6)), ("k_codes", zlib.compress(b"")),
                        ("k_range", inverted), ("position", torch.tensor([1.5]))):
        forged = container.encode(dict(buffers, **{name: value}), kind="t")
        with pytest.raises(FormatError):
            codec.decode(container.decode(forged), tuple(keys.shape), keys.dtype, torch.device("cpu"))
    with pytest.raises(FormatError):
        KVTCProfile.from_bytes(profile.to_bytes()[:-5])
    assert np.isfinite(codec._widths[0]).all()
