"""Scenario ``overload``: does priority hold when offered three times the capacity?

A mock backend with ``capacity`` slots of ``service_ms`` each (8 x 100 ms = 80 requests/s)
behind one worker; an open-loop Poisson load of ``factor`` x capacity for ``duration_s``,
10% high priority. Low-priority requests pile up in the queue (and, past their deadline,
are answered ``deadline_exceeded``); a high-priority request should only wait for the next
free slot. Reports per-class latency, its evolution over the run (the plot), and the
backend's observed maximum concurrency and utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

from hutch_bench.report import latency_series
from hutch_bench.scenarios.common import (
    BackendLoad,
    Target,
    format_targets,
    print_lines,
    run_backend_load,
    targets_report,
)

__all__ = ["OverloadOptions", "run"]


@dataclass(frozen=True)
class OverloadOptions(BackendLoad):
    factor: float = 3.0
    duration_s: float = 30.0
    mix: str = "high=0.1,low=0.9"
    timeout_s: float = 30.0


async def run(amqp_url: str, options: OverloadOptions, out: TextIO) -> dict[str, Any]:
    print(f"overload: {options.describe()}", file=out)
    measured = await run_backend_load(amqp_url, options)
    run_, backend = measured.load, measured.backend
    report: dict[str, Any] = {
        "scenario": "overload",
        "title": f"Priority under {options.factor:g}x overload: "
                 f"{options.capacity} slots x {options.service_ms:g} ms",
        "config": options.config(),
        "service_ms": options.service_ms,
        **run_.summary,
        "priorities": run_.priorities,
        "backend": backend.figures(),
        "series": latency_series(run_.records, list(run_.priorities)),
    }
    high = run_.summary["classes"].get("high")
    targets = []
    if high is not None:
        p99 = high["latency_ms"]["p99"]
        targets = [
            Target("high-priority p99 end-to-end < 250 ms",
                   "no answer" if p99 is None else f"{p99:.1f} ms",
                   p99 is not None and p99 < 250),
            Target("zero high-priority errors", f"{high['error_count']} errors of "
                   f"{high['sent']}", high["error_count"] == 0 and high["sent"] > 0),
        ]
    targets.append(measured.cap_target(options.capacity))
    report["targets"] = targets_report(targets)
    print_lines(run_.table(), out)
    print(backend.line(options.capacity), file=out)
    print_lines(["targets:", *format_targets(targets)], out)
    return report
