"""Scenario ``globalcap``: does a backend's cap hold across worker replicas, and is the
backend kept busy?

Three worker processes serve one backend of ``capacity`` slots, each configured with that
``max_concurrency``; an open-loop load of ``factor`` x capacity keeps it overloaded.
The mock counts what it really saw: the maximum in flight (must never exceed the cap,
whatever the replicas do) and its utilisation, busy slot-seconds over available
slot-seconds while the load lasts (a cap held by leaving slots idle would be cheap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

from hutch_bench.scenarios.common import (
    BackendLoad,
    Target,
    format_targets,
    print_lines,
    run_backend_load,
    targets_report,
)

__all__ = ["GlobalCapOptions", "run"]


@dataclass(frozen=True)
class GlobalCapOptions(BackendLoad):
    workers: int = 3


async def run(amqp_url: str, options: GlobalCapOptions, out: TextIO) -> dict[str, Any]:
    print(f"globalcap: {options.describe()}", file=out)
    measured = await run_backend_load(amqp_url, options, max_queue_length=1_000_000)
    run_, backend = measured.load, measured.backend
    report: dict[str, Any] = {
        "scenario": "globalcap",
        "title": f"Global cap: {options.workers} workers, one backend of {options.capacity}",
        "config": options.config(),
        **run_.summary,
        "priorities": run_.priorities,
        "backend": backend.figures(),
        "processes_alive_at_end": measured.alive_at_end,
    }
    busy = backend.utilisation
    targets = [measured.cap_target(options.capacity),
               Target("utilisation >= 95%", f"{busy:.1%}", busy >= 0.95)]
    report["targets"] = targets_report(targets)
    print_lines(run_.table(), out)
    print(backend.line(options.capacity), file=out)
    print_lines(["targets:", *format_targets(targets)], out)
    return report
