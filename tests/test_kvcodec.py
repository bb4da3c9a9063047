"""The project's multi-level codec on synthetic KV with realistic structure."""

import asyncio

import pytest
import torch

import kvstore.codecs.base as codec_base
from kvstore import KVStore
from kvstore.codecs.kvcodec import KVCodecV1
from kvstore.codecs.kvcodec_profile import ZERO, KVCodecProfile, build_profile
from kvstore.errors import CodecError, FormatError
from kvstore.format import container

L, H, D = 3, 2, 16


def synthetic_kv(tokens: int, seed: int):
    """Keys with per-channel offsets and a few large channels, a huge first (sink) token;
    values of varying per-token scale."""
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.ones(L, H, 1, D)
    channel_scale[..., :2] = 8.0
    keys = torch.randn(L, H, tokens, D, generator=g) * channel_scale + torch.linspace(-3, 3, D)
    keys[:, :, 0] *= 40
    token_scale = torch.exp(torch.randn(L, H, tokens, 1, generator=g))
    values = torch.randn(L, H, tokens, D, generator=g) * token_scale
    return keys.half(), values.half()


@pytest.fixture(scope="module")
def profile():
    samples = [synthetic_kv(512, seed) for seed in range(3)]
    energy = torch.rand(L, H, D, generator=torch.Generator().manual_seed(9)) * 10 + 0.1
    return build_profile(samples, query_energy=energy)


def round_trip(codec, keys, values, start=0):
    data = container.encode(codec.encode(keys, values, start=start), kind="t")
    return data, codec.decode(container.decode(data), tuple(keys.shape), keys.dtype, torch.device("cpu"))


@pytest.mark.parametrize("tokens", [1, 37, 256])
def test_error_is_bounded_by_half_a_step(profile, tokens):
    keys, values = synthetic_kv(tokens, seed=10)
    for level in range(len(profile.levels)):
        codec = KVCodecV1(profile, level)
        _, (k2, v2) = round_trip(codec, keys, values, start=100)
        step_k = profile.key_step(level)[:, :, None]
        err_k = (k2.float() - keys.float()).abs()
        assert bool((err_k <= step_k / 2 * 1.01 + keys.float().abs() * 1e-3).all()), level
        rms = values.float().pow(2).mean(-1, keepdim=True).sqrt()
        err_v = (v2.float() - values.float()).abs()
        # the value step is gamma * rms rounded to a quarter octave (at most 2**(1/8) off)
        bound = profile.levels[level].gamma * rms * 2 ** (1 / 8) / 2 * 1.01 + values.float().abs() * 1e-3
        assert bool((err_v <= bound).all()), level


def test_sizes_shrink_level_by_level(profile):
    keys, values = synthetic_kv(256, seed=11)
    sizes = [len(round_trip(KVCodecV1(profile, level), keys, values, start=256)[0]) for level in range(5)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1.5 * sizes[-1]
    assert 8 * sizes[1] / (2 * keys.numel()) < 6  # well under fp16's 16 bits


def test_sink_tokens_and_outliers_are_exact(profile):
    keys, values = synthetic_kv(64, seed=12)
    keys[1, 0, 30, 3] = 5000.0  # far outside the symbol range: patched
    _, (k2, v2) = round_trip(KVCodecV1(profile, 3), keys, values, start=0)
    assert torch.equal(k2[:, :, :4], keys[:, :, :4]) and torch.equal(v2[:, :, :4], values[:, :, :4])
    assert k2[1, 0, 30, 3] == 5000.0
    # a chunk starting after the sinks stores none
    data, _ = round_trip(KVCodecV1(profile, 3), keys, values, start=64)
    assert "sink_k" not in container.decode(data).header.buffers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(profile, dtype):
    keys, values = synthetic_kv(40, seed=13)
    _, (k2, v2) = round_trip(KVCodecV1(profile, 1), keys.to(dtype), values.to(dtype), start=0)
    assert k2.dtype == dtype and v2.dtype == dtype
    assert torch.allclose(k2.float(), keys.float(), atol=2.0)


def test_profile_round_trip_and_validation(profile):
    data = profile.to_bytes()
    again = KVCodecProfile.from_bytes(data)
    assert again.shape == profile.shape and again.levels == profile.levels
    assert torch.equal(again.key_unit, profile.key_unit)
    assert again.to_bytes() == data
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 1
    with pytest.raises(FormatError):
        KVCodecProfile.from_bytes(bytes(corrupt))


def test_corrupt_stream_and_bad_params_raise(profile):
    keys, values = synthetic_kv(64, seed=14)
    codec = KVCodecV1(profile, 2)
    buffers = codec.encode(keys, values, start=64)
    stream = bytearray(buffers["k"])
    stream[len(stream) // 2] ^= 0xFF
    buffers["k"] = bytes(stream)
    with pytest.raises(FormatError):  # the container checksum is fine: the rANS stream itself must catch it
        codec.decode(container.decode(container.encode(buffers, kind="t")), (L, H, 64, D), torch.float16, torch.device("cpu"))
    with pytest.raises(FormatError):
        KVCodecV1.from_params({"profile": "0" * 32, "level": 1})
    with pytest.raises(FormatError):
        KVCodecV1.from_params({"profile": codec.profile_id, "level": 1, "extra": 1})
    with pytest.raises(CodecError):
        KVCodecV1(profile, 99)
    with pytest.raises(CodecError):
        codec.encode(torch.zeros(L, H, 8, D + 1), torch.zeros(L, H, 8, D + 1))


def test_symbol_range_matches_profile_alphabet(profile):
    assert profile.tables[0].keys.alphabet == 256 and ZERO == 128


def test_store_round_trip_loads_profile_from_the_store(profile):
    async def go():
        backend_url = "memory://"
        levels = [KVCodecV1(profile, level) for level in range(5)]
        async with KVStore(backend_url, chunk_tokens=32, levels=levels) as writer:
            keys, values = synthetic_kv(100, seed=15)
            kv = list(zip(keys.unbind(0), values.unbind(0)))
            tokens = list(range(100))
            manifest = await writer.put("synthetic", tokens, kv)
            profile_keys = [k async for k in writer.store.list() if "/profiles/" in k]
            assert len(profile_keys) == 1
            sizes = [manifest.level_bytes(i) for i in range(5)]
            assert sizes == sorted(sizes, reverse=True)
            codec_base._PROFILES.clear()  # a fresh process knows no profile
            reader = KVStore(writer.store, chunk_tokens=32, levels=["raw"])
            for level in range(5):
                out = await reader.get("synthetic", tokens, level=level)
                expected = round_trip(KVCodecV1(profile, level), keys[:, :, :32], values[:, :, :32], start=0)[1]
                assert torch.equal(out[0][0][:, :32], expected[0][0])
            await writer.store.delete(profile_keys[0])
            codec_base._PROFILES.clear()
            reader = KVStore(writer.store, chunk_tokens=32)
            with pytest.raises(FormatError, match="profile"):
                await reader.get("synthetic", tokens, level=1)

    asyncio.run(go())
