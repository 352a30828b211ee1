"""One case of the ``partition`` scenario: a pool type, a partition handling mode, a load.

Layout on the three-node cluster ``c1, c2, c3``: the pool's topology, the client and
worker B on ``c1`` (the majority side, ``c1 + c2``); worker A on ``c3``, the node that
gets isolated. Worker A starts first and holds the backend's lease (an exclusive queue,
on ``c3``); worker B waits for it. One backend, ``cap`` slots, served by a mock that counts
how many requests it serves at once (its capacity is 4 x cap, so only Hutch limits it).

A load of ``load`` x the backend's capacity keeps a backlog. ``partition_at_s`` into it,
``c3`` is cut from ``c1`` and ``c2`` (:mod:`~hutch_bench.scenarios.partition_net`) for
``partition_s``, then healed; ``after_heal_s`` later, under ``ignore``, the operator's
repair (``stop_app``/``start_app`` of ``c3``, what RabbitMQ's docs prescribe for the side
not trusted). The load goes on ``tail_s`` more, then every request is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from hutch_bench.cluster_nodes import BenchNode
from hutch_bench.loadgen import LoadPlan, PriorityClass, Progress, run_load, schedule
from hutch_bench.report import summarize
from hutch_bench.scenarios.common import MODEL, hutch_clients
from hutch_bench.scenarios.partition_net import (
    heal,
    isolate,
    partitions,
    rabbit_running,
    restart_app,
    set_handling,
)
from hutch_bench.scenarios.partition_options import PartitionOptions
from hutch_bench.scenarios.partition_watch import Phase, Sampler, phase_figures
from hutch_bench.stack import Child, Stack
from pipeline.settings import Settings, load_settings

__all__ = ["FaultLog", "run_case"]

_NORMAL = PriorityClass("normal", 5, 1.0)
#: How often the fault script asks the isolated node how it is (one rabbitmqctl each).
_POLL_S = 0.5
#: How long a node paused or restarted by RabbitMQ may take to run again after the heal.
_RECOVERY_S = 120.0


@dataclass
class FaultLog:
    """What the fault script did and saw, in seconds from the load's start (a command's
    time is when it was issued: rabbitmqctl takes a second or more to start)."""

    partitioned_s: float | None = None
    healed_s: float | None = None
    #: ``ignore``: the operator's stop_app of the isolated node, and its start_app done.
    repair_started_s: float | None = None
    repaired_s: float | None = None
    #: The isolated node's RabbitMQ seen stopped (``pause_minority`` pausing it).
    paused_seen_s: float | None = None
    #: ... seen stopped after the heal (``autoheal`` restarting the losing side;
    #: ``pause_minority``: still paused).
    stopped_after_heal_s: float | None = None
    #: ... and seen running again after the heal, having been seen stopped.
    resumed_s: float | None = None
    #: The partition as each side's RabbitMQ recorded it (the last non-empty list seen).
    partitions: dict[str, list[str]] = field(default_factory=dict)


class _Fault:
    """The partition, the heal and (``ignore``) the repair, on the load's clock."""

    def __init__(self, nodes: list[BenchNode], mode: str, timing: PartitionOptions) -> None:
        self.majority, self.minority = nodes[:2], nodes[2]
        self.mode, self.timing = mode, timing
        self.log = FaultLog()
        self.task: asyncio.Task[None] | None = None
        self.origin = 0.0

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.origin

    async def arm(self) -> None:
        self.origin = asyncio.get_running_loop().time()
        self.task = asyncio.create_task(self._script())

    async def _until(self, moment_s: float) -> None:
        await asyncio.sleep(max(0.0, moment_s - self.now()))

    async def _script(self) -> None:
        t = self.timing
        await self._until(t.partition_at_s)
        self.log.partitioned_s = self.now()  # (the eval lands a CLI start-up later)
        await isolate(self.minority, self.majority)
        while self.now() < self.log.partitioned_s + t.partition_s:
            if self.log.paused_seen_s is None and not await rabbit_running(self.minority):
                self.log.paused_seen_s = self.now()
            await asyncio.sleep(_POLL_S)
        self.log.healed_s = self.now()
        await heal(self.minority, self.majority)
        while self.now() < self.log.healed_s + t.after_heal_s:
            await self._look()
            await asyncio.sleep(_POLL_S)
        if self.mode == "ignore":
            self.log.repair_started_s = self.now()
            await restart_app(self.minority)
            self.log.repaired_s = self.now()
            return
        # pause_minority and autoheal start the node again by themselves: until then.
        give_up = self.now() + _RECOVERY_S
        while self.log.resumed_s is None and self.now() < give_up:
            await asyncio.sleep(_POLL_S)
            await self._look()

    async def _look(self) -> None:
        running = await rabbit_running(self.minority)
        if not running and self.log.stopped_after_heal_s is None:
            self.log.stopped_after_heal_s = self.now()
        stopped = self.log.paused_seen_s is not None or self.log.stopped_after_heal_s
        if running and stopped and self.log.resumed_s is None:
            self.log.resumed_s = self.now()
        sides = {"majority": self.majority[0], **({"minority": self.minority} if running
                                                  else {})}
        for side, node in sides.items():
            with contextlib.suppress(Exception):  # a node restarting its app
                if found := await partitions(node):
                    self.log.partitions[side] = found

    async def done(self) -> FaultLog:
        if self.task is not None:
            await self.task
        return self.log

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _settings(stack: Stack, nodes: list[BenchNode], order: list[int], queue_type: str,
              mock_url: str, timing: PartitionOptions) -> Settings:
    return load_settings(
        amqp_url=[nodes[i].amqp_url for i in order],
        management_url=nodes[order[0]].management_url, prefix=stack.prefix,
        shutdown_grace_s=5, heartbeat_s=5, lease_retry_s=timing.lease_retry_s,
        reply_queue_type=queue_type,
        pools=[{"name": "bench", "models": [MODEL], "queue_type": queue_type,
                "max_queue_length": 100_000,
                "backends": [{"name": f"{stack.prefix}-b", "url": mock_url,
                              "max_concurrency": timing.cap, "timeout_s": 60}]}])


