"""Signed stores: a reader with the key gets only what a writer with the key stored.

The attacker here has write access to the backend (any key, any bytes) but not the
signing key: it forges objects with an unsigned KVStore, alters stored bytes, replays
signed objects of another context under this one's keys, and plants objects where a
signed writer will put. On memory, local files, Redis and S3 (moto).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from kvstore import KVStore
from kvstore.admin import verify_store
from kvstore.backends.local import LocalStore
from kvstore.backends.memory import MemoryStore
from kvstore.backends.signed import SignedStore
from kvstore.cli import main as cli_main
from kvstore.errors import ConfigError, FormatError, KVStoreError, SignatureError
from kvstore.format.signed import ENVELOPE_BYTES, SigningKeys

CHUNK = 8
KEY = b"fleet key, 32 bytes of secret!!!"
OLD_KEY = b"last year's key, also secret...."
MODEL = "m"


def _kv(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, tokens, 4, generator=g).half(), torch.randn(2, tokens, 4, generator=g).half())
            for _ in range(2)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(p, q) for (x, p), (y, q) in zip(a, b))


@pytest.fixture(params=["memory", "local", "redis", "s3"])
async def backend(request, tmp_path):
    """A fresh raw backend (what the attacker writes to) and the namespace to use."""
    kind = request.param
    if kind == "memory":
        store = MemoryStore()
    elif kind == "local":
        from kvstore.backends.local import LocalStore
        store = LocalStore(str(tmp_path))
    elif kind == "redis":
        from kvstore.backends import open_store
        store = open_store(request.getfixturevalue("redis_url"))
    else:
        from kvstore.backends import open_store
        s3 = request.getfixturevalue("moto_s3")
        store = open_store(f"{s3.url}/signed-{uuid.uuid4().hex[:8]}", **s3.storage_options())
    yield store, f"s-{uuid.uuid4().hex[:8]}"
    await store.close()


def _signed(store, namespace, key=KEY, accepted=()) -> KVStore:
    return KVStore(store, namespace=namespace, chunk_tokens=CHUNK, levels=("raw", "int8"), signing_key=key,
                   accepted_keys=accepted)


def _unsigned(store, namespace) -> KVStore:
    return KVStore(store, namespace=namespace, chunk_tokens=CHUNK, levels=("raw", "int8"))


async def _keys(store, namespace, part: str) -> list[str]:
    return sorted([k async for k in store.list(f"{namespace}/") if part in k])


async def _forge(store, namespace: str, ids, part: str) -> None:
    """The attacker: encodes other KV for ``ids`` without the key and writes each of its
    objects whose key contains ``part`` over the store's."""
    forger_store = MemoryStore()
    await _unsigned(forger_store, namespace).put(MODEL, ids, _kv(len(ids), 99))
    for key in await _keys(forger_store, namespace, part):
        await store.put(key, await forger_store.get(key))


async def test_signed_round_trip_and_prefix(backend):
    store, ns = backend
    kvs = _signed(store, ns)
    ids, kv = list(range(24)), _kv(24, 0)
    await kvs.put(MODEL, ids, kv)
    assert _same(await kvs.get(MODEL, ids), kv)
    assert _same(await kvs.get(MODEL, ids[:16]), [(k[:, :16], v[:, :16]) for k, v in kv])  # no manifest of its own
    assert await kvs.lookup(MODEL, ids) == 24
    # every value on the backend carries the envelope; an unsigned reader is told why it cannot read them
    raw = await store.get((await _keys(store, ns, "/contexts/"))[0])
    assert raw[:8] == b"KVSIGN\x00\x01"
    with pytest.raises(FormatError, match="signed object"):
        await _unsigned(store, ns).get(MODEL, ids)


async def test_a_forged_chunk_is_refused_with_and_without_a_manifest(backend):
    store, ns = backend
    kvs = _signed(store, ns)
    ids, kv = list(range(24)), _kv(24, 1)
    await kvs.put(MODEL, ids, kv)
    await _forge(store, ns, ids, "/chunks/")  # over every chunk object
    with pytest.raises(SignatureError, match="not a signed object"):
        await kvs.get(MODEL, ids)
    with pytest.raises(SignatureError):
        await kvs.get(MODEL, ids[:16])


