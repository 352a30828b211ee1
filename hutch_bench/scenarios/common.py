"""What every scenario shares: the one-backend pool, the open-loop run, targets.

A scenario is a function ``run(amqp_url, options, out) -> report``: it starts what it
needs in a :class:`~hutch_bench.stack.Stack`, measures, prints its tables and targets
to ``out``, and returns every figure as a JSON-able dict (what ``--json`` writes and
:mod:`hutch_bench.plots` draws).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from hutch_bench.loadgen import (
    LoadClient,
    LoadPlan,
    Progress,
    assign_classes,
    parse_priority_mix,
    run_load,
    schedule,
)
from hutch_bench.report import RequestRecord, format_table, summarize
from hutch_bench.stack import Child, MockProcess, Stack
from pipeline.client.client import HutchClient
from pipeline.settings import Settings

__all__ = [
    "MODEL",
    "BackendLoad",
    "BackendLoadRun",
    "BackendWindow",
    "LoadRun",
    "LoadShape",
    "Target",
    "apply_hutch",
    "format_targets",
    "hutch_clients",
    "loaded_backend",
    "open_loop",
    "print_lines",
    "run_backend_load",
    "sample_at",
    "start_hutch",
    "start_workers",
    "targets_report",
    "utilisation",
]

#: The model every scenario requests (the mock answers any configured model alike).
MODEL = "mock-small"


@dataclass(frozen=True)
class Target:
    """One of issue 5's targets: what was measured and whether it was met."""

    name: str
    measured: str
    met: bool


def format_targets(targets: Sequence[Target]) -> list[str]:
    width = max(len(t.name) for t in targets)
    return [f"  {'MET    ' if t.met else 'NOT MET'}  {t.name.ljust(width)}  {t.measured}"
            for t in targets]


def targets_report(targets: Sequence[Target]) -> list[dict[str, Any]]:
    return [asdict(t) for t in targets]


async def apply_hutch(stack: Stack, mock: MockProcess, *, capacity: int,
                      overrides: dict[str, Any] | None = None, **pool: Any) -> Settings:
    """Apply a topology of one pool (``bench``) with one backend, ``mock``;
    ``overrides``: top-level settings (a streaming scenario's coalescing)."""
    settings = stack.settings(
        pools=[{"name": "bench", "models": [MODEL], **pool, "backends": [
            {"name": f"{stack.prefix}-mock", "url": mock.url, "max_concurrency": capacity,
             "timeout_s": 60}]}],
        **{"shutdown_grace_s": 10, **(overrides or {})})
    await stack.apply(settings)
    return settings


async def start_workers(stack: Stack, settings: Settings, count: int = 1, *,
                        loop: str = "asyncio") -> list[Child]:
    """Start ``count`` worker processes; return once they all consume (each consumes the
    triage queue) and one of them holds the backend's lease (it consumes the pool's)."""
    workers = [await stack.worker(settings, loop=loop) for _ in range(count)]
    await stack.wait_for_consumers(stack.names.triage_queue, count)
    await stack.wait_for_consumers(stack.names.work_queue("bench"), 1)
    return workers


async def start_hutch(stack: Stack, mock: MockProcess, *, capacity: int, workers: int = 1,
                      loop: str = "asyncio", **pool: Any) -> Settings:
    """:func:`apply_hutch` then :func:`start_workers`."""
    settings = await apply_hutch(stack, mock, capacity=capacity, **pool)
    await start_workers(stack, settings, workers, loop=loop)
    return settings


@contextlib.asynccontextmanager
async def hutch_clients(stack: Stack, settings: Settings, count: int
                        ) -> AsyncIterator[list[HutchClient]]:
    """``count`` connected clients; the stack deletes their reply queues on close."""
    async with contextlib.AsyncExitStack() as opened:
        clients = []
        for i in range(count):
            client_id = f"{stack.prefix}-bench-{i}"
            stack.client_ids.append(client_id)
            clients.append(await opened.enter_async_context(
                HutchClient.from_settings(settings, client_id=client_id)))
        yield clients


@dataclass
class LoadRun:
    """One open-loop run: its records, elapsed time and summary."""

    records: list[RequestRecord]
    elapsed_s: float
    summary: dict[str, Any]
    priorities: dict[str, int]

    def table(self) -> list[str]:
        return format_table(self.summary, self.priorities)


@dataclass(frozen=True)
class LoadShape:
    """How an open-loop load sends: rate, duration, priority mix, deadlines, arrivals."""

    rate: float
    duration_s: float
    mix: str = "normal=1"
    timeout_s: float = 60.0
    arrival: str = "poisson"
    seed: int | None = 1
    progress: bool = False


async def open_loop(clients: Sequence[LoadClient], shape: LoadShape) -> LoadRun:
    """Run one open-loop load on ``clients`` and summarise it."""
    classes = parse_priority_mix(shape.mix)
    times = schedule(shape.rate, shape.duration_s, arrival=shape.arrival, seed=shape.seed)
    plan = LoadPlan(times=times, classes=assign_classes(len(times), classes, seed=shape.seed),
                    models=[MODEL] * len(times), timeout_s=shape.timeout_s)
    bar = Progress(len(times), shape.duration_s, enabled=shape.progress)
    records, elapsed = await run_load(clients, plan, progress=bar)
    return LoadRun(records, elapsed, summarize(records, elapsed, [c.name for c in classes]),
                   {c.name: c.priority for c in classes})


