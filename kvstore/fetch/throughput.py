"""Throughput estimation from what has been received so far (never from the future).

The fetcher keeps several requests out at once, each on its own pooled
connection, and parallel connections through one bottleneck share it about
fairly (TCP's processor sharing). A completed transfer's duration therefore says
little on its own: while ``n`` transfers were on the wire it got about ``1/n``
of the link. So the estimator is told when each transfer starts and when it
ends, and a completed transfer of ``b`` bytes over ``[s, e]`` gives the sample

    link rate = b / integral over [s, e] of dt / n(t)

where ``n(t)`` counts the transfers on the wire at ``t`` (completed or not).
One transfer at a time gives its own rate; three sharing a link each give the
link's rate, where charging each for its whole duration would read a third of it, and
pooling only the completed ones would read low whenever a partner
was still in flight. Before the first transfer completes, the caller's prior
(or ``None``) is returned.
"""

from __future__ import annotations

import itertools
from collections import deque

from kvstore.errors import ConfigError


def fair_share_time(start: float, end: float, others: list[tuple[float, float]]) -> float:
    """The integral over ``[start, end]`` of ``1 / n(t)``, where ``n(t)`` is one (the transfer
    itself) plus the number of ``others`` intervals covering ``t``: the time the transfer had
    the whole link to itself, were the link shared equally."""
    cuts = sorted({start, end, *(t for s, e in others for t in (s, e) if start < t < end)})
    total = 0.0
    for a, b in zip(cuts, cuts[1:]):
        middle = (a + b) / 2
        total += (b - a) / (1 + sum(1 for s, e in others if s <= middle < e))
    return total


class ThroughputEstimator:
    """Bytes over fair-share time, summed over the last ``window`` completed transfers.

    Each completed transfer contributes its bytes and its fair-share time (see above).
    Connections do not share a link exactly fairly (one of three finishing first had
    more than a third), so one sample alone is noisy, but over transfers that shared
    the link their fair-share times add up to the time the link was busy: the ratio of
    sums is the link's delivered rate, the unfairness cancelling. A drop shows as soon
    as slow transfers complete, since their longer times dominate the sums (and the
    fetcher caps the figure by what the transfers still in flight prove, see
    :func:`in_flight_bound`).
    """

    RECENT = 16  # completed transfers kept to count who shared the link

    def __init__(self, window: int = 3, prior_Bps: float | None = None) -> None:
        if window < 1:
            raise ConfigError("window must be at least 1")
        self.window = window
        self.prior_Bps = prior_Bps
        self._ids = itertools.count()
        self._active: dict[int, float] = {}  # transfer id -> start
        self._done: deque[tuple[float, float]] = deque(maxlen=self.RECENT)
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)  # (bytes, fair-share seconds)

    def start(self, at: float) -> int:
        """A transfer went on the wire at ``at`` (seconds); returns its handle."""
        handle = next(self._ids)
        self._active[handle] = at
        return handle

    def finish(self, handle: int, nbytes: int, at: float) -> None:
        """Transfer ``handle`` delivered ``nbytes`` by ``at``: take its sample."""
        start = self._active.pop(handle)
        if at < start or nbytes < 0:
            raise ConfigError("a transfer needs end >= start and nbytes >= 0")
        others = [*self._done, *((s, float("inf")) for s in self._active.values())]
        self._done.append((start, at))
        if nbytes > 0:
            self._samples.append((nbytes, fair_share_time(start, at, others)))

    def cancel(self, handle: int) -> None:
        """Transfer ``handle`` failed: forget it (it no longer shares the link)."""
        self._active.pop(handle, None)

    def record(self, nbytes: int, start: float, end: float) -> None:
        """A completed transfer reported after the fact (it shared the link with the
        transfers started and not yet finished, and with those recorded before)."""
        self.finish(self.start(start), nbytes, end)

    @property
    def samples(self) -> int:
        return len(self._samples)

    def estimate(self) -> float | None:
        """Bytes per second, or the prior when nothing has completed yet."""
        if not self._samples:
            return self.prior_Bps
        return sum(n for n, _ in self._samples) / max(sum(t for _, t in self._samples), 1e-6)


def in_flight_bound(in_flight: list[tuple[int, float]], completed: list[tuple[int, float]], now: float) -> float | None:
    """An upper bound of the link's recent rate from transfers that have *not* completed.

    ``in_flight``: (bytes, start) of the transfers on the wire; ``completed``: (bytes, end)
    of finished ones. Since the earliest in-flight transfer started, the link delivered
    less than the in-flight bytes plus the bytes of transfers completed meanwhile, so its
    average rate over that time is below their sum over the elapsed time. When the rate
    drops while every transfer is still on the wire (parallel connections slow down
    together, and none completes to give a sample), this bound falls with every moment
    that passes. ``None`` when nothing is in flight.
    """
    if not in_flight:
        return None
    since = min(start for _, start in in_flight)
    elapsed = now - since
    if elapsed <= 0:
        return None
    delivered = sum(n for n, _ in in_flight) + sum(n for n, end in completed if end >= since)
    return delivered / elapsed
