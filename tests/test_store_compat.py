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


def test_a_kvcodec_profile_and_chunk_written_before_value_widths_still_load():
    """``tests/data/kvcodec-profile-2026-12-07.bin`` and ``kvcodec-chunk-2026-12-07.bin`` were
    written by commit bc94c86, before a profile could have a value width of its own: a
    ``build_profile`` of two synthetic contexts (``kvcodec_samples``, shape (2, 2, 16)) and the
    level-2 chunk of ``synthetic_kv(20, 7)``. They load, the profile keeps its bytes (its id),
    and the chunk decodes as a chunk encoded now does."""
    from kvcodec_samples import synthetic_kv

    from kvstore.codecs.kvcodec import KVCodec
    from kvstore.codecs.kvcodec_profile import KVCodecProfile
    from kvstore.format import container

    data = (FIXTURE.parent / "kvcodec-profile-2026-12-07.bin").read_bytes()
    profile = KVCodecProfile.from_bytes(data)
    assert profile.value_dim is None and profile.value_width == profile.head_dim == 16
    assert profile.to_bytes() == data and profile.profile_id == "797e04dfcd8fd8100f69052ac35dd1f5"
    codec = KVCodec(profile, 2)
    old = container.decode((FIXTURE.parent / "kvcodec-chunk-2026-12-07.bin").read_bytes())
    keys, values = synthetic_kv(20, 7, shape=(2, 2, 16))
    new = container.decode(container.encode(codec.encode(keys, values), kind="kvcodec-chunk-fixture"))
    for a, b in zip(codec.decode(old, (2, 2, 20, 16), torch.float16, torch.device("cpu")),
                    codec.decode(new, (2, 2, 20, 16), torch.float16, torch.device("cpu"))):
        assert torch.equal(a, b)
