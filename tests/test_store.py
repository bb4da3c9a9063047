"""The KVStore facade: round trips, prefix reuse, and never returning wrong or partial KV."""

import asyncio

import numpy as np
import pytest
import torch

from kvstore import KVStore, SyncKVStore
from kvstore.backends.memory import MemoryStore
from kvstore.errors import (
    ChecksumError,
    ConfigError,
    ContextNotFoundError,
    FormatError,
    IncompleteContextError,
)
from kvstore.format import container

MODEL = "test/model@v1"
LAYERS, HEADS, DIM = 3, 2, 8


def make_kv(tokens: int, dtype=torch.float16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(HEADS, tokens, DIM, generator=g).to(dtype), torch.randn(HEADS, tokens, DIM, generator=g).to(dtype))
        for _ in range(LAYERS)
    ]


def assert_kv_equal(a, b):
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a, b):
        assert ka.dtype == kb.dtype and ka.shape == kb.shape
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.fixture(params=["memory", "local"])
async def kvs(request, tmp_path):
    url = "memory://" if request.param == "memory" else tmp_path.as_uri()
    async with KVStore(url, chunk_tokens=16) as store:
        yield store


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 16, 50])
async def test_round_trip(kvs, dtype, tokens):
    ids = list(range(100, 100 + tokens))
    kv = make_kv(tokens, dtype)
    manifest = await kvs.put(MODEL, ids, kv)
    assert manifest.num_tokens == tokens and len(manifest.chunks) == -(-tokens // 16)
    assert await kvs.lookup(MODEL, ids) == tokens
    assert_kv_equal(await kvs.get(MODEL, ids), kv)


async def test_prefix_reuse_is_chunk_granular(kvs):
    ids = list(range(50))
    kv = make_kv(50)
    await kvs.put(MODEL, ids, kv)
    longer = ids + [7, 7, 7]
    assert await kvs.lookup(MODEL, longer) == 48
    assert await kvs.lookup(MODEL, ids[:40]) == 32
    assert await kvs.lookup(MODEL, [1] + ids[1:]) == 0
    prefix = await kvs.get(MODEL, ids[:32])
    assert_kv_equal(prefix, [(k[:, :32], v[:, :32]) for k, v in kv])
    with pytest.raises(ContextNotFoundError, match="lookup"):
        await kvs.get(MODEL, longer)


async def test_shared_prefix_chunks_are_stored_once(kvs):
    ids = list(range(64))
    kv = make_kv(64)
    await kvs.put(MODEL, ids, kv)
    before = {k async for k in kvs.store.list()}
    other = ids[:32] + list(range(1000, 1032))
    tail = make_kv(64, seed=1)
    other_kv = [(torch.cat([k[:, :32], k2[:, 32:]], 1), torch.cat([v[:, :32], v2[:, 32:]], 1))
                for (k, v), (k2, v2) in zip(kv, tail)]
    await kvs.put(MODEL, other, other_kv)
    added = {k async for k in kvs.store.list()} - before
    assert len(added) == 3  # two new chunks + one manifest; the first two chunks are shared
    assert_kv_equal(await kvs.get(MODEL, ids), kv)
    assert_kv_equal(await kvs.get(MODEL, other), other_kv)


async def test_other_values_for_the_same_tokens_are_stored_beside_never_over(kvs):
    """Two writers of one context with different KV (other numerics, other dtype): each
    manifest lists its own objects, and the first writer's objects are never replaced."""
    ids = list(range(48))
    first, second = make_kv(48), make_kv(48, seed=7)
    await kvs.put(MODEL, ids, first)
    base = {k: await kvs.store.get(k) async for k in kvs.store.list() if "/chunks/" in k}
    manifest = await kvs.put(MODEL, ids, second)
    assert all(o.key.split("/")[-1].count("=") == 1 for c in manifest.chunks for o in c.objects)  # versions
    assert {k: await kvs.store.get(k) for k in base} == base  # untouched
    assert_kv_equal(await kvs.get(MODEL, ids), second)  # the manifest (the last put) lists its own
    assert_kv_equal(await kvs.get(MODEL, ids[:32]), [(k[:, :32], v[:, :32]) for k, v in first])  # base chain
    await kvs.put(MODEL, ids, [(k.float(), v.float()) for k, v in first])  # another dtype: a third version
    got = await kvs.get(MODEL, ids)
    assert got[0][0].dtype == torch.float32 and torch.equal(got[0][0], first[0][0].float())


async def test_models_do_not_share_kv(kvs):
    ids = list(range(40))
    await kvs.put(MODEL, ids, make_kv(40))
    assert await kvs.lookup("another/model", ids) == 0
    with pytest.raises(ContextNotFoundError):
        await kvs.get("another/model", ids)


async def test_delete(kvs):
    ids = list(range(40))
    await kvs.put(MODEL, ids, make_kv(40))
    assert await kvs.delete(MODEL, ids) is True
    assert await kvs.lookup(MODEL, ids) == 0
    assert [k async for k in kvs.store.list()] == []
    assert await kvs.delete(MODEL, ids) is False


async def test_bad_input_is_refused(kvs):
    ids = list(range(10))
    with pytest.raises(ConfigError, match="10 token ids"):
        await kvs.put(MODEL, ids, make_kv(11))
    with pytest.raises(ConfigError):
        await kvs.put(MODEL, [], make_kv(0))
    with pytest.raises(ConfigError):
        await kvs.put(MODEL, [-1] * 10, make_kv(10))
    with pytest.raises(ConfigError, match="layout"):  # layers of different shapes need the model's layout
        await kvs.put(MODEL, ids, [(torch.zeros(2, 10, 8),) * 2, (torch.zeros(1, 10, 8),) * 2])
    with pytest.raises(ConfigError):
        await kvs.put(MODEL, ids, [(torch.zeros(2, 10, 8, dtype=torch.int32),) * 2])
    with pytest.raises(ConfigError):
        await kvs.put("", ids, make_kv(10))
    await kvs.put(MODEL, ids, make_kv(10))
    with pytest.raises(ConfigError):
        await kvs.get(MODEL, ids, level=1)


def test_constructor_validation():
    with pytest.raises(ConfigError):
        KVStore("memory://", chunk_tokens=0)
    with pytest.raises(ConfigError):
        KVStore("memory://", levels=[])
    with pytest.raises(ConfigError):
        KVStore("memory://", levels=["raw", "raw"])
    with pytest.raises(ConfigError):
        KVStore("nosuch://x")


async def _stored_objects(store):
    return {k: await store.get(k) async for k in store.list()}


async def test_every_corrupted_byte_of_every_object_is_caught():
    backend = MemoryStore()
    kvs = KVStore(backend, chunk_tokens=4)
    ids = list(range(7))
    kv = [(torch.randn(1, 7, 2, dtype=torch.float16), torch.randn(1, 7, 2, dtype=torch.float16))]
    await kvs.put(MODEL, ids, kv)
    pristine = await _stored_objects(backend)
    assert len(pristine) == 3
    checked = 0
    for key, value in pristine.items():
        for position in range(len(value)):
            corrupt = bytearray(value)
            corrupt[position] ^= 0x01
            await backend.put(key, bytes(corrupt))
            with pytest.raises(FormatError) as info:  # ChecksumError and IncompleteContextError included
                await kvs.get(MODEL, ids)
            if not 8 <= position < 12:
                assert isinstance(info.value, ChecksumError | IncompleteContextError), (key, position, info.value)
            checked += 1
        await backend.put(key, value)
    assert checked == sum(map(len, pristine.values()))
    assert_kv_equal(await kvs.get(MODEL, ids), kv)


async def test_truncated_chunk_and_missing_chunk_give_clear_errors():
    backend = MemoryStore()
    kvs = KVStore(backend, chunk_tokens=4)
    ids = list(range(10))
    await kvs.put(MODEL, ids, make_kv(10))
    chunk_keys = sorted([k async for k in backend.list() if "/chunks/" in k])
    value = await backend.get(chunk_keys[1])
    await backend.put(chunk_keys[1], value[: len(value) // 2])
    with pytest.raises(FormatError, match="declares|truncated"):
        await kvs.get(MODEL, ids)
    await backend.delete(chunk_keys[1])
    with pytest.raises(IncompleteContextError, match="missing"):
        await kvs.get(MODEL, ids)


async def test_chunk_replaced_by_another_valid_object_is_caught():
    backend = MemoryStore()
    kvs = KVStore(backend, chunk_tokens=4)
    ids = list(range(8))
    await kvs.put(MODEL, ids, make_kv(8))
    chunk_keys = sorted([k async for k in backend.list() if "/chunks/" in k])
    a, b = await backend.get(chunk_keys[0]), await backend.get(chunk_keys[1])
    await backend.put(chunk_keys[0], b)  # a valid, checksummed object of other tokens
    with pytest.raises(IncompleteContextError, match="not the object"):
        await kvs.get(MODEL, ids)
    await backend.delete([k async for k in backend.list() if "/contexts/" in k][0])
    with pytest.raises(FormatError, match="expected|different"):  # no manifest: the chunk's own identity
        await kvs.get(MODEL, ids)
    await backend.put(chunk_keys[0], a)
    assert_kv_equal(await kvs.get(MODEL, ids), make_kv(8))


async def test_concurrent_writers_of_one_context_leave_one_complete_copy():
    backend = MemoryStore()
    ids = list(range(100))
    kv = make_kv(100)
    writers = [KVStore(backend, chunk_tokens=16) for _ in range(6)]
    await asyncio.gather(*(w.put(MODEL, ids, kv) for w in writers))
    assert len([k async for k in backend.list()]) == 8  # 7 chunks + 1 manifest
    assert_kv_equal(await writers[0].get(MODEL, ids), kv)


async def test_ttl_expires_context():
    async with KVStore("memory://", chunk_tokens=8, ttl=0.3) as kvs:
        ids = list(range(20))
        await kvs.put(MODEL, ids, make_kv(20))
        assert await kvs.lookup(MODEL, ids) == 20
        await asyncio.sleep(0.5)
        assert await kvs.lookup(MODEL, ids) == 0


def test_sync_wrapper(tmp_path):
    ids = list(range(30))
    kv = make_kv(30)
    with SyncKVStore(tmp_path.as_uri(), chunk_tokens=8) as kvs:
        kvs.put(MODEL, ids, kv)
        assert kvs.lookup(MODEL, ids) == 30
        assert_kv_equal(kvs.get(MODEL, ids), kv)
        assert kvs.manifest(MODEL, ids).num_tokens == 30
        with pytest.raises(ContextNotFoundError):
            kvs.get(MODEL, ids[:20])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_get_to_cuda(kvs):
    ids = list(range(20))
    kv = make_kv(20)
    await kvs.put(MODEL, ids, kv)
    out = await kvs.get(MODEL, ids, device="cuda")
    assert out[0][0].is_cuda
    assert_kv_equal([(k.cpu(), v.cpu()) for k, v in out], kv)


def test_manifest_header_lists_levels_and_checksums():
    async def go():
        kvs = KVStore("memory://", chunk_tokens=4)
        m = await kvs.put(MODEL, list(range(9)), make_kv(9))
        data = await kvs.store.get(kvs.keys.manifest_key(m.fingerprint, m.chunks[-1].hash))
        header = container.decode(data).header
        assert header.kind == "kv-manifest"
        assert header.meta["levels"][0]["codec"] == "raw"
        assert all(len(c["objects"]) == 1 for c in header.meta["chunks"])
    asyncio.run(go())


async def test_storing_the_same_tokens_in_another_dtype_replaces_the_chunks():
    async with KVStore("memory://", chunk_tokens=8) as kvs:
        ids = list(range(20))
        await kvs.put(MODEL, ids, make_kv(20, torch.float32))
        kv16 = make_kv(20, torch.float16, seed=3)
        await kvs.put(MODEL, ids, kv16)
        assert_kv_equal(await kvs.get(MODEL, ids), kv16)


class _DeletesAfterManifests(MemoryStore):
    """Removes one chunk object right after each of the first ``times`` manifest writes,
    as a concurrent ``delete`` or ``gc`` could."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    async def put(self, key, data, *, ttl=None, create_only=False):
        written = await super().put(key, data, ttl=ttl, create_only=create_only)
        if "/contexts/" in key and self.times > 0:
            self.times -= 1
            victim = next(k for k in sorted(self._values) if "/chunks/" in k)
            await self.delete(victim)
        return written


async def test_put_redoes_when_a_listed_object_vanishes():
    kv = make_kv(40)
    async with KVStore(_DeletesAfterManifests(times=2), chunk_tokens=16) as store:
        await store.put(MODEL, list(range(40)), kv)  # third attempt sticks
        assert_kv_equal(await store.get(MODEL, list(range(40))), kv)


async def test_put_gives_up_with_a_clear_error():
    from kvstore.errors import ConcurrentWriteError
    from kvstore.store import PUT_ATTEMPTS

    async with KVStore(_DeletesAfterManifests(times=PUT_ATTEMPTS), chunk_tokens=16) as store:
        with pytest.raises(ConcurrentWriteError):
            await store.put(MODEL, list(range(40)), make_kv(40))
        with pytest.raises(IncompleteContextError):  # never partial KV
            await store.get(MODEL, list(range(40)))


async def test_manifest_cannot_point_at_objects_elsewhere():
    """A manifest (even one re-sealed with valid checksums) listing another namespace's object is refused."""
    import dataclasses

    from kvstore.format.manifest import ChunkObject

    async with KVStore("memory://", chunk_tokens=16) as store:
        tokens = list(range(40))
        manifest = await store.put(MODEL, tokens, make_kv(40))
        first = manifest.chunks[0]
        moved = ChunkObject("other-tenant/" + first.objects[0].key, *dataclasses.astuple(first.objects[0])[1:])
        forged = dataclasses.replace(manifest, chunks=(dataclasses.replace(first, objects=(moved,)), *manifest.chunks[1:]))
        key = store.keys.manifest_key(manifest.fingerprint, manifest.chunks[-1].hash)
        await store.store.put(key, forged.to_bytes(np.asarray(tokens, dtype="<i4")))
        with pytest.raises(FormatError, match="outside its place"):
            await store.get(MODEL, tokens)


async def test_a_read_without_manifest_follows_one_writers_chain_through_versions(kvs):
    """Two writers of other KV raced: chunk 0's base object is A's, chunk 1's is B's. A prefix
    read without a manifest follows A's chain through the version stored beside B's object."""
    ids = list(range(48))
    a, b = make_kv(48), make_kv(48, seed=5)
    first = await kvs.put(MODEL, ids, a)
    second = await kvs.put(MODEL, ids, b)  # B's objects: versions beside A's
    base_1, b_1 = first.chunks[1].objects[0].key, second.chunks[1].objects[0].key
    a_bytes, b_bytes = await kvs.store.get(base_1), await kvs.store.get(b_1)
    a_version = kvs.keys.chunk_version(base_1, first.chunks[1].objects[0].checksum)
    await kvs.store.put(a_version, a_bytes)  # A's chunk 1 beside, B's at the base: as if B won that race
    await kvs.store.put(base_1, b_bytes)
    await kvs.store.delete(b_1)
    assert_kv_equal(await kvs.get(MODEL, ids[:32]), [(k[:, :32], v[:, :32]) for k, v in a])
    await kvs.store.delete(a_version)  # A's chain now ends at chunk 0: refused, never mixed
    with pytest.raises(IncompleteContextError, match="writers of other KV"):
        await kvs.get(MODEL, ids[:32])


async def test_delete_keeps_what_other_contexts_share(kvs):
    ids = list(range(64))
    kv = make_kv(64)
    await kvs.put(MODEL, ids, kv)
    await kvs.put(MODEL, ids[:32], [(k[:, :32], v[:, :32]) for k, v in kv])  # shares chunks 0-1
    assert await kvs.delete(MODEL, ids) is True
    assert_kv_equal(await kvs.get(MODEL, ids[:32]), [(k[:, :32], v[:, :32]) for k, v in kv])
    assert await kvs.lookup(MODEL, ids) == 32
    assert await kvs.delete(MODEL, ids[:32]) is True
    assert [k async for k in kvs.store.list()] == []


async def test_a_chunk_re_encoded_from_other_values_is_refused_without_a_manifest(kvs):
    """Chunk 1 replaced at its key by a valid object of the same tokens but other KV (written
    as an old writer would, without the chain fields), or of another level: refused."""
    from kvstore.codecs import get_codec
    from kvstore.format.chunk import ChunkIdentity, encode_chunk

    ids = list(range(48))
    kv = make_kv(48)
    manifest = await kvs.put(MODEL, ids, kv)
    entry = manifest.chunks[1]
    other = make_kv(48, seed=3)
    keys = torch.stack([k[:, 16:32] for k, _ in other])
    values = torch.stack([v[:, 16:32] for _, v in other])
    ident = ChunkIdentity(manifest.fingerprint, entry.hash, 16, np.asarray(ids[16:32], dtype="<i4"),
                          LAYERS, HEADS, DIM, torch.float16)
    await kvs.store.put(entry.objects[0].key, encode_chunk(get_codec("raw"), ident, keys, values))
    with pytest.raises(IncompleteContextError):
        await kvs.get(MODEL, ids[:32])
    await kvs.store.put(entry.objects[0].key, encode_chunk(get_codec("int8"), ident, keys, values))
    with pytest.raises(FormatError, match="level asked for"):
        await kvs.get(MODEL, ids[:32])


class CountingStore(MemoryStore):
    """A memory store that counts the objects it hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def get(self, key, byte_range=None):
        value = await super().get(key, byte_range)
        self.gets += value is not None
        return value


@pytest.mark.parametrize("with_manifest", [True, False])
async def test_get_parses_each_object_read_once(monkeypatch, with_manifest):
    """One pass down and up: every object a get reads has its header parsed once (the manifest
    check, the chain check and the codec all use that parse)."""
    backend = CountingStore()
    store = KVStore(backend, chunk_tokens=16, levels=["raw", "int8"])
    tokens = list(range(64))
    kv = [(torch.randn(2, 64, 8), torch.randn(2, 64, 8)) for _ in range(3)]
    await store.put("m", tokens, kv)
    asked = tokens if with_manifest else tokens[:48]  # a prefix: no manifest of its own
    await store.get("m", asked, level=1)  # warm: the layout and profiles are read once per store
    parses = []
    real = container.decode_header
    monkeypatch.setattr(container, "decode_header", lambda *a, **k: parses.append(1) or real(*a, **k))
    backend.gets = 0
    got = await store.get("m", asked, level=1)
    assert len(got) == 3 and got[0][0].shape == (2, len(asked), 8)
    # the manifest read again is not parsed again: its bytes are those the warm-up get checked
    assert backend.gets == len(asked) // 16 + with_manifest and len(parses) == len(asked) // 16


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("with_manifest", [True, False])
async def test_get_into_an_earlier_output_writes_it_and_nothing_else(with_manifest, level):
    """``out=``: a second context's KV lands in the first get's tensors (no new output), equal
    to a fresh get's, for the raw and int8 codecs, with and without a manifest."""
    async with KVStore("memory://", chunk_tokens=16, levels=["raw", "int8"]) as store:
        first, second = list(range(50)), list(range(1000, 1050))
        await store.put(MODEL, first, make_kv(50, seed=1))
        await store.put(MODEL, second, make_kv(50, seed=2))
        asked = (first, second) if with_manifest else (first[:48], second[:48])
        out = await store.get(MODEL, asked[0], level=level)
        pointers = [(k.data_ptr(), v.data_ptr()) for k, v in out]
        again = await store.get(MODEL, asked[1], level=level, out=out)
        assert [(k.data_ptr(), v.data_ptr()) for k, v in again] == pointers
        assert again.num_tokens == len(asked[1])
        assert_kv_equal(again, await store.get(MODEL, asked[1], level=level))
        assert not torch.equal(again[0][0], (await store.get(MODEL, asked[0], level=level))[0][0])


async def test_get_refuses_an_output_that_does_not_fit():
    async with KVStore("memory://", chunk_tokens=16) as store:
        await store.put(MODEL, list(range(50)), make_kv(50))
        await store.put(MODEL, list(range(40)), make_kv(40, dtype=torch.float32))
        out = await store.get(MODEL, list(range(50)))
        with pytest.raises(ConfigError, match="out does not fit"):
            await store.get(MODEL, list(range(40)), out=out)  # other length and dtype
        with pytest.raises(ConfigError, match="earlier get"):
            await store.get(MODEL, list(range(50)), out=make_kv(50))  # not a get's output
        with pytest.raises(ConfigError, match="out does not fit"):
            await store.get(MODEL, list(range(48)), out=out)  # a prefix of it: fewer tokens
        assert_kv_equal(await store.get(MODEL, list(range(50)), out=out), make_kv(50))


def test_sync_get_into_an_earlier_output(tmp_path):
    with SyncKVStore(tmp_path.as_uri(), chunk_tokens=8) as kvs:
        kvs.put(MODEL, list(range(30)), make_kv(30, seed=3))
        kvs.put(MODEL, list(range(100, 130)), make_kv(30, seed=4))
        out = kvs.get(MODEL, list(range(30)))
        again = kvs.get(MODEL, list(range(100, 130)), out=out)
        assert again[1][0].data_ptr() == out[1][0].data_ptr()
        assert_kv_equal(again, make_kv(30, seed=4))


class _BatchCountingStore(MemoryStore):
    """Counts get_many batches and single ranged gets; can garble one header in a batch."""

    def __init__(self, garble: str = "") -> None:
        super().__init__()
        self.batches: list[int] = []
        self.ranged: list[str] = []
        self.garble = garble

    async def get_many(self, requests):
        self.batches.append(len(requests))
        got = [await super(_BatchCountingStore, self).get(key, byte_range) for key, byte_range in requests]
        return [b"\0" * len(v) if v is not None and self.garble and self.garble in key else v
                for (key, _), v in zip(requests, got)]

    async def get(self, key, byte_range=None):
        if byte_range is not None:
            self.ranged.append(key)
        return await super().get(key, byte_range)


async def test_put_checks_the_listed_objects_in_one_batch():
    backend = _BatchCountingStore()
    async with KVStore(backend, chunk_tokens=16, levels=["raw", "int8"]) as store:
        manifest = await store.put(MODEL, list(range(64)), make_kv(64))
        listed = sum(len(chunk.objects) for chunk in manifest.chunks)
        assert listed == 8 and backend.batches == [listed] and backend.ranged == []


async def test_put_reads_an_unreadable_header_of_the_batch_once_more():
    """A header damaged in the batch (in transit, say) is read again on its own, and the put holds."""
    backend = _BatchCountingStore(garble="/raw-")
    async with KVStore(backend, chunk_tokens=16, levels=["raw", "int8"]) as store:
        await store.put(MODEL, list(range(32)), make_kv(32))
        assert len(backend.batches) == 1 and len(backend.ranged) == 2  # the two raw objects, once each
        assert_kv_equal(await store.get(MODEL, list(range(32))), make_kv(32))


async def test_a_manifest_changed_in_place_is_parsed_and_checked_again():
    """Parsing is skipped only for manifest bytes identical to ones already checked: damage to
    a manifest read before is caught on the next get."""
    async with KVStore("memory://", chunk_tokens=16) as store:
        ids = list(range(40))
        await store.put(MODEL, ids, make_kv(40))
        assert_kv_equal(await store.get(MODEL, ids), make_kv(40))
        key = [k async for k in store.store.list() if "/contexts/" in k][0]
        data = bytearray(await store.store.get(key))
        data[-1] ^= 1
        await store.store.put(key, bytes(data))
        with pytest.raises((ChecksumError, FormatError)):
            await store.get(MODEL, ids)
