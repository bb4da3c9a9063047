"""GPU work done in worker threads stays ordered with the caller's CUDA stream (:mod:`kvstore.cuda_streams`).

The GPU tests make a race visible: the caller's stream is held back by a long sleep kernel,
with work queued behind it that reads memory the call is about to be handed (the caching
allocator reuses a block freed on the caller's stream at once), or KV that is written only
after the sleep. Work that ran on another stream would read or overwrite it too early.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvstore import KVStore, SyncKVStore
from kvstore.cuda_streams import _CALLER_STREAM, caller_stream, current_stream_if_cuda, on_stream, resolve_device
from kvstore.errors import ConfigError
from kvstore.fetch.fetcher import AdaptiveFetcher
from kvstore.sync import LoopThread

MODEL = "stream-test"
LAYERS, HEADS, TOKENS, DIM = 4, 2, 512, 64
SLEEP_CYCLES = 500_000_000  # ~0.3 s on an H100: far longer than the call's own work

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_kv(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(HEADS, TOKENS, DIM, generator=g).half(), torch.randn(HEADS, TOKENS, DIM, generator=g).half())
            for _ in range(LAYERS)]  # fmt: skip


def assert_kv_equal(got, want) -> None:
    assert len(got) == len(want)
    for (k, v), (k_ref, v_ref) in zip(got, want):
        assert torch.equal(k.cpu(), k_ref) and torch.equal(v.cpu(), v_ref)


# -- everywhere: the plumbing ---------------------------------------------------------------
def test_off_cuda_nothing_changes():
    fn = len
    assert on_stream(None, fn) is fn
    assert caller_stream("cpu") is None
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_a_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")

    async def get():
        async with KVStore("memory://") as store:
            await store.get(MODEL, [1, 2, 3], device="cuda")

    with pytest.raises(ConfigError, match="CUDA is not available"):
        asyncio.run(get())


def test_a_blocking_callers_stream_reaches_the_loop_and_its_worker_threads(monkeypatch):
    """What :class:`SyncKVStore`'s loop thread passes along: the stream current in the calling
    thread is what the coroutine and the threads it starts see (a marker object stands in
    for a CUDA stream here)."""
    import kvstore.sync

    async def seen() -> tuple[object, object]:
        return _CALLER_STREAM.get(), await asyncio.to_thread(_CALLER_STREAM.get)

    loop = LoopThread()
    try:
        here = current_stream_if_cuda()  # None where this process has not initialised CUDA
        assert loop.run(seen()) == (here, here)
        marker = object()
        monkeypatch.setattr(kvstore.sync, "current_stream_if_cuda", lambda: marker)
        assert loop.run(seen()) == (marker, marker)
    finally:
        loop.stop()


# -- on a GPU ----------------------------------------------------------------------------------
def _held_back_reader(stream: torch.cuda.Stream) -> tuple[torch.Tensor, int]:
    """On ``stream``: a sleep, then ``y = 2 * x`` for a fresh ``x`` the size of a loaded KV
    tensor, freed at once (its block goes back to ``stream``'s pool while the read is
    pending). Returns ``y``, all 2 unless someone wrote into ``x``'s memory too early, and
    where ``x`` was (the caching allocator hands that block to the next allocation of its
    size on ``stream``: the call's output)."""
    with torch.cuda.stream(stream):
        x = torch.ones(LAYERS, HEADS, TOKENS, DIM, dtype=torch.float16, device="cuda")
        where = x.data_ptr()
        torch.cuda._sleep(SLEEP_CYCLES)
        y = x * 2
        del x
    return y, where


REUSED = "the output did not reuse the freed block, so this run could not show the race"


@pytest.mark.gpu
@needs_cuda
def test_get_writes_the_kv_on_the_callers_stream():
    kv = make_kv()
    tokens = list(range(TOKENS))

    async def scenario():
        async with KVStore("memory://") as store:
            await store.put(MODEL, tokens, kv)
            await store.get(MODEL, tokens, device="cuda")  # warm-up: first kernel loads may synchronize
            side = torch.cuda.Stream()
            y, where = _held_back_reader(side)
            with torch.cuda.stream(side):
                out = await store.get(MODEL, tokens, device="cuda")
            reused = out[0][0].data_ptr() == where
            side.synchronize()
            return y, reused, out

    y, reused, out = asyncio.run(scenario())
    assert reused, REUSED
    assert torch.all(y == 2), "the decode wrote into memory the caller's stream was still reading"
    assert_kv_equal(out, kv)


@pytest.mark.gpu
@needs_cuda
def test_blocking_get_takes_its_output_from_the_callers_stream():
    """SyncKVStore's loop thread has the default stream current: the output must still come
    from the caller's stream's pool, not from a block the default stream is still reading."""
    kv = make_kv(3)
    tokens = list(range(TOKENS))
    with SyncKVStore("memory://") as store:
        store.put(MODEL, tokens, kv)
        store.get(MODEL, tokens, device="cuda")  # warm-up
        y, _ = _held_back_reader(torch.cuda.default_stream())
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            out = store.get(MODEL, tokens, device="cuda")
        side.synchronize()
        torch.cuda.synchronize()
    assert torch.all(y == 2), "the decode wrote into memory the default stream was still reading"
    assert_kv_equal(out, kv)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("blocking", [False, True], ids=["KVStore", "SyncKVStore"])
def test_put_reads_the_kv_after_the_callers_stream_wrote_it(blocking):
    kv = make_kv(1)
    tokens = list(range(TOKENS))
    on_gpu = [(k.cuda(), v.cuda()) for k, v in kv]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        late = [(k * 1, v * 1) for k, v in on_gpu]  # written only after the sleep
        if blocking:
            with SyncKVStore("memory://") as store:
                store.put(MODEL, tokens, late)
                got = store.get(MODEL, tokens)
        else:

            async def scenario():
                async with KVStore("memory://") as store:
                    await store.put(MODEL, tokens, late)
                    return await store.get(MODEL, tokens)

            got = asyncio.run(scenario())
    assert_kv_equal(got, kv)


@pytest.mark.gpu
@needs_cuda
def test_fetcher_decodes_after_the_callers_earlier_work():
    kv = make_kv(2)
    tokens = list(range(TOKENS))

    async def scenario():
        async with KVStore("memory://") as store:
            await store.put(MODEL, tokens, kv)
            fetcher = AdaptiveFetcher(store, device="cuda")
            await fetcher.load(MODEL, tokens, deadline_s=30.0)  # warm-up
            side = torch.cuda.Stream()
            y, where = _held_back_reader(side)
            with torch.cuda.stream(side):
                result = await fetcher.load(MODEL, tokens, deadline_s=30.0)
            reused = result.kv[0][0].data_ptr() == where
            side.synchronize()
            return y, reused, result

    y, reused, result = asyncio.run(scenario())
    assert reused, REUSED
    assert torch.all(y == 2), "the fetcher's decode stream wrote into memory the caller's stream was still reading"
    assert_kv_equal(result.kv, kv)
