"""The backend's concurrency over a partition: sampled, then cut into the run's phases.

The mock counts its exact peak (``max_concurrency``) but not when it happened, so a
sampler reads ``in_service`` from ``/stats`` every ``interval_s``, and
the phases (before the partition, during it, after the heal, after the operator's repair)
each get their peak and how long the backend held more than its cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hutch_bench.stack import MockProcess

__all__ = ["Phase", "Sample", "Sampler", "phase_figures"]


@dataclass(frozen=True)
class Sample:
    t_s: float
    in_service: int


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float
    end_s: float


@dataclass
class Sampler:
    """Reads the mock's ``/stats`` until stopped; ``t_s`` counts from :meth:`start`."""

    mock: MockProcess
    interval_s: float = 0.1
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _origin: float = 0.0

    def start(self, origin: float) -> None:
        self._origin = origin
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(Exception):  # a busy machine: the next sample will do
                stats = await self.mock.stats()
                self.samples.append(Sample(loop.time() - self._origin,
                                           int(stats["in_service"])))
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def phase_figures(samples: Sequence[Sample], phases: Sequence[Phase], cap: int
                  ) -> list[dict[str, Any]]:
    """Per phase: the highest sampled concurrency, the seconds spent above ``cap`` (and
    below it: slots lost while a backlog waits, in a saturating load), and
    the first and last samples above it (seconds from the run's start). The exact peak of
    the whole run is the mock's ``max_concurrency``."""
    rows = []
    for phase in phases:
        inside = [s for s in samples if phase.start_s <= s.t_s < phase.end_s]
        pairs = list(itertools.pairwise(inside))
        over = [(a, b) for a, b in pairs if a.in_service > cap]
        under = [(a, b) for a, b in pairs if a.in_service < cap]
        above = [s.t_s for s in inside if s.in_service > cap]
        rows.append({
            "phase": phase.name, "from_s": round(phase.start_s, 2),
            "to_s": round(phase.end_s, 2),
            "max_sampled": max((s.in_service for s in inside), default=0),
            "over_cap_s": round(sum(b.t_s - a.t_s for a, b in over), 2),
            "below_cap_s": round(sum(b.t_s - a.t_s for a, b in under), 2),
            "first_over_cap_s": round(above[0], 2) if above else None,
            "last_over_cap_s": round(above[-1], 2) if above else None,
        })
    return rows
