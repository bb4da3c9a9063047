"""Prometheus metrics of the store: hits, misses, bytes, recomputes, latencies, checksum failures.

The metrics live on :data:`REGISTRY`, a ``CollectorRegistry`` owned by kvstore,
not on prometheus-client's global default registry, so importing kvstore adds
nothing to an application's ``/metrics`` until it asks::

    from kvstore import metrics
    metrics.register_default()                  # expose through the default registry
    # or: prometheus_client.generate_latest(metrics.registry())

The store calls the small ``record_*`` helpers below; they never raise on
ordinary input and cost a few microseconds each.

==========================================  =========  ===================================
metric                                      labels     meaning
==========================================  =========  ===================================
``kvstore_chunk_hits_total``                op         chunks found (op: lookup, get)
``kvstore_chunk_misses_total``              op         chunks asked for and not stored
``kvstore_read_bytes_total``                level      chunk bytes fetched, per level index
``kvstore_written_bytes_total``             level      chunk bytes written, per level index
``kvstore_chunks_recomputed_total``         (none)     chunks recomputed instead of fetched
``kvstore_decode_seconds``                  codec      decode time of one chunk object
``kvstore_fetch_seconds``                   level      latency of one object fetch
``kvstore_checksum_failures_total``         kind       objects that failed verification
==========================================  =========  ===================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("kvstore.metrics")

#: kvstore's own registry; nothing is registered on the global default one
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CHUNK_HITS = Counter("kvstore_chunk_hits", "Chunks found in the store", ["op"], registry=REGISTRY)
CHUNK_MISSES = Counter("kvstore_chunk_misses", "Chunks asked for but not stored", ["op"], registry=REGISTRY)
READ_BYTES = Counter("kvstore_read_bytes", "Chunk object bytes fetched", ["level"], registry=REGISTRY)
WRITTEN_BYTES = Counter("kvstore_written_bytes", "Chunk object bytes written", ["level"], registry=REGISTRY)
CHUNKS_RECOMPUTED = Counter(
    "kvstore_chunks_recomputed", "Chunks recomputed by the model instead of fetched", registry=REGISTRY
)
DECODE_SECONDS = Histogram(
    "kvstore_decode_seconds", "Time to verify and decode one chunk object", ["codec"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
FETCH_SECONDS = Histogram(
    "kvstore_fetch_seconds", "Latency of one object fetch from the byte store", ["level"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
CHECKSUM_FAILURES = Counter(
    "kvstore_checksum_failures", "Stored objects that failed checksum or consistency checks", ["kind"],
    registry=REGISTRY,
)


def registry() -> CollectorRegistry:
    """kvstore's registry (for ``generate_latest``, ``start_http_server(registry=...)``...)."""
    return REGISTRY


class _Forward(Collector):
    """Exposes everything on :data:`REGISTRY` through another registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()

    def describe(self) -> Iterable[Metric]:
        return []  # names are checked in our own registry; an empty describe skips re-checking


_forwarded: set[int] = set()


def register_default(target: CollectorRegistry | None = None) -> CollectorRegistry:
    """Expose kvstore's metrics through ``target`` (prometheus-client's default registry when
    ``None``); calling it again for the same registry does nothing. Returns ``target``."""
    if target is None:
        from prometheus_client import REGISTRY as default

        target = default
    if id(target) not in _forwarded:
        target.register(_Forward())
        _forwarded.add(id(target))
    return target


# -- the helpers the store calls ---------------------------------------------------------------


def record_lookup(hits: int, misses: int, *, op: str = "lookup") -> None:
    """Count chunks a ``lookup`` (or a ``get``: ``op="get"``) found and did not find."""
    if hits > 0:
        CHUNK_HITS.labels(op).inc(hits)
    if misses > 0:
        CHUNK_MISSES.labels(op).inc(misses)


def record_get(level: int | str, nbytes: int, seconds: float) -> None:
    """One object fetched at ``level``: its size and the fetch latency."""
    label = str(level)
    READ_BYTES.labels(label).inc(max(0, nbytes))
    FETCH_SECONDS.labels(label).observe(max(0.0, seconds))


def record_put(level: int | str, nbytes: int) -> None:
    """One chunk object of ``nbytes`` written at ``level``."""
    WRITTEN_BYTES.labels(str(level)).inc(max(0, nbytes))


def record_decode(codec: str, seconds: float) -> None:
    """One chunk object of ``codec`` verified and decoded in ``seconds``."""
    DECODE_SECONDS.labels(codec).observe(max(0.0, seconds))


def record_recompute(chunks: int = 1) -> None:
    """``chunks`` chunks recomputed by the model instead of fetched."""
    if chunks > 0:
        CHUNKS_RECOMPUTED.inc(chunks)


def record_checksum_failure(kind: str) -> None:
    """An object of ``kind`` (``chunk``, ``manifest``, ``profile``...) failed verification."""
    CHECKSUM_FAILURES.labels(kind).inc()
    log.debug("checksum failure on a %s object", kind)


def value(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of sample ``name`` (e.g. ``kvstore_chunk_hits_total``), 0 if unset."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0
