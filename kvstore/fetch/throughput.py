"""Throughput estimation from what has been received so far (never from the future).

Completed transfers are recorded as (bytes, start, end); overlapping transfers
are not counted as twice the bandwidth, and idle gaps (while the fetcher waits
on a decode) do not dilute the estimate. Before the first transfer completes,
the caller's prior (or ``None``) is returned.
"""

from __future__ import annotations

from collections import deque


class ThroughputEstimator:
    """The smaller of the last transfer's link rate and the harmonic mean of the last
    ``window`` transfers' rates.

    A transfer's rate is its bytes over the time the link spent on it: from its
    start, or from the end of the transfer completed before it if that was later
    (so a request queued behind another is not charged for the wait). The
    harmonic mean leans towards slow samples and the last sample shows a drop at
    once, so a spike is trusted less than a drop: what a deadline needs.
    """

    def __init__(self, window: int = 3, prior_Bps: float | None = None) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.prior_Bps = prior_Bps
        self._rates: deque[float] = deque(maxlen=window)
        self._last_end: float | None = None

    def record(self, nbytes: int, start: float, end: float) -> None:
        """Add a completed transfer of ``nbytes`` that ran from ``start`` to ``end`` (seconds)."""
        if end < start or nbytes < 0:
            raise ValueError("a transfer needs end >= start and nbytes >= 0")
        service_start = start if self._last_end is None else min(end, max(start, self._last_end))
        self._last_end = end if self._last_end is None else max(self._last_end, end)
        if nbytes == 0:
            return
        self._rates.append(nbytes / max(end - service_start, 1e-6))

    @property
    def samples(self) -> int:
        return len(self._rates)

    def estimate(self) -> float | None:
        """Bytes per second, or the prior when nothing has completed yet."""
        if not self._rates:
            return self.prior_Bps
        harmonic = len(self._rates) / sum(1.0 / r for r in self._rates)
        return min(harmonic, self._rates[-1])
