"""The adaptive streaming fetcher: per-chunk level choice against a deadline, recompute
fallback, decode pipelined with the fetch."""

from kvstore.fetch.fetcher import AdaptiveFetcher, ChunkDecision, LoadResult, StaticPolicy
from kvstore.fetch.prefill import PrefillCost
from kvstore.fetch.throughput import ThroughputEstimator

__all__ = ["AdaptiveFetcher", "ChunkDecision", "LoadResult", "PrefillCost", "StaticPolicy", "ThroughputEstimator"]
