"""The benchmark scenarios of ``hutch bench scenario NAME``: one module each.

- :mod:`~pipeline.bench.scenarios.overhead`: direct call vs minimal aio-pika RPC vs Hutch;
- :mod:`~pipeline.bench.scenarios.overload`: priority under 3x overload;
- :mod:`~pipeline.bench.scenarios.globalcap`: one backend's cap across 3 worker processes;
- :mod:`~pipeline.bench.scenarios.backlog`: 100,000 queued requests drained by one worker.

Each has an options dataclass (its defaults are issue 5's measurements; every field is a
command-line option) and a ``quick`` preset: the same code on a tiny load, for the smoke
tests and a first look.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO

from pipeline.bench.scenarios import backlog, globalcap, overhead, overload

__all__ = ["SCENARIOS", "Scenario"]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    options: type[Any]
    run: Callable[[str, Any, TextIO], Awaitable[dict[str, Any]]]
    quick: dict[str, Any]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("overhead", "direct HTTP vs a minimal aio-pika RPC vs Hutch: added latency, "
             "max throughput", overhead.OverheadOptions, overhead.run,
             {"light_rps": 20, "light_s": 1, "warmup_s": 0.5, "rates": (40,), "step_s": 1}),
    Scenario("overload", "3x the backend's capacity, 10% high priority: latency per class",
             overload.OverloadOptions, overload.run,
             {"duration_s": 3, "timeout_s": 5}),
    Scenario("globalcap", "3 worker processes, one backend of 8: max concurrency, "
             "utilisation", globalcap.GlobalCapOptions, globalcap.run,
             {"duration_s": 3, "timeout_s": 10}),
    Scenario("backlog", "100,000 requests queued, then drained: drain rate, worker RSS",
             backlog.BacklogOptions, backlog.run, {"requests": 300}),
)}
