"""kvcodec3, the transform codec: round trips, its calibration model, layer groups, bad bytes."""

import asyncio

import pytest
import torch

import kvstore.codecs.base as codec_base
from kvstore import KVStore
from kvstore.codecs.base import get_codec
from kvstore.codecs.kvcodec3 import KVCodec3
from kvstore.codecs.kvcodec3_profile import (
    TransformProfile,
    fit_transform,
    pair_weights,
    transform_groups,
    with_levels,
)
from kvstore.codecs.rope import rotate
from kvstore.errors import CodecError, FormatError
from kvstore.format import container
from tests.transform_samples import LEVELS, H, D, L, correlated_kv, rope_table, transform_profile


@pytest.fixture(scope="module")
def profile():
    return transform_profile()


def round_trip(codec, keys, values, start=0):
    data = container.encode(codec.encode(keys, values, start=start), kind="t")
    return data, codec.decode(container.decode(data), tuple(keys.shape), keys.dtype, torch.device("cpu"))


def test_rope_undone_and_redone_is_the_identity():
    keys, _ = correlated_kv(50, seed=1, start=1000)
    table = rope_table()
    plain = rotate(keys, table, 1000, inverse=True)
    assert not torch.allclose(plain, keys, atol=1e-2)
    assert torch.allclose(rotate(plain, table, 1000), keys, atol=1e-4)


def test_the_profile_decorrelates_across_layers(profile):
    # six latent factors drive every layer and head of the keys: six coordinates per group carry
    # them; values, each head scaled by its own RMS, keep fewer than half of their 2 x 64 features
    assert profile.key_rank == 2 * 6 and profile.value_rank < 64
    assert profile.groups == ((0, 1), (2, 3))


@pytest.mark.parametrize("start", [0, 100])
def test_error_shrinks_with_the_level_and_matches_the_calibration_model(profile, start):
    keys, values = correlated_kv(120, seed=7, start=start)
    errors, sizes = [], []
    for level in range(len(LEVELS)):
        data, (k2, v2) = round_trip(KVCodec3(profile, level), keys, values, start=start)
        errors.append(float((k2 - keys).pow(2).mean() + (v2 - values).pow(2).mean()))
        sizes.append(len(data))
        if start == 0:  # the codec does what calibration measures (profile.roundtrip)
            k3, v3 = profile.roundtrip(keys, values, LEVELS[level])
            assert torch.allclose(k2, k3, atol=1e-4) and torch.allclose(v2, v3, atol=1e-4)
            s = profile.sink_tokens
            assert s >= 1 and torch.equal(k2[:, :, :s], keys[:, :, :s])  # the sinks, exact
    assert errors == sorted(errors) and sizes == sorted(sizes, reverse=True)
    assert errors[0] < 1e-2 * float(keys.pow(2).mean() + values.pow(2).mean())


def test_chunks_decode_alike_wherever_they_are_cut(profile):
    keys, values = correlated_kv(96, seed=3)
    codec = KVCodec3(profile, 2)
    _, (whole_k, whole_v) = round_trip(codec, keys, values)
    parts = [round_trip(codec, keys[:, :, s:s + 32].contiguous(), values[:, :, s:s + 32].contiguous(), start=s)[1]
             for s in (0, 32, 64)]
    assert torch.allclose(torch.cat([p[0] for p in parts], 2), whole_k, atol=1e-4)
    assert torch.allclose(torch.cat([p[1] for p in parts], 2), whole_v, atol=1e-4)


def test_tokens_the_bases_cannot_represent_are_stored_exactly(profile):
    keys, values = correlated_kv(40, seed=5, start=8, dtype=torch.float16)
    keys[1, 0, 7] = 500.0  # a direction no calibration token took
    values[2, 1, 9] = -300.0
    codec = KVCodec3(profile, 0)
    buffers = codec.encode(keys, values, start=8)
    assert buffers["exact_tokens"].tolist() == [7, 9]
    _, (k2, v2) = round_trip(codec, keys, values, start=8)
    assert k2.dtype == torch.float16
    assert torch.equal(k2[:, :, [7, 9]], keys[:, :, [7, 9]]) and torch.equal(v2[:, :, [7, 9]], values[:, :, [7, 9]])
    assert float((k2.float() - keys.float()).abs().max()) < 1.0


