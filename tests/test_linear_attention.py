"""Linear-attention layers (Qwen3-Next's gated DeltaNet): fixed-size states stored after
chunks, loaded only at the prefix's end, continued exactly.

A tiny random Qwen3-Next (one linear-attention layer, one full-attention layer) from
transformers' own class, on the CPU."""

from __future__ import annotations

import pytest
import torch

from eval.architectures import tiny_model
from kvstore import KVStore
from kvstore.errors import ConfigError, FormatError, IncompleteContextError, KVMismatchError
from kvstore.fetch.fetcher import AdaptiveFetcher
from kvstore.integrations.hf import (
    cache_layout,
    extract_kv,
    generate_greedy,
    kv_to_cache,
    prefill,
    recompute,
)
from kvstore.format.layout import CacheLayout, LayerSpec
from kvstore.kv import LinearStates

CHUNK = 16
TOKENS = 80
INNER = 48


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_model("qwen3_next")


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return torch.randint(2, 500, (TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def kv(model, ids):  # type: ignore[no-untyped-def]
    return extract_kv(model, ids, states_every=CHUNK)


def test_extract_keeps_the_states_after_every_chunk(model, ids, kv):
    states = kv[0]
    assert isinstance(states, LinearStates) and states.positions == (16, 32, 48, 64, 80)
    conv, recurrent = states.after(TOKENS)
    assert conv.shape == (128, 4) and recurrent.shape == (4, 16, 16) and recurrent.dtype == torch.float32
    # the states after 48 tokens are those a prefill of the first 48 tokens ends with
    alone = extract_kv(model, ids[:INNER])[0].after(INNER)
    for a, b in zip(states.after(INNER), alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert kv[1][0].shape == (2, TOKENS, 16)  # the full-attention layer: every token
    assert extract_kv(model, ids)[0].positions == (TOKENS,)  # without states_every: the end only


async def test_states_round_trip_and_a_prefix_continues_exactly(model, ids, kv):
    layout = cache_layout(model)
    async with KVStore("memory://", chunk_tokens=CHUNK, levels=["raw", "int8", ("kivi2", {})]) as store:
        manifest = await store.put("q", ids, kv, layout=layout)
        for chunk in manifest.chunks:  # one state object per chunk, shared by every level
            keys = {chunk.object_at(level, 0, 2).key for level in range(3)}
            assert len(keys) == 1 and keys.pop().endswith("/state+linear")
        got = await store.get("q", ids)
        assert all(torch.equal(a, b) for a, b in zip(got[0].after(TOKENS), kv[0].after(TOKENS)))
        assert got[0].positions == (TOKENS,) and torch.equal(got[1][0], kv[1][0])

        # a prefix continues from the states after its last chunk (no manifest of its own)
        assert await store.lookup("q", ids[:INNER] + [7, 8, 9]) == INNER
        assert await store.lookup("q", ids[:INNER + 5]) == INNER  # not past the last stored state
        prefix = await store.get("q", ids[:INNER])
        rest = recompute(model, ids[INNER:], prefix)
        torch.testing.assert_close(rest[1][0], kv[1][0][:, INNER:], rtol=0, atol=1e-5)
        for a, b in zip(rest[0].after(TOKENS), kv[0].after(TOKENS)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        logits, _ = prefill(model, ids[INNER:], kv_to_cache(model, prefix))
        full_logits, _ = prefill(model, ids)
        torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-4)

        fresh = generate_greedy(model, ids, None, max_new_tokens=8)
        last = await store.lookup("q", ids[:-1])
        assert last == TOKENS - CHUNK
        assert generate_greedy(model, ids, await store.get("q", ids[:last]), max_new_tokens=8) == fresh
        with pytest.raises(KVMismatchError, match="cannot drop"):  # states already hold the last token
            generate_greedy(model, ids, got, max_new_tokens=2)
        for level in (1, 2):  # lossy levels: the attention layers lossy, the states exact
            lossy = await store.get("q", ids[:last], level=level)
            assert torch.equal(lossy[0].after(last)[1], kv[0].after(last)[1])
            assert not torch.equal(lossy[1][0], kv[1][0][:, :last])
            assert len(generate_greedy(model, ids, lossy, max_new_tokens=4)) == 4
        again = await store.get("q", ids[:last], level=0, out=lossy)  # into the last load's tensors
        assert again[1][0].data_ptr() == lossy[1][0].data_ptr() and torch.equal(again[1][0], kv[1][0][:, :last])
        assert torch.equal(again[0].after(last)[1], kv[0].after(last)[1])


async def test_states_kept_only_where_given_or_asked(model, ids, kv):
    layout = cache_layout(model)
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:  # states only after the last token
        await store.put("q", ids, extract_kv(model, ids), layout=layout)
        assert await store.lookup("q", ids) == TOKENS
        assert await store.lookup("q", ids[:INNER] + [1]) == 0  # the full layer is there, no state
    async with KVStore("memory://", chunk_tokens=CHUNK, sliding_chunks="last_window") as store:
        manifest = await store.put("q", ids, kv, layout=layout)
        assert [c.object_at(0, 0, 2) is not None for c in manifest.chunks] == [False] * 4 + [True]
        assert await store.lookup("q", ids) == TOKENS and await store.lookup("q", ids[:INNER] + [1]) == 0


def test_the_layout_records_linear_layers(model):
    layout = cache_layout(model)
    assert CacheLayout.from_dict(layout.to_dict()) == layout and layout.has_linear
    assert layout.bytes_per_token(2) == 2 * 2 * 16 * 2  # the full layer's K and V only
    # one snapshot, fp32: (128 x 4 + 4 x 16 x 16) x 4 bytes = the bf16 KV of 48 tokens: 3 chunks
    assert layout.state_bytes() == 6144 and layout.states_interval(CHUNK) == 48
    with pytest.raises(ConfigError, match="conv_channels"):
        LayerSpec("linear", 4, 16, 16)
    with pytest.raises(ConfigError, match="only linear layers"):
        LayerSpec("full", 4, 16, 16, conv_channels=8, conv_width=4)
    doc = layout.to_dict()
    doc["specs"][0]["conv_width"] = -1
    with pytest.raises(FormatError):
        CacheLayout.from_dict(doc)


async def test_a_bound_store_keeps_states_every_interval_and_loads_before_the_end(model, ids):
    async with KVStore("memory://", model=model, chunk_tokens=CHUNK, levels=["raw"]) as store:
        await store.put(ids)
        n, cache = await store.load(ids)
        assert n == cache_layout(model).states_interval(CHUNK)  # the last stored state before the final token
        logits, _ = prefill(model, ids[n:], cache)
        torch.testing.assert_close(logits, prefill(model, ids)[0], rtol=0, atol=1e-4)


async def test_bad_or_moved_states_are_refused(model, ids, kv):
    layout = cache_layout(model)
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:
        with pytest.raises(ConfigError, match="no linear-attention states after the context's last token"):
            await store.put("q", ids[:40], [LinearStates({32: kv[0].after(32)}), (kv[1][0][:, :40], kv[1][1][:, :40])],
                            layout=layout)
        with pytest.raises(ConfigError, match="must be LinearStates"):
            await store.put("q", ids, [kv[1], kv[1]], layout=layout)
        assert [key async for key in store.store.list("")] == []  # refused before any write
        manifest = await store.put("q", ids, kv, layout=layout)
        # the state object after chunk 2 copied over chunk 3's: its identity names other tokens
        second, third = manifest.chunks[2].object_at(0, 0, 2), manifest.chunks[3].object_at(0, 0, 2)
        await store.store.put(third.key, await store.store.get(second.key))
        with pytest.raises(FormatError):
            await store.get("q", ids[:64])
        got = await store.get("q", ids)  # reads only the states after its last chunk: intact
        assert torch.equal(got[0].after(TOKENS)[1], kv[0].after(TOKENS)[1])
        last = manifest.chunks[4].object_at(0, 0, 2)
        await store.store.put(last.key, await store.store.get(third.key))
        with pytest.raises(FormatError):
            await store.get("q", ids)


async def test_the_fetcher_refuses_linear_layers_clearly(model, ids, kv):
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:
        await store.put("q", ids, kv, layout=cache_layout(model))
        with pytest.raises(ConfigError, match="linear-attention"):
            await AdaptiveFetcher(store).load("q", ids, deadline_s=1.0)


async def test_writers_of_other_states_for_the_same_tokens_each_read_consistently(model, ids, kv):
    layout = cache_layout(model)
    other = [LinearStates({n: (c * 1.5, r * 1.5) for n in e.positions for c, r in [e.after(n)]})
             if isinstance(e, LinearStates) else (e[0] * 1.5, e[1] * 1.5) for e in kv]
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:
        await store.put("q", ids, kv, layout=layout)
        await store.put("q", ids, other, layout=layout)  # the same tokens, other KV: its own versions
        whole = await store.get("q", ids)  # the manifest now lists the second writer's objects
        assert torch.equal(whole[0].after(TOKENS)[1], other[0].after(TOKENS)[1])
        assert torch.equal(whole[1][0], other[1][0])
        prefix = await store.get("q", ids[:INNER])  # no manifest: the first writer's chain, whole
        assert torch.equal(prefix[0].after(INNER)[1], kv[0].after(INNER)[1])
        assert torch.equal(prefix[1][0], kv[1][0][:, :INNER])
        # the first writer's state after chunk 2 replaced by the second's: never a mixed prefix
        manifest = await store.manifest("q", ids)
        state = manifest.chunks[2].object_at(0, 0, 2)
        base = state.key.split("=")[0]
        await store.store.delete(base)
        await store.store.put(base, await store.store.get(state.key))
        with pytest.raises(IncompleteContextError):
            await store.get("q", ids[:INNER])


@pytest.fixture(scope="module")
def hybrid():  # type: ignore[no-untyped-def]
    """Attention layers 1 and 3 between linear ones: a profile's rows are not the model's layers."""
    return tiny_model("qwen3_next", num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2)


def _contexts(n: int, tokens: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 500, (tokens,), generator=gen).tolist() for _ in range(n)]


async def test_a_bound_store_calibrates_kvcodec_levels_on_the_attention_layers(hybrid):
    ids = _contexts(1, TOKENS, 6)[0]
    exact = extract_kv(hybrid, ids)
    async with KVStore("memory://", model=hybrid, chunk_tokens=CHUNK, calibrate=_contexts(2, 160, 5)) as store:
        manifest = await store.put(ids)
        assert {level.codec for level in manifest.levels} == {"kvcodec"}
        profile = store.codecs[0].model_profile
        assert profile.shape == (2, 2, 16)  # rows: the attention layers 1 and 3
        cal = profile.calibration
        assert len(cal["key_layer_factors"]) == 2
        assert all(m <= 1.5 * t for t, m in zip(cal["targets_pct"], cal["measured_pct"]))
        kv = await store.get(ids)  # the default level
        for i in (0, 2):  # linear layers: their states, exact (the store's prefill was cut at 48)
            for a, b in zip(kv[i].after(TOKENS), exact[i].after(TOKENS)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert not torch.equal(kv[1][0], exact[1][0]) and kv[3][1].shape == exact[3][1].shape
        n, cache = await store.load(ids)  # from the last stored state before the end
        assert n == 48 and torch.isfinite(prefill(hybrid, ids[n:], cache)[0]).all()


async def test_kvcodec_levels_code_the_attention_layers_of_a_hybrid_model(hybrid):
    from kvstore.codecs.kvcodec import KVCodec
    from kvstore.integrations.hf_profile import profile_model

    profile = profile_model(hybrid, _contexts(2, 160, 5), targets_pct=None)  # the default steps
    ids = _contexts(1, TOKENS, 6)[0]
    kv = extract_kv(hybrid, ids, states_every=CHUNK)
    async with KVStore("memory://", chunk_tokens=CHUNK, levels=[KVCodec(profile, 0), KVCodec(profile, 5)]) as store:
        await store.put("q", ids, kv, layout=cache_layout(hybrid))
        errors = []
        for level in (0, 1):
            got = await store.get("q", ids[:INNER], level=level)
            assert torch.equal(got[2].after(INNER)[1], kv[2].after(INNER)[1])
            errors.append([float((got[i][j] - kv[i][j][:, :INNER]).norm() / kv[i][j][:, :INNER].norm())
                           for i in (1, 3) for j in (0, 1)])
        assert max(errors[0]) < 0.15 and all(a < b for a, b in zip(*errors))  # relative errors
