"""A store bound to a model (``KVStore(url, model=...)``): it prefills, calibrates the model's
codec profile once and shares it through the store, and loads ready caches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from kvstore import KVStore, SyncKVStore
from kvstore.admin.checks import DEFAULT_PROFILE, check_bytes
from kvstore.codecs.kvcodec import KVCodec
from kvstore.codecs.kvcodec3 import KVCodec3
from kvstore.codecs.kvcodec3_profile import TransformProfile
from kvstore.codecs.kvcodec_profile import KVCodecProfile
from kvstore.errors import ConfigError, ContextNotFoundError, FormatError
from eval.architectures import tiny_model
from kvstore.format.default_profile import default_profile_from_bytes
from kvstore.format.keys import KeyScheme, model_fingerprint
from kvstore.integrations.hf import cache_kwarg, extract_kv
from kvstore.integrations.hf_adapter import HFModel
from kvstore.model_adapter import ModelAdapter


class CountingModel(HFModel):
    """A real Hugging Face adapter that records what it was asked to calibrate on."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.calibrated_on: list[list[int]] = []

    def calibrate(self, contexts):
        self.calibrated_on.append([len(c) for c in contexts])
        return super().calibrate(contexts)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_model("llama").eval()


def tokens_of(model, n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist()


def stored_profile(root: Path, model_id: str) -> tuple[str, bytes]:
    fingerprint = model_fingerprint(model_id)
    key = KeyScheme("kvstore").default_profile_key(fingerprint)
    return default_profile_from_bytes((root / key).read_bytes(), fingerprint)


def test_an_hf_model_is_adapted(llama):
    adapter = HFModel(llama)
    assert isinstance(adapter, ModelAdapter)
    assert adapter.model_id == HFModel(llama).model_id  # stable: hashes the config and weights
    with pytest.raises(ConfigError, match="Hugging Face"):
        KVStore("memory://", model=object())


async def test_put_prefills_and_stores_the_models_kvcodec_levels(llama, tmp_path):
    model = CountingModel(llama)
    tokens = tokens_of(llama, 300)
    async with KVStore(tmp_path.as_uri(), model=model) as store:
        manifest = await store.put(tokens)
        assert model.calibrated_on == [[300]]  # on the first put's tokens, once
        assert store.default_level == 2
        profile_id, profile_bytes = stored_profile(tmp_path, model.model_id)
        assert [spec.codec for spec in manifest.levels] == ["kvcodec"] * 6
        assert [spec.params["level"] for spec in manifest.levels] == list(range(6))
        assert {spec.params["profile"] for spec in manifest.levels} == {profile_id}
        loaded = await store.get(tokens)  # the default level
        at_2 = await store.get(tokens, level=2)
        await store.put(tokens_of(llama, 100, seed=2))
        assert model.calibrated_on == [[300]]  # calibrated once per model

    profile = KVCodecProfile.from_bytes(profile_bytes)  # the same as levels given by hand, bit for bit
    async with KVStore("memory://", levels=[KVCodec(profile, i) for i in range(6)]) as by_hand:
        await by_hand.put(model.model_id, tokens, extract_kv(llama, tokens), layout=model.cache_layout())
        expected = await by_hand.get(model.model_id, tokens, level=2)
    for (k, v), (k2, v2), (ke, ve) in zip(loaded, at_2, expected, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
        assert torch.equal(k, ke) and torch.equal(v, ve)


async def test_every_writer_of_a_model_uses_the_first_stored_profile(llama, tmp_path):
    url = tmp_path.as_uri()
    first, second = CountingModel(llama), CountingModel(llama)
    async with KVStore(url, model=first) as a, KVStore(url, model=second) as b:
        # both find no profile, both calibrate; one stores its profile first and both use that one
        made = await asyncio.gather(a.put(tokens_of(llama, 300, seed=3)), b.put(tokens_of(llama, 260, seed=4)))
    profile_id, _ = stored_profile(tmp_path, first.model_id)
    for manifest in made:
        assert {spec.params["profile"] for spec in manifest.levels} == {profile_id}
    third = CountingModel(llama)
    async with KVStore(url, model=third) as c:  # a later writer reads it: no calibration
        manifest = await c.put(tokens_of(llama, 280, seed=5))
        assert await c.lookup(tokens_of(llama, 300, seed=3)) == 300
    assert third.calibrated_on == []
    assert {spec.params["profile"] for spec in manifest.levels} == {profile_id}
    async with KVStore(url) as unbound:  # a writer that cannot calibrate (an engine) reads the levels
        levels = await unbound.stored_levels(first.model_id)
        assert [(c.name, c.params["profile"], c.level) for c in levels] == [("kvcodec", profile_id, i)
                                                                            for i in range(6)]
        assert await unbound.stored_levels("another-model") is None


async def test_load_returns_the_stored_prefix_and_a_ready_cache(llama):
    model = HFModel(llama)
    tokens = tokens_of(llama, 300)
    async with KVStore("memory://", model=model) as store:
        assert await store.load(tokens) == (0, None)  # nothing stored: and no calibration on a read
        assert not store.codecs
        with pytest.raises(ContextNotFoundError):
            await store.get(tokens)
        await store.put(tokens)
        more = tokens + tokens_of(llama, 40, seed=9)
        n, cache = await store.load(more)  # a prefix: whole chunks
        assert n == 256 and cache.get_seq_length() == 256
        prefix = await store.get(tokens[:256])
        assert torch.equal(cache.layers[0].keys[0], prefix[0][0]) and torch.equal(cache.layers[1].values[0], prefix[1][1])
        n, cache = await store.load(tokens)  # the whole context: its last token is left to compute
        assert n == 299 and cache.get_seq_length() == 299
        whole = await store.get(tokens)
        assert torch.equal(cache.layers[1].keys[0], whole[1][0][:, :299])
        with torch.no_grad():  # the model goes on from the cache
            logits = llama(input_ids=torch.tensor([tokens[n:]]), **{cache_kwarg(llama): cache}).logits
        assert logits.shape[:2] == (1, 1) and torch.isfinite(logits).all()


async def test_a_first_put_of_8k_tokens_calibrates_kvcodec3_levels(llama, tmp_path):
    model = CountingModel(llama)
    tokens = tokens_of(llama, 8192 + 300, seed=3)
    async with KVStore(tmp_path.as_uri(), model=model) as store:
        manifest = await store.put(tokens)
        assert model.calibrated_on == [[2048] * 4]  # four contexts of the first 8,192 tokens
        assert [spec.codec for spec in manifest.levels] == ["kvcodec3"] * 6 and store.default_level == 2
        loaded = await store.get(tokens)
    profile_id, profile_bytes = stored_profile(tmp_path, model.model_id)
    profile = TransformProfile.from_bytes(profile_bytes)
    assert profile.calibration["calibration_tokens"] == 8192
    # the store's level 2 is kvcodec3 level 2 of that profile, bit for bit
    async with KVStore("memory://", levels=[KVCodec3(profile, 2)]) as by_hand:
        await by_hand.put(model.model_id, tokens, extract_kv(llama, tokens), layout=model.cache_layout())
        expected = await by_hand.get(model.model_id, tokens)
    assert all(torch.equal(a, b) for (ka, va), (kb, vb) in zip(loaded, expected) for a, b in ((ka, kb), (va, vb)))
    again = CountingModel(llama)
    async with KVStore(tmp_path.as_uri(), model=again) as store:  # another writer reads the stored profile
        await store.put(tokens_of(llama, 300, seed=4))
        assert again.calibrated_on == [] and {type(c) for c in store.codecs} == {KVCodec3}


async def test_calibration_texts(llama):
    model = CountingModel(llama)
    texts = [tokens_of(llama, 64, seed=7), tokens_of(llama, 80, seed=8)]
    async with KVStore("memory://", model=model, calibrate=texts) as store:
        await store.put(tokens_of(llama, 300))
    assert model.calibrated_on == [[64, 80]]
    async with KVStore("memory://", model=HFModel(llama), calibrate=["some text"]) as store:
        with pytest.raises(ConfigError, match="tokenizer"):
            await store.put(tokens_of(llama, 300))
    for bad in ("one text", [], ["x"]):
        with pytest.raises(ConfigError, match="calibrate"):
            KVStore("memory://", model=model, calibrate=bad, levels=("raw",) if bad == ["x"] else "auto")


async def test_calls_a_bound_store_refuses(llama):
    model = HFModel(llama)
    tokens = tokens_of(llama, 40)
    with pytest.raises(ConfigError, match="model"):
        KVStore("memory://", levels="auto")
    async with KVStore("memory://") as store:
        with pytest.raises(ConfigError, match="bound to a model"):
            await store.put(tokens)
        with pytest.raises(ConfigError, match="bound to a model"):
            await store.load(tokens)
    async with KVStore("memory://", model=model) as store:
        with pytest.raises(ConfigError, match="calibrated for model"):
            await store.put("another-model", tokens, extract_kv(llama, tokens))
        with pytest.raises(ConfigError, match="too short"):
            await store.put(tokens[:8])
        with pytest.raises(ConfigError, match="level"):
            await store.get(tokens, level=6)
    async with KVStore("memory://", model=model, levels=["raw", "int8"], default_level=1) as store:
        await store.put(tokens)  # explicit levels: no calibration, the model still prefills
        assert store.default_level == 1
        assert torch.equal((await store.get(tokens))[0][0], (await store.get(tokens, level=1))[0][0])
        await store.put("another-model", tokens, extract_kv(llama, tokens))  # any model id with explicit levels


async def test_a_damaged_default_profile_is_refused_not_replaced(llama, tmp_path):
    model = HFModel(llama)
    async with KVStore(tmp_path.as_uri(), model=model) as store:
        await store.put(tokens_of(llama, 100))
    fingerprint = model_fingerprint(model.model_id)
    key = KeyScheme("kvstore").default_profile_key(fingerprint)
    path = tmp_path / key
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))
    check, _ = check_bytes(key, bytes(data))
    assert check.kind == DEFAULT_PROFILE and not check.ok
    counting = CountingModel(llama)
    async with KVStore(tmp_path.as_uri(), model=counting) as store:
        with pytest.raises(FormatError, match="delete it"):
            await store.put(tokens_of(llama, 100, seed=3))
    async with KVStore(tmp_path.as_uri()) as store:
        with pytest.raises(FormatError, match="delete it"):
            await store.stored_levels(model.model_id)
    assert counting.calibrated_on == [] and path.read_bytes() == bytes(data)