@dataclass
class BackendWindow:
    """What the mock saw while a load ran: its final ``/stats`` and its utilisation over
    the loaded part (from ``warm_s`` into the run to the end of sending)."""

    stats: dict[str, Any]
    utilisation: float
    window_s: float

    def line(self, capacity: int) -> str:
        return (f"backend: max in flight {self.stats['max_in_flight']} of {capacity}, "
                f"utilisation {self.utilisation:.1%} over {self.window_s:.1f} s, "
                f"served {self.stats['served']}")

    def figures(self) -> dict[str, Any]:
        return {key: self.stats[key] for key in (
            "max_concurrency", "max_in_flight", "served", "disconnected")} | {
            "utilisation": self.utilisation, "window_s": self.window_s}


async def loaded_backend(mock: MockProcess, clients: Sequence[LoadClient], shape: LoadShape
                         ) -> tuple[LoadRun, BackendWindow]:
    """:func:`open_loop` on a freshly reset mock, reading its stats around the run.

    The first second (a quarter of short runs) is left out of the utilisation: the queue
    is still filling. The backlog keeps the backend busy until sending ends."""
    await mock.reset()
    warm_s = min(1.0, shape.duration_s / 4)
    before = asyncio.create_task(sample_at(mock, warm_s))
    after = asyncio.create_task(sample_at(mock, shape.duration_s))
    run_ = await open_loop(clients, shape)
    first, last = await before, await after
    final = await mock.stats()
    return run_, BackendWindow(final, utilisation(first, last),
                               last["elapsed_s"] - first["elapsed_s"])


@dataclass(frozen=True)
class BackendLoad:
    """An open-loop load of ``factor`` x the capacity of one mock backend (``capacity``
    slots x ``service_ms``) for ``duration_s``, served by ``workers`` worker processes:
    the common shape of the ``overload`` and ``globalcap`` scenarios, which subclass it
    with their own defaults."""

    capacity: int = 8
    service_ms: float = 100.0
    factor: float = 2.0
    duration_s: float = 20.0
    mix: str = "normal=1"
    timeout_s: float = 60.0
    workers: int = 1
    connections: int = 1
    seed: int = 1
    progress: bool = False

    @property
    def capacity_rps(self) -> float:
        return self.capacity * 1000 / self.service_ms

    @property
    def rate(self) -> float:
        return self.factor * self.capacity_rps

    def describe(self) -> str:
        return (f"{self.workers} worker process(es), one backend of {self.capacity} slots x "
                f"{self.service_ms:g} ms ({self.capacity_rps:g} req/s), offered "
                f"{self.rate:g} req/s ({self.factor:g}x) for {self.duration_s:g} s, mix "
                f"{self.mix}, timeout {self.timeout_s:g} s")

    def config(self) -> dict[str, Any]:
        return {**asdict(self), "offered_rps": self.rate, "capacity_rps": self.capacity_rps}

    def shape(self) -> LoadShape:
        """The open-loop load these options offer."""
        return LoadShape(rate=self.rate, duration_s=self.duration_s, mix=self.mix,
                         timeout_s=self.timeout_s, seed=self.seed, progress=self.progress)


@dataclass
class BackendLoadRun:
    """What :func:`run_backend_load` measured."""

    load: LoadRun
    backend: BackendWindow
    #: Child processes (workers and mock) still running at the end: none crashed.
    alive_at_end: int

    def cap_target(self, capacity: int) -> Target:
        peak = self.backend.stats["max_in_flight"]
        return Target(f"backend never sees more than {capacity} in service",
                      f"max in flight {peak}", peak <= capacity)


async def run_backend_load(amqp_url: str, options: BackendLoad,
                           **pool: Any) -> BackendLoadRun:
    """Start the mock and the workers (``pool`` overrides pool settings), run the load,
    and read the backend around it."""
    async with Stack(amqp_url) as stack:
        mock = await stack.mock(capacity=options.capacity, latency_ms=options.service_ms)
        settings = await start_hutch(stack, mock, capacity=options.capacity,
                                     workers=options.workers, **pool)
        async with hutch_clients(stack, settings, options.connections) as clients:
            run_, backend = await loaded_backend(mock, clients, options.shape())
        alive = sum(child.process.returncode is None for child in stack.children)
    return BackendLoadRun(run_, backend, alive)


def utilisation(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Busy slot-seconds over available slot-seconds between two mock ``/stats`` reads."""
    span = after["elapsed_s"] - before["elapsed_s"]
    busy = after["busy_slot_s"] - before["busy_slot_s"]
    return busy / (after["capacity"] * span) if span > 0 else 0.0


async def sample_at(mock: MockProcess, delay_s: float) -> dict[str, Any]:
    """The mock's ``/stats`` ``delay_s`` from now (run beside a load)."""
    await asyncio.sleep(delay_s)
    return await mock.stats()


def print_lines(lines: Sequence[str], out: TextIO) -> None:
    for line in lines:
        print(line, file=out)
