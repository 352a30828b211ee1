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

__all__ = ["GlobalCapOptions", "run"]


@dataclass(frozen=True)
class GlobalCapOptions:
    workers: int = 3
    capacity: int = 8
    service_ms: float = 100.0
    factor: float = 2.0
    duration_s: float = 20.0
    timeout_s: float = 60.0
    seed: int = 1
    progress: bool = False


async def run(amqp_url: str, options: GlobalCapOptions, out: TextIO) -> dict[str, Any]:
    capacity_rps = options.capacity * 1000 / options.service_ms
    rate = options.factor * capacity_rps
    print(f"globalcap: {options.workers} worker processes, one backend of "
          f"{options.capacity} slots x {options.service_ms:g} ms ({capacity_rps:g} req/s), "
          f"offered {rate:g} req/s for {options.duration_s:g} s", file=out)
    async with Stack(amqp_url) as stack:
        mock = await stack.mock(capacity=options.capacity, latency_ms=options.service_ms)
        settings = await start_hutch(stack, mock, capacity=options.capacity,
                                     workers=options.workers, max_queue_length=1_000_000)
        async with hutch_clients(stack, settings, 1) as clients:
            run_, backend = await loaded_backend(
                mock, clients, rate=rate, duration_s=options.duration_s,
                timeout_s=options.timeout_s, seed=options.seed, progress=options.progress)
        alive = sum(child.process.returncode is None for child in stack.children)
    report: dict[str, Any] = {
        "scenario": "globalcap",
        "title": f"Global cap: {options.workers} workers, one backend of {options.capacity}",
        "config": {**options.__dict__, "offered_rps": rate, "capacity_rps": capacity_rps},
        **run_.summary,
        "priorities": run_.priorities,
        "backend": backend.figures(),
        "processes_alive_at_end": alive,
    }
    peak, busy = backend.stats["max_in_flight"], backend.utilisation
    targets = [
        Target(f"backend never sees more than {options.capacity} in service",
               f"max in flight {peak}", peak <= options.capacity),
        Target("utilisation >= 95%", f"{busy:.1%}", busy >= 0.95),
    ]
    report["targets"] = targets_report(targets)
    print_lines(run_.table(), out)
    print(backend.line(options.capacity), file=out)
    print_lines(["targets:", *format_targets(targets)], out)
    return report
