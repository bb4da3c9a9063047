"""Bad input from callers or from stored bytes raises a KVStoreError, never a bare exception."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvstore import KVStore, SyncKVStore
from kvstore.errors import ClosedStoreError, ConfigError, FormatError, KVStoreError
from kvstore.format import manifest as manifest_format
from kvstore.format.layout import CacheLayout, LayerSpec

MODEL = "m"
IDS = list(range(20))


def _kv(tokens=20, layers=2):
    return [(torch.randn(2, tokens, 8), torch.randn(2, tokens, 8)) for _ in range(layers)]


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), -1.0, 0, True, "5", 1e12])
async def test_ttls_are_validated_as_numbers(ttl):
    async with KVStore("memory://", chunk_tokens=8) as store:
        with pytest.raises(ConfigError, match="ttl"):
            await store.put(MODEL, IDS, _kv(), ttl=ttl)


@pytest.mark.parametrize("level", [True, False, 1.0, -1, 5, "0"])  # None: the default level
async def test_levels_are_validated_as_ints(level):
    async with KVStore("memory://", chunk_tokens=8, levels=["raw", "int8"]) as store:
        await store.put(MODEL, IDS, _kv())
        with pytest.raises(ConfigError, match="level"):
            await store.get(MODEL, IDS, level=level)
        with pytest.raises(ConfigError, match="level"):
            await store.lookup(MODEL, IDS, level=level)


async def test_a_closed_store_refuses_work():
    store = KVStore("memory://", chunk_tokens=8)
    await store.put(MODEL, IDS, _kv())
    await store.close()
    for call in (store.get(MODEL, IDS), store.lookup(MODEL, IDS), store.put(MODEL, IDS, _kv()),
                 store.delete(MODEL, IDS), store.manifest(MODEL, IDS)):
        with pytest.raises(ClosedStoreError):
            await call


def test_a_closed_sync_store_refuses_work_without_leaking_coroutines(recwarn):
    store = SyncKVStore("memory://", chunk_tokens=8)
    store.put(MODEL, IDS, _kv())
    store.close()
    for call in (lambda: store.get(MODEL, IDS), lambda: store.lookup(MODEL, IDS), lambda: store.put(MODEL, IDS, _kv())):
        with pytest.raises(ClosedStoreError):
            call()
    store.close()  # twice is fine
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


@pytest.mark.parametrize("dims", [(4096, 65536, 65536), (4000, 4000, 4000), (1, 1 << 20, 1), (0, 2, 8)])
async def test_a_manifest_with_enormous_dimensions_is_a_format_error(dims):
    async with KVStore("memory://", chunk_tokens=8) as store:
        manifest = await store.put(MODEL, IDS, _kv())
        key = store.keys.manifest_key(manifest.fingerprint, manifest.chunks[-1].hash)
        doc = manifest.to_bytes(np.asarray(IDS, dtype="<i4"))
        from kvstore.format import container

        obj = container.decode(doc)
        meta = dict(obj.header.meta)
        spec = {"kind": "full", "kv_heads": dims[1], "key_dim": dims[2], "value_dim": dims[2], "slots": "kv"}
        meta["layout"] = {"specs": [spec], "layers": [0] * dims[0]}
        forged = container.encode({"tokens": obj.tensor("tokens")}, kind=manifest_format.KIND, meta=meta)
        await store.store.put(key, forged)
        with pytest.raises(FormatError):
            await store.get(MODEL, IDS)


def test_layouts_refuse_implausible_sizes():
    with pytest.raises(ConfigError, match="implausible"):
        CacheLayout((LayerSpec("full", 65536, 65536, 65536),))
    with pytest.raises(ConfigError):
        CacheLayout.uniform(0, 1, 1)
    assert math.isfinite(CacheLayout.uniform(126, 8, 128).bytes_per_token())


async def test_every_error_is_a_kvstore_error():
    async with KVStore("memory://", chunk_tokens=8) as store:
        for bad in (lambda: store.put(MODEL, IDS, "kv"), lambda: store.put(MODEL, IDS, [(1, 2)]),
                    lambda: store.get(MODEL, [])):
            with pytest.raises(KVStoreError):
                await bad()
