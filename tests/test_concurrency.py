"""Concurrency and isolation guarantees, on every backend (memory, local, Redis, S3 via moto).

- writers racing on one context end with one complete, verifiable copy;
- KV stored for one model is never returned for another;
- a request whose tokens differ anywhere gets only the matching prefix, and an
  object whose token ids are not the request's is refused even when re-sealed
  with valid checksums;
- a short load test (mixed put/get/lookup/delete from many streams) has no errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import numpy as np
import pytest
import torch

from kvstore import KVStore
from kvstore.admin import verify_store
from kvstore.backends.memory import MemoryStore
from kvstore.errors import ContextNotFoundError, FormatError, IncompleteContextError
from kvstore.format import container
from kvstore.format import manifest as manifest_format
from kvstore.format.keys import chunk_hashes, model_fingerprint
from tests.tools import loadtest
from tests.tools.loadtest import run_load_test

MODEL_A, MODEL_B = "org/model-a@v1", "org/model-b@v1"
LAYERS, HEADS, DIM, CHUNK = 2, 2, 8, 8
TOKENS = 20  # chunks of 8, 8 and 4 tokens


def make_kv(tokens: int, seed: int = 0, dtype: torch.dtype = torch.float16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(HEADS, tokens, DIM, generator=g).to(dtype),
             torch.randn(HEADS, tokens, DIM, generator=g).to(dtype)) for _ in range(LAYERS)]


def make_ids(n: int = TOKENS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n, dtype=np.int32)


def assert_kv_equal(got, want, tokens: int | None = None):
    assert len(got) == len(want)
    for (gk, gv), (wk, wv) in zip(got, want):
        wk, wv = wk[:, :tokens], wv[:, :tokens]
        assert gk.dtype == wk.dtype and gk.shape == wk.shape
        assert torch.equal(gk, wk) and torch.equal(gv, wv)


class Opener:
    """Opens KVStores, each with its own client, on one store and a fresh namespace."""

    def __init__(self, url, options):
        self.url, self.options = url, options
        self.namespace = f"conc-{uuid.uuid4().hex[:10]}"
        self.opened: list[KVStore] = []

    def __call__(self, **kwargs) -> KVStore:
        kwargs.setdefault("chunk_tokens", CHUNK)
        kvs = KVStore(self.url, namespace=self.namespace, storage_options=self.options, **kwargs)
        self.opened.append(kvs)
        return kvs

    async def keys(self) -> list[str]:
        return sorted([k async for k in self.opened[0].store.list(f"{self.namespace}/")])


@pytest.fixture(params=["memory", "local", "redis", "s3"])
async def opener(request, tmp_path):
    kind = request.param
    if kind == "memory":
        shared = MemoryStore()
        url, options = shared, None
    elif kind == "local":
        url, options = tmp_path.as_uri(), None
    elif kind == "redis":
        url, options = request.getfixturevalue("redis_url"), None
    else:
        s3 = request.getfixturevalue("moto_s3")
        url, options = f"{s3.url}/concurrency", s3.storage_options()
    op = Opener(url, options)
    yield op
    if op.opened:
        for key in await op.keys():
            await op.opened[0].store.delete(key)
    for kvs in op.opened:
        await kvs.close()


async def assert_one_complete_copy(op: Opener, kvs: KVStore, tokens: int) -> None:
    """Exactly the context's chunks and one manifest, all intact and consistent."""
    chunks = -(-tokens // CHUNK)
    keys = await op.keys()
    assert len(keys) == chunks + 1, keys
    assert sum("/contexts/" in k for k in keys) == 1
    report = await verify_store(kvs.store, f"{op.namespace}/")
    assert report.ok, report.to_text()
    assert report.manifests_checked == 1 and report.objects == chunks + 1


# -- (a) racing writers ------------------------------------------------------------


@pytest.mark.parametrize("writers", [2, 8])
async def test_writers_of_one_context_leave_one_complete_copy(opener, writers):
    ids, kv = make_ids(), make_kv(TOKENS)
    stores = [opener() for _ in range(writers)]
    manifests = await asyncio.gather(*(s.put(MODEL_A, ids, kv) for s in stores))
    # every writer was told of the very same chunk objects (size and header checksum)
    assert all(m.chunks == manifests[0].chunks for m in manifests)
    reader = opener()
    assert_kv_equal(await reader.get(MODEL_A, ids), kv)
    await assert_one_complete_copy(opener, reader, TOKENS)


async def test_writers_with_different_kv_leave_one_consistent_copy(opener):
    """Replicas whose KV differs (non-deterministic kernels): a get returns exactly one writer's
    KV, whole; no writer's object is replaced (each stores its own version of a chunk)."""
    ids = make_ids()
    kvs = [make_kv(TOKENS, seed=i) for i in range(8)]
    stores = [opener() for _ in kvs]
    await asyncio.gather(*(s.put(MODEL_A, ids, kv) for s, kv in zip(stores, kvs)))
    got = await stores[0].get(MODEL_A, ids)
    owners = [i for i, kv in enumerate(kvs)
              if all(torch.equal(gk, k) and torch.equal(gv, v) for (gk, gv), (k, v) in zip(got, kv))]
    assert len(owners) == 1, "the context is no single writer's KV"
    prefix = await stores[0].get(MODEL_A, ids[:2 * CHUNK])  # without a manifest: one writer's chain too
    assert sum(all(torch.equal(pk, k[:, :2 * CHUNK]) and torch.equal(pv, v[:, :2 * CHUNK])
                   for (pk, pv), (k, v) in zip(prefix, kv)) for kv in kvs) == 1
    keys = await opener.keys()
    assert sum("/contexts/" in k for k in keys) == 1 and len(keys) <= 8 * -(-TOKENS // CHUNK) + 1
    report = await verify_store(stores[0].store, f"{opener.namespace}/")
    assert report.ok, report.to_text()


class SlowManifests(MemoryStore):
    """A view of another memory store whose manifest writes land late (a slow writer)."""

    def __init__(self, shared: MemoryStore) -> None:
        super().__init__()
        self._values = shared._values

    async def put(self, key, value, **kwargs):
        if "/contexts/" in key:
            await asyncio.sleep(0.2)
        return await super().put(key, value, **kwargs)


async def test_writers_in_two_dtypes_leave_one_complete_copy():
    backend, ids = MemoryStore(), make_ids()
    kv16, kv32 = make_kv(TOKENS, 1, torch.float16), make_kv(TOKENS, 2, torch.float32)
    slow, fast = KVStore(SlowManifests(backend), chunk_tokens=CHUNK), KVStore(backend, chunk_tokens=CHUNK)
    await asyncio.gather(slow.put(MODEL_A, ids, kv16), fast.put(MODEL_A, ids, kv32))
    got = await fast.get(MODEL_A, ids)  # either writer's KV, whole, is a complete copy
    assert_kv_equal(got, kv16 if got[0][0].dtype == torch.float16 else kv32)


# -- (b) model isolation ------------------------------------------------------------


async def test_kv_of_one_model_is_never_returned_for_another(opener):
    kvs, ids = opener(), make_ids()
    kv_a, kv_b = make_kv(TOKENS, 1), make_kv(TOKENS, 2)
    await kvs.put(MODEL_A, ids, kv_a)
    assert await kvs.lookup(MODEL_B, ids) == 0
    assert await kvs.manifest(MODEL_B, ids) is None
    for n in (TOKENS, 2 * CHUNK, CHUNK):  # with a manifest, and chunk-aligned prefixes without
        with pytest.raises(ContextNotFoundError):
            await kvs.get(MODEL_B, ids[:n])
    await kvs.put(MODEL_B, ids, kv_b)  # same tokens, other model: stored apart
    assert_kv_equal(await kvs.get(MODEL_A, ids), kv_a)
    assert_kv_equal(await kvs.get(MODEL_B, ids), kv_b)
    assert_kv_equal(await kvs.get(MODEL_B, ids[:CHUNK]), kv_b, CHUNK)


async def test_objects_copied_under_another_models_keys_are_refused(opener):
    """A misconfigured copy (or a tenant) puts model A's objects exactly where model B's would be."""
    kvs, ids = opener(), make_ids()
    manifest = await kvs.put(MODEL_A, ids, make_kv(TOKENS))
    fp_a, fp_b = manifest.fingerprint, model_fingerprint(MODEL_B)
    tag = manifest.levels[0].tag
    b_hashes = chunk_hashes(fp_b, ids, CHUNK)  # chained from the fingerprint: B's keys differ throughout
    for chunk, b_hash in zip(manifest.chunks, b_hashes):
        data = await kvs.store.get(chunk.objects[0].key)
        await kvs.store.put(kvs.keys.chunk_key(fp_b, b_hash, tag), data)
    a_manifest = await kvs.store.get(kvs.keys.manifest_key(fp_a, manifest.chunks[-1].hash))
    await kvs.store.put(kvs.keys.manifest_key(fp_b, b_hashes[-1]), a_manifest)
    with pytest.raises(FormatError, match="belongs to model"):
        await kvs.get(MODEL_B, ids)
    await kvs.store.delete(kvs.keys.manifest_key(fp_b, b_hashes[-1]))
    for n in (TOKENS, CHUNK):  # no manifest: each chunk's own recorded identity refuses it
        with pytest.raises(FormatError, match="fingerprint"):
            await kvs.get(MODEL_B, ids[:n])


# -- (c) token verification ---------------------------------------------------------


async def test_a_changed_token_anywhere_gives_only_the_matching_prefix(opener):
    kvs, ids, kv = opener(), make_ids(), make_kv(TOKENS)
    await kvs.put(MODEL_A, ids, kv)
    for position in range(TOKENS):
        other = ids.copy()
        other[position] = (other[position] + 1) % 50_000
        matching = position // CHUNK * CHUNK
        assert await kvs.lookup(MODEL_A, other) == matching, position
        with pytest.raises(ContextNotFoundError):
            await kvs.get(MODEL_A, other)
        if matching and position % CHUNK == 0:  # the prefix found is usable, and exact
            assert_kv_equal(await kvs.get(MODEL_A, other[:matching]), kv, matching)


def reseal(data: bytes, *, tokens: np.ndarray | None = None, **meta) -> bytes:
    """Rebuild a container with valid checksums, optionally with other token ids or meta fields."""
    obj = container.decode(data)
    buffers = {name: obj.tensor(name) for name in obj.header.buffers}
    if tokens is not None:
        buffers["tokens"] = torch.from_numpy(np.ascontiguousarray(tokens, dtype="<i4"))
    return container.encode(buffers, kind=obj.header.kind, codec=obj.header.codec,
                            meta={**obj.header.meta, **meta})


@pytest.fixture
async def stored():
    """A memory store holding one context of three chunks, and what it holds."""
    async with KVStore(MemoryStore(), chunk_tokens=CHUNK) as kvs:
        ids, kv = make_ids(), make_kv(TOKENS)
        manifest = await kvs.put(MODEL_A, ids, kv)
        yield kvs, ids, kv, manifest


async def test_resealing_is_faithful(stored):
    kvs, _, _, manifest = stored
    for key in [o.key for c in manifest.chunks for o in c.objects]:
        data = await kvs.store.get(key)
        assert reseal(data) == data  # so the forgeries below differ only where they mean to


async def test_chunk_resealed_for_other_tokens_is_refused_by_the_token_check(stored):
    """Chunk 1's object, re-sealed to name the hash of other tokens, at those tokens' key."""
    kvs, ids, kv, manifest = stored
    fp = manifest.fingerprint
    other = ids.copy()
    other[CHUNK + 3] += 1  # chunk 1 differs
    other_hash = chunk_hashes(fp, other, CHUNK)[1]
    tag = manifest.levels[0].tag
    original = await kvs.store.get(manifest.chunks[1].objects[0].key)
    forged = reseal(original, hash=other_hash)  # meta now claims the other chunk; token ids unchanged
    container.decode(forged)  # every checksum is valid
    await kvs.store.put(kvs.keys.chunk_key(fp, other_hash, tag), forged)
    with pytest.raises(FormatError, match="different token ids"):
        await kvs.get(MODEL_A, other[: 2 * CHUNK])
    # control: with the token ids rewritten as well, the same object passes -- the token ids refused it
    await kvs.store.put(kvs.keys.chunk_key(fp, other_hash, tag),
                        reseal(original, hash=other_hash, tokens=other[CHUNK: 2 * CHUNK]))
    assert_kv_equal(await kvs.get(MODEL_A, other[: 2 * CHUNK]), kv, 2 * CHUNK)


async def test_manifest_resealed_for_other_tokens_is_refused(stored):
    kvs, ids, _, manifest = stored
    fp = manifest.fingerprint
    other = ids.copy()
    other[TOKENS - 1] += 1  # the last chunk differs
    hashes = chunk_hashes(fp, other, CHUNK)
    # 1. A's manifest re-sealed with the other tokens, at their key: A's last chunk names other tokens
    await kvs.store.put(kvs.keys.manifest_key(fp, hashes[-1]), manifest.to_bytes(other))
    with pytest.raises(FormatError, match="chunk hashes do not match"):  # the manifest's own check
        await kvs.get(MODEL_A, other)
    # 2. ...and the last chunk re-sealed to name the other hash, recorded in the manifest with
    #    its new size and checksum: everything agrees except the chunk's token ids
    last = manifest.chunks[-1]
    forged = reseal(await kvs.store.get(last.objects[0].key), hash=hashes[-1])
    key = kvs.keys.chunk_key(fp, hashes[-1], manifest.levels[0].tag)
    await kvs.store.put(key, forged)
    header = container.decode(forged).header
    entry = dataclasses.replace(last, hash=hashes[-1], objects=(
        manifest_format.ChunkObject(key, len(forged), container.PREFIX_BYTES + header.header_bytes, header.checksum),))
    other_manifest = dataclasses.replace(manifest, chunks=(*manifest.chunks[:-1], entry))
    await kvs.store.put(kvs.keys.manifest_key(fp, hashes[-1]), other_manifest.to_bytes(other))
    with pytest.raises(FormatError, match="different token ids"):
        await kvs.get(MODEL_A, other)
    # 3. A's own manifest re-sealed to list other tokens: refused before any chunk is read
    await kvs.store.put(kvs.keys.manifest_key(fp, manifest.chunks[-1].hash), manifest.to_bytes(other))
    with pytest.raises(FormatError, match="does not describe the requested tokens"):
        await kvs.get(MODEL_A, ids)


# -- (d) load --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "s3"])
async def test_short_load_test_has_no_errors(request, kind):
    if kind == "redis":
        url, options = request.getfixturevalue("redis_url"), {}
    else:
        s3 = request.getfixturevalue("moto_s3")
        url, options = f"{s3.url}/load", s3.storage_options()
    result = await run_load_test(url, concurrency=16, duration_s=3.0, seed=1, **options)
    assert result["errors"] == 0 and result["wrong_kv"] == 0, result["error_examples"]
    assert all(result["by_kind"][k]["ops"] > 0 for k in loadtest.KINDS), result["by_kind"]
    assert result["verify_ok"] and result["leftover_objects"] == 0
    assert result["p99_ms"] is not None and result["rss_mb_peak"] is not None


@pytest.mark.parametrize("sabotage", ["flip_a_value", "ignore_the_model"])
async def test_load_test_counts_wrong_kv(monkeypatch, sabotage):
    """The load test's checks are live: a store that returns wrong KV is caught."""
    real_get = KVStore.get

    async def get(self, model_id, tokens, **kwargs):
        if sabotage == "ignore_the_model":
            model_id = loadtest.MODEL
        kv = await real_get(self, model_id, tokens, **kwargs)
        if sabotage == "flip_a_value":
            kv[-1][1].view(torch.int16)[-1, -1, -1] ^= 1
        return kv

    monkeypatch.setattr(KVStore, "get", get)
    result = await run_load_test("memory://", concurrency=4, duration_s=0.5)
    kind = "get" if sabotage == "flip_a_value" else "miss"
    assert result["wrong_kv"] > 0 and result["by_kind"][kind]["errors"] == result["wrong_kv"]
    assert result["errors"] >= result["wrong_kv"] and result["error_examples"]
