"""Every codec on every layout a model may have: head widths 64-256, one KV head, key width
different from value width (MLA), and kvcodec on a layer group's rows of its profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.codecs import get_codec
from kvstore.codecs.kvcodec import KVCodec
from kvstore.errors import CodecError, FormatError
from kvstore.format import container
from kvstore.format.chunk import ChunkIdentity, decode_chunk, encode_chunk

from kvcodec_samples import small_profile, synthetic_kv

CPU = torch.device("cpu")
TOKENS = 33
BASELINES = ["raw", "int8", "kivi2", "cachegen_ref"]
#: (layers, heads, key width, value width)
SHAPES = [(2, 2, 64, 64), (2, 2, 80, 80), (2, 1, 96, 96), (1, 4, 128, 128), (2, 1, 256, 256),
          (2, 1, 32, 8), (1, 2, 192, 128)]


def _ident(layers, heads, key_dim, value_dim, dtype=torch.float16):
    return ChunkIdentity("fp", "hash", 0, np.arange(TOKENS, dtype=np.int32), layers, heads, key_dim, dtype,
                         value_dim, "g")


def _kv(layers, heads, key_dim, value_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(layers, heads, TOKENS, key_dim, generator=g) * 2 + 1).half()
    values = (torch.randn(layers, heads, TOKENS, value_dim, generator=g) * 0.5).half()
    return keys, values


def _rel(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("codec_name", BASELINES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}H{}K{}V{}".format(*s))
def test_baseline_codecs_round_trip_every_shape(codec_name, shape):
    keys, values = _kv(*shape)
    ident = _ident(*shape)
    k, v = decode_chunk(encode_chunk(get_codec(codec_name), ident, keys, values), ident, CPU)
    assert k.shape == keys.shape and v.shape == values.shape
    bound = {"raw": 0.0, "int8": 0.02, "kivi2": 0.6, "cachegen_ref": 0.3}[codec_name]
    assert _rel(k, keys) <= bound and _rel(v, values) <= bound


def test_a_chunk_is_refused_under_another_value_width():
    keys, values = _kv(2, 1, 32, 8)
    blob = encode_chunk(get_codec("int8"), _ident(2, 1, 32, 8), keys, values)
    with pytest.raises(FormatError, match="value_dim"):
        decode_chunk(blob, _ident(2, 1, 32, 32), CPU)


@pytest.mark.parametrize("heads, dim", [(1, 256), (2, 128), (2, 96), (3, 80), (2, 64)])
def test_kvcodec_round_trips_every_head_shape(heads, dim):
    profile = small_profile((3, heads, dim))
    keys, values = synthetic_kv(TOKENS, 5, shape=(3, heads, dim))
    errors = []
    for level in (0, 2, 5):
        codec = KVCodec(profile, level)
        ident = ChunkIdentity("fp", "hash", 0, np.arange(TOKENS, dtype=np.int32), 3, heads, dim, torch.float16)
        k, v = decode_chunk(encode_chunk(codec, ident, keys, values), ident, CPU)
        assert k.shape == keys.shape and v.shape == values.shape
        errors.append((_rel(k, keys), _rel(v, values)))
    assert errors[0][0] < 0.08 and errors[0][1] < 0.12  # the best level is close
    assert errors == sorted(errors) and errors[-1][0] < 0.5 and errors[-1][1] < 1.0  # coarser levels, larger errors


def test_kvcodec_layer_groups_use_their_rows_of_the_profile():
    profile = small_profile((3, 2, 64))
    keys, values = synthetic_kv(TOKENS, 6, shape=(3, 2, 64))
    whole = KVCodec(profile, 2)
    group = whole.for_layers((0, 2), 3)
    assert group.params["layers"] == [0, 2] and group.profile.shape == (2, 2, 64)
    assert whole.for_layers((0, 1, 2), 3) is whole and whole.for_layers((0, 2), 3) is group
    sub_k, sub_v = keys[[0, 2]], values[[0, 2]]
    ident = ChunkIdentity("fp", "hash", 0, np.arange(TOKENS, dtype=np.int32), 2, 2, 64, torch.float16, None, "g")
    k, v = decode_chunk(encode_chunk(group, ident, sub_k, sub_v), ident, CPU)
    obj = container.decode(container.encode(whole.encode(keys, values), kind="t"))
    k_all, v_all = whole.decode(obj, tuple(keys.shape), torch.float16, CPU)
    assert torch.equal(k, k_all[[0, 2]]) and torch.equal(v, v_all[[0, 2]])  # the same steps as the whole model
    with pytest.raises(CodecError):
        whole.for_layers((0, 5), 3)


def _unequal_kv(tokens, seed, layers, heads, key_dim, value_dim):
    keys, _ = synthetic_kv(tokens, seed, shape=(layers, heads, key_dim))
    _, values = synthetic_kv(tokens, seed + 100, shape=(layers, heads, value_dim))
    return keys, values


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shape", [(2, 1, 32, 8), (1, 2, 192, 128)], ids=lambda s: "L{}H{}K{}V{}".format(*s))
def test_kvcodec_codes_key_and_value_slots_of_other_widths(shape, version):
    from kvstore.codecs.kvcodec_profile import KVCodecProfile, build_profile

    L, H, Dk, Dv = shape
    profile = build_profile([_unequal_kv(96, s, *shape) for s in range(2)])
    assert profile.shape == (L, H, Dk) and profile.value_width == Dv
    stored = KVCodecProfile.from_bytes(profile.to_bytes())
    assert stored.value_dim == Dv and stored.tables[2].values.num_models == L * H * Dv
    keys, values = _unequal_kv(TOKENS, 7, *shape)
    ident = _ident(*shape)
    errors = []
    for level in (0, 2, 5):
        k, v = decode_chunk(encode_chunk(KVCodec(profile, level, version=version), ident, keys, values), ident, CPU)
        assert k.shape == keys.shape and v.shape == values.shape
        errors.append((_rel(k, keys), _rel(v, values)))
        obj = container.decode(container.encode(KVCodec(profile, level, version=version).encode(keys, values), kind="t"))
        out_k, out_v = torch.zeros(L, H, TOKENS + 5, Dk).half(), torch.zeros(L, H, TOKENS + 5, Dv).half()
        KVCodec(profile, level, version=version).decode_into(obj, out_k[:, :, 5:], out_v[:, :, 5:])  # views
        assert torch.equal(out_k[:, :, 5:], k) and torch.equal(out_v[:, :, 5:], v) and not out_v[:, :, :5].any()
    assert errors[0][0] < 0.08 and errors[0][1] < 0.12 and errors == sorted(errors)
    with pytest.raises(CodecError, match="value"):
        KVCodec(profile, 0).encode(keys, values[..., :-1])
    from kvstore.kernels.kvcodec_decode import decode_kvcodec_kernels

    with pytest.raises(CodecError, match="equal key and value widths"):  # the kernels say so, clearly
        decode_kvcodec_kernels(KVCodec(profile, 0).encode(keys, values), KVCodec(profile, 0), tuple(keys.shape),
                               torch.float16, "cpu", backend="torch")
    with pytest.raises(FormatError, match="value"):  # a chunk read as another value width
        decode_chunk(encode_chunk(KVCodec(profile, 0), ident, keys, values), _ident(L, H, Dk, Dk), CPU)


async def test_kvcodec_stores_an_mla_shaped_layout_by_layer_group():
    from kvstore import KVStore
    from kvstore.codecs.kvcodec_profile import build_profile
    from kvstore.format.layout import CacheLayout, LayerSpec

    shape = (3, 1, 32, 8)
    profile = build_profile([_unequal_kv(96, s, *shape) for s in range(2)])
    keys, values = _unequal_kv(64, 9, *shape)
    kv = [(keys[i], values[i]) for i in range(3)]
    mla, window = LayerSpec("full", 1, 32, 8, slots="mla"), LayerSpec("sliding", 1, 32, 8, window=16, slots="mla")
    layout = CacheLayout((mla, window, mla))  # two groups: the profile's rows (0, 2) and (1,)
    async with KVStore("memory://", chunk_tokens=16, levels=[KVCodec(profile, 0)]) as store:
        await store.put("m", list(range(64)), kv, layout=layout)
        got = await store.get("m", list(range(64)))
    whole = KVCodec(profile, 0)
    obj = container.decode(container.encode(whole.encode(keys[:, :, :16], values[:, :, :16]), kind="t"))
    whole_k, whole_v = whole.decode(obj, (3, 1, 16, 32), torch.float16, CPU, value_dim=8)
    for i in (0, 2):  # the first chunk of the full layers: coded with the whole profile's rows
        assert torch.equal(got[i][0][:, :16], whole_k[i]) and torch.equal(got[i][1][:, :16], whole_v[i])
    assert got[1][1].shape[2] == 8 and _rel(got[0][0], keys[0]) < 0.08