async def test_an_altered_byte_is_refused(backend):
    store, ns = backend
    kvs = _signed(store, ns)
    ids, kv = list(range(16)), _kv(16, 2)
    await kvs.put(MODEL, ids, kv)
    for key in await _keys(store, ns, "/chunks/"):
        data = bytearray(await store.get(key))
        data[-1] ^= 1  # a KV byte, at every level
        await store.put(key, bytes(data))
    with pytest.raises(SignatureError, match="MAC mismatch"):
        await kvs.get(MODEL, ids)


async def test_a_forged_manifest_is_refused(backend):
    store, ns = backend
    kvs = _signed(store, ns)
    ids, kv = list(range(16)), _kv(16, 3)
    await kvs.put(MODEL, ids, kv)
    await _forge(store, ns, ids, "/contexts/")  # over the manifest
    with pytest.raises(SignatureError):
        await kvs.get(MODEL, ids)


async def test_a_replayed_object_of_another_context_is_refused(backend):
    """Signed objects are bound to the key they were written at: another context's chunk and
    manifest, copied over this context's keys, are refused although their MACs are genuine."""
    store, ns = backend
    kvs = _signed(store, ns)
    ids_a, ids_b = list(range(16)), list(range(100, 116))
    await kvs.put(MODEL, ids_a, _kv(16, 4))
    await kvs.put(MODEL, ids_b, _kv(16, 5))
    manifests = await _keys(store, ns, "/contexts/")
    # B's chunk objects copied over A's, level by level (same tag, other chunk hash)
    plan_a, plan_b = kvs._plan(MODEL, ids_a), kvs._plan(MODEL, ids_b)
    for ha, hb in zip(plan_a.hashes, plan_b.hashes):
        for codec in kvs.codecs:
            key_a = kvs.keys.chunk_key(plan_a.fingerprint, ha, codec.tag)
            await store.put(key_a, await store.get(kvs.keys.chunk_key(plan_b.fingerprint, hb, codec.tag)))
    with pytest.raises(SignatureError, match="MAC mismatch"):
        await kvs.get(MODEL, ids_a)
    manifest_a, manifest_b = (await _manifest_of(kvs, ids_a)), (await _manifest_of(kvs, ids_b))
    assert {manifest_a, manifest_b} == set(manifests)
    await store.put(manifest_a, await store.get(manifest_b))
    with pytest.raises(SignatureError, match="MAC mismatch"):
        await kvs.get(MODEL, ids_a)


async def _manifest_of(kvs: KVStore, ids) -> str:
    plan = kvs._plan(MODEL, ids)
    return kvs.keys.manifest_key(plan.fingerprint, plan.hashes[-1])


async def test_objects_planted_before_a_signed_put_are_not_shared(backend):
    """An attacker who writes a context's chunks first (create-only keys: first writer wins)
    cannot make a signed writer share them: it writes its own versions beside them."""
    store, ns = backend
    ids, kv = list(range(24)), _kv(24, 6)
    await _unsigned(store, ns).put(MODEL, ids, _kv(24, 97))  # the attacker's, at the base keys
    kvs = _signed(store, ns)
    await kvs.put(MODEL, ids, kv)
    assert _same(await kvs.get(MODEL, ids), kv)
    lossy = await kvs.get(MODEL, ids, level=1)  # int8: close to the signed writer's KV, not the attacker's
    assert all(torch.allclose(k.float(), wk.float(), atol=0.05) for (k, _), (wk, _) in zip(lossy, kv))
    # the manifest-less path reads base keys first: the planted objects there fail their MAC
    with pytest.raises(SignatureError):
        await kvs.get(MODEL, ids[:16])


