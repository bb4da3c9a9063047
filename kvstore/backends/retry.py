"""Retries with capped exponential backoff and full jitter, at the edge of each backend.

:func:`count_retries` lets a caller (a benchmark, the fault campaign) see how
many retries the backend calls it makes needed, without a global counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from kvstore.errors import ConfigError, TransientBackendError

T = TypeVar("T")
log = logging.getLogger("kvstore.backends")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry a transient failure.

    ``attempts`` counts the first try; delays grow as ``base_delay * 2**n``,
    capped at ``max_delay``, with full jitter. ``deadline`` bounds the whole
    operation, retries included: no retry starts after it, and an attempt still
    running at it is cancelled (a server that stops answering must not hang the
    caller where the client library has no timeout, e.g. aiohttp awaiting
    ``100 Continue``).
    """

    attempts: int = 5
    base_delay: float = 0.05
    max_delay: float = 2.0
    deadline: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.deadline <= 0:
            raise ConfigError(f"invalid retry policy {self}")


NO_RETRY = RetryPolicy(attempts=1)


@dataclass
class RetryCount:
    """Retries made, and operations given up after their last attempt, inside :func:`count_retries`."""

    retries: int = 0
    gave_up: int = 0


_counters: ContextVar[tuple[RetryCount, ...]] = ContextVar("kvstore_retry_counters", default=())


@contextlib.contextmanager
def count_retries() -> Iterator[RetryCount]:
    """Count the retries of backend operations run in this context and in the tasks and
    threads it starts (they inherit the context); nests, and concurrent loads stay apart."""
    count = RetryCount()
    token = _counters.set((*_counters.get(), count))
    try:
        yield count
    finally:
        _counters.reset(token)


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str = "operation",
) -> T:
    """Run ``operation`` until it succeeds, retrying :class:`TransientBackendError`.

    The last transient error is re-raised when attempts or the deadline run out;
    an attempt cut off by the deadline raises :class:`TransientBackendError`.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        limit = asyncio.timeout(started + policy.deadline - time.monotonic())
        try:
            async with limit:
                return await operation()
        except TimeoutError as exc:
            if not limit.expired():
                raise
            _count(gave_up=1)
            raise TransientBackendError(
                f"{what}: no answer within the {policy.deadline:g} s deadline (transient)"
            ) from exc
        except TransientBackendError as exc:
            elapsed = time.monotonic() - started
            delay = random.uniform(0, min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1)))
            if attempt >= policy.attempts or elapsed + delay >= policy.deadline:
                _count(gave_up=1)
                raise
            _count(retries=1)
            log.debug("%s failed (%s); retry %d in %.3fs", what, exc, attempt, delay)
            await asyncio.sleep(delay)


def _count(*, retries: int = 0, gave_up: int = 0) -> None:
    for count in _counters.get():
        count.retries += retries
        count.gave_up += gave_up
