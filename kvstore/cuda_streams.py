"""Keep GPU work done in worker threads ordered with the caller's CUDA stream.

``asyncio.to_thread`` runs a function in a pool thread, where the current CUDA stream is
the device's default stream, not the one the calling code had current (and the current
device is device 0, not the caller's). Kernels queued there are not ordered with the
caller's earlier work (the KV it was still computing) nor with its later work (reading
what the call returns), and the caching allocator may hand either side memory the other
is still using. :func:`caller_stream` captures the caller's stream when the call starts;
:func:`on_stream` makes a function run with that stream (and its device) current.

A blocking caller in another thread (:class:`~kvstore.sync.SyncKVStore`, whose event loop
runs in a thread of its own) passes its stream along with :func:`with_stream_of`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

import torch

from kvstore.errors import ConfigError

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["caller_stream", "current_stream_if_cuda", "on_stream", "resolve_device", "with_stream_of"]

#: the stream of a blocking caller in another thread, for the coroutines run on its behalf
_CALLER_STREAM: ContextVar[torch.cuda.Stream | None] = ContextVar("kvstore_caller_stream", default=None)


def current_stream_if_cuda() -> torch.cuda.Stream | None:
    """The calling thread's current stream on its current device, or ``None`` when this
    process has not initialised CUDA (then the caller has no GPU work to order with, and
    asking would create a CUDA context for nothing)."""
    if not torch.cuda.is_initialized():  # (is_available() would initialise the driver: no fork after it)
        return None
    return torch.cuda.current_stream()


async def with_stream_of(stream: torch.cuda.Stream | None, coro: Coroutine[Any, Any, R]) -> R:
    """Await ``coro`` with ``stream`` standing for the caller's stream (and ``"cuda"`` for its
    device) in :func:`caller_stream` and :func:`resolve_device`, in ``coro`` and the tasks
    and threads it starts."""
    token = _CALLER_STREAM.set(stream)
    try:
        return await coro
    finally:
        _CALLER_STREAM.reset(token)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, a CUDA device with its index (``"cuda"`` is the
    caller's current device, which a worker thread would not know); :class:`ConfigError`
    for a CUDA device where CUDA is not available."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: CUDA is not available (torch {torch.__version__})")
    if device.index is None:
        passed = _CALLER_STREAM.get()
        return passed.device if passed is not None else torch.device("cuda", torch.cuda.current_device())
    return device


def caller_stream(device: str | torch.device) -> torch.cuda.Stream | None:
    """The caller's current stream on ``device`` (see :func:`with_stream_of`); ``None`` off CUDA."""
    device = resolve_device(device)
    if device.type != "cuda":
        return None
    passed = _CALLER_STREAM.get()
    return passed if passed is not None and passed.device == device else torch.cuda.current_stream(device)


def on_stream(stream: torch.cuda.Stream | None, fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with ``stream`` (and its device) current, in whatever thread calls it;
    ``fn`` itself when ``stream`` is ``None``."""
    if stream is None:
        return fn

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            return fn(*args, **kwargs)

    return run
