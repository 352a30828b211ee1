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

from pipeline.bench.report import latency_series
from pipeline.bench.scenarios.common import (
    Target,
    format_targets,
    hutch_clients,
    loaded_backend,
    print_lines,
    start_hutch,
    targets_report,
)
from pipeline.bench.stack import Stack

__all__ = ["OverloadOptions", "run"]


@dataclass(frozen=True)
class OverloadOptions:
    capacity: int = 8
    service_ms: float = 100.0
    factor: float = 3.0
    duration_s: float = 30.0
    mix: str = "high=0.1,low=0.9"
    timeout_s: float = 30.0
    connections: int = 1
    seed: int = 1
    progress: bool = False

    @property
    def capacity_rps(self) -> float:
        return self.capacity * 1000 / self.service_ms


async def run(amqp_url: str, options: OverloadOptions, out: TextIO) -> dict[str, Any]:
    rate = options.factor * options.capacity_rps
    print(f"overload: mock {options.capacity} slots x {options.service_ms:g} ms "
          f"({options.capacity_rps:g} req/s), offered {rate:g} req/s ({options.factor:g}x) "
          f"for {options.duration_s:g} s, mix {options.mix}, timeout {options.timeout_s:g} s",
          file=out)
    async with Stack(amqp_url) as stack:
        mock = await stack.mock(capacity=options.capacity, latency_ms=options.service_ms)
        settings = await start_hutch(stack, mock, capacity=options.capacity)
        async with hutch_clients(stack, settings, options.connections) as clients:
            run_, backend = await loaded_backend(
                mock, clients, rate=rate, duration_s=options.duration_s, mix=options.mix,
                timeout_s=options.timeout_s, seed=options.seed, progress=options.progress)
    classes = list(run_.priorities)
    report: dict[str, Any] = {
        "scenario": "overload",
        "title": f"Priority under {options.factor:g}x overload: "
                 f"{options.capacity} slots x {options.service_ms:g} ms",
        "config": {**options.__dict__, "offered_rps": rate,
                   "capacity_rps": options.capacity_rps},
        "service_ms": options.service_ms,
        **run_.summary,
        "priorities": run_.priorities,
        "backend": backend.figures(),
        "series": latency_series(run_.records, classes),
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
    peak = backend.stats["max_in_flight"]
    targets.append(Target(f"backend never above {options.capacity} in service",
                          f"max in flight {peak}", peak <= options.capacity))
    report["targets"] = targets_report(targets)
    print_lines(run_.table(), out)
    print(backend.line(options.capacity), file=out)
    print_lines(["targets:", *format_targets(targets)], out)
    return report
