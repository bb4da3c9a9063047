"""``AdaptiveFetcher``: stream a stored context's chunks against a deadline.

Chunks are fetched in order with at most ``max_in_flight`` transfers at once;
each next chunk's level is chosen by a policy (adaptive by default) from the
throughput measured on completed transfers. Decoding runs in a worker thread
(on CUDA, on its own stream) so that chunk *i* decodes while chunk *i + 1* is
still on the wire. When the deadline cannot be met even at the smallest level,
the application's ``recompute(tokens, prefix_kv)`` rebuilds a chunk (or the rest)
from its tokens. A chunk whose fetch fails after the backend's retries (an
outage, a missing, truncated or corrupt object) is recomputed the same way when
a ``recompute`` is given, and raises its clear error otherwise: a load returns
verified KV or raises, never wrong KV. Every decision is recorded in a trace.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


import numpy as np
import torch

from kvstore import metrics
from kvstore.codecs.base import get_codec
from kvstore.cuda_streams import caller_stream, on_stream, resolve_device
from kvstore.decode_threads import in_decode_thread
from kvstore.errors import BackendError, ConfigError, ContextNotFoundError, FormatError, IncompleteContextError
from kvstore.fetch.policy import (
    FETCH,
    RECOMPUTE_CHUNK,
    RECOMPUTE_REST,
    AdaptivePolicy,
    DecisionContext,
    Policy,
    StaticPolicy,
)
from kvstore.fetch.prefill import PrefillCost
from kvstore.fetch.throughput import ThroughputEstimator, in_flight_bound
from kvstore.format import container
from kvstore.format.chunk import ChunkIdentity, decode_chunk, group_identity
from kvstore.format.dtypes import torch_dtype
from kvstore.format.keys import as_token_array
from kvstore.format.layout import continuation_start
from kvstore.format.manifest import Manifest, check_recorded_object
from kvstore.kv import KV, PrefixKV, group_outputs, prefix_kv
from kvstore.store import KVStore

Recompute = Callable[[torch.Tensor, KV | None], KV]
UNAVAILABLE = 1 << 62  # the size of a level whose objects are not all stored: never chosen by a deadline

__all__ = ["AdaptiveFetcher", "ChunkDecision", "LoadResult", "StaticPolicy"]


@dataclass
class ChunkDecision:
    """What the fetcher did with one chunk, and why (times in seconds from the load's start)."""

    index: int
    start: int
    stop: int
    action: str  # "fetch" or "recompute"
    level: int | None
    codec: str | None
    nbytes: int
    decided_at: float
    throughput_Bps: float | None
    reason: str
    fetch_start: float | None = None
    fetch_end: float | None = None
    ready_at: float | None = None
    work_s: float = 0.0  # decode or recompute seconds


@dataclass
class LoadResult:
    """A loaded context: its KV, the decision trace and the headline figures."""

    kv: KV
    decisions: list[ChunkDecision]
    deadline_s: float
    ttft_s: float
    bytes_fetched: int
    manifest: Manifest = field(repr=False)

    @property
    def slo_met(self) -> bool:
        return self.ttft_s <= self.deadline_s

    @property
    def decode_exposed_s(self) -> float:
        """Time after the last byte arrived until the KV was ready (decode not hidden by the fetch)."""
        ends = [d.fetch_end for d in self.decisions if d.fetch_end is not None]
        return max(0.0, self.ttft_s - max(ends)) if ends else self.ttft_s

    def levels(self) -> list[int | None]:
        """The level of each chunk (``None`` where it was recomputed)."""
        return [d.level if d.action == "fetch" else None for d in self.decisions]

    def table(self) -> str:
        """The decision trace, one line per chunk, for people."""
        lines = [f"{'chunk':>5} {'tokens':>11} {'action':>9} {'level':>5} {'bytes':>10} "
                 f"{'est Mbit/s':>10} {'fetch s':>15} {'ready s':>7}  reason"]
        for d in self.decisions:
            est = "-" if d.throughput_Bps is None else f"{d.throughput_Bps * 8 / 1e6:.1f}"
            span = "-" if d.fetch_start is None else f"{d.fetch_start:.3f}-{d.fetch_end:.3f}"
            lines.append(f"{d.index:>5} {d.start:>5}-{d.stop:<5} {d.action:>9} {str(d.level):>5} {d.nbytes:>10} "
                         f"{est:>10} {span:>15} {d.ready_at or 0:7.3f}  {d.reason}")
        lines.append(f"ttft {self.ttft_s:.3f}s, deadline {self.deadline_s:.3f}s, "
                     f"{'met' if self.slo_met else 'MISSED'}; {self.bytes_fetched} bytes fetched")
        return "\n".join(lines)


class AdaptiveFetcher:
    """Loads stored contexts chunk by chunk under a time-to-first-token deadline.

    Parameters:
        store: the :class:`KVStore` holding the contexts.
        recompute: ``recompute(tokens, prefix_kv) -> kv`` rebuilding the KV of ``tokens``
            that follow ``prefix_kv`` (e.g. :func:`kvstore.integrations.hf.make_recompute`);
            ``None`` disables the fallback.
        prefill_cost: what the application's recompute costs (a :class:`PrefillCost`,
            e.g. from :meth:`PrefillCost.measure`), used to decide when recomputing beats
            fetching. Without it (or ``prefill_tokens_per_s``) the policy cannot weigh a
            recompute, so ``recompute`` serves only chunks whose fetch failed, and the cost
            is fitted to those once timed.
        prefill_tokens_per_s: a flat prefill rate instead of ``prefill_cost`` (simpler, but it
            undercharges the last chunks of a long context).
        device: where the KV is assembled.
        max_in_flight: chunks in flight or fetched and awaiting decode (the pipeline window).
        prior_Bps: a throughput guess used before the first transfer completes.
    """

    def __init__(
        self,
        store: KVStore,
        *,
        recompute: Recompute | None = None,
        prefill_cost: PrefillCost | None = None,
        prefill_tokens_per_s: float | None = None,
        device: str | torch.device = "cpu",
        max_in_flight: int = 3,
        prior_Bps: float | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        self.store = store
        self.recompute = recompute
        if prefill_cost is not None and prefill_tokens_per_s is not None:
            raise ConfigError("give prefill_cost or prefill_tokens_per_s, not both")
        self.prefill_cost = (PrefillCost.from_rate(prefill_tokens_per_s) if prefill_tokens_per_s is not None
                             else prefill_cost)
        self._prefill_declared = self.prefill_cost is not None
        self._prefill_samples: deque[tuple[int, int, float]] = deque(maxlen=16)  # (tokens, prefix, s) timed
        self.device = resolve_device(device)
        self.max_in_flight = max_in_flight
        self.prior_Bps = prior_Bps
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    async def load(
        self,
        model_id: str,
        tokens: Sequence[int] | torch.Tensor | np.ndarray,
        *,
        deadline_s: float,
        policy: Policy | None = None,
        levels: Sequence[int] | None = None,
        continue_at: int | None = None,
        out: KV | None = None,
    ) -> LoadResult:
        """Load the KV of exactly ``tokens`` within ``deadline_s`` seconds if possible.

        ``levels``: the manifest level indices the policy may choose from, best first
        (default: all). ``continue_at``: sliding-window layers hold the window of a
        continuation from that token (as :meth:`KVStore.get`'s), not from the last.
        ``out``: the KV of an earlier load of the same shape to write into (as
        :meth:`KVStore.get`'s). Returns the KV with the decision trace.
        """
        result: LoadResult | None = None
        async for item in self.stream(model_id, tokens, deadline_s=deadline_s, policy=policy, levels=levels,
                                      continue_at=continue_at, out=out):
            if isinstance(item, LoadResult):
                result = item
        assert result is not None
        return result

    async def stream(
        self,
        model_id: str,
        tokens: Sequence[int] | torch.Tensor | np.ndarray,
        *,
        deadline_s: float,
        policy: Policy | None = None,
        levels: Sequence[int] | None = None,
        continue_at: int | None = None,
        out: KV | None = None,
    ) -> AsyncIterator[ChunkDecision | LoadResult]:
        """Like :meth:`load`, yielding each chunk's decision as its KV becomes ready,
        then the :class:`LoadResult`."""
        if not deadline_s > 0:
            raise ConfigError(f"deadline_s must be positive, got {deadline_s!r}")
        token_array = as_token_array(tokens)
        manifest = await self.store.manifest(model_id, token_array)
        if manifest is None:
            raise ContextNotFoundError(f"no stored context of these {len(token_array)} tokens for {model_id!r}")
        if manifest.layout.has_linear:  # its per-chunk choices (fetch or recompute) assume per-token KV
            raise ConfigError("the adaptive fetcher does not stream models with linear-attention layers yet "
                              f"({manifest.layout.describe()}); load them with KVStore.get")
        await self.store.load_profiles(manifest)
        candidates = list(range(len(manifest.levels))) if levels is None else list(levels)
        if not candidates or any(not 0 <= lv < len(manifest.levels) for lv in candidates):
            raise ConfigError(f"levels must be indices into the manifest's {len(manifest.levels)} levels")
        run = _Load(self, manifest, token_array, deadline_s, policy or AdaptivePolicy(), candidates,
                    continuation_start(continue_at, len(token_array)), out)
        async for item in run.execute():
            yield item


class _Load:
    """The state of one load: scheduling, fetching, decoding, recomputing."""

    def __init__(self, fetcher: AdaptiveFetcher, manifest: Manifest, tokens: np.ndarray,
                 deadline_s: float, policy: Policy, candidates: list[int], continue_at: int,
                 out: KV | None = None) -> None:
        self.f = fetcher
        self.m = manifest
        self.tokens = tokens
        self.deadline = deadline_s
        self.policy = policy
        self.candidates = candidates
        # the last ``max_in_flight`` completions are the latest transfers that shared the link:
        # enough for their unfairness to cancel, few enough that a drop shows at once
        self.estimator = ThroughputEstimator(window=fetcher.max_in_flight, prior_Bps=fetcher.prior_Bps)
        self.dtype = torch_dtype(manifest.dtype)[0]
        # on a GPU: the KV comes from the caller's stream's memory pool, chunks decode on the
        # fetcher's stream, recomputes run on the caller's; the decode stream first waits for
        # the caller's work so far (the memory just allocated may still be in use there)
        self.caller_stream = caller_stream(fetcher.device)
        # per layer group: the chunks fetched start where the group's layers need them (the
        # chunks of a sliding window before ``continue_at``; every chunk of full attention)
        self.groups = manifest.layout.groups
        n, chunk_tokens = manifest.num_tokens, manifest.chunk_tokens
        self.first_chunk = [g.spec.first_needed(continue_at) // chunk_tokens for g in self.groups]
        self.base = [manifest.chunks[c].start for c in self.first_chunk]
        self.outs: list[tuple[torch.Tensor, torch.Tensor]] = group_outputs(  # type: ignore[assignment]
            self.groups, n, self.base, self.dtype, fetcher.device, on_stream(self.caller_stream, torch.empty), out)
        if fetcher._stream is not None:
            fetcher._stream.wait_stream(self.caller_stream)
        # per chunk, bytes at each candidate level (in the policy's order)
        self.sizes = [[self._size(i, level) for level in candidates] for i in range(len(manifest.chunks))]
        self.codecs: dict[tuple[int, int], dict[str, Any]] = {}  # (level, group) -> codec, built on first use
        self.decisions: list[ChunkDecision] = []
        self.pending: dict[int, int] = {}  # chunk index -> bytes in flight
        self.decode_s: list[float] = []
        self.t0 = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _latest_fetched_level(self) -> int | None:
        """The level of the latest chunk fetched so far (``None`` before any)."""
        return next((d.level for d in reversed(self.decisions) if d.action == "fetch"), None)

    def _unit(self, i: int) -> list[int]:
        """The layer groups whose objects of chunk ``i`` the load reads."""
        return [g.index for g in self.groups if i >= self.first_chunk[g.index]]

    def _size(self, i: int, level: int) -> int:
        """Bytes of chunk ``i`` at ``level`` (every group the load reads; huge where one is not stored)."""
        objects = [self.m.object_at(i, level, g) for g in self._unit(i)]
        return sum(o.size for o in objects) if all(o is not None for o in objects) else UNAVAILABLE  # type: ignore[union-attr]

    def _codec(self, level: int, group: int) -> dict[str, Any]:
        """The codec (name, params) that ``group``'s objects at ``level`` must have been coded with."""
        if (level, group) not in self.codecs:
            spec, layout = self.m.levels[level], self.m.layout
            codec = get_codec(spec.codec, spec.params).for_layers(
                layout.token_rows(self.groups[group].layers), len(layout.token_layers))
            self.codecs[level, group] = {"name": codec.name, "params": codec.params}
        return self.codecs[level, group]

    def _identity(self, i: int, group: int) -> ChunkIdentity:
        chunk = self.m.chunks[i]
        return group_identity(self.m.fingerprint, chunk.hash, chunk.start, self.tokens[chunk.start:chunk.stop],
                              self.groups[group], self.dtype)

    def _context(self, i: int) -> DecisionContext:
        chunks = self.m.chunks[i:]
        decode_tail = float(np.median(self.decode_s)) if self.decode_s else 0.0
        prefill = self.f.prefill_cost if self.f.recompute is not None else None
        return DecisionContext(
            index=i, now=self.now(), deadline=self.deadline,
            remaining_sizes=self.sizes[i:],
            remaining_tokens=[c.stop - c.start for c in chunks], prefix_tokens=chunks[0].start,
            candidates=self.candidates, throughput_Bps=self._throughput(),
            pending_bytes=sum(self.pending.values()), decode_tail_s=decode_tail,
            prefill=prefill,
            previous_level=self._latest_fetched_level(),
        )

    def _throughput(self) -> float | None:
        """The estimator's figure, lowered by what the transfers still on the wire prove
        (see :func:`~kvstore.fetch.throughput.in_flight_bound`)."""
        estimate = self.estimator.estimate()
        on_wire = [(n, self.decisions[j].fetch_start) for j, n in self.pending.items()
                   if self.decisions[j].fetch_start is not None]
        done = [(d.nbytes, d.fetch_end) for d in self.decisions if d.fetch_end is not None]
        bound = in_flight_bound(on_wire, done, self.now())  # type: ignore[arg-type]
        return estimate if estimate is None or bound is None else min(estimate, bound)

    async def _get_objects(self, i: int, level: int, groups: list[int]) -> list[bytes]:
        """Chunk ``i``'s objects of ``groups`` at ``level``, read concurrently."""

        async def get(g: int) -> bytes:
            obj = self.m.object_at(i, level, g)
            blob = None if obj is None else await self.f.store.store.get(obj.key)
            if blob is None:
                where = obj.key if obj is not None else f"layer group {self.groups[g].name!r}, not stored"
                raise IncompleteContextError(f"chunk {i} ({where}) is missing from the store")
            return blob

        return list(await asyncio.gather(*(get(g) for g in groups)))

    async def _fetch(self, d: ChunkDecision) -> list[bytes]:
        d.fetch_start = self.now()
        started = time.perf_counter()
        transfer = self.estimator.start(started)
        try:
            blobs = await self._get_objects(d.index, d.level, self._unit(d.index))  # type: ignore[arg-type]
            d.fetch_end = self.now()
            nbytes = sum(map(len, blobs))
            self.estimator.finish(transfer, nbytes, time.perf_counter())
            metrics.record_get(d.level, nbytes, time.perf_counter() - started)
            return blobs
        finally:
            self.estimator.cancel(transfer)  # a no-op once finished
            self.pending.pop(d.index, None)

    def _decode_into(self, i: int, blobs: list[bytes]) -> None:
        level = self.decisions[i].level
        try:
            for g, blob in zip(self._unit(i), blobs, strict=True):
                obj = container.decode(blob)  # the header parsed once; buffers checked as decoded
                check_recorded_object(obj, self.m.object_at(i, level, g), i)  # type: ignore[arg-type]
                self._decode_chunk(i, g, obj, self._codec(level, g))  # type: ignore[arg-type]
        except FormatError:
            metrics.record_checksum_failure("chunk")
            raise

    def _decode_chunk(self, i: int, g: int, blob: bytes | container.Container, codec: dict[str, Any]) -> None:
        chunk, base = self.m.chunks[i], self.base[g]
        out_k, out_v = self.outs[g]
        ident = self._identity(i, g)
        into = (out_k[:, :, chunk.start - base:chunk.stop - base], out_v[:, :, chunk.start - base:chunk.stop - base])
        if self.f._stream is not None:
            with torch.cuda.stream(self.f._stream):
                decode_chunk(blob, ident, self.f.device, codec, out=into)
            self.f._stream.synchronize()
        else:
            decode_chunk(blob, ident, self.f.device, codec, out=into)

    async def _windows_before(self, start: int) -> dict[int, tuple[int, list[bytes], list[int], int]] | None:
        """The sliding-window KV a recompute from ``start`` needs but the load does not read
        (its window lies before the group's first fetched chunk): per group, the first token
        and the objects of the chunks that hold it, at the level of the latest fetched chunk
        (the smallest candidate before any). ``None`` when one cannot be read: the recompute
        then starts from the context's beginning."""
        level = self._latest_fetched_level()
        level = self.candidates[-1] if level is None else level
        chunk_tokens = self.m.chunk_tokens
        windows: dict[int, tuple[int, list[bytes], list[int], int]] = {}
        for g in self.groups:
            need = g.spec.first_needed(start)
            if start == 0 or need >= self.base[g.index]:
                continue
            chunks = list(range(need // chunk_tokens, -(-min(start, self.base[g.index]) // chunk_tokens)))
            try:
                blobs = [(await self._get_objects(i, level, [g.index]))[0] for i in chunks]
                for i, blob in zip(chunks, blobs):
                    check_recorded_object(blob, self.m.object_at(i, level, g.index), i)  # type: ignore[arg-type]
            except (BackendError, FormatError):
                return None
            windows[g.index] = (need, blobs, chunks, level)
        return windows

    def _recompute_into(self, start: int, stop: int,
                        windows: dict[int, tuple[int, list[bytes], list[int], int]] | None = None) -> None:
        assert self.f.recompute is not None
        prefix: KV | None = None
        if start > 0:
            layers: KV = [None] * self.m.layers  # type: ignore[list-item]
            for g in self.groups:
                out_k, out_v = self.outs[g.index]
                held = max(0, start - self.base[g.index])
                parts_k, parts_v = [out_k[:, :, :held]], [out_v[:, :, :held]]
                if windows and g.index in windows:  # decode the window before the fetched chunks
                    need, blobs, chunks, level = windows[g.index]
                    codec = self._codec(level, g.index)
                    decoded = [decode_chunk(b, self._identity(i, g.index), out_k.device, codec)
                               for b, i in zip(blobs, chunks)]
                    first = self.m.chunks[chunks[0]].start
                    until = min(start, self.base[g.index]) - first
                    parts_k.insert(0, torch.cat([k for k, _ in decoded], dim=2)[:, :, need - first:until])
                    parts_v.insert(0, torch.cat([v for _, v in decoded], dim=2)[:, :, need - first:until])
                keys, values = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)
                for j, layer in enumerate(g.layers):
                    layers[layer] = (keys[j], values[j])
            prefix = PrefixKV(layers, start)
        kv = self.f.recompute(torch.as_tensor(self.tokens[start:stop], dtype=torch.long), prefix)
        for g in self.groups:
            out_k, out_v = self.outs[g.index]
            base = self.base[g.index]
            if stop <= base:
                continue
            skip = max(0, base - start)  # tokens before the group's first fetched chunk
            out_k[:, :, max(start, base) - base:stop - base] = torch.stack(
                [kv[layer][0][:, skip:] for layer in g.layers]).to(out_k.device, self.dtype)
            out_v[:, :, max(start, base) - base:stop - base] = torch.stack(
                [kv[layer][1][:, skip:] for layer in g.layers]).to(out_v.device, self.dtype)
        if self.outs[0][0].is_cuda:  # the work is timed: wait for it, not for its launch
            torch.cuda.synchronize(self.outs[0][0].device)

    async def execute(self) -> AsyncIterator[ChunkDecision | LoadResult]:
        self.t0 = time.perf_counter()
        slots = asyncio.Semaphore(self.f.max_in_flight)
        queue: asyncio.Queue[tuple[ChunkDecision, asyncio.Task[bytes] | None] | None] = asyncio.Queue()
        scheduler = asyncio.create_task(self._schedule(slots, queue))
        self.tasks: list[asyncio.Task[bytes]] = []
        bytes_fetched = 0
        try:
            while (item := await queue.get()) is not None:
                d, task = item
                if task is not None:
                    try:
                        blobs = await task
                        bytes_fetched += sum(map(len, blobs))
                        started = time.perf_counter()
                        await in_decode_thread(self._decode_into, d.index, blobs)
                    except (BackendError, FormatError) as exc:
                        slots.release()
                        if self.f.recompute is None:
                            raise
                        self._fetch_failed(d, exc)
                    else:
                        d.work_s = time.perf_counter() - started
                        self.decode_s.append(d.work_s)
                        metrics.record_decode(self.m.levels[d.level].codec, d.work_s)  # type: ignore[index]
                        slots.release()  # a window slot covers a chunk until it is decoded
                        d.ready_at = self.now()
                        yield d
                        continue
                rest = d.reason.startswith("[rest]")
                stop = self.m.chunks[-1].stop if rest else d.stop
                started = time.perf_counter()
                windows = await self._windows_before(d.start)
                begin = d.start if windows is not None else 0  # no window to continue from: from the start
                await asyncio.to_thread(on_stream(self.caller_stream, self._recompute_into), begin, stop, windows)
                d.work_s = time.perf_counter() - started
                metrics.record_recompute(len(self.decisions[d.index:]) if rest else 1)
                if not self.f._prefill_declared and d.work_s > 0:
                    self.f._prefill_samples.append((stop - d.start, d.start, d.work_s))
                    self.f.prefill_cost = PrefillCost.fit(self.f._prefill_samples)
                for later in self.decisions[d.index:] if rest else [d]:
                    later.ready_at = self.now()
                    yield later
            await scheduler
        finally:
            for task in [scheduler, *self.tasks]:
                if not task.done():
                    task.cancel()
        yield LoadResult(prefix_kv(self.groups, self.outs, self.m.layers, self.m.num_tokens),  # type: ignore[arg-type]
                         self.decisions, self.deadline, self.now(), bytes_fetched, self.m)

    def _fetch_failed(self, d: ChunkDecision, exc: Exception) -> None:
        """Turn a chunk whose fetch or verification failed into a recompute of that chunk."""
        d.reason = f"fetch failed (level {d.level}): {type(exc).__name__}: {exc}"
        d.action, d.level, d.codec, d.nbytes = "recompute", None, None, 0

    async def _schedule(self, slots: asyncio.Semaphore, queue: asyncio.Queue) -> None:  # type: ignore[type-arg]
        try:
            i = 0
            while i < len(self.m.chunks):
                await slots.acquire()
                if i > 0 and self.estimator.estimate() is None and self.tasks:
                    # nothing measured and no prior: let the first transfer finish before deciding more
                    await asyncio.wait([self.tasks[0]])
                chunk = self.m.chunks[i]
                ctx = self._context(i)
                choice = self.policy.choose(ctx)
                if choice.action != FETCH and self.f.recompute is None:
                    choice = type(choice)(FETCH, self.candidates[-1], "recompute unavailable: smallest level")
                if choice.action == FETCH:
                    level = choice.level if choice.level is not None else self.candidates[-1]
                    spec = self.m.levels[level]
                    d = ChunkDecision(i, chunk.start, chunk.stop, "fetch", level, spec.tag,
                                      self._size(i, level), ctx.now, ctx.throughput_Bps, choice.reason)
                    self.decisions.append(d)
                    self.pending[i] = d.nbytes
                    task = asyncio.create_task(self._fetch(d))
                    self.tasks.append(task)
                    await queue.put((d, task))
                    i += 1
                    continue
                slots.release()
                if choice.action == RECOMPUTE_CHUNK:
                    d = ChunkDecision(i, chunk.start, chunk.stop, "recompute", None, None, 0, ctx.now,
                                      ctx.throughput_Bps, choice.reason)
                    self.decisions.append(d)
                    await queue.put((d, None))
                    i += 1
                    continue
                assert choice.action == RECOMPUTE_REST
                rest = self.m.chunks[i:]
                first = ChunkDecision(i, chunk.start, chunk.stop, "recompute", None, None, 0, ctx.now,
                                      ctx.throughput_Bps, "[rest] " + choice.reason)
                self.decisions.append(first)
                for c_index, c in enumerate(rest[1:], start=i + 1):
                    self.decisions.append(ChunkDecision(c_index, c.start, c.stop, "recompute", None, None, 0,
                                                        ctx.now, ctx.throughput_Bps, "recomputed with the rest"))
                await queue.put((first, None))
                break
        finally:
            await queue.put(None)
