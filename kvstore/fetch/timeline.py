"""A load's timeline as plain data, and its drawing: the true link rate, the
fetcher's estimate at each decision, and each chunk's transfer, level and decode.

Shared by ``kvstore bench stream`` and ``kvstore demo`` so both plot a load the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvstore.fetch.fetcher import LoadResult

LEVEL_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")  # red (C3) marks recompute


def timeline_of(result: LoadResult, times: Sequence[float], rates_Bps: Sequence[float], deadline_s: float,
                level_names: Sequence[str], max_steps: int = 80) -> dict[str, Any]:
    """A JSON-ready record of one load under a bandwidth trace (``times``/``rates_Bps``: its steps)."""
    return {"trace": {"times": list(times[:max_steps]), "rates_Bps": list(rates_Bps[:max_steps])},
            "decisions": [vars(d) for d in result.decisions], "deadline_s": deadline_s,
            "level_names": list(level_names)}


def draw_timeline(ax_rate: Any, ax_chunks: Any, timeline: dict[str, Any], title: str) -> None:
    """Draw a :func:`timeline_of` record on two matplotlib axes sharing the time axis."""
    decisions = timeline["decisions"]
    end = max(d["ready_at"] or 0 for d in decisions) * 1.05
    times, rates = timeline["trace"]["times"], timeline["trace"]["rates_Bps"]
    xs, ys = [], []
    for i, t in enumerate(times):
        if t > end:
            break
        nxt = times[i + 1] if i + 1 < len(times) else end
        xs += [t, min(nxt, end)]
        ys += [rates[i] * 8 / 1e6] * 2
    ax_rate.plot(xs, ys, color="grey", label="true link rate")
    est = [(d["decided_at"], d["throughput_Bps"] * 8 / 1e6) for d in decisions if d["throughput_Bps"]]
    ax_rate.step([e[0] for e in est], [e[1] for e in est], where="post", color="C0",
                 label="fetcher's estimate (at each decision)")
    ax_rate.set_ylim(bottom=0, top=max(ys + [e[1] for e in est]) * 1.15 if ys else None)
    ax_rate.set_ylabel("Mbit/s")
    ax_rate.legend(loc="upper right", fontsize=8)
    ax_rate.set_title(title)
    for d in decisions:
        if d["fetch_start"] is None:  # recomputed from text
            ax_chunks.barh(d["index"], (d["ready_at"] or 0) - d["decided_at"], left=d["decided_at"], color="C3")
            continue
        ax_chunks.barh(d["index"], d["fetch_end"] - d["fetch_start"], left=d["fetch_start"], color=LEVEL_COLORS[d["level"] % len(LEVEL_COLORS)])
        ax_chunks.barh(d["index"], d["ready_at"] - d["fetch_end"], left=d["fetch_end"], color="black", height=0.3)
        name = timeline["level_names"][d["level"]]
        ax_chunks.text(d["fetch_start"], d["index"], f" {name} {d['nbytes'] / 1e6:.2f}MB", fontsize=7, va="center")
    ax_chunks.yaxis.get_major_locator().set_params(integer=True)
    ax_chunks.axvline(timeline["deadline_s"], color="red", ls="--", label="SLO")
    ax_chunks.set_xlabel("seconds since the load started")
    ax_chunks.set_ylabel("chunk")
    ax_chunks.set_title("bars: transfer (colour: level), black: decode after it, red: recompute", fontsize=9)
    ax_chunks.legend(loc="lower right", fontsize=8)
