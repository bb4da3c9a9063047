"""Retries with capped exponential backoff and full jitter, at the edge of each backend."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from kvstore.errors import ConfigError, TransientBackendError

T = TypeVar("T")
log = logging.getLogger("kvstore.backends")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry a transient failure.

    ``attempts`` counts the first try; delays grow as ``base_delay * 2**n``,
    capped at ``max_delay``, with full jitter; no retry starts after
    ``deadline`` seconds from the first try.
    """

    attempts: int = 5
    base_delay: float = 0.05
    max_delay: float = 2.0
    deadline: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.deadline <= 0:
            raise ConfigError(f"invalid retry policy {self}")


NO_RETRY = RetryPolicy(attempts=1)


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str = "operation",
) -> T:
    """Run ``operation`` until it succeeds, retrying :class:`TransientBackendError`.

    The last transient error is re-raised when attempts or the deadline run out.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await operation()
        except TransientBackendError as exc:
            elapsed = time.monotonic() - started
            if attempt >= policy.attempts or elapsed >= policy.deadline:
                raise
            delay = random.uniform(0, min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1)))
            delay = min(delay, max(0.0, policy.deadline - elapsed))
            log.debug("%s failed (%s); retry %d in %.3fs", what, exc, attempt, delay)
            await asyncio.sleep(delay)
