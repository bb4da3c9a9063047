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
