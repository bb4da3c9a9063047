"""The architecture matrix: every cache layout transformers 5.x builds, stored and continued.

Each model is one of transformers' own classes with a tiny random config
(:mod:`eval.architectures`): extract -> put (every level) -> get -> greedy
generation from the stored raw KV equals generation from fresh KV; a stored prefix
ending at an inner chunk boundary, continued by ``recompute``, equals the full
prefill; lossy levels decode to the right shapes and generate. Qwen3-Next's
linear-attention layers (fixed-size states, no per-token KV) have tests of their own.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kvstore import KVStore
from kvstore.errors import CodecError, ConfigError, MissingObjectError
from eval.architectures import ARCHS, WINDOW, tiny_config, tiny_model
from kvstore.format.layout import CacheLayout, LayerSpec
from kvstore.integrations.hf import (
    cache_layout,
    cache_to_kv,
    extract_kv,
    generate_greedy,
    kv_to_cache,
    prefill,
    recompute,
)

CHUNK = 16
TOKENS = 80  # five chunks; every sliding window (16) is exceeded
INNER = 48  # an inner chunk boundary
PER_TOKEN = [a for a in ARCHS if a != "qwen3_next"]  # every layer caches per-token KV
SLIDING = ["mistral", "gemma2", "gemma3", "cohere2", "gpt_oss"]


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return torch.randint(2, 500, (TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module", params=PER_TOKEN)
def arch(request):  # type: ignore[no-untyped-def]
    return request.param, tiny_model(request.param)


def _plain_prefill_kv(model, ids):  # type: ignore[no-untyped-def]
    """The KV of a prefill through a config-less cache (every layer keeps every token)."""
    from transformers import DynamicCache

    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), cache=DynamicCache(), use_cache=True)
        cache = DynamicCache()
        model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    return cache_to_kv(cache)


def test_layouts_follow_the_configs():
    layouts = {a: cache_layout(tiny_model(a)) for a in ARCHS}
    assert layouts["llama"].is_uniform and layouts["phi3"].is_uniform and layouts["qwen3"].is_uniform
    assert {s.kind for s in layouts["mistral"].layers} == {"sliding"}
    assert [s.kind for s in layouts["gemma3"].layers] == ["sliding", "sliding", "full"]
    assert [g.name for g in layouts["gemma2"].groups] == [f"sw{WINDOW}", "full"]
    mla = layouts["deepseek_v3"].layers[0]
    assert (mla.slots, mla.kv_heads, mla.key_dim, mla.value_dim) == ("mla", 1, 32, 8)
    linear = layouts["qwen3_next"].layers[0]
    assert [s.kind for s in layouts["qwen3_next"].layers] == ["linear", "full"]
    # 4 value heads of 16 x 16; convolved q, k (2 heads x 16 each) and v (4 x 16) over a width of 4
    assert linear.state_shapes() == ((2 * 2 * 16 + 4 * 16, 4), (4, 16, 16))
    for layout in layouts.values():
        assert CacheLayout.from_dict(layout.to_dict()) == layout


def test_an_unknown_linear_attention_cache_is_refused_with_the_layer_named():
    config = tiny_config("qwen3_next")
    object.__setattr__(config, "linear_conv_kernel_dim", 0)  # not a gated-DeltaNet cache we can read
    with pytest.raises(ConfigError, match="layer 0 .*linear_attention"):
        cache_layout(config)


def test_extract_kv_holds_every_token_of_every_layer(arch, ids):
    _, model = arch
    kv = extract_kv(model, ids)
    plain = _plain_prefill_kv(model, ids)
    for (k, v), (pk, pv) in zip(kv, plain, strict=True):
        assert k.shape[1] == v.shape[1] == TOKENS
        torch.testing.assert_close(k, pk, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, pv, rtol=0, atol=1e-5)


async def test_store_roundtrip_generation_and_inner_continuation(arch, ids):
    name, model = arch
    layout = cache_layout(model)
    kv = extract_kv(model, ids)
    fresh = generate_greedy(model, ids, None, max_new_tokens=8)
    async with KVStore("memory://", chunk_tokens=CHUNK, levels=["raw", "int8", ("kivi2", {})]) as store:
        manifest = await store.put(name, ids, kv, layout=layout)
        assert manifest.layout == layout
        got = await store.get(name, ids)
        assert got.num_tokens == TOKENS
        for i, ((k, v), (gk, gv), spec) in enumerate(zip(kv, got, layout.layers, strict=True)):
            held = TOKENS if spec.window is None else TOKENS - (TOKENS - spec.window) // CHUNK * CHUNK
            assert gk.shape[1] == gv.shape[1] == held, i
            assert torch.equal(gk, k[:, TOKENS - held:]) and torch.equal(gv, v[:, TOKENS - held:]), i
        assert generate_greedy(model, ids, got, max_new_tokens=8) == fresh

        # a prefix ending at an inner chunk boundary continues exactly
        assert await store.lookup(name, ids[:INNER] + [7, 8, 9]) == INNER
        prefix = await store.get(name, ids[:INNER])
        rest = recompute(model, ids[INNER:], prefix)
        for (k, v), (rk, rv) in zip(kv, rest, strict=True):
            torch.testing.assert_close(rk, k[:, INNER:], rtol=0, atol=1e-5)
            torch.testing.assert_close(rv, v[:, INNER:], rtol=0, atol=1e-5)
        logits, _ = prefill(model, ids[INNER:], kv_to_cache(model, prefix))
        full_logits, _ = prefill(model, ids)
        torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-4)

        # lossy levels decode to the layout's shapes and generate
        for level in (1, 2):
            lossy = await store.get(name, ids, level=level)
            assert [(k.shape, v.shape) for k, v in lossy] == [(k.shape, v.shape) for k, v in got]
            assert len(generate_greedy(model, ids, lossy, max_new_tokens=4)) == 4

        # a later load written into the first one's tensors (full and sliding groups)
        reused = await store.get(name, ids, level=1, out=got)
        for (rk, rv), (gk, _), (lk, lv) in zip(reused, got, await store.get(name, ids, level=1), strict=True):
            assert rk.data_ptr() == gk.data_ptr() and torch.equal(rk, lk) and torch.equal(rv, lv)


async def test_sliding_layers_fetch_only_their_window(ids):
    model = tiny_model("gemma3")
    layout = cache_layout(model)
    kv = extract_kv(model, ids)
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:
        await store.put("gemma3", ids, kv, layout=layout)
        read: list[str] = []
        original = store.store.get

        async def counting_get(key, *args, **kwargs):  # type: ignore[no-untyped-def]
            read.append(key)
            return await original(key, *args, **kwargs)

        store.store.get = counting_get  # type: ignore[method-assign]
        await store.get("gemma3", ids)
        chunks = [k for k in read if "/chunks/" in k]
        sliding = [k for k in chunks if k.endswith(f"+sw{WINDOW}")]
        full = [k for k in chunks if k.endswith("+full")]
        assert len(full) == TOKENS // CHUNK  # every chunk of the full layer
        assert len(sliding) == 1  # the window (the last 16 tokens, [64, 80)) is the last chunk
        read.clear()
        everything = await store.get("gemma3", ids, sliding_window_only=False)
        assert len([k for k in read if "/chunks/" in k]) == 2 * TOKENS // CHUNK
        assert all(k.shape[1] == TOKENS for k, _ in everything)


async def test_last_window_storage_keeps_only_the_end(ids):
    model = tiny_model("gemma2")
    layout = cache_layout(model)
    kv = extract_kv(model, ids)
    async with KVStore("memory://", chunk_tokens=CHUNK, sliding_chunks="last_window") as store:
        manifest = await store.put("gemma2", ids, kv, layout=layout)
        sliding = [c.object_at(0, 0, 2) for c in manifest.chunks]
        assert [o is not None for o in sliding] == [False, False, False, False, True]
        assert await store.lookup("gemma2", ids) == TOKENS
        # an inner prefix's window was not stored: lookup does not offer it
        assert await store.lookup("gemma2", ids[:INNER] + [1]) == 0
        got = await store.get("gemma2", ids)
        assert generate_greedy(model, ids, got, max_new_tokens=6) == generate_greedy(model, ids, None, max_new_tokens=6)
        with pytest.raises(MissingObjectError, match="not stored"):
            await store.get("gemma2", ids, sliding_window_only=False)


async def test_a_continuation_from_an_earlier_token_gets_its_windows(ids):
    """``continue_at``: the sliding layers start where a continuation from that token needs
    them (an engine loading only a prefix of the tokens), and hold the stored KV there."""
    model = tiny_model("gemma2")
    layout = cache_layout(model)
    kv = extract_kv(model, ids)
    sliding = [i for i, spec in enumerate(layout.layers) if spec.kind == "sliding"]
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:
        await store.put("gemma2", ids, kv, layout=layout)
        own = await store.get("gemma2", ids)
        earlier = await store.get("gemma2", ids, continue_at=70)  # needs [54, 70): chunks from 48
        assert {own[i][0].shape[1] for i in sliding} == {16}
        for i, (k, v) in enumerate(earlier):
            held = TOKENS - INNER if i in sliding else TOKENS
            assert k.shape[1] == held
            torch.testing.assert_close(k, kv[i][0][:, TOKENS - held:], rtol=0, atol=0)
            torch.testing.assert_close(v, kv[i][1][:, TOKENS - held:], rtol=0, atol=0)
        for bad in (0, TOKENS + 1, True, 3.0):
            with pytest.raises(ConfigError, match="continue_at"):
                await store.get("gemma2", ids, continue_at=bad)


async def test_a_put_of_sliding_layers_held_from_a_token_stores_only_from_there(ids):
    """``sliding_from`` (an engine that freed its blocks behind the windows): sliding chunks
    before it are not stored, whatever the KV holds there, and the context still loads and
    continues exactly; a ``sliding_from`` past the last window is refused."""
    model = tiny_model("gemma2")
    layout = cache_layout(model)
    kv = extract_kv(model, ids)
    sliding = [i for i, spec in enumerate(layout.layers) if spec.kind == "sliding"]
    freed = [(torch.full_like(k[:, :INNER], 7.0), torch.full_like(v[:, :INNER], 7.0)) for k, v in kv]
    held = [(torch.cat([f[0], k[:, INNER:]], 1), torch.cat([f[1], v[:, INNER:]], 1)) if i in sliding else (k, v)
            for i, ((k, v), f) in enumerate(zip(kv, freed))]
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:
        manifest = await store.put("gemma2", ids, held, layout=layout, sliding_from=INNER)
        groups = {g.name: g.index for g in layout.groups}
        stored = [manifest.object_at(i, 0, groups[f"sw{WINDOW}"]) is not None for i in range(len(manifest.chunks))]
        assert stored == [False, False, False, True, True]
        assert all(manifest.object_at(i, 0, groups["full"]) is not None for i in range(len(manifest.chunks)))
        got = await store.get("gemma2", ids)
        assert generate_greedy(model, ids, got, max_new_tokens=6) == generate_greedy(model, ids, None, max_new_tokens=6)
        with pytest.raises(MissingObjectError, match="not stored"):
            await store.get("gemma2", ids, sliding_window_only=False)
        # other values where the KV is not held: the same content, the same objects
        other = [(torch.cat([-f[0], k[:, INNER:]], 1), torch.cat([-f[1], v[:, INNER:]], 1)) if i in sliding else (k, v)
                 for i, ((k, v), f) in enumerate(zip(kv, freed))]
        again = await store.put("gemma2", ids, other, layout=layout, sliding_from=INNER)
        assert again.chunks == manifest.chunks
        with pytest.raises(ConfigError, match="sliding_from"):
            await store.put("gemma2", ids, held, layout=layout, sliding_from=INNER + CHUNK + 1)
        with pytest.raises(ConfigError, match="sliding_from"):
            await store.put("gemma2", ids, held, layout=layout, sliding_from=-1)


async def test_a_model_keeps_one_layout(ids):
    model = tiny_model("gemma2")
    layout = cache_layout(model)
    kv = extract_kv(model, ids)
    other = CacheLayout(tuple(LayerSpec("full", s.kv_heads, s.key_dim, s.value_dim) for s in layout.layers))
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:
        await store.put("m", ids, kv, layout=layout)
        with pytest.raises(ConfigError, match="stored with layout"):
            await store.put("m", ids[:32], [(k[:, :32], v[:, :32]) for k, v in kv], layout=other)
        with pytest.raises(ConfigError, match="layout"):  # differing layers without a layout
            await store.put("n", ids, [kv[0], (kv[1][0][:1], kv[1][1][:1])])


def _kvcodec_for(model, ids):  # type: ignore[no-untyped-def]
    from kvstore.codecs.kvcodec import KVCodec
    from kvstore.codecs.kvcodec_profile import build_profile

    kv = extract_kv(model, ids)
    sample = (torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]))
    heads, dim = kv[0][0].shape[0], kv[0][0].shape[2]
    return kv, KVCodec(build_profile([sample], query_energy=torch.ones(len(kv), heads, dim)), 1)


async def test_kvcodec_codes_each_layer_group_with_its_profile_rows(ids):
    model = tiny_model("gemma3")
    kv, codec = _kvcodec_for(model, ids)
    async with KVStore("memory://", chunk_tokens=CHUNK, levels=["raw", codec]) as store:
        manifest = await store.put("gemma3", ids, kv, layout=cache_layout(model))
        got = await store.get("gemma3", ids, level=1, sliding_window_only=False)
        for (k, v), (gk, gv) in zip(kv, got, strict=True):
            assert (gk - k).abs().max() < 0.5 * k.abs().max() and (gv - v).abs().max() < 0.5 * v.abs().max()
            assert not torch.equal(gk, k)  # lossy, through the group's own rows of the profile
        for chunk in manifest.chunks:
            sliding, full = chunk.object_at(1, 0, 2), chunk.object_at(1, 1, 2)
            header = await store.store.get(sliding.key)
            assert b'"layers":[0,1]' in header[:4096] and b'"layers":[2]' in (await store.store.get(full.key))[:4096]
        assert len(generate_greedy(model, ids, got, max_new_tokens=4)) == 4


async def test_kvcodec_refuses_another_models_profile_before_writing(ids):
    model = tiny_model("deepseek_v3")
    _, codec = _kvcodec_for(tiny_model("llama"), ids)
    kv = extract_kv(model, ids)
    async with KVStore("memory://", chunk_tokens=CHUNK, levels=["raw", codec]) as store:
        with pytest.raises(CodecError, match="does not match the profile"):
            await store.put("deepseek", ids, kv, layout=cache_layout(model))
        assert [key async for key in store.store.list("")] == []


def test_an_mla_latent_is_weighted_by_the_queries_absorbed_into_it():
    from kvstore.integrations.hf_profile import _key_slot_reads

    attention = tiny_model("deepseek_v3").model.layers[0].self_attn
    gen = torch.Generator().manual_seed(4)
    nope, rope = attention.qk_nope_head_dim, attention.qk_rope_head_dim
    query = torch.randn(1, attention.config.num_attention_heads, 5, nope + rope, generator=gen)
    latent = torch.randn(1, 1, 5, attention.kv_lora_rank, generator=gen)
    keys, _ = attention.expand_kv(latent, torch.zeros(1, 1, 5, rope))  # the model's own expansion
    with torch.no_grad():
        direct = (query[..., :nope] * keys[..., :nope]).sum(-1)  # the non-rotary part of each logit
        absorbed = (_key_slot_reads(attention, query) * latent).sum(-1)
    torch.testing.assert_close(absorbed, direct, rtol=1e-4, atol=1e-6)


async def test_a_bound_store_calibrates_kvcodec_levels_on_mla_latents(ids):
    model = tiny_model("deepseek_v3")
    gen = torch.Generator().manual_seed(3)
    calibrate = [torch.randint(2, 500, (320,), generator=gen).tolist() for _ in range(2)]
    exact = extract_kv(model, ids)
    async with KVStore("memory://", model=model, chunk_tokens=CHUNK, calibrate=calibrate) as store:
        manifest = await store.put(ids)
        assert {level.codec for level in manifest.levels} == {"kvcodec"}
        profile = store.codecs[0].model_profile
        assert profile.shape == (2, 1, 32) and profile.value_width == 8  # latent, rotary key
        cal = profile.calibration
        assert all(m <= 1.5 * t for t, m in zip(cal["targets_pct"], cal["measured_pct"]))
        got = await store.get(ids, level=0)
        for (k, v), (gk, gv) in zip(exact, got, strict=True):
            assert gk.shape == k.shape and gv.shape == v.shape and not torch.equal(gk, k)
        n, cache = await store.load(ids)
        assert n == len(ids) - 1 and len(generate_greedy(model, ids, got, max_new_tokens=4)) == 4


def test_no_future_warning_from_the_bridge(ids):
    model = tiny_model("gemma2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        kv = extract_kv(model, ids)
        generate_greedy(model, ids, kv, max_new_tokens=2)
        recompute(model, ids[INNER:], [(k[:, :INNER], v[:, :INNER]) for k, v in kv])


def test_levels_are_calibrated_to_their_targets_on_each_model():
    from kvstore.codecs.kvcodec_profile import KVCodecProfile
    from kvstore.integrations.hf_profile import profile_model

    model = tiny_model("gemma2")
    gen = torch.Generator().manual_seed(3)
    contexts = [torch.randint(2, 500, (320,), generator=gen) for _ in range(2)]
    targets = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
    profile = profile_model(model, contexts, targets_pct=targets)
    cal = profile.calibration
    assert cal is not None and cal["targets_pct"] == list(targets)
    assert len(cal["key_layer_factors"]) == 2 and all(0.25 <= f <= 4 for f in cal["key_layer_factors"])
    betas = [lv.beta for lv in profile.levels]
    assert betas == sorted(betas) and len(set(betas)) == len(betas)  # coarser steps for looser targets
    for target, measured in zip(targets, cal["measured_pct"]):
        assert measured <= 1.5 * target  # each level meets its target on the calibration text
    assert KVCodecProfile.from_bytes(profile.to_bytes()).calibration == cal


def test_bench_models_quick_covers_every_architecture():
    from benchmarks.models import run

    result = run(quick=True)
    rows = {r["arch"]: r for r in result["rows"]}
    assert set(rows) == set(ARCHS) and result["supported"] == len(ARCHS)
    for arch in ARCHS:
        assert rows[arch]["raw_roundtrip_exact"] and rows[arch]["generate_matches"], arch
    assert rows["qwen3_next"]["state_bytes"] > 0 and rows["llama"]["state_bytes"] == 0
    for arch in SLIDING:
        assert rows[arch]["prefix_get_bytes"] < rows[arch]["stored_bytes"], arch
    long = result["long_context"]
    assert long["raw_roundtrip_exact"] and long["prefix_get_vs_full"] < 0.35


class _RecomputeAt:
    """Fetch every chunk at level 0 except chunk ``at``, which is recomputed."""

    name = "recompute-at"

    def __init__(self, at: int) -> None:
        self.at = at

    def choose(self, ctx):  # type: ignore[no-untyped-def]
        from kvstore.fetch.policy import FETCH, RECOMPUTE_CHUNK, Choice

        if ctx.index == self.at:
            return Choice(RECOMPUTE_CHUNK, None, "test: recompute this chunk")
        return Choice(FETCH, 0, "test: level 0")


@pytest.mark.parametrize("name", ["gemma3", "mistral", "deepseek_v3"])
async def test_fetcher_streams_every_layout_and_recomputes_inside_it(name, ids):
    from kvstore.fetch import AdaptiveFetcher
    from kvstore.integrations.hf import make_recompute

    model = tiny_model(name)
    kv = extract_kv(model, ids)
    async with KVStore("memory://", chunk_tokens=CHUNK, levels=["raw", "int8"]) as store:
        await store.put(name, ids, kv, layout=cache_layout(model))
        want = await store.get(name, ids)
        fetcher = AdaptiveFetcher(store, recompute=make_recompute(model))
        fetched = await fetcher.load(name, ids, deadline_s=30.0, policy=_RecomputeAt(-1))
        assert fetched.kv.num_tokens == TOKENS
        assert fetched.bytes_fetched < (await store.manifest(name, ids)).level_bytes(0) or name == "deepseek_v3"
        for (k, v), (wk, wv) in zip(fetched.kv, want, strict=True):
            assert torch.equal(k, wk) and torch.equal(v, wv)
        # chunk 1 recomputed: its sliding window lies before the chunks the load reads
        mixed = await fetcher.load(name, ids, deadline_s=30.0, policy=_RecomputeAt(1))
        assert [d.action for d in mixed.decisions] == ["fetch", "recompute", "fetch", "fetch", "fetch"]
        for (k, v), (wk, wv) in zip(mixed.kv, want, strict=True):
            torch.testing.assert_close(k, wk, rtol=0, atol=1e-5)
            torch.testing.assert_close(v, wv, rtol=0, atol=1e-5)
        assert generate_greedy(model, ids, mixed.kv, max_new_tokens=6) == generate_greedy(model, ids, None, max_new_tokens=6)


async def test_fetcher_recomputes_from_the_start_when_a_window_was_not_stored(ids):
    from kvstore.fetch import AdaptiveFetcher
    from kvstore.integrations.hf import make_recompute

    model = tiny_model("gemma2")
    kv = extract_kv(model, ids)
    async with KVStore("memory://", chunk_tokens=CHUNK, sliding_chunks="last_window") as store:
        await store.put("gemma2", ids, kv, layout=cache_layout(model))
        want = await store.get("gemma2", ids)
        fetcher = AdaptiveFetcher(store, recompute=make_recompute(model))
        mixed = await fetcher.load("gemma2", ids, deadline_s=30.0, policy=_RecomputeAt(2))
        for (k, v), (wk, wv) in zip(mixed.kv, want, strict=True):
            torch.testing.assert_close(k, wk, rtol=0, atol=1e-5)
            torch.testing.assert_close(v, wv, rtol=0, atol=1e-5)


async def test_the_fetcher_streams_the_windows_of_a_continuation_from_an_earlier_token(ids):
    from kvstore.fetch import AdaptiveFetcher, StaticPolicy

    model = tiny_model("gemma2")
    layout = cache_layout(model)
    kv = extract_kv(model, ids)
    async with KVStore("memory://", chunk_tokens=CHUNK) as store:
        await store.put("gemma2", ids, kv, layout=layout)
        want = await store.get("gemma2", ids, continue_at=70)
        loaded = await AdaptiveFetcher(store).load("gemma2", ids, deadline_s=30.0, policy=StaticPolicy(0), continue_at=70)
        for (k, v), (wk, wv) in zip(loaded.kv, want, strict=True):
            torch.testing.assert_close(k, wk, rtol=0, atol=0)
            torch.testing.assert_close(v, wv, rtol=0, atol=0)
        with pytest.raises(ConfigError, match="continue_at"):
            await AdaptiveFetcher(store).load("gemma2", ids, deadline_s=30.0, continue_at=TOKENS + 1)


async def test_pq_indexes_full_attention_layers_and_retrieval_leaves_sliding_ones_alone():
    from kvstore.retrieval import PQConfig
    from kvstore.retrieval.attention import RetrievalConfig
    from kvstore.retrieval.hf import RetrievalSession, generate_retrieval

    model = tiny_model("gemma3")
    ids = torch.randint(2, 500, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    kv = extract_kv(model, ids)
    async with KVStore("memory://", chunk_tokens=64) as store:
        await store.put("gemma3", ids, kv, layout=cache_layout(model), pq=PQConfig(bits=4, sinks=4, iters=4))
        index = await store.get_pq("gemma3", ids)
    assert index.layer_ids == (2,) and index.layers == 1  # the one full-attention layer
    assert index.config.subspaces == 2  # sized by the 16-wide head
    # every token in the budget: retrieval attention is full attention, so decoding matches exactly
    wide = RetrievalConfig(budget=1.0, sinks=4, window=8)
    out, session = generate_retrieval(model, ids, 6, kv=kv, session=RetrievalSession(index, wide, collect=True))
    assert out == generate_greedy(model, ids, kv, max_new_tokens=6)
    assert set(session.stats.recall_sum) == {2}  # only the indexed layer ran retrieval
    # many queries at once (teacher forcing): sliding layers get their own masks, unchanged
    from eval.perplexity import continuation_nll
    from kvstore.retrieval.hf import retrieval_attention

    ctx, cont = ids[:150], ids[150:]
    ctx_kv = [(k[:, :150], v[:, :150]) for k, v in kv]
    ctx_index = (await _pq_of(model, ctx, ctx_kv))
    plain = continuation_nll(model, ctx, cont, ctx_kv)
    with retrieval_attention(model, RetrievalSession(ctx_index, wide)):
        torch.testing.assert_close(continuation_nll(model, ctx, cont, ctx_kv), plain, rtol=0, atol=1e-4)
    # a real budget attends fewer tokens in that layer and still decodes
    narrow = RetrievalConfig(budget=0.2, sinks=4, window=8)
    out, session = generate_retrieval(model, ids, 6, kv=kv, session=RetrievalSession(index, narrow, collect=True))
    assert len(out) == 6 and session.stats.attended < session.stats.visible


async def _pq_of(model, ids, kv):  # type: ignore[no-untyped-def]
    from kvstore.retrieval import PQConfig

    async with KVStore("memory://", chunk_tokens=64) as store:
        await store.put("m", ids, kv, layout=cache_layout(model), pq=PQConfig(bits=4, sinks=4, iters=4))
        return await store.get_pq("m", ids)


def test_pq_subspaces_scale_with_the_head():
    from kvstore.retrieval import PQConfig

    assert [PQConfig().for_head_dim(d).subspaces for d in (16, 64, 80, 96, 128, 256)] == [2, 2, 2, 3, 4, 8]
    assert PQConfig(subspaces=2).for_head_dim(256).subspaces == 2  # an explicit choice stands


async def test_kvcodec3_calibrates_on_a_hybrid_model_and_codes_each_layer_group(ids):
    # Gemma 3 (tiny): sliding and full layers, QK-norm, two RoPE thetas. The transform groups keep
    # the kinds apart, so each of the store's layer-group objects is coded on its own.
    from kvstore.codecs.kvcodec3 import KVCodec3
    from kvstore.integrations.hf_profile import transform_profile_model

    model = tiny_model("gemma3")
    contexts = [torch.randint(2, 500, (64,), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    profile = transform_profile_model(model, contexts, group_layers=4)
    kinds = [spec.kind for spec in cache_layout(model).layers]
    assert all(len({kinds[layer] for layer in group}) == 1 for group in profile.groups)
    assert [lv.beta for lv in profile.levels] == sorted(lv.beta for lv in profile.levels)
    kv = extract_kv(model, ids)
    async with KVStore("memory://", chunk_tokens=CHUNK, levels=["raw", KVCodec3(profile, 2)]) as store:
        await store.put("gemma3", ids, kv, layout=cache_layout(model))
        got = await store.get("gemma3", ids, level=1, sliding_window_only=False)
    # chunk by chunk and group by group, the store's objects decode to what the whole profile's
    # calibration model (one pass over the context) gives
    keys, values = profile.roundtrip(torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]),
                                     profile.levels[2])
    for layer, (gk, gv) in enumerate(got):
        assert torch.allclose(gk, keys[layer], atol=1e-4) and torch.allclose(gv, values[layer], atol=1e-4)
        assert not torch.equal(gk, kv[layer][0])
    assert len(generate_greedy(model, ids, got, max_new_tokens=4)) == 4