def test_exact_tokens_are_capped_at_a_share_of_the_chunk(profile):
    """Text the profile does not fit at all (every token an outlier): a bounded share of the
    chunk is stored exactly, the farthest out first; the rest is coded, not dropped."""
    keys, values = correlated_kv(64, seed=8, start=100)
    keys[0, 0, :, 3] += torch.linspace(50, 500, 64)  # every token off the bases, the last ones most
    buffers = KVCodec3(profile, 0).encode(keys, values, start=100)
    assert buffers["exact_tokens"].tolist() == [62, 63]  # ceil(64 / 32)
    _, (k2, _) = round_trip(KVCodec3(profile, 0), keys, values, start=100)
    assert torch.equal(k2[:, :, 62:], keys[:, :, 62:]) and bool(torch.isfinite(k2).all())


def test_coordinates_beyond_the_symbols_use_patches(profile):
    keys, values = correlated_kv(40, seed=5, start=8, scale=20)  # in the bases' directions, far beyond the symbols
    buffers = KVCodec3(profile, 0).encode(keys, values, start=8)
    assert "k_patch_index" in buffers and "exact_tokens" not in buffers
    _, (k2, _) = round_trip(KVCodec3(profile, 0), keys, values, start=8)
    assert float((k2 - keys).abs().max()) < 0.05 * float(keys.abs().max())


def test_a_profile_written_with_four_sink_tokens_still_decodes_its_chunks():
    # profiles written before kvcodec3 kept one sink token stored 4: their chunks carry 4
    samples = [correlated_kv(200, s) for s in range(3)]
    fitted = fit_transform(samples, rope=rope_table(), key_weight=torch.ones(L, H, D),
                           groups=transform_groups(("full",) * L, 2), sink_tokens=4)
    stored = with_levels(fitted, samples, LEVELS).to_bytes()
    old = TransformProfile.from_bytes(stored)
    assert old.sink_tokens == 4
    keys, values = correlated_kv(40, seed=12)
    data = container.encode(KVCodec3(old, 2).encode(keys, values), kind="t")
    assert tuple(container.decode(data).tensor("sink_k").shape) == (L, H, 4, D)
    again = TransformProfile.from_bytes(stored)  # read back as a reader of the store would
    k2, v2 = KVCodec3(again, 2).decode(container.decode(data), tuple(keys.shape), keys.dtype, torch.device("cpu"))
    assert torch.equal(k2[:, :, :4], keys[:, :, :4]) and torch.equal(v2[:, :, :4], values[:, :, :4])
    k3, v3 = old.roundtrip(keys, values, LEVELS[2])
    assert torch.allclose(k2, k3, atol=1e-4) and torch.allclose(v2, v3, atol=1e-4)


def test_profile_bytes_round_trip_and_stored_params_rebuild_the_codec(profile):
    again = TransformProfile.from_bytes(profile.to_bytes())
    assert again.to_bytes() == profile.to_bytes()
    codec = KVCodec3(profile, 3)
    rebuilt = get_codec("kvcodec3", codec.params)
    keys, values = correlated_kv(30, seed=2)
    data, (k2, _) = round_trip(codec, keys, values)
    k3, _ = rebuilt.decode(container.decode(data), tuple(keys.shape), keys.dtype, torch.device("cpu"))
    assert torch.equal(k2, k3)


def test_a_layer_group_codes_whole_transform_groups_only(profile):
    keys, values = correlated_kv(30, seed=4)
    whole = round_trip(KVCodec3(profile, 1), keys, values)[1]
    part = KVCodec3(profile, 1).for_layers((2, 3), L)
    _, (k2, v2) = round_trip(part, keys[2:].contiguous(), values[2:].contiguous())
    assert torch.allclose(k2, whole[0][2:], atol=1e-4) and torch.allclose(v2, whole[1][2:], atol=1e-4)
    with pytest.raises(CodecError, match="whole transform groups"):
        KVCodec3(profile, 1).for_layers((1, 2), L)


