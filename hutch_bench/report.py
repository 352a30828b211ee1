"""Figures and tables of a ``hutch bench`` run.

Kept apart from the load generator so the arithmetic (percentiles, per-class summaries)
is pure and testable without a broker, and so the printed table and the ``--json`` file
are rendered from one summary dict: they cannot disagree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PERCENTILES",
    "RequestRecord",
    "distribution",
    "format_table",
    "latency_series",
    "percentile",
    "summarize",
]

#: The percentiles reported for every latency figure (plus the maximum).
PERCENTILES = (50.0, 95.0, 99.0)


@dataclass
class RequestRecord:
    """One request of a run. Times are seconds on the monotonic clock, relative to the
    run's start; ``latency_s`` is measured from ``intended_s`` (the scheduled send time),
    not ``sent_s``, so a generator or system that falls behind shows it in the tail."""

    index: int
    priority_class: str
    priority: int
    model: str
    intended_s: float
    sent_s: float | None = None
    done_s: float | None = None
    latency_s: float | None = None
    queue_wait_ms: int | None = None
    error: str | None = None


def percentile(values: Sequence[float], p: float) -> float:
    """The exact nearest-rank ``p``-th percentile (0 < p <= 100) of ``values``.

    Nearest rank rather than interpolation: the figure is always a latency some request
    really had, and p100 is the maximum. Sorts a copy; no numpy needed for a few thousand
    values. Raises ValueError on an empty sequence or a ``p`` out of range.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of ``values`` (None each when there are none)."""
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        out[f"p{p:g}"] = percentile(values, p) if values else None
    out["max"] = max(values) if values else None
    return out


def _summary(records: Iterable[RequestRecord], elapsed_s: float) -> dict[str, Any]:
    records = list(records)
    answered = [r for r in records if r.sent_s is not None and r.error is None
                and r.latency_s is not None]
    errors = Counter(r.error for r in records if r.error is not None)
    latencies_ms = [r.latency_s * 1000 for r in answered if r.latency_s is not None]
    waits_ms = [float(r.queue_wait_ms) for r in answered if r.queue_wait_ms is not None]
    return {
        "sent": sum(1 for r in records if r.sent_s is not None),
        "answered": len(answered),
        "errors": dict(sorted(errors.items())),
        "error_count": sum(errors.values()),
        "throughput_rps": len(answered) / elapsed_s if elapsed_s > 0 else 0.0,
        "queue_wait_ms": distribution(waits_ms),
        "latency_ms": distribution(latencies_ms),
    }


def summarize(records: Sequence[RequestRecord], elapsed_s: float,
              class_order: Sequence[str]) -> dict[str, Any]:
    """Every figure of a run: per priority class (in ``class_order``) and in total.

    ``elapsed_s`` runs from the first intended send to the last reply, so throughput is
    what the system delivered, not what was offered. Also reports the generator's own
    lag (actual minus intended send time): if it is large, the machine running the bench
    was the bottleneck and the latencies include that.
    """
    lags_ms = [(r.sent_s - r.intended_s) * 1000 for r in records if r.sent_s is not None]
    return {
        "elapsed_s": elapsed_s,
        "classes": {name: _summary((r for r in records if r.priority_class == name),
                                   elapsed_s) for name in class_order},
        "total": _summary(records, elapsed_s),
        "send_lag_ms": distribution(lags_ms),
    }


def latency_series(records: Sequence[RequestRecord], class_order: Sequence[str],
                   window_s: float = 1.0) -> dict[str, list[dict[str, Any]]]:
    """Per class, one point per ``window_s`` of intended send time: answered and failed
    counts and the end-to-end p50/p95/p99/max (ms) of the requests sent in that window.

    By send time, not completion time: a point says what a request sent at that moment
    went through, which is what a caller of an overloaded system experiences.
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    out: dict[str, list[dict[str, Any]]] = {}
    for name in class_order:
        windows: dict[int, list[RequestRecord]] = {}
        for record in records:
            if record.priority_class == name and record.sent_s is not None:
                windows.setdefault(int(record.intended_s // window_s), []).append(record)
        points = []
        for index in sorted(windows):
            group = windows[index]
            latencies = [r.latency_s * 1000 for r in group
                         if r.error is None and r.latency_s is not None]
            points.append({"t_s": index * window_s, "answered": len(latencies),
                           "errors": sum(r.error is not None for r in group),
                           **distribution(latencies)})
        out[name] = points
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(summary: dict[str, Any], priorities: dict[str, int]) -> list[str]:
    """The summary as aligned text lines: one row per class, then ``all``."""
    header = ["class", "prio", "sent", "answered", "errors", "req/s",
              "wait p50", "p95", "p99", "max", "e2e p50", "p95", "p99", "max"]
    rows: list[list[str]] = []
    items = [(name, str(priorities[name]), figures)
             for name, figures in summary["classes"].items()]
    items.append(("all", "", summary["total"]))
    for name, prio, figures in items:
        wait, e2e = figures["queue_wait_ms"], figures["latency_ms"]
        rows.append([name, prio, str(figures["sent"]), str(figures["answered"]),
                     str(figures["error_count"]), f"{figures['throughput_rps']:.1f}",
                     *(_ms(wait[k]) for k in ("p50", "p95", "p99", "max")),
                     *(_ms(e2e[k]) for k in ("p50", "p95", "p99", "max"))])
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in (header, *rows)]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("(latencies in ms; queue wait from x-hutch-queue-wait-ms, end-to-end from "
                 "the intended send time)")
    for name, _prio, figures in items:
        if figures["errors"]:
            detail = ", ".join(f"{code} {n}" for code, n in figures["errors"].items())
            lines.append(f"errors {name}: {detail}")
    lag = summary["send_lag_ms"]
    lines.append(f"generator send lag: p99 {_ms(lag['p99'])} ms, max {_ms(lag['max'])} ms; "
                 f"elapsed {summary['elapsed_s']:.2f} s")
    return lines
