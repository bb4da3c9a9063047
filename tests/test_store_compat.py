"""A store written by the previous release (2026-11-22, commit ad3ce0b: manifest version 1,
chunk objects without layer groups or chain fields) still loads, verifies and takes new puts.

``tests/data/store-2026-11-22`` was written by that commit's ``KVStore`` on a ``file://`` root:
model ``legacy/model``, tokens 0..39, 16-token chunks, levels raw and int8, the KV below."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kvstore import KVStore
from kvstore.admin import verify_store

FIXTURE = Path(__file__).parent / "data" / "store-2026-11-22"
MODEL, IDS = "legacy/model", list(range(40))


def written_kv(tokens: int = 40, seed: int = 0):
    """The KV that release stored (same generator, same draws)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, tokens, 8, generator=g).half(), torch.randn(2, tokens, 8, generator=g).half())
            for _ in range(3)]


@pytest.fixture
async def old_store(tmp_path):
    root = tmp_path / "store"
    shutil.copytree(FIXTURE, root)
    async with KVStore(root.as_uri(), chunk_tokens=16, levels=["raw", "int8"]) as store:
        yield store


async def test_a_previous_release_store_loads(old_store):
    manifest = await old_store.manifest(MODEL, IDS)
    assert manifest is not None and manifest.layout.is_uniform and manifest.shape == (3, 2, 8)
    want = written_kv()
    got = await old_store.get(MODEL, IDS)  # through its version-1 manifest
    assert all(torch.equal(k, wk) and torch.equal(v, wv) for (k, v), (wk, wv) in zip(got, want))
    lossy = await old_store.get(MODEL, IDS, level=1)
    assert all((k.float() - wk.float()).abs().max() < 0.05 for (k, _), (wk, _) in zip(lossy, want))
    prefix = await old_store.get(MODEL, IDS[:32])  # no manifest: chunk objects without chain fields
    assert all(torch.equal(k, wk[:, :32]) for (k, _), (wk, _) in zip(prefix, want))
    assert await old_store.lookup(MODEL, IDS) == 40 and await old_store.lookup(MODEL, IDS[:32] + [7]) == 32
    report = await verify_store(old_store.store)
    assert report.ok and report.manifests_checked == 1, report.to_text()


async def test_a_previous_release_store_takes_new_puts(old_store):
    kv = written_kv()
    await old_store.put(MODEL, IDS, kv)  # the same KV again, written by this release
    got = await old_store.get(MODEL, IDS)
    assert all(torch.equal(k, wk) for (k, _), (wk, _) in zip(got, kv))
    prefix = await old_store.get(MODEL, IDS[:16])
    assert all(torch.equal(k, wk[:, :16]) for (k, _), (wk, _) in zip(prefix, kv))
    assert (await verify_store(old_store.store)).ok
