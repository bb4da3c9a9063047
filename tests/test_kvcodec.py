"""The project's multi-level codec on synthetic KV with realistic structure."""

import asyncio
import base64
import hashlib
import zlib

import pytest
import torch

import kvstore.codecs.base as codec_base
from kvstore import KVStore
from kvstore.codecs import rans
from kvstore.codecs.base import get_codec
from kvstore.codecs.kvcodec import FORMAT_VERSION, KVCodec
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
        codec = KVCodec(profile, level)
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
    sizes = [len(round_trip(KVCodec(profile, level), keys, values, start=256)[0]) for level in range(5)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1.5 * sizes[-1]
    assert 8 * sizes[1] / (2 * keys.numel()) < 6  # well under fp16's 16 bits


def test_sink_tokens_and_outliers_are_exact(profile):
    keys, values = synthetic_kv(64, seed=12)
    keys[1, 0, 30, 3] = 5000.0  # far outside the symbol range: patched
    _, (k2, v2) = round_trip(KVCodec(profile, 3), keys, values, start=0)
    assert torch.equal(k2[:, :, :4], keys[:, :, :4]) and torch.equal(v2[:, :, :4], values[:, :, :4])
    assert k2[1, 0, 30, 3] == 5000.0
    # a chunk starting after the sinks stores none
    data, _ = round_trip(KVCodec(profile, 3), keys, values, start=64)
    assert "sink_k" not in container.decode(data).header.buffers


@pytest.mark.parametrize("token", [17, 1])  # 1: a sink token, stored as it is
@pytest.mark.parametrize(("which", "bad"), [(0, float("nan")), (1, float("nan")), (0, float("inf")), (1, float("-inf"))])
def test_non_finite_kv_is_refused(profile, which, bad, token):
    """NaN or infinite KV raises CodecError: a NaN key would not be patched and a NaN or
    infinite value ruins its token's scale, so either would decode as wrong values."""
    assert profile.sink_tokens > 1
    kv = list(synthetic_kv(40, seed=14))
    kv[which][2, 1, token, 5] = bad
    with pytest.raises(CodecError, match="NaN or infinite"):
        KVCodec(profile, 2).encode(*kv, start=0)


def test_empty_chunk_encodes_and_decodes(profile):
    empty = torch.zeros(L, H, 0, D, dtype=torch.float16)
    _, (k2, v2) = round_trip(KVCodec(profile, 2), empty, empty, start=0)
    assert k2.shape == (L, H, 0, D) and v2.shape == (L, H, 0, D)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(profile, dtype):
    keys, values = synthetic_kv(40, seed=13)
    _, (k2, v2) = round_trip(KVCodec(profile, 1), keys.to(dtype), values.to(dtype), start=0)
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
    codec = KVCodec(profile, 2)
    buffers = codec.encode(keys, values, start=64)
    stream = bytearray(buffers["k"])
    stream[len(stream) // 2] ^= 0xFF
    buffers["k"] = bytes(stream)
    with pytest.raises(FormatError):  # the container checksum is fine: the rANS stream itself must catch it
        codec.decode(container.decode(container.encode(buffers, kind="t")), (L, H, 64, D), torch.float16, torch.device("cpu"))
    with pytest.raises(FormatError):
        KVCodec.from_params({"profile": "0" * 32, "level": 1})
    with pytest.raises(FormatError):
        KVCodec.from_params({"profile": codec.profile_id, "level": 1, "extra": 1})
    with pytest.raises(CodecError):
        KVCodec(profile, 99)
    with pytest.raises(CodecError):
        codec.encode(torch.zeros(L, H, 8, D + 1), torch.zeros(L, H, 8, D + 1))


def test_symbol_range_matches_profile_alphabet(profile):
    assert profile.tables[0].keys.alphabet == 256 and ZERO == 128


def test_store_round_trip_loads_profile_from_the_store(profile):
    async def go():
        backend_url = "memory://"
        levels = [KVCodec(profile, level) for level in range(5)]
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
                expected = round_trip(KVCodec(profile, level), keys[:, :, :32], values[:, :, :32], start=0)[1]
                assert torch.equal(out[0][0][:, :32], expected[0][0])
            await writer.store.delete(profile_keys[0])
            codec_base._PROFILES.clear()
            reader = KVStore(writer.store, chunk_tokens=32)
            with pytest.raises(FormatError, match="profile"):
                await reader.get("synthetic", tokens, level=1)

    asyncio.run(go())


# -- the stream layout: channel-major (version 2) and token-major (version 1) ---------------------


def stream_bytes(buffers):
    return sum(len(buffers[name]) for name in ("k", "v", "scales"))


def test_channel_major_is_the_default_and_is_recorded(profile):
    codec = KVCodec(profile, 2)
    assert FORMAT_VERSION == 2 and codec.version == 2 and codec.params["version"] == 2
    keys, values = synthetic_kv(40, seed=20)
    buffers = codec.encode(keys, values, start=0)
    assert rans.read_header(buffers["k"]).dims == (L * H * D, 40, 1)
    assert rans.read_header(buffers["v"]).dims == (L * H * D, 40, 1)
    assert rans.read_header(buffers["scales"]).dims == (L * H, 40, 1)
    old = KVCodec(profile, 2, version=1)
    assert "version" not in old.params and rans.read_header(old.encode(keys, values)["k"]).dims == (L * H, 40, D)
    # parameters round-trip; a chunk stored without a version is version 1; unknown versions are refused
    assert KVCodec.from_params(codec.params).version == 2
    assert KVCodec.from_params({"profile": codec.profile_id, "level": 2}).version == 1
    assert codec.tag != old.tag  # different bytes, different objects in a store
    for bad in (3, 1, "2", True):
        with pytest.raises(FormatError):
            KVCodec.from_params({**codec.params, "version": bad})
    with pytest.raises(CodecError):
        KVCodec(profile, 2, version=5)


@pytest.mark.parametrize("start", [0, 256])
def test_layouts_decode_to_identical_values(profile, start):
    """Same quantized symbols, another order: both decode (CPU) to the same values, bit for bit."""
    keys, values = synthetic_kv(300, seed=21)
    keys[2, 1, 100, 5] = -4000.0  # a patch
    for level in range(len(profile.levels)):
        outs = []
        for version in (1, 2):
            codec = KVCodec(profile, level, version=version)
            _, (k2, v2) = round_trip(codec, keys, values, start=start)
            outs.append((k2, v2))
        (k1, v1), (k2, v2) = outs
        assert torch.equal(k1, k2) and torch.equal(v1, v2), level


def test_channel_major_costs_only_its_extra_groups(profile):
    """4,096 tokens: the version-2 key/value streams have 4x the groups (lanes of ~1,024 symbols)
    and the scale stream 3x; the extra size is at most the extra groups' states and offsets
    (132 bytes each) and, at realistic rates, about 1%."""
    keys, values = synthetic_kv(4096, seed=16)
    for level in range(len(profile.levels)):
        old, new = KVCodec(profile, level, version=1), KVCodec(profile, level)
        b1, b2 = old.encode(keys, values, start=256), new.encode(keys, values, start=256)
        groups = [sum(rans.read_header(b[n]).num_groups for n in ("k", "v", "scales")) for b in (b1, b2)]
        assert groups == [7, 27]
        s1, s2 = stream_bytes(b1), stream_bytes(b2)
        assert 0 < s2 - s1 <= 132 * (groups[1] - groups[0]), level
        bits = 8 * s1 / (2 * keys.numel())
        assert s2 / s1 - 1 < (0.011 if bits > 2 else 0.015), (level, bits, s2 / s1)


def test_entropy_code_lane_symbols_and_ideal_bits(profile):
    codec = KVCodec(profile, 1)
    keys, values = synthetic_kv(512, seed=22)
    q = codec.quantize(keys, values, start=64)
    assert q.keys.shape == (L * H * D, 512, 1) and q.scales.shape == (L * H, 512, 1)
    short = codec.entropy_code(q, lane_symbols=64)
    assert rans.read_header(short["k"]).group_size == 64 * 32 and rans.read_header(short["scales"]).group_size == 16 * 32
    obj = container.decode(container.encode(short, kind="t"))
    _, (k0, v0) = round_trip(codec, keys, values, start=64)
    k1, v1 = codec.decode(obj, tuple(keys.shape), keys.dtype, torch.device("cpu"))
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    old = KVCodec(profile, 1, version=1)
    ideal = codec.ideal_bits(q)
    assert ideal == pytest.approx(old.ideal_bits(old.quantize(keys, values, start=64)), rel=1e-12)
    assert 0.97 < ideal / (8 * stream_bytes(codec.encode(keys, values, start=64))) < 1.0


# A chunk written by the token-major encoder before the format version existed (commit e1fcd6d):
# a 1-level profile of 2 layers x 2 heads x 8 dims, a 40-token first chunk (sinks and a key patch),
# and the SHA-256 of the fp16 keys + values that commit decoded from it.
OLD_PROFILE_B64 = (
    "eNqVkXs4lPkewEcXjpVmUxFapldPbA077zv3Yf2mY5Iuk82q2CljzAwmY0ZmmBFz5nQhwqKSpMu0rZaKON1wFLHpVC6lkmzIllsol+Q+73l1"
    "nnZ1nnP2POf71/f++V42bP0WZ4DD4R7Mwn0Q9q+Wmrmz+6jRUIhEJoJYUEikUC4SCx3DwuWBEqkYIkIfbIgVDckEoWIsQyaXiSENEQoVKwXT"
    "bqkgShyugFgIESvmB4sFon8Z0xpfJAmFWAwipJDIQvhKeYhYhgUpREgqjhRLMZXHg51IRJITg7pjBxFSCgKkYr5QHhoWLlYoJHIZhtstlQRM"
    "40QCpYAfEKUUY1UwhY71DIgIDPxA5v02W4g4ii8Uy5TicGxwkTIqbNoZKJULlGQE8yiCBdMeHkJEiAyMJw8MVIiVEItEhGQfWyNYZ7U6mIyp"
    "ZApMI1PpTAqTRmXS6TCZimiIn7AiZBLl/0X60P4/sWAGmUZFSAxsNSZCocNUOnkGS0niYzjFDFSERKZkzABR6PQZGIRK+x2DhX7D0GEYQcgM"
    "MpPGhKlUGoVMhz/FRAqkEeI/AlFJM0F02ox9sNBHEI2GkBAqiQRTmdjVSGT4k9NhHIVQIP1DDsz8t7vNfBLz98MhTBqNTIJJ9OkUMhNhIHTN"
    "Dg3uv4joUQJYtD0WELxOgg5dEphEPMCie0eB1feRgHvCDEyaq0HyqWSgq00ClOpUUHL1ILD0zASrNvJB6RkVWGd3ANi47wJoihwUWyQAXU4x"
    "MD1WAXSynaAnSAM2D+wBl16FgAXJ6aB8vQb8ZfAI0F/7GtQcTAQtvlzQZNrlWlO8BZQ4xQKPop/Bw6R5bKRtHrvpW4RdkOzFtpo96tq5Lgz0"
    "WWQAu6lngLZlDvtRyyJ2iIMl+5tGDtsQnQ2o13aCZZ9lg/luT8EPu3qA5gievfHhSjZsRWbP9e53bVrIBWvzkoBJTRc45/YGpBUvYQdVO7LZ"
    "PT5s9Ym+Ju6mim8+x/nziKFpP65a+OO7q7cJYHDWDysOFdFWREiW/9riM1L1N3mOBa4hoHnhbpwQz95tUDl3ngVh+XjFF+Pm5Jil/ocCO25k"
    "RtU2P8nTJTg31KKe/tqiWVRKTMmVHb4L1Xf21p8znpJyYkqYSnFLIcHGRex9PiJrYs96Tkuh7t2N3AuDERrJyGUftE0wDApjrLL23HM2P+IK"
    "sbykm3gLBhZVa9XBcYFmIQ+jHDeFlwpXuxTo5Q162oAej78wmr80ze8sT7G85SHBxnXkjUnPUPz2NwGokel9NGis+8UIsbBA78b52fpLSkOn"
    "W3NacJyK4qA5/FwjeHh3W3z8sC1EQx+lHI3UBaD4lBUMr5v1eXn3ZseqiA6a4/2pzUvHKdD3+4dtbSC/N3FVdZLgF5O2EDesvW/SogdsPIU8"
    "1m6yqxjXlhr8+awxvZ6Gtvbr8V66+cOXDuOFSRPgr41jtmm+WX1o1J296iWdHa+ymfbHUNLc1/U38+3N32tJUdgNeEXovoQ+1OzC02DvgSkj"
    "Dqc3iJ9oZHHWrANweqdU0nFKoeGo3oKwFV2bLbmwOdtyUv95aCc40/YlVviP9LKaNUE5QtRogTO6rf3Oy8b9MXrUoOxWwnvc/xbs/79wZY/Y"
    "i4z6azkOyWVx588c7KluLEynrA/xt46oO8eb825W6gnd1+x1jdvg6J1ByWFOL47N9uk2uBiGSzTxyTZXHfMt7TyN789wfyupkscMtzVHV3Tt"
    "UfVPpnbEHkzjtJZkOjM3KJ/4psYkTWqKw17rlr4Yr7wSlEuKy/x775/Os0wOcR/8UrlFy3IyKs7FrJS05AVD3YzFCbXxryke1wquXkZUTzxv"
    "nxKgBw6kgWrLJ7eqT12vPIrFaKs7+461xsIplIvaeCivfyWaoWZ5nZxz175L5ahYVTb/ZtsYXtcxUbetUz9c7RfpHbR6kNqJej+P5alaqoZs"
    "XfZ+dyfXhxGb0VWEHgiuQ673vybUe9uvHjQuuewFM3nDdqYTwCXpuY2sOeVw7OEsLGvtA4+QDm3s9YZdU20LlM9yY4KUinHrHluC+9GTRvqX"
    "NdVVY19xuGjddqHP/AY1aqQrSO+CvzIyCarL98vZtE8kFOUN5cMXJxO3qfX7HOi2o3XXM+yt3SLMlp/WlVoPVaxyOYGWH8lq1w1eim6A32vV"
    "x6fQhqkY18t0w3xsFJfv6D9FPKjW9k/gOdZ20fmo542T2SzjQ2+1qMr96Y2f7C5iFRMgnT8Ga6+ETS27V9NdNP9m4yhqz6mZar1/uELhXmqi"
    "QlG8YcDR7o//T79lWkmYt0bYizNNayRk4uTlVzM6fIYrDKXlhs0Ea9E+4uN1VhZrMs9sHvVfJjjd8rRzoATcuhB3PHRPL/l+pZ+l0WLj4x5p"
    "HU71TRbODlXFvIkRR696g3ZHr0ZWyrMNaN76zfG7/UUbWZIzXyTAWbcXZ3Hb64C+vnLJA7dyjT68wvLVrcqcla25jtcab2ti6hPvu7ukKrnG"
    "AwmP7Zydpsr227/MObe19rmjbKflUz/ZM4/P4lcZbrn79nGPZ1igxmBtgR35n8zWtf0="
)
OLD_CHUNK_B64 = (
    "S1ZTAAEAAABnAwAAAAAAAIf4WlC1QApKeyJraW5kIjoia3YtY2h1bmsiLCJjb2RlYyI6eyJuYW1lIjoia3Zjb2RlYyIsInBhcmFtcyI6eyJw"
    "cm9maWxlIjoiN2Y0MTBkODRlMmMyZDZiNGE1YjljNTg4MDMwZmFkMTQiLCJsZXZlbCI6MH19LCJtZXRhIjp7fSwiZGF0YV9ieXRlcyI6MTk5"
    "NiwiYnVmZmVycyI6W3sibmFtZSI6InNpbmtfayIsImR0eXBlIjoiZmxvYXQxNiIsInNoYXBlIjpbMiwyLDQsOF0sIm9mZnNldCI6MCwibmJ5"
    "dGVzIjoyNTYsInh4aDMiOjMwOTE4NDg0NzE3NjAxMjU1MDZ9LHsibmFtZSI6InNpbmtfdiIsImR0eXBlIjoiZmxvYXQxNiIsInNoYXBlIjpb"
    "MiwyLDQsOF0sIm9mZnNldCI6MjU2LCJuYnl0ZXMiOjI1NiwieHhoMyI6MTcxNDUwOTY2MDkxMjc0NjIyMDh9LHsibmFtZSI6ImtfcGF0Y2hf"
    "aW5kZXgiLCJkdHlwZSI6ImludDMyIiwic2hhcGUiOlsxXSwib2Zmc2V0Ijo1MTIsIm5ieXRlcyI6NCwieHhoMyI6Mjc3NDc2NzA5NTM3ODMx"
    "MzI4fSx7Im5hbWUiOiJrX3BhdGNoX3ZhbHVlIiwiZHR5cGUiOiJmbG9hdDE2Iiwic2hhcGUiOlsxXSwib2Zmc2V0Ijo1NzYsIm5ieXRlcyI6"
    "MiwieHhoMyI6MTM2OTUyMDg0MTcyMzY3NDg0NDB9LHsibmFtZSI6ImsiLCJkdHlwZSI6InVpbnQ4Iiwic2hhcGUiOls0ODhdLCJvZmZzZXQi"
    "OjY0MCwibmJ5dGVzIjo0ODgsInh4aDMiOjI5NTM0NzAyMTE0MTM0NjkxMTJ9LHsibmFtZSI6InYiLCJkdHlwZSI6InVpbnQ4Iiwic2hhcGUi"
    "Ols1MTZdLCJvZmZzZXQiOjExNTIsIm5ieXRlcyI6NTE2LCJ4eGgzIjoxODI5NTQ0NDY2MzYyNDQ2MTA3NX0seyJuYW1lIjoic2NhbGVzIiwi"
    "ZHR5cGUiOiJ1aW50OCIsInNoYXBlIjpbMjY4XSwib2Zmc2V0IjoxNzI4LCJuYnl0ZXMiOjI2OCwieHhoMyI6OTM5MjEzNjE0NjkzMzkwNjgw"
    "N31dfQA2T+hQDT4sUEdUK0n0WBvXyzvnOTU9NDmGQd49CUF/QIY8MT8BNmK+CUJjQHk4ozwhPd5BikIHu9lBGUBwR3o4tMQaU6JLo0lCSHTO"
    "jNLQy3I86TwEPUE4CUWpOB+5kcK9OJQ7NDXGvsk/Vq2IwCU3AjwpQnNDmaixPkev6T5HQpVElEnKzATGXUwy175Qq0xeMuszhDsqvT+0Eh3O"
    "QE+4ZDwBILQ5Cj8wuBu/WbwbQJQ7w0EeO8NAUDq+PDm/OkLbS5JNw1RqSePPgkjDVTlVnDYfPRA0TsDPOCs3PkFVtGQ8ujo0Qm1E+jvOPkI5"
    "I0GQGUNAsLy7QXw+LzBhQPJBRURVRMi5dzxMQbbBn0C8wu88prVfsWM8S7tcMYOwATjdoUsnrbp3su0vcLbzrIcu4znWvhW8J7e6Pu89ub4E"
    "vsw4m7aPupu9UDh4NIA35bO+LF+wzpw0JuiydSqpKKKsGp3TNTazV7VZKuK0w7uzuGe84bd/vSO47TjAvnrAVj6jsBYz+LLAryO4sLZgqAio"
    "lCyAtpswPS9jNH+xiDfpNDy0azGXuEQ3DTbvN9y45TOCpuacxZdOKGEsbCnBpH0pajjJMQ670bGDvWQ5R6p7u0So7jMgpretIR4KLHOrDiVG"
    "RM2qGrzuvq/FbT/uNgXF4kBRt8O9SjwSQKE55LnkuiMDAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAADcaQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAS1ZS"
    "QQEPIAMEAAAAKAAAAAgAAAAgAAAAAAEAADMGlAOw0O3EAAUAAAEAAACYAAAAQ9ACAPjAsgcnKAEA9DIBAMivUwCgzhsLp1aiDBHBCgCJqwsG"
    "qEYBAH6udQFOPNEODlYEAC/QKCBEOFsHqcEQADgsMwCupwEAaFoMAM+uMAE10u/i31HcryrZuLLssHID38p8ALmtqATMR6FIx8QdDBxCMwtg"
    "qwEAXs8EJHeoAQAAAAAAmAAAADSJb8wErsB6hJUCWno2Rlo6x7sa6MX9fXexPpllrynrz4rifvHcWWG6ZDrYVWS3MuukDVAdTByESa+oJfQl"
    "vYkJE9cXsYvTezKLXPCjDQFCQi/n+G3ylm4zbzKlg5szvZvWMknHoaWpKCvW+yXp7UaCUr3gD4V6Yhf3dI0K+/VJG8SE2+kHv0JZOeu8AqhE"
    "GnmKWLNDDKpGnaktjDBvTAUtxWIpWNNpdw042VwwDGxN+wG4c5ru8xBXDfNdVgvMjSgXY6n+uwsWnS/gmNy5e1j1pGu2I0SkH/fl8pDbJh7K"
    "IywWH3JfSF7lCDaWr9KU3vOrZhBSDz7HHKH35R4eJgvMI282Eom09IFiBo7HWV0cLeUk1h4jvD6tJqiazgzE552F5Io2/X0BWOwyBS+yg38A"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAABLVlJBAQ8gAwQAAAAoAAAACAAAACAAAAAAAQAA6HPoybDQ7cQABQAAAQAAAKUAAAAcvAoAA1BHAbJL"
    "AwABTBAAPrwVAxe3cAdeRG0PWdRxAISykCj6w+IBSLc8BHlGDACtMJ4Nt8S78lQ9HAGrzOEWljMNAcc+JgA8UNpA+zIqB2HNwgVIwJFjGE0C"
    "AES+M2PkSp1M7r4nVjq5BgDUrwUAik9lkMvO5QTOw9NJUTHiHQAAAAClAAAAYlGGLhej+SzewnppkRy5IWo5KrVuY3oqZqohjPptVpjmqfu5"
    "QlW7+TvwvBzpJtdInVOZ8y/8CYgL9GivEUHQEPUjAWwALUXbdDEBv2dM+cJXuxHHMjf3ysYUwe3sbVirDjXbNgKpD6oKnDMsLpGNiapt5Z7E"
    "I9Hkz+avpEs4Gz/Haxc4uOhVphUgGxVvSK6r3VStoHg9EHfPQMJqI1RkDslc9AnwBKGL6maQOgxJbsJtrMtGzjSmL6zaE+mEES4RPB6B8yWs"
    "Nx90k/Ih9kUNwTnZ1TDGbsdK7evw7NIdijg4uKEhvK2zS1ivchvZqRCZw+aA+ozWvd4ZtQeByW5Ch/Z2Gen0sS1MrOcTu1FKrDteX7XExx24"
    "xfGK/59/m9X1n95w0PMqlmA998eEOtOnzmx5Wo5CmiPUk4tH3KvDK4ijw0nc4EYM//Z5AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABLVlJBAQ8gAwQAAAAoAAAAAQAAAAQAAAAAAQAALGeK7KmvjiegAAAAAQAAACkAAAAf"
    "cJMAI7pUAcseOgBG2gMAFTo8ADWTGAB7saZ1LAmPAIU6NADs3i0A4Q9AAAA7KAA9PWsABCYOAL1gAwAupAEApugRANxElgBuopQC1fgBAIhh"
    "cgAcTgwA5NwpAHNxAQB4E0ICjwJIAObixwDNpRgAGYyvA7zoUAC1XRkAyu7XAAAAAAApAAAA/dTvEErxfq4BU28eODV/+QBhbwD6hZ8DwOHR"
    "TwrozzWwluOYhdu0q6mJjA/uDwjsOBcXLugCDBii2y9EKQgBRUgX9c0FiLfTcwAy/KMOenJvfQAA"
)
OLD_DIGEST = "3eef813ac982cab759cc8d46676353362fcb1f8eccee7f459c4eac603557b070"


def old_kv():
    """The KV that chunk was encoded from."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 40, 8, generator=g) * torch.linspace(0.5, 3, 8) + 1.0
    k[:, :, 0] *= 30
    v = torch.randn(2, 2, 40, 8, generator=g) * torch.exp(torch.randn(2, 2, 40, 1, generator=g))
    k, v = k.half(), v.half()
    k[1, 0, 20, 3] = 3000.0
    return k, v


def old_chunk():
    """(codec from the stored parameters, container) of the old-layout chunk."""
    profile = KVCodecProfile.from_bytes(zlib.decompress(base64.b64decode("".join(OLD_PROFILE_B64))))
    KVCodec(profile, 0)  # registers the profile, as a store does when it loads it
    obj = container.decode(base64.b64decode("".join(OLD_CHUNK_B64)))
    return get_codec(obj.header.codec["name"], obj.header.codec["params"]), obj


def test_old_layout_chunk_still_decodes_bit_exact():
    codec, obj = old_chunk()
    assert set(obj.header.codec["params"]) == {"profile", "level"} and codec.version == 1
    k, v = codec.decode(obj, (2, 2, 40, 8), torch.float16, torch.device("cpu"))
    assert hashlib.sha256(k.numpy().tobytes() + v.numpy().tobytes()).hexdigest() == OLD_DIGEST
    keys, values = old_kv()
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and k[1, 0, 20, 3] == 3000.0
    # the version-1 encoder is kept: it still writes these exact streams
    again = codec.encode(keys, values, start=0)
    for name in ("k", "v", "scales"):
        assert bytes(again[name]) == bytes(obj.raw(name)), name
    # and the same KV in today's layout decodes to the same values
    new = KVCodec(codec.profile, 0)
    _, (k2, v2) = round_trip(new, keys, values, start=0)
    assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_into_writes_the_callers_slice(profile, dtype):
    """The CPU decoder writes a chunk (patches and sinks included) straight into a token
    slice of a larger output, the same values as ``decode``, and nothing outside it; a view
    whose layer and head axes do not merge is filled too (through a copy)."""
    keys, values = synthetic_kv(40, seed=5)
    keys[1, 0, 30, 3] = 3000.0  # a patch
    codec = KVCodec(profile, 1)
    obj = container.decode(container.encode(codec.encode(keys.to(dtype), values.to(dtype)), kind="t"))
    want_k, want_v = codec.decode(obj, (L, H, 40, D), dtype, torch.device("cpu"))
    exact = keys.to(dtype)
    assert want_k[1, 0, 30, 3] == exact[1, 0, 30, 3] and torch.equal(want_k[:, :, 0], exact[:, :, 0])
    out_k, out_v = (torch.full((L, H + 1, 64, D), 7.0, dtype=dtype) for _ in range(2))
    codec.decode_into(obj, out_k[:, 1:, 10:50], out_v[:, 1:, 10:50])  # layer and head axes do not merge
    assert torch.equal(out_k[:, 1:, 10:50], want_k) and torch.equal(out_v[:, 1:, 10:50], want_v)
    assert (out_k[:, 0] == 7).all() and (out_v[:, :, 50:] == 7).all()
    merged_k, merged_v = (torch.full((L, H, 64, D), 7.0, dtype=dtype) for _ in range(2))
    codec.decode_into(obj, merged_k[:, :, 20:60], merged_v[:, :, 20:60])
    assert torch.equal(merged_k[:, :, 20:60], want_k) and torch.equal(merged_v[:, :, 20:60], want_v)
    assert (merged_k[:, :, :20] == 7).all() and (merged_v[:, :, 60:] == 7).all()