async def test_key_rotation(backend):
    store, ns = backend
    ids_old, ids_new = list(range(16)), list(range(200, 216))
    kv_old, kv_new = _kv(16, 7), _kv(16, 8)
    await _signed(store, ns, key=OLD_KEY).put(MODEL, ids_old, kv_old)
    rotated = _signed(store, ns, key=KEY, accepted=[OLD_KEY])
    assert _same(await rotated.get(MODEL, ids_old), kv_old)  # old objects still read during the rotation
    await rotated.put(MODEL, ids_new, kv_new)
    new_only = _signed(store, ns, key=KEY)
    assert _same(await new_only.get(MODEL, ids_new), kv_new)
    with pytest.raises(SignatureError, match="does not accept"):  # the old key, no longer listed
        await new_only.get(MODEL, ids_old)
    with pytest.raises(SignatureError, match="does not accept"):  # a reader that never had the new key
        await _signed(store, ns, key=OLD_KEY).get(MODEL, ids_new)


def test_keys_are_checked():
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        SigningKeys.of(b"short")
    with pytest.raises(ConfigError, match="sequence of keys"):
        SigningKeys.of(KEY, KEY)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a signing_key"):
        KVStore("memory://", accepted_keys=[KEY])
    keys = SigningKeys.of(KEY.decode())
    payload = b"x" * 100
    signed = keys.envelope("ns/a", payload) + payload
    assert bytes(keys.open("ns/a", signed)) == payload
    for bad in (signed[:ENVELOPE_BYTES - 1], b"", payload):
        with pytest.raises(SignatureError):
            keys.open("ns/a", bad)
    with pytest.raises(SignatureError, match="MAC mismatch"):
        keys.open("ns/b", signed)


async def test_range_reads_check_the_whole_value():
    inner = MemoryStore()
    store = SignedStore(inner, SigningKeys.of(KEY))
    await store.put("ns/a", b"0123456789")
    assert await store.get("ns/a", _range(2, 5)) == b"234"
    data = bytearray(await inner.get("ns/a"))
    data[-1] ^= 1  # a byte outside the range asked for
    await inner.put("ns/a", bytes(data))
    with pytest.raises(SignatureError):
        await store.get("ns/a", _range(2, 5))


async def test_housekeeping_is_the_backends_own(tmp_path):
    """gc asks a signed store what it asks its backend: ages from file times, expired objects."""
    inner = LocalStore(tmp_path)
    store = SignedStore(inner, SigningKeys.of(KEY))
    await store.put("ns/a", b"x")
    await store.put("ns/b", b"y", ttl=0.05)
    await asyncio.sleep(0.1)
    assert store.age_note == inner.age_note == "" and store.expiry_note == ""
    assert [(e.key, e.age is not None) for e in await store.entries("ns/")] == [("ns/a", True)]
    assert await store.expired_keys() == ["ns/b"]
    assert await store.remove_expired(["ns/b"]) == 1 and await inner.expired_keys() == []


def _range(start, end):
    from kvstore.backends.base import RangeRequest
    return RangeRequest(start, end)


def test_verify_with_the_key(tmp_path, capsys):
    store_dir = tmp_path / "store"

    async def write_and_verify() -> None:
        async with KVStore(store_dir.as_uri(), chunk_tokens=CHUNK, signing_key=KEY) as kvs:
            await kvs.put(MODEL, list(range(24)), _kv(24, 9))
            report = await verify_store(kvs.store, "kvstore/")
            assert report.ok, report.to_text()

    asyncio.run(write_and_verify())
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    assert cli_main(["verify", store_dir.as_uri(), "--key-file", str(key_file)]) == 0
    assert "all OK" in capsys.readouterr().out
    assert cli_main(["verify", store_dir.as_uri()]) != 0  # without the key nothing reads
    assert "open the store with its signing key" in capsys.readouterr().out
    other = tmp_path / "other"
    other.write_bytes(OLD_KEY)
    assert cli_main(["verify", store_dir.as_uri(), "--key-file", str(other)]) != 0
    assert "does not accept" in capsys.readouterr().out


def test_signature_errors_are_kvstore_errors():
    assert issubclass(SignatureError, KVStoreError)