async def test_sliding_window_model(tmp_path):
    torch.manual_seed(0)
    gemma = tiny_model("gemma2").eval()
    tokens = tokens_of(gemma, 300)
    async with KVStore(tmp_path.as_uri(), model=gemma) as store:
        await store.put(tokens)  # the model's layout: sliding and full layers
        n, cache = await store.load(tokens + [5, 6])
        assert n == 256 and cache.get_seq_length() == 256


def test_sync_store(llama, tmp_path):
    tokens = tokens_of(llama, 300)
    with SyncKVStore(tmp_path.as_uri(), model=llama) as store:
        store.put(tokens)
        assert store.lookup(tokens) == 300
        n, cache = store.load(tokens)
        assert n == 299 and cache.get_seq_length() == 299
        assert store.delete(tokens)
        assert store.lookup(tokens) == 0


async def test_a_bound_store_reads_contexts_stored_without_one(llama, tmp_path):
    model = HFModel(llama)
    tokens = tokens_of(llama, 300)
    kv = extract_kv(llama, tokens)
    async with KVStore(tmp_path.as_uri(), levels=["raw"]) as before:  # as stores were written until now
        await before.put(model.model_id, tokens, kv, layout=model.cache_layout())
    async with KVStore(tmp_path.as_uri(), model=model) as store:
        loaded = await store.get(tokens, level=0)  # the manifest's levels, not the bound ones
        assert not store.codecs  # and no calibration for a read
    for (k, v), (k2, v2) in zip(loaded, kv, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
