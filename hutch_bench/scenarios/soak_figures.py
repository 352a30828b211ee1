"""The soak's figures from its samples and records: growth after warm-up, outcomes,
lost and duplicated answers, and the CSV of the samples.

Growth compares the median of a window just after warm-up (the first third of the run)
with the median of the last window of the run: a median over a minute, not two single
samples, so a garbage collection or a burst of streams at either end is no trend.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hutch_bench.scenarios.soak_traffic import HTTP_KINDS, SoakRecord

__all__ = [
    "SERIES",
    "growth",
    "outcomes",
    "parse_duration",
    "series_values",
    "write_csv",
    "write_requests_csv",
]

#: The series the soak judges: (name, role in a sample, field of that role).
SERIES = (
    ("worker-a rss_mib", "worker-a", "rss_mib"),
    ("worker-a fds", "worker-a", "fds"),
    ("worker-a amqp_connections", "worker-a", "amqp_connections"),
    ("worker-b rss_mib", "worker-b", "rss_mib"),
    ("gateway rss_mib", "gateway", "rss_mib"),
    ("gateway fds", "gateway", "fds"),
    ("gateway amqp_connections", "gateway", "amqp_connections"),
    ("broker rss_mib", "broker", "rss_mib"),
    ("broker mem_used_mib", "broker", "mem_used_mib"),
    ("broker our_queues_memory_mib", "broker", "our_queues_memory_mib"),
    ("broker our_queues_messages", "broker", "our_queues_messages"),
    ("broker fd_used", "broker", "fd_used"),
    ("broker our_connections", "broker", "our_connections"),
    ("broker connections", "broker", "connections"),
)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``30m``, ``2m``, ``90s``, ``1h`` or plain seconds, in seconds."""
    value = text.strip().lower()
    scale = _UNITS.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"duration {text!r}: expected e.g. 30m, 90s or 1h") from None
    if not seconds > 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def series_values(samples: Sequence[dict[str, Any]], role: str, key: str
                  ) -> list[tuple[float, float]]:
    """(t_s, value) of one field of one role, where sampled."""
    return [(s["t_s"], float(s[role][key])) for s in samples
            if s.get(role) and s[role].get(key) is not None]


def _median(points: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    values = [v for t, v in points if start <= t <= end]
    return statistics.median(values) if values else None


def growth(samples: Sequence[dict[str, Any]], duration_s: float,
           since_s: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Each series' median over the first window after warm-up and over the last one,
    and the growth between them. ``since_s``: a role restarted at that time is judged
    from then (worker-b's last start), or not at all if too little is left."""
    warm = duration_s / 3
    window = min(60.0, (duration_s - warm) / 4)
    out: dict[str, dict[str, Any]] = {}
    for name, role, key in SERIES:
        start = max(warm, (since_s or {}).get(role, 0.0))
        points = series_values(samples, role, key)
        first = _median(points, start, start + window)
        last = _median(points, duration_s - window, duration_s)
        if last is None:  # a slow sampler left the window empty: the last sample before
            last = next((v for t, v in reversed(points) if t <= duration_s), None)
        usable = start + window < duration_s - window
        ratio = (last - first) / first if usable and first and last is not None else None
        out[name] = {"first": first, "last": last, "growth": ratio,
                     "window_s": window, "from_s": start,
                     "max": max((v for _, v in points), default=None)}
    return out


def outcomes(records: Sequence[SoakRecord]) -> dict[str, Any]:
    """Counts by kind and outcome; lost (no terminal answer where one was due) and
    duplicated (more than one) requests, with a few of their ids."""
    by_kind: dict[str, Counter[str]] = {}
    for record in records:
        by_kind.setdefault(record.kind, Counter())[record.outcome] += 1
    # An HTTP call the client abandoned on purpose has no answer to get.
    lost = [r for r in records if r.answers == 0
            and not (r.kind in HTTP_KINDS and r.outcome == "disconnected")]
    duplicated = [r for r in records if _to_caller(r) > 1]
    on_wire = [r for r in records if r.kind not in HTTP_KINDS and r.answers > 1]
    return {
        "requests": len(records),
        "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
        "by_outcome": dict(Counter(r.outcome for r in records)),
        "answered_once": sum(r.answers == 1 for r in records),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "wire_duplicates": len(on_wire),
        "lost_examples": [_example(r) for r in lost[:10]],
        "duplicated_examples": [_example(r) for r in duplicated[:10]],
        "wire_duplicate_examples": [_example(r) for r in on_wire[:10]],
    }


def _to_caller(record: SoakRecord) -> int:
    """Answers the caller got: an HTTP call's terminal events, an AMQP request's finals
    handed to it while it waited."""
    return record.answers if record.kind in HTTP_KINDS else record.delivered


def _example(record: SoakRecord) -> list[Any]:
    return [record.kind, record.outcome, record.correlation_id, record.answers,
            round(record.sent_s, 2), None if record.done_s is None else round(record.done_s, 2)]


def write_requests_csv(records: Sequence[SoakRecord], path: Path) -> None:
    """One row per request: kind, times, outcome, finals reached, finals delivered."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "kind", "sent_s", "done_s", "outcome", "answers",
                         "delivered", "correlation_id"])
        for r in records:
            writer.writerow([r.index, r.kind, round(r.sent_s, 3),
                             None if r.done_s is None else round(r.done_s, 3), r.outcome,
                             r.answers, r.delivered, r.correlation_id])


def write_csv(samples: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per sample, one column per role and field (``worker-a.rss_mib``)."""
    names = {f"{role}.{key}" for s in samples for role, fields in s.items()
             if isinstance(fields, dict) for key in fields if key != "ports"}
    columns = ["t_s", *sorted(names)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for sample in samples:
            row = [sample["t_s"]]
            for column in columns[1:]:
                role, key = column.split(".", 1)
                row.append((sample.get(role) or {}).get(key))
            writer.writerow(row)
