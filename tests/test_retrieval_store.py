"""PQ objects stored beside the KV: round trip, verification, and K/V fetched straight from the store."""

import pytest
import torch

from kvstore import KVStore
from kvstore.errors import ChecksumError, ConfigError, ContextNotFoundError, FormatError, IncompleteContextError
from kvstore.format import container
from kvstore.retrieval import pq
from kvstore.retrieval.sources import StoreSource
from kvstore.retrieval.store import (
    KIND_CENTROIDS,
    KIND_CODES,
    centroids_key,
    delete_pq,
    get_pq,
    pq_objects,
    put_pq,
)

MODEL = "test/model@v1"
LAYERS, HEADS, DIM, TOKENS = 2, 2, 16, 300
CONFIG = pq.PQConfig(subspaces=2, bits=5, sinks=4, iters=4)  # stored configs name their subspaces


def make_kv(tokens=TOKENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(HEADS, tokens, DIM, generator=g), torch.randn(HEADS, tokens, DIM, generator=g))
            for _ in range(LAYERS)]


@pytest.fixture
async def kvs():
    store = KVStore("memory://", chunk_tokens=128)
    yield store
    await store.close()


@pytest.fixture
def context():
    kv = make_kv()
    tokens = list(range(1000, 1000 + TOKENS))
    return tokens, kv, pq.build_index([k for k, _ in kv], CONFIG)


