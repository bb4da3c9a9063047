"""Throughput estimation from what has been received so far (never from the future).

Completed transfers are recorded as (bytes, start, end). Transfers in flight at
the same time share the link (the fetcher keeps up to ``max_in_flight``
requests out on pooled connections), so a transfer's own duration says little:
two that shared a link finish close together, and charging each only for the
time since the other ended made a spike of the second. Instead the sample taken
when a transfer completes covers its *cohort*, the recent transfers whose
intervals overlap its own: their bytes over the length of the union of their
intervals. Time during which several were on the wire counts once, idle gaps
(the fetcher waiting on a decode) count not at all, and one transfer at a time
gives each transfer's own rate. Before the first transfer completes, the
caller's prior (or ``None``) is returned.
"""

from __future__ import annotations

from collections import deque


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``[start, end]`` intervals, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


class ThroughputEstimator:
    """The smaller of the latest sample and the harmonic mean of the last ``window`` samples.

    A sample is the delivered rate of the completed transfer's cohort (see above). The
    harmonic mean leans towards slow samples and the latest sample shows a drop soonest,
    so a spike is trusted less than a drop: what a deadline needs. Bytes of transfers
    still in flight are not seen, so with transfers in parallel the estimate errs low,
    never high.
    """

    RECENT = 8  # completed transfers kept to find a cohort

    def __init__(self, window: int = 3, prior_Bps: float | None = None) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.prior_Bps = prior_Bps
        self._recent: deque[tuple[int, float, float]] = deque(maxlen=self.RECENT)
        self._rates: deque[float] = deque(maxlen=window)

    def record(self, nbytes: int, start: float, end: float) -> None:
        """Add a completed transfer of ``nbytes`` that ran from ``start`` to ``end`` (seconds)."""
        if end < start or nbytes < 0:
            raise ValueError("a transfer needs end >= start and nbytes >= 0")
        if nbytes == 0:
            return
        cohort = [(n, s, e) for n, s, e in self._recent if e > start and s < end] + [(nbytes, start, end)]
        self._recent.append((nbytes, start, end))
        busy = union_length([(s, e) for _, s, e in cohort])
        self._rates.append(sum(n for n, _, _ in cohort) / max(busy, 1e-6))

    @property
    def samples(self) -> int:
        return len(self._rates)

    def estimate(self) -> float | None:
        """Bytes per second, or the prior when nothing has completed yet."""
        if not self._rates:
            return self.prior_Bps
        harmonic = len(self._rates) / sum(1.0 / r for r in self._rates)
        return min(harmonic, self._rates[-1])


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