def test_groups_never_mix_attention_kinds():
    kinds = ("sliding", "sliding", "full", "sliding", "sliding", "full")
    assert transform_groups(kinds, 3) == ((0, 1, 3), (2, 5), (4,))
    with pytest.raises(CodecError):
        transform_groups(kinds, 0)


def test_pair_weights_commute_with_the_rotation():
    unit = torch.rand(2, 3, 8) + 0.1
    w = pair_weights(unit)
    assert torch.allclose(w[..., :4], w[..., 4:])


def test_corrupted_and_malformed_buffers_are_refused(profile):
    keys, values = correlated_kv(40, seed=6)
    codec = KVCodec3(profile, 2)
    buffers = codec.encode(keys, values, start=0)
    data = container.encode(buffers, kind="t")
    obj = container.decode(data)
    for name in obj.header.buffers:  # a flipped byte in any buffer: its checksum
        start, _ = obj._range(name)
        bad = bytearray(data)
        bad[start] ^= 0x40
        with pytest.raises(FormatError):
            codec.decode(container.decode(bytes(bad)), tuple(keys.shape), keys.dtype, torch.device("cpu"))
    for name, replacement in (("position", torch.tensor([-5])), ("k_patch_index", torch.tensor([10**6], dtype=torch.int32)),
                              ("sink_k", keys[:, :, :2].contiguous()), ("exact_tokens", torch.tensor([0], dtype=torch.int32))):
        forged = dict(buffers, **{name: replacement})
        if name == "k_patch_index":
            forged["k_patch_value"] = torch.tensor([1.0])
        if name == "exact_tokens":  # a sink index, and the token's KV missing
            forged["exact_k"] = keys[:, :, :1].contiguous()
        with pytest.raises(FormatError):
            codec.decode(container.decode(container.encode(forged, kind="t")), tuple(keys.shape), keys.dtype,
                         torch.device("cpu"))
    with pytest.raises(FormatError):  # another level's streams do not decode under this level's models
        KVCodec3(profile, 5).decode(obj, tuple(keys.shape), keys.dtype, torch.device("cpu"))


def test_bad_inputs_raise_codec_errors(profile):
    keys, values = correlated_kv(10, seed=8)
    with pytest.raises(CodecError):
        KVCodec3(profile, 6)
    with pytest.raises(CodecError):
        KVCodec3(profile, True)
    with pytest.raises(CodecError):
        KVCodec3(profile).encode(keys[:2], values[:2])
    bad = keys.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        KVCodec3(profile).encode(bad, values)
    with pytest.raises(FormatError):
        get_codec("kvcodec3", {"profile": "0" * 32, "level": 1})
    data = bytearray(profile.to_bytes())
    with pytest.raises(FormatError):
        TransformProfile.from_bytes(bytes(data[:-3]))


def test_store_round_trip_reads_the_profile_from_the_store(profile):
    async def go():
        levels = [KVCodec3(profile, level) for level in range(len(LEVELS))]
        async with KVStore("memory://", chunk_tokens=32, levels=levels) as writer:
            keys, values = correlated_kv(100, seed=15, dtype=torch.float16)
            tokens = list(range(100))
            await writer.put("synthetic", tokens, list(zip(keys.unbind(0), values.unbind(0))))
            codec_base._PROFILES.clear()  # a fresh process knows no profile
            reader = KVStore(writer.store, chunk_tokens=32, levels=["raw"])
            out = await reader.get("synthetic", tokens, level=2)
            expected = round_trip(KVCodec3(profile, 2), keys[:, :, 32:64].contiguous(),
                                  values[:, :, 32:64].contiguous(), start=32)[1]
            assert torch.equal(out[1][0][:, 32:64], expected[0][1])

    asyncio.run(go())