def _leases(worker: Child) -> int:
    """How often ``worker`` took the backend's lease (its ``lease.acquired`` lines)."""
    return worker.log_path.read_text(errors="replace").count("lease.acquired")


async def _ready(nodes: list[BenchNode]) -> None:
    """A cluster fit for the next case: the isolated node's RabbitMQ runs, no partition
    recorded anywhere (a leftover one is repaired as under ``ignore``)."""
    for _ in range(120):
        if await rabbit_running(nodes[2]):
            break
        await asyncio.sleep(1)
    if any([await partitions(node) for node in nodes]):
        await restart_app(nodes[2])


async def run_case(nodes: list[BenchNode], queue_type: str, mode: str, timing: PartitionOptions
                   ) -> dict[str, Any]:
    """One case, measured; the cluster is left whole and unpartitioned."""
    await set_handling(nodes, mode)
    async with Stack(nodes[0].amqp_url) as stack:
        mock = await stack.mock(capacity=4 * timing.cap, latency_ms=timing.service_ms)
        client_settings = _settings(stack, nodes, [0, 1, 2], queue_type, mock.url, timing)
        await stack.apply(client_settings)
        worker_a = await stack.worker(
            _settings(stack, nodes, [2, 0, 1], queue_type, mock.url, timing), log_level="INFO")
        await stack.wait_for_consumers(stack.names.work_queue("bench"), 1, timeout_s=60)
        worker_b = await stack.worker(client_settings, log_level="INFO")
        await stack.wait_for_consumers(stack.names.triage_queue, 2, timeout_s=60)
        async with hutch_clients(stack, client_settings, 1) as clients:
            await mock.reset()
            times = schedule(timing.rate, timing.load_s, arrival="poisson", seed=timing.seed)
            plan = LoadPlan(times=times, classes=[_NORMAL] * len(times),
                            models=[MODEL] * len(times), timeout_s=timing.timeout_s)
            fault, sampler = _Fault(nodes, mode, timing), Sampler(mock, timing.sample_s)

            async def start() -> None:
                await fault.arm()
                sampler.start(fault.origin)

            try:
                records, elapsed = await run_load(
                    clients, plan, on_start=start,
                    progress=Progress(len(times), timing.load_s, enabled=timing.progress))
                log = await fault.done()
            finally:
                fault.cancel()
                await sampler.stop()
            stats = await mock.stats()
            dropped = sum(c.dropped_replies for c in clients)
        leases = {"worker_a_on_isolated": _leases(worker_a), "worker_b_on_majority":
                  _leases(worker_b)}
    await _ready(nodes)
    summary = summarize(records, elapsed, [_NORMAL.name])["total"]
    end = max((s.t_s for s in sampler.samples), default=elapsed)
    marks = [("before", 0.0), ("partition", log.partitioned_s), ("healed", log.healed_s),
             ("repair", log.repair_started_s), ("end", end)]
    known = [(name, at) for name, at in marks if at is not None]
    phases = [Phase(name, start, stop) for (name, start), (_, stop)
              in itertools.pairwise(known) if stop > start]
    twice = sorted(i for i, n in Counter(stats["served_ids"]).items() if n > 1)
    return {
        "queue_type": queue_type, "mode": mode, "offered_rps": round(timing.rate, 2),
        "sent": summary["sent"], "answered": summary["answered"], "errors": summary["errors"],
        "latency_ms": summary["latency_ms"],
        "duplicate_replies_dropped": dropped,
        "served": stats["served"], "aborted": stats["aborted"],
        "served_twice": len(twice),
        "max_concurrency": stats["max_concurrency"],
        "phases": phase_figures(sampler.samples, phases, timing.cap),
        "leases_taken": leases,
        "fault": asdict(log),
        "timeline": [[round(s.t_s, 2), s.in_service] for s in sampler.samples],
    }
