"""``kvstore bench faults``: reliability under injected faults, hostile input and load.

Three parts, each from its own module in :mod:`kvstore.testing`, against real
servers on loopback (redis-server and moto's S3 server, started here):

- **faults** (:func:`tests.tools.faults.run_fault_campaign`): loads and writes
  through a TCP proxy that resets, stalls, truncates and corrupts traffic and
  answers S3 503 SlowDown / 500, plus redis-server crashes mid-load; every
  returned tensor is compared byte for byte with what was stored;
- **fuzz** (:func:`tests.tools.fuzz.run_fuzz`): mutated containers,
  manifests, chunk objects of every codec, rANS streams, profiles, PQ objects
  and hostile keys fed to their decoders;
- **load** (:func:`tests.tools.loadtest.run_load_tests`): concurrent streams of
  puts, gets, lookups and deletes against Redis and S3 for a bounded time;
- **consistency** (:func:`tests.tools.consistency.run_consistency`): random
  interleavings of puts of different KV for shared prefixes, deletes, gc (with and
  without a grace period), expiry and gets on memory, local files, Redis and S3,
  each checked against the invariant (one put's KV or an error; durable contexts
  never lost; TTL contexts not expired early).

Full run: >= 1,000 injected faults per backend, 100,000 fuzz cases, 64 streams
for 60 s per backend, 2,000 interleavings per backend. ``--quick``: 150 faults
per backend, 5,000 fuzz cases, 16 streams for 5 s per backend, 100 interleavings
per backend.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from tests.tools.consistency import run_consistency
from tests.tools.faults import run_fault_campaign
from tests.tools.fuzz import run_fuzz
from tests.tools.loadtest import run_load_tests

TARGETS = {"wrong_kv_returned": 0, "fuzz_unexpected_exceptions": 0, "load_test.errors": 0,
           "injected_faults_min": 1000, "fuzz_cases_min": 100_000, "load_test.concurrency": 64,
           "load_test.duration_s": 60, "consistency.rounds_min": 2000, "consistency.failures": 0}
CONSISTENCY_BACKENDS = ("memory", "local", "redis", "s3")
CONSISTENCY_FAILURES = ("mixed_or_wrong", "lost_durable_contexts", "expired_too_early")
COUNTS = ("injected_faults", "loads", "wrong_kv_returned", "recovered_by_retry", "recovered_by_recompute",
          "clear_errors", "unexpected_errors", "writes", "failed_writes_left_partial")


def _log(message: str) -> None:
    print(f"[faults] {message}", file=sys.stderr, flush=True)


def run(quick: bool) -> dict[str, Any]:
    """Measure; ``quick`` takes a couple of minutes on two cores."""
    n_faults, fuzz_cases, concurrency, duration_s = (150, 5000, 16, 5.0) if quick else (1000, 100_000, 64, 60.0)
    rounds = 100 if quick else TARGETS["consistency.rounds_min"]
    campaigns: dict[str, Any] = {}
    for kind in ("redis", "s3"):
        started = time.perf_counter()
        campaigns[kind] = asyncio.run(run_fault_campaign(kind, n_faults, seed=0))
        campaigns[kind]["seconds"] = time.perf_counter() - started
        _log(f"{kind}: {campaigns[kind]}")
    totals = {name: sum(c.get(name, 0) for c in campaigns.values()) for name in COUNTS}
    fuzz = run_fuzz(fuzz_cases, seed=0)
    _log(f"fuzz: {fuzz['fuzz_cases']} cases, {fuzz['fuzz_unexpected_exceptions']} unexpected, "
         f"{fuzz['seconds']:.0f} s")
    load = run_load_tests(("redis", "s3"), concurrency=concurrency, duration_s=duration_s)
    _log(f"load: {load['ops']} ops, {load['errors']} errors, p99 {load['p99_ms']} ms")
    consistency = run_consistency(CONSISTENCY_BACKENDS, rounds)
    for kind, result in consistency.items():
        _log(f"consistency {kind}: {result}")
    ran = [r for r in consistency.values() if "error" not in r]
    met = {
        "wrong_kv_returned": totals["wrong_kv_returned"] == 0,
        "unexpected_errors": totals["unexpected_errors"] == 0,
        "failed_writes_left_partial": totals["failed_writes_left_partial"] == 0,
        "injected_faults": all(c["injected_faults"] >= TARGETS["injected_faults_min"] for c in campaigns.values()),
        "fuzz_unexpected_exceptions": fuzz["fuzz_unexpected_exceptions"] == 0,
        "fuzz_cases": fuzz["fuzz_cases"] >= TARGETS["fuzz_cases_min"],
        "load_test_errors": load["errors"] == 0 and load["wrong_kv"] == 0,
        "load_test_scale": concurrency >= 64 and duration_s >= 60,
        "consistency": len(ran) == len(CONSISTENCY_BACKENDS)
        and all(r[name] == 0 for r in ran for name in CONSISTENCY_FAILURES),
        "consistency_rounds": all(r["rounds"] >= TARGETS["consistency.rounds_min"] for r in ran),
    }
    return {
        **totals,
        "faults_per_backend": campaigns,
        "fuzz_cases": fuzz["fuzz_cases"],
        "fuzz_unexpected_exceptions": fuzz["fuzz_unexpected_exceptions"],
        "fuzz": fuzz,
        "load_test": load,
        "consistency": consistency,
        "targets": TARGETS,
        "targets_met": met,
    }
