"""One phase of the ``fairness`` scenario: a mock, a pool with a scheduling policy, its
workers, a multi-tenant load, and the backend watched while it runs.

Each phase starts from nothing (its own :class:`~hutch_bench.stack.Stack`), so the fair
run and the FIFO run of a phase see the same load (same seeds) on the same kind of stack,
one after the other. The mock's ``/stats`` is sampled every quarter second, so the
utilisation can be read over any part of the run; a worker can be killed (SIGKILL)
mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hutch_bench.scenarios.common import apply_hutch
from hutch_bench.scenarios.tenantload import (
    TenantLoad,
    TenantRecord,
    plan_records,
    run_tenants,
)
from hutch_bench.stack import Child, MockProcess, Stack
from pipeline.broker.connection import connect_url
from pipeline.client.client import HutchClient

__all__ = ["BackendSample", "Phase", "PhaseRun", "run_phase", "utilisation_between"]

_SAMPLE_EVERY_S = 0.25


@dataclass(frozen=True)
class Phase:
    """What a phase runs: the backend, the pool's scheduling, the tenants' loads."""

    name: str
    loads: tuple[TenantLoad, ...]
    duration_s: float
    capacity: int
    #: The mock's options beyond capacity (its pace, jitter, reply length, seed).
    mock: tuple[str, ...]
    latency_ms: float = 0.0
    stream: bool = True
    timeout_s: float = 15.0
    #: Tenant settings (weights) and the pool's bands, beside ``policy``.
    tenants: tuple[tuple[str, float], ...] = ()
    bands: tuple[tuple[str, int], ...] = ()
    workers: int = 1
    #: Kill (SIGKILL) the worker holding the backend this many seconds into the load.
    kill_at_s: float | None = None
    seed: int = 1


@dataclass(frozen=True)
class BackendSample:
    t_s: float
    busy_slot_s: float
    elapsed_s: float
    served: int
    capacity: int
    #: Requests ready in the pool's queue (not yet delivered to a worker).
    intake: int = 0


@dataclass
class PhaseRun:
    """What a phase measured under one policy."""

    policy: str
    records: list[TenantRecord]
    elapsed_s: float
    samples: list[BackendSample] = field(default_factory=list)
    max_in_flight: int = 0
    served: int = 0
    #: Finals the client dropped as duplicates (or late, after it gave up).
    dropped_replies: int = 0
    killed_pid: int | None = None
    #: CPU seconds (user + system) the workers used during the load (None with a kill).
    worker_cpu_s: float | None = None

    def of(self, tenant: str) -> list[TenantRecord]:
        return [r for r in self.records if r.tenant == tenant]

    def utilisation(self, from_s: float, to_s: float) -> float | None:
        return utilisation_between(self.samples, from_s, to_s)


def utilisation_between(samples: Sequence[BackendSample], from_s: float,
                        to_s: float) -> float | None:
    """Busy over available slot-seconds between the samples nearest two load times."""
    if len(samples) < 2 or to_s <= from_s:
        return None
    a = min(samples, key=lambda s: abs(s.t_s - from_s))
    b = min(samples, key=lambda s: abs(s.t_s - to_s))
    span = b.elapsed_s - a.elapsed_s
    return (b.busy_slot_s - a.busy_slot_s) / (b.capacity * span) if span > 0 else None


async def _sample(stack: Stack, mock: MockProcess, started: float,
                  out: list[BackendSample], stop: asyncio.Event) -> None:
    """The mock's counters and the depth of the pool's queue (the intake), until
    ``stop`` (not cancelled: a cancelled queue declaration closes its channel noisily)."""
    loop = asyncio.get_running_loop()
    connection = await connect_url(stack.amqp_url, name="hutch bench fairness")
    async with connection:
        channel = await connection.channel()
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a slow read skips a sample
                stats = await mock.stats()
                intake = await channel.declare_queue(stack.names.work_queue("bench"),
                                                     passive=True)
                out.append(BackendSample(
                    loop.time() - started, stats["busy_slot_s"], stats["elapsed_s"],
                    stats["served"], stats["capacity"],
                    intake.declaration_result.message_count or 0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _SAMPLE_EVERY_S)


def _cpu_s(children: Sequence[Child]) -> float | None:
    """User plus system CPU seconds of ``children`` (Linux ``/proc``; None elsewhere)."""
    total = 0.0
    for child in children:
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _kill_later(worker: Child, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    worker.process.kill()


def _pool(phase: Phase, policy: str) -> dict[str, Any]:
    scheduling: dict[str, Any] = {"policy": policy}
    if phase.bands:
        scheduling["bands"] = [{"name": n, "min_priority": m} for n, m in phase.bands]
    return {"scheduling": scheduling, "max_queue_length": 1_000_000}


async def _workers(stack: Stack, phase: Phase, settings: Any) -> list[Child]:
    """The first worker takes the backend's lease (it is the one a kill hits); the
    others stand by, consuming the triage queue."""
    first = await stack.worker(settings)
    await stack.wait_for_consumers(stack.names.work_queue("bench"), 1)
    others = [await stack.worker(settings) for _ in range(phase.workers - 1)]
    await stack.wait_for_consumers(stack.names.triage_queue, phase.workers)
    return [first, *others]


async def run_phase(amqp_url: str, phase: Phase, policy: str) -> PhaseRun:
    """Run ``phase`` under ``policy`` (``fair`` or ``fifo``) on a stack of its own."""
    records = plan_records(phase.loads, phase.duration_s, phase.seed)
    async with Stack(amqp_url) as stack:
        mock = await stack.mock(capacity=phase.capacity, latency_ms=phase.latency_ms,
                                extra=phase.mock)
        tenants = {name: {"weight": weight} for name, weight in phase.tenants}
        settings = await apply_hutch(stack, mock, capacity=phase.capacity,
                                     overrides={"tenants": tenants}, **_pool(phase, policy))
        workers = await _workers(stack, phase, settings)
        run = PhaseRun(policy, records, 0.0)
        # A reply queue of the workers' own user: a publisher that vouches for a tenant
        # (x-hutch-user) may only be answered in one of its own reply queues.
        client_id = f"{settings.amqp_user}.{stack.prefix}-fair"
        stack.client_ids.append(client_id)
        async with HutchClient.from_settings(settings, client_id=client_id) as client:
            await mock.reset()
            started = asyncio.get_running_loop().time()
            cpu_before = _cpu_s(workers)
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample(stack, mock, started, run.samples, stop))
            helpers: list[asyncio.Task[None]] = []
            if phase.kill_at_s is not None:
                helpers.append(asyncio.create_task(_kill_later(workers[0], phase.kill_at_s)))
                run.killed_pid = workers[0].pid
            try:
                run.elapsed_s = await run_tenants(client, records, stream=phase.stream,
                                                  timeout_s=phase.timeout_s)
            finally:
                stop.set()
                for task in helpers:
                    task.cancel()
                await asyncio.gather(sampler, *helpers, return_exceptions=True)
            stats = await mock.stats()
            run.max_in_flight, run.served = stats["max_in_flight"], stats["served"]
            run.dropped_replies = client.dropped_replies
            cpu_after = _cpu_s(workers)
            if phase.kill_at_s is None and cpu_before is not None and cpu_after is not None:
                run.worker_cpu_s = cpu_after - cpu_before
    return run