async def test_round_trip_reads_no_kv(kvs, context):
    tokens, kv, index = context
    await kvs.put(MODEL, tokens, kv)
    written = await put_pq(kvs, MODEL, tokens, index)
    assert len(written.codes) == 3  # one codes object per 128-token chunk
    read: list[str] = []
    original_get = kvs.store.get

    async def recording_get(key, *args, **kwargs):
        read.append(key)
        return await original_get(key, *args, **kwargs)

    kvs.store.get = recording_get
    loaded = await get_pq(kvs, MODEL, tokens, CONFIG)
    assert sorted(read) == sorted(written.keys) and all("/pq/" in key for key in read)
    assert torch.equal(loaded.codes, index.codes)
    assert ((loaded.centroids - index.centroids).abs() <= _grid_error(index.centroids, 4)).all()  # q4 default
    assert loaded.config == CONFIG
    listed = await pq_objects(kvs, MODEL, tokens, CONFIG)
    assert listed == written
    # packed codes: `bits` bits per code, not a byte
    head = await kvs.store.get(written.codes[0].key)
    spec = container.decode_header(head[: container.head_bytes_needed(head)]).buffers["codes"]
    assert spec.nbytes == -(-LAYERS * HEADS * 128 * CONFIG.subspaces * CONFIG.bits // 8)


async def test_kinds_and_key_layout(kvs, context):
    tokens, _, index = context
    written = await put_pq(kvs, MODEL, tokens, index)
    key = centroids_key(kvs, MODEL, tokens, CONFIG)
    assert written.centroids.key == key and key.startswith("kvstore/") and "/pq/" in key
    assert container.decode(await kvs.store.get(key)).header.kind == KIND_CENTROIDS
    assert container.decode(await kvs.store.get(written.codes[0].key)).header.kind == KIND_CODES


async def test_trains_from_kv_when_no_index(kvs, context):
    tokens, kv, index = context
    await put_pq(kvs, MODEL, tokens, kv=kv, config=CONFIG)
    loaded = await get_pq(kvs, MODEL, tokens, CONFIG)
    assert torch.equal(loaded.codes, index.codes)  # deterministic by seed


async def test_absent_for_other_tokens_model_or_config(kvs, context):
    tokens, _, index = context
    await put_pq(kvs, MODEL, tokens, index)
    assert await get_pq(kvs, MODEL, tokens[:-1], CONFIG) is None
    assert await get_pq(kvs, "other/model", tokens, CONFIG) is None
    assert await get_pq(kvs, MODEL, tokens, pq.PQConfig(subspaces=4)) is None  # another configuration
    loaded = await get_pq(kvs, MODEL, tokens, pq.PQConfig(bits=5, sinks=4, iters=4))  # head-sized: found by listing
    assert loaded is not None and loaded.config == CONFIG and torch.equal(loaded.codes, index.codes)
    assert await get_pq(kvs, MODEL, tokens, pq.PQConfig()) is None  # no stored configuration matches


def _grid_error(centroids, bits):
    """The largest error of a per-channel grid of 2**bits levels (half a step, plus fp16 rounding)."""
    spread = centroids.amax(-2, keepdim=True) - centroids.amin(-2, keepdim=True)
    return 0.51 * spread / (2**bits - 1) + 2e-3 * centroids.abs().amax(-2, keepdim=True) + 1e-4


def _flip(data: bytes, position: int) -> bytes:
    raw = bytearray(data)
    raw[position] ^= 0x40
    return bytes(raw)


@pytest.mark.parametrize("which", ["codes", "centroids"])
async def test_corrupt_object_raises_checksum_error(kvs, context, which):
    tokens, _, index = context
    written = await put_pq(kvs, MODEL, tokens, index)
    key = written.codes[1].key if which == "codes" else written.centroids.key
    data = await kvs.store.get(key)
    start, _ = container.decode_header(data[: container.head_bytes_needed(data)]).buffer_range(which)
    await kvs.store.put(key, _flip(data, start + 3))
    with pytest.raises(ChecksumError):
        await get_pq(kvs, MODEL, tokens, CONFIG)


async def test_replaced_or_missing_codes_are_detected(kvs, context):
    tokens, _, index = context
    written = await put_pq(kvs, MODEL, tokens, index)
    other = pq.build_index([k for k, _ in make_kv(seed=5)], CONFIG)
    # a codes object from another index, well formed, at the right key: the listing catches it
    stale = await put_pq(kvs, MODEL, tokens, other)
    await kvs.store.put(stale.centroids.key, await _centroids_bytes(kvs, index, tokens))
    with pytest.raises((IncompleteContextError, FormatError)):
        await get_pq(kvs, MODEL, tokens, CONFIG)
    await put_pq(kvs, MODEL, tokens, index)
    await kvs.store.delete(written.codes[2].key)
    with pytest.raises(IncompleteContextError):
        await get_pq(kvs, MODEL, tokens, CONFIG)


async def _centroids_bytes(kvs, index, tokens):
    scratch = KVStore("memory://", chunk_tokens=kvs.chunk_tokens)
    written = await put_pq(scratch, MODEL, tokens, index)
    return await scratch.store.get(written.centroids.key)


async def test_delete(kvs, context):
    tokens, _, index = context
    written = await put_pq(kvs, MODEL, tokens, index)
    assert await delete_pq(kvs, MODEL, tokens, CONFIG)
    assert not any([await kvs.store.exists(key) for key in written.keys])
    assert not await delete_pq(kvs, MODEL, tokens, CONFIG)


def test_store_source_fetches_only_needed_chunks(context):
    tokens, kv, _ = context
    import asyncio

    kvs = KVStore("memory://", chunk_tokens=128)
    asyncio.run(kvs.put(MODEL, tokens, kv))
    source = asyncio.run(StoreSource.open(kvs, MODEL, tokens))
    try:
        idx = torch.tensor([[3, 130, 140], [5, 131, 200]])
        k, v = source.gather(1, idx)
        assert source.chunks_fetched == 2  # chunks 0 and 1, not 2
        expected_k = torch.stack([kv[1][0][h, idx[h]] for h in range(HEADS)])
        expected_v = torch.stack([kv[1][1][h, idx[h]] for h in range(HEADS)])
        assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
        fetched = source.bytes_fetched
        source.gather(0, idx)
        assert source.bytes_fetched == fetched  # cached
    finally:
        source.close()


async def test_centroid_formats_sizes_and_errors(kvs, context):
    tokens, _, index = context
    sizes = {}
    for fmt in ("q3", "q4", "int8", "float16", "float32"):
        written = await put_pq(kvs, MODEL, tokens, index, centroid_format=fmt)
        sizes[fmt] = written.centroids.size
        loaded = await get_pq(kvs, MODEL, tokens, CONFIG)
        assert torch.equal(loaded.codes, index.codes)
        error = (loaded.centroids - index.centroids).abs()
        if fmt.startswith("q"):
            assert (error <= _grid_error(index.centroids, int(fmt[1]))).all()
        elif fmt == "int8":
            assert (error <= 0.51 * index.centroids.abs().amax(-1, keepdim=True) / 127 + 1e-3).all()
        else:
            assert torch.allclose(loaded.centroids, index.centroids, rtol=1e-3, atol=1e-3)
    assert sizes["q3"] < sizes["q4"] < sizes["int8"] < sizes["float16"] < sizes["float32"]
    with pytest.raises(ConfigError):
        await put_pq(kvs, MODEL, tokens, index, centroid_format="int4")


@pytest.mark.parametrize("change", ["format", "extra buffer", "missing buffer"])
async def test_centroids_object_must_match_its_format(kvs, context, change):
    tokens, _, index = context
    written = await put_pq(kvs, MODEL, tokens, index)  # q4
    obj = container.decode(await kvs.store.get(written.centroids.key))
    meta = dict(obj.header.meta)
    buffers = {name: torch.frombuffer(bytearray(obj.raw(name)), dtype=torch.uint8) for name in obj.header.buffers}
    if change == "format":
        meta["centroid_format"] = "q3"
    elif change == "extra buffer":
        buffers["centroid_scales"] = torch.zeros(4, dtype=torch.uint8)
    else:
        del buffers["centroid_steps"]
    await kvs.store.put(written.centroids.key, container.encode(buffers, kind=KIND_CENTROIDS, meta=meta))
    with pytest.raises(FormatError):
        await get_pq(kvs, MODEL, tokens, CONFIG)


# -- through KVStore.put(pq=...) / get_pq: listed in the manifest ------------------------------------


async def test_put_with_pq_lists_objects_in_manifest(kvs, context):
    tokens, kv, index = context
    manifest = await kvs.put(MODEL, tokens, kv, pq=CONFIG)
    assert manifest.pq is not None and manifest.pq.config == CONFIG.to_dict()
    assert len(manifest.pq.codes) == len(manifest.chunks) == 3
    reread = await kvs.manifest(MODEL, tokens)
    assert reread is not None and reread.pq == manifest.pq  # survives the manifest's bytes
    read: list[str] = []
    original_get = kvs.store.get

    async def recording_get(key, *args, **kwargs):
        read.append(key)
        return await original_get(key, *args, **kwargs)

    kvs.store.get = recording_get
    loaded = await kvs.get_pq(MODEL, tokens)
    assert not any("/chunks/" in key for key in read)  # no KV fetched
    assert sorted(k for k in read if "/pq/" in k) == sorted(o.key for o in manifest.pq.objects)
    trained = pq.build_index([k for k, _ in kv], CONFIG)  # deterministic by seed
    assert torch.equal(loaded.codes, trained.codes)
    assert ((loaded.centroids - trained.centroids).abs() <= _grid_error(trained.centroids, 4)).all()


async def test_put_with_ready_index_and_float_centroids(kvs, context):
    tokens, kv, index = context
    await kvs.put(MODEL, tokens, kv, pq=index, pq_centroid_format="float32")
    loaded = await kvs.get_pq(MODEL, tokens)
    assert torch.equal(loaded.codes, index.codes) and torch.equal(loaded.centroids, index.centroids)


async def test_get_pq_without_pq_or_context(kvs, context):
    tokens, kv, _ = context
    with pytest.raises(ContextNotFoundError):
        await kvs.get_pq(MODEL, tokens)
    await kvs.put(MODEL, tokens, kv)
    assert await kvs.get_pq(MODEL, tokens) is None
    with pytest.raises(ConfigError):
        await kvs.put(MODEL, tokens, kv, pq="m2b6")


async def test_get_pq_rejects_objects_the_manifest_did_not_record(kvs, context):
    tokens, kv, index = context
    await kvs.put(MODEL, tokens, kv, pq=CONFIG)
    other = pq.build_index([k for k, _ in make_kv(seed=5)], CONFIG)
    await put_pq(kvs, MODEL, tokens, other)  # a self-consistent set, but not the listed one
    with pytest.raises(IncompleteContextError):
        await kvs.get_pq(MODEL, tokens)
    await kvs.store.delete(centroids_key(kvs, MODEL, tokens, CONFIG))
    with pytest.raises(IncompleteContextError):
        await kvs.get_pq(MODEL, tokens)


async def test_delete_removes_pq_objects(kvs, context):
    tokens, kv, _ = context
    manifest = await kvs.put(MODEL, tokens, kv, pq=CONFIG)
    assert await kvs.delete(MODEL, tokens)
    assert not any([await kvs.store.exists(o.key) for o in manifest.pq.objects])


def test_sync_store_passes_pq_through(context):
    from kvstore import SyncKVStore

    tokens, kv, index = context
    with SyncKVStore("memory://", chunk_tokens=128) as store:
        store.put(MODEL, tokens, kv, pq=index)
        assert torch.equal(store.get_pq(MODEL, tokens).codes, index.codes)


async def test_grid_centroids_beyond_fp16_are_refused(kvs, context):
    tokens, _, index = context
    huge = pq.PQIndex(index.config, index.centroids * 1e7, index.codes)
    for fmt in ("q4", "int8"):
        with pytest.raises(ConfigError, match="fp16"):
            await put_pq(kvs, MODEL, tokens, huge, centroid_format=fmt)
    await put_pq(kvs, MODEL, tokens, huge, centroid_format="float32")
    assert torch.equal((await get_pq(kvs, MODEL, tokens, CONFIG)).centroids, huge.centroids)
