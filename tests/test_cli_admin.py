"""``kvstore ls / inspect / verify / gc`` on local, S3 (moto) and Redis stores; the admin API on memory;
the Prometheus metrics helpers."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from kvstore import KVStore, SyncKVStore, metrics
from kvstore.admin import (
    classify,
    collect_garbage,
    inspect_context,
    list_contexts,
    verify_store,
)
from kvstore.backends import open_store
from kvstore.cli import EXIT_DAMAGED, EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, main
from kvstore.errors import ChecksumError
from kvstore.format.keys import KeyScheme

MODEL = "test/admin-model@v1"
LEVELS = ["raw", "int8"]
LONG, SHORT = list(range(100, 140)), list(range(100, 120))  # 3 chunks; 2 chunks, the first shared


def make_kv(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, tokens, 8, generator=g).half(), torch.randn(2, tokens, 8, generator=g).half())
            for _ in range(2)]


@dataclass
class Target:
    """A store to run the commands on: its URL, its storage options, and the same as CLI arguments."""

    url: str
    options: dict
    backend: str

    @property
    def args(self) -> list[str]:
        out = [self.url]
        for key, value in self.options.items():
            out += ["-o", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
        return out

    def run(self, fn):
        """``await fn(store)`` on a byte store opened from the URL, on a fresh loop."""
        async def go():
            async with open_store(self.url, **self.options) as store:
                return await fn(store)

        return asyncio.run(go())


@pytest.fixture(params=["local", "s3", "redis"])
def target(request, tmp_path):
    tag = f"t-{uuid.uuid4().hex[:10]}"
    if request.param == "local":
        yield Target(tmp_path.as_uri(), {}, "local")
        return
    if request.param == "s3":
        s3 = request.getfixturevalue("moto_s3")
        t = Target(f"{s3.url}/{tag}", s3.storage_options(), "s3")
    else:
        t = Target(request.getfixturevalue("redis_url"), {"prefix": f"{tag}/"}, "redis")
    yield t
    t.run(_clear)


async def _clear(store) -> None:
    await asyncio.gather(*[store.delete(k) async for k in store.list()])


@pytest.fixture
def stored(target):
    """Two contexts (40 and 20 tokens, sharing their first chunk) at two levels; their manifests."""
    with SyncKVStore(target.url, chunk_tokens=16, levels=LEVELS, storage_options=target.options) as kvs:
        long = kvs.put(MODEL, LONG, make_kv(40))
        short = kvs.put(MODEL, SHORT, [(k[:, :20], v[:, :20]) for k, v in make_kv(40)])
    return long, short


def manifest_key(manifest) -> str:
    return KeyScheme().manifest_key(manifest.fingerprint, manifest.chunks[-1].hash)


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, out


def cli_json(capsys, *argv: str) -> tuple[int, dict]:
    code, out = cli(capsys, *argv, "--json")
    return code, json.loads(out)


async def corrupt(store, key: str) -> None:
    data = bytearray(await store.get(key))
    data[-1] ^= 0x01  # a byte of the last buffer: its checksum no longer matches
    await store.put(key, bytes(data))


# -- the commands on a healthy store -----------------------------------------------------------


def test_ls_inspect_verify(target, stored, capsys):
    long, short = stored
    if target.backend == "local":  # the text output is the same on every backend (and S3 calls are slow)
        code, out = cli(capsys, "ls", *target.args)
        assert code == EXIT_OK and out.count(MODEL) == 2 and "2 contexts" in out
        code, out = cli(capsys, "inspect", *target.args, classify(manifest_key(long)).name[:10])
        assert code == EXIT_OK and "7 of 7 objects OK" in out and "int8" in out
        code, out = cli(capsys, "verify", *target.args)
        assert code == EXIT_OK and "all OK" in out
    code, doc = cli_json(capsys, "ls", *target.args)
    assert code == EXIT_OK and not doc["unreadable"]
    by_tokens = {c["tokens"]: c for c in doc["contexts"]}
    assert set(by_tokens) == {40, 20} and by_tokens[40]["chunks"] == 3 and by_tokens[20]["chunks"] == 2
    assert [lv["codec"] for lv in by_tokens[40]["levels"]] == LEVELS
    assert by_tokens[40]["levels"][0]["bytes"] == long.level_bytes(0) > long.level_bytes(1)
    assert by_tokens[40]["key"] == manifest_key(long)

    code, doc = cli_json(capsys, "inspect", *target.args, by_tokens[20]["context"][:10])
    assert code == EXIT_OK and doc["ok"] and doc["tokens"] == 20 and doc["key"] == manifest_key(short)
    assert [[o["status"] for o in c["objects"]] for c in doc["chunks"]] == [["ok", "ok"], ["ok", "ok"]]
    code, doc = cli_json(capsys, "verify", *target.args)
    assert doc["ok"] and doc["objects"] == 10 and doc["kinds"] == {"chunk": 8, "manifest": 2}
    assert doc["manifests_checked"] == 2


@pytest.mark.parametrize("target", ["local", "redis"], indirect=True)  # nothing S3-specific: keep it fast
def test_inspect_unknown_context_and_bad_store(target, stored, capsys):
    assert main(["inspect", *target.args, "ffffffffffff"]) == EXIT_NOT_FOUND
    assert "not found" in capsys.readouterr().err
    assert main(["ls", "nosuch://store"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("kvstore: error:") and err.count("\n") == 1
    # (not on S3: s3fs hands unknown options to aiobotocore, which raises TypeError)
    assert main(["ls", *target.args, "-o", "nonsense_option=1"]) == EXIT_ERROR
    assert capsys.readouterr().err.count("\n") == 1


# -- damage ---------------------------------------------------------------------------------------


def test_verify_and_inspect_report_corruption_by_key(target, stored, capsys):
    long, short = stored
    bad = long.chunks[1].objects[1].key  # chunk 1 at int8, only in the long context
    gone = long.chunks[2].objects[0].key
    target.run(lambda store: corrupt(store, bad))
    target.run(lambda store: store.delete(gone))

    code, doc = cli_json(capsys, "verify", *target.args)
    assert code == EXIT_DAMAGED and not doc["ok"]
    problems = {p["key"]: p for p in doc["problems"]}
    assert set(problems) == {bad, gone}
    assert problems[bad]["problem"] == "corrupt" and "checksum" in problems[bad]["detail"]
    assert problems[gone]["problem"] == "missing" and problems[gone]["referenced_by"] == manifest_key(long)
    if target.backend == "local":
        code, out = cli(capsys, "verify", *target.args)
        assert code == EXIT_DAMAGED and f"CORRUPT {bad}" in out and f"MISSING {gone}" in out

    code, doc = cli_json(capsys, "inspect", *target.args, manifest_key(long))
    assert code == EXIT_DAMAGED
    assert {p["key"]: p["status"] for p in doc["problems"]} == {bad: "corrupt", gone: "missing"}
    # the short context does not use the damaged objects
    assert main(["inspect", *target.args, manifest_key(short)]) == EXIT_OK
    capsys.readouterr()


@pytest.mark.parametrize("target", ["local", "redis"], indirect=True)
def test_verify_prefix_and_corrupt_manifest(target, stored, capsys):
    long, short = stored
    prefix = f"kvstore/{long.fingerprint}/contexts/"
    code, doc = cli_json(capsys, "verify", *target.args, "--prefix", prefix)
    assert code == EXIT_OK and doc["objects"] == 2 and doc["manifests_checked"] == 2
    target.run(lambda store: corrupt(store, manifest_key(short)))
    code, doc = cli_json(capsys, "verify", *target.args, "--prefix", prefix)
    assert code == EXIT_DAMAGED and [p["key"] for p in doc["problems"]] == [manifest_key(short)]
    code, doc = cli_json(capsys, "ls", *target.args)
    assert code == EXIT_DAMAGED and [u["key"] for u in doc["unreadable"]] == [manifest_key(short)]
    code, doc = cli_json(capsys, "inspect", *target.args, manifest_key(short))
    assert code == EXIT_DAMAGED and doc["manifest"]["status"] == "corrupt" and "chunks" not in doc
    # gc keeps every object of a model whose manifest it cannot read
    target.run(lambda store: store.delete(manifest_key(long)))
    code, doc = cli_json(capsys, "gc", *target.args, "--grace", "0")
    assert code == EXIT_OK and doc["orphans"] == [] and any("unreadable manifest" in n for n in doc["notes"])


# -- gc ----------------------------------------------------------------------------------------------


def test_gc_removes_orphans_keeps_listed(target, stored, capsys):
    long, short = stored
    target.run(lambda store: store.delete(manifest_key(long)))  # its chunks 1 and 2 become orphans
    orphans = sorted(o.key for c in long.chunks[1:] for o in c.objects)
    listed = sorted({o.key for c in short.chunks for o in c.objects})

    code, doc = cli_json(capsys, "gc", *target.args, "--dry-run", "--grace", "0")
    assert code == EXIT_OK and doc["dry_run"]
    assert [o["key"] for o in doc["orphans"]] == orphans and doc["referenced"] == len(listed)
    code, doc = cli_json(capsys, "gc", *target.args, "--grace", "3600")  # all of them are seconds old
    assert code == EXIT_OK and doc["orphans"] == [] and doc["young"] == len(orphans)
    assert target.run(lambda store: store.exists(orphans[0]))

    code, out = cli(capsys, "gc", *target.args, "--grace", "0")
    assert code == EXIT_OK and all(f"removed orphan chunk {key}" in out for key in orphans)
    remaining = target.run(lambda store: _keys(store))
    assert remaining == sorted([*listed, manifest_key(short)])
    assert main(["verify", *target.args]) == EXIT_OK
    with SyncKVStore(target.url, chunk_tokens=16, levels=LEVELS, storage_options=target.options) as kvs:
        assert torch.equal(kvs.get(MODEL, SHORT)[0][0], make_kv(40)[0][0][:, :20])
    capsys.readouterr()


async def _keys(store) -> list[str]:
    return sorted([k async for k in store.list()])


def test_gc_expired_objects(target, capsys):
    if target.backend == "redis":
        pytest.skip("Redis expires keys itself")
    target.run(lambda store: store.put("kvstore/stray/expiring", b"x", ttl=0.05))
    target.run(lambda store: store.put("kvstore/stray/lasting", b"y", ttl=3600))
    time.sleep(0.1)
    code, doc = cli_json(capsys, "gc", *target.args, "--dry-run")
    assert code == EXIT_OK and doc["expired"] == ["kvstore/stray/expiring"]
    code, doc = cli_json(capsys, "gc", *target.args)
    assert code == EXIT_OK and doc["expired"] == ["kvstore/stray/expiring"]
    code, doc = cli_json(capsys, "gc", *target.args)
    assert doc["expired"] == []
    assert target.run(lambda store: store.get("kvstore/stray/lasting")) == b"y"


def test_gc_local_temp_files(tmp_path, capsys):
    old = tmp_path / "kvstore" / ".chunk.tmp-0123abcd"
    new = tmp_path / ".ttl" / ".key.tmp-4567ef"
    for path in (old, new):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    code, doc = cli_json(capsys, "gc", tmp_path.as_uri(), "--dry-run")
    assert code == EXIT_OK and doc["temp_files"] == [str(old)] and old.exists()
    code, doc = cli_json(capsys, "gc", tmp_path.as_uri())
    assert doc["temp_files"] == [str(old)] and not old.exists() and new.exists()


def test_gc_redis_cluster_dry_run(redis_cluster_url, capsys):
    target = Target(redis_cluster_url, {"prefix": f"t-{uuid.uuid4().hex[:10]}/"}, "redis-cluster")
    with SyncKVStore(target.url, chunk_tokens=16, levels=LEVELS, storage_options=target.options) as kvs:
        long = kvs.put(MODEL, LONG, make_kv(40))
    try:
        target.run(lambda store: store.delete(manifest_key(long)))
        code, doc = cli_json(capsys, "gc", *target.args, "--dry-run", "--grace", "3600")
        assert code == EXIT_OK and doc["young"] == 6 and doc["orphans"] == []  # ages known (idle time)
        code, doc = cli_json(capsys, "gc", *target.args, "--grace", "0")
        assert len(doc["orphans"]) == 6 and target.run(_keys) == []
    finally:
        target.run(_clear)


# -- the module API on a memory store (one process) ----------------------------------------------


async def test_admin_api_on_memory():
    async with KVStore("memory://", chunk_tokens=16, levels=LEVELS) as kvs:
        long = await kvs.put(MODEL, LONG, make_kv(40))
        await kvs.put(MODEL, SHORT, [(k[:, :20], v[:, :20]) for k, v in make_kv(40)])
        store = kvs.store
        listing = await list_contexts(store)
        assert sorted(c.manifest.num_tokens for c in listing.contexts) == [20, 40]
        report = await inspect_context(store, manifest_key(long))
        assert report.ok and len(report.objects) == 3
        assert (await verify_store(store)).ok

        await corrupt(store, long.chunks[0].objects[0].key)
        report = await verify_store(store)
        assert [p.key for p in report.problems] == [long.chunks[0].objects[0].key]

        await store.delete(manifest_key(long))
        kept = await collect_garbage(store, grace=60)  # memory cannot tell ages: nothing removed
        assert kept.orphans == [] and kept.unknown_age == 4 and any("does not record" in n for n in kept.notes)
        dry = await collect_garbage(store, grace=0, dry_run=True)
        assert len(dry.orphans) == 4 and await store.exists(dry.orphans[0].key)
        done = await collect_garbage(store, grace=0)
        assert [o.key for o in done.orphans] == [o.key for o in dry.orphans]
        assert not await store.exists(dry.orphans[0].key)
        assert len([k async for k in store.list()]) == 5  # 2 chunks x 2 levels + 1 manifest

        await store.put("kvstore/stray/expiring", b"x", ttl=0.01)
        await asyncio.sleep(0.05)
        assert (await collect_garbage(store, dry_run=True)).expired == ["kvstore/stray/expiring"]


async def test_admin_accounts_for_pq_objects():
    from kvstore.retrieval import pq
    from kvstore.retrieval.store import put_pq

    config = pq.PQConfig(bits=3, sinks=2, iters=2)
    async with KVStore("memory://", chunk_tokens=16, levels=LEVELS) as kvs:
        long = await kvs.put(MODEL, LONG, make_kv(40), pq=config)
        assert {classify(o.key).kind for o in long.pq.objects} == {"pq"}
        assert classify(long.pq.centroids.key).fingerprint == long.fingerprint
        stray = await put_pq(kvs, MODEL, SHORT, kv=[(k[:, :20], v[:, :20]) for k, v in make_kv(40)],
                             config=config)  # listed by no manifest
        store = kvs.store
        report = await inspect_context(store, manifest_key(long))
        assert report.ok and len(report.pq) == 1 + len(long.chunks)
        assert report.to_json()["pq"]["bytes"] == long.pq.total_bytes and "pq " in report.to_text()
        await corrupt(store, long.pq.codes[1].key)
        report = await inspect_context(store, manifest_key(long))
        assert [p.key for p in report.problems] == [long.pq.codes[1].key]
        assert [p.key for p in (await verify_store(store)).problems] == [long.pq.codes[1].key]

        done = await collect_garbage(store, grace=0)
        assert sorted(o.key for o in done.orphans) == sorted(stray.keys)
        assert all([await store.exists(o.key) for o in long.pq.objects])

        # a manifest whose PQ codes or centroids were deleted: verify says so, by key
        await store.delete(long.pq.codes[0].key)
        await store.delete(long.pq.centroids.key)
        problems = (await verify_store(store)).problems
        assert {(p.key, p.problem) for p in problems} >= {(long.pq.codes[0].key, "missing"),
                                                           (long.pq.centroids.key, "missing")}
        assert all(p.referenced_by == manifest_key(long) for p in problems if p.problem == "missing")


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_counters_move():
    hits = metrics.value("kvstore_chunk_hits_total", {"op": "lookup"})
    misses = metrics.value("kvstore_chunk_misses_total", {"op": "get"})
    read = metrics.value("kvstore_read_bytes_total", {"level": "1"})
    fetches = metrics.value("kvstore_fetch_seconds_count", {"level": "1"})
    metrics.record_lookup(3, 0)
    metrics.record_lookup(0, 2, op="get")
    metrics.record_get(1, 1000, 0.002)
    metrics.record_put(0, 500)
    metrics.record_decode("int8", 0.01)
    metrics.record_recompute(2)
    metrics.record_checksum_failure("chunk")
    assert metrics.value("kvstore_chunk_hits_total", {"op": "lookup"}) == hits + 3
    assert metrics.value("kvstore_chunk_misses_total", {"op": "get"}) == misses + 2
    assert metrics.value("kvstore_read_bytes_total", {"level": "1"}) == read + 1000
    assert metrics.value("kvstore_fetch_seconds_count", {"level": "1"}) == fetches + 1
    assert metrics.value("kvstore_written_bytes_total", {"level": "0"}) >= 500
    assert metrics.value("kvstore_decode_seconds_count", {"codec": "int8"}) >= 1
    assert metrics.value("kvstore_chunks_recomputed_total") >= 2
    assert metrics.value("kvstore_checksum_failures_total", {"kind": "chunk"}) >= 1


def test_metrics_registry_is_private_until_registered():
    import prometheus_client

    assert prometheus_client.REGISTRY.get_sample_value("kvstore_chunks_recomputed_total") is None
    app = CollectorRegistry()
    assert b"kvstore_" not in generate_latest(app)
    assert metrics.register_default(app) is app
    metrics.register_default(app)  # a second call does nothing (no duplicate registration error)
    metrics.record_recompute()
    text = generate_latest(app).decode()
    assert "kvstore_chunks_recomputed_total" in text and "kvstore_fetch_seconds_bucket" in text
    assert app.get_sample_value("kvstore_chunks_recomputed_total") == metrics.value("kvstore_chunks_recomputed_total")


def _store_has_hooks() -> bool:
    import inspect as pyinspect

    import kvstore.store

    return "metrics.record_get" in pyinspect.getsource(kvstore.store)


@pytest.mark.skipif(not _store_has_hooks(), reason="kvstore/store.py does not call kvstore.metrics yet")
async def test_store_moves_metrics():
    def snapshot():
        return {
            "written": metrics.value("kvstore_written_bytes_total", {"level": "1"}),
            "read": metrics.value("kvstore_read_bytes_total", {"level": "0"}),
            "fetches": metrics.value("kvstore_fetch_seconds_count", {"level": "0"}),
            "hits": metrics.value("kvstore_chunk_hits_total", {"op": "lookup"}),
            "misses": metrics.value("kvstore_chunk_misses_total", {"op": "lookup"}),
            "get_hits": metrics.value("kvstore_chunk_hits_total", {"op": "get"}),
            "decodes": metrics.value("kvstore_decode_seconds_count", {"codec": "raw"}),
            "corrupt": metrics.value("kvstore_checksum_failures_total", {"kind": "chunk"}),
        }

    before = snapshot()
    async with KVStore("memory://", chunk_tokens=16, levels=LEVELS) as kvs:
        manifest = await kvs.put(MODEL, LONG, make_kv(40))
        assert await kvs.lookup(MODEL, LONG[:32] + [1] * 16) == 32  # 2 chunks found, the 3rd is not
        await kvs.get(MODEL, LONG)
        after = snapshot()
        assert after["written"] - before["written"] == manifest.level_bytes(1)
        assert after["read"] - before["read"] == manifest.level_bytes(0)
        assert after["fetches"] - before["fetches"] == 3 and after["decodes"] - before["decodes"] == 3
        assert after["hits"] - before["hits"] == 2 and after["misses"] - before["misses"] == 1
        assert after["get_hits"] - before["get_hits"] == 3
        await corrupt(kvs.store, manifest.chunks[0].objects[0].key)
        with pytest.raises(ChecksumError):
            await kvs.get(MODEL, LONG)
        assert snapshot()["corrupt"] == after["corrupt"] + 2  # read once more before raising: fails again


# -- gc and concurrent writers --------------------------------------------------------------------


async def test_gc_keeps_chunks_of_a_manifest_written_during_the_scan():
    """A context whose manifest appears after gc listed the store keeps its chunks."""
    from kvstore.backends.memory import MemoryStore

    class Racing(MemoryStore):
        pending: tuple[str, bytes] | None = None

        async def list(self, prefix: str = ""):
            if "/contexts/" in prefix and self.pending:  # gc's second look at the manifests
                await self.put(*self.pending)  # the writer finishes its put just now
                self.pending = None
            async for key in super().list(prefix):
                yield key

    store = Racing()
    async with KVStore(store, chunk_tokens=16, levels=LEVELS) as kvs:
        long = await kvs.put(MODEL, LONG, make_kv(40))
        key = manifest_key(long)
        store.pending = (key, await store.get(key))
        await store.delete(key)  # as if the writer had stored its chunks but not yet its manifest
        report = await collect_garbage(store, grace=0)
        assert report.orphans == [] and report.referenced == 6
        assert (await verify_store(store)).ok
        assert len(await kvs.get(MODEL, LONG)) == 2


def test_gc_local_grace_uses_file_age(tmp_path, capsys):
    with SyncKVStore(tmp_path.as_uri(), chunk_tokens=16, levels=LEVELS) as kvs:
        long = kvs.put(MODEL, LONG, make_kv(40))
    (tmp_path / manifest_key(long)).unlink()
    old = long.chunks[0].objects[0].key
    stamp = time.time() - 600
    os.utime(tmp_path / old, (stamp, stamp))
    code, doc = cli_json(capsys, "gc", tmp_path.as_uri(), "--grace", "300")
    assert code == EXIT_OK and [o["key"] for o in doc["orphans"]] == [old] and doc["young"] == 5
    assert doc["orphans"][0]["age"] >= 600 and not (tmp_path / old).exists()


def test_read_only_commands_do_not_create_a_local_store(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["ls", str(missing)]) == EXIT_ERROR
    assert main(["verify", missing.as_uri()]) == EXIT_ERROR
    assert not missing.exists() and "no local store" in capsys.readouterr().err
