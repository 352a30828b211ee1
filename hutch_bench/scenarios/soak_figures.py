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
    duplicated = [r for r in records if r.answers > 1]
    return {
        "requests": len(records),
        "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
        "by_outcome": dict(Counter(r.outcome for r in records)),
        "answered_once": sum(r.answers == 1 for r in records),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "lost_examples": [(r.kind, r.outcome, r.correlation_id) for r in lost[:10]],
        "duplicated_examples": [(r.kind, r.outcome, r.correlation_id, r.answers)
                                for r in duplicated[:10]],
    }


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
