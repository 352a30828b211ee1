"""Scenario ``cluster``: what a replicated pool costs, and what a node loss does to it.

The same load on two deployments, in one run, on RabbitMQ nodes the scenario starts
itself (:mod:`hutch_bench.cluster_nodes`; the broker it was pointed at is not used,
since a node gets killed):

* ``classic``: a classic pool on a standalone node, workers and client connected to it
  (Hutch on one broker);
* ``quorum``: a quorum pool, with quorum reply queues, on a three-node cluster: worker 1
  connected to the node that leads the work queue, worker 2 and the client each to
  another node (every process lists every node, its own first).

Each gets the latency of a light load and a sweep of offered loads for its max sustained
throughput; quorum / classic is the figure to take away. Then failover, on the quorum
deployment: an open-loop load at ``failover_load`` x the quorum pool's max and,
``kill_at_s`` into it, kill -9 of the node leading the work queue. Reported: the time from
the kill to the next answer, to the first answer to a request sent after the kill, the
longest silence; checked: every request answered (the client drops duplicates), nothing
parked, each backend's cap held, the leader moved.

Everything shares one machine: three nodes on one box cost CPU that three machines would
not, so the ratio measured here is a floor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

from hutch_bench.cluster_nodes import BenchNode, BenchNodes, KillAt
from hutch_bench.loadgen import (
    LoadClient,
    LoadPlan,
    PriorityClass,
    Progress,
    run_load,
    schedule,
)
from hutch_bench.report import RequestRecord, distribution, summarize
from hutch_bench.scenarios.common import (
    MODEL,
    LoadRun,
    LoadShape,
    Target,
    format_targets,
    hutch_clients,
    open_loop,
    print_lines,
    targets_report,
)
from hutch_bench.stack import MockProcess, Stack
from pipeline.broker.connection import connect
from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import ConfigError, StackError
from pipeline.settings import Settings, load_settings

__all__ = ["ClusterOptions", "answer_timeline", "failover_times", "layout", "run"]

_NORMAL = PriorityClass("normal", 5, 1.0)


@dataclass(frozen=True)
class ClusterOptions:
    #: Mock backends of ``concurrency`` slots x ``service_ms``; one lease each, so as many
    #: worker processes consume the pool.
    backends: int = 2
    concurrency: int = 32
    service_ms: float = 5.0
    light_rps: float = 25.0
    light_s: float = 10.0
    warmup_s: float = 2.0
    rates: tuple[float, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1200,
                                 1500)
    step_s: float = 5.0
    #: The failover load, as a share of the quorum pool's max sustained throughput.
    failover_load: float = 0.5
    failover_s: float = 20.0
    kill_at_s: float = 8.0
    timeout_s: float = 60.0
    #: The quorum deployment's clients' reply queues (``quorum``: replies survive a node).
    reply_queue_type: str = "quorum"
    node_timeout_s: float = 150.0
    seed: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.kill_at_s >= self.failover_s:
            raise ConfigError(f"--kill-at-s {self.kill_at_s:g} must fall inside the "
                              f"failover load (--failover-s {self.failover_s:g})")
        if self.reply_queue_type not in ("classic", "quorum"):
            raise ConfigError(f"--reply-queue-type {self.reply_queue_type!r}: expected "
                              "classic or quorum")
        if not self.rates:
            raise ConfigError("--rates: give at least one rate")


def layout(leader: int, size: int, workers: int) -> tuple[list[list[int]], list[int]]:
    """The node order of each worker and of the client: worker 1 starts at the leader,
    worker 2 and the client at the other nodes (each lists every node, its own first)."""
    ring = [leader, *(i for i in range(size) if i != leader)]

    def starting(k: int) -> list[int]:
        return ring[k % size:] + ring[:k % size]

    return [starting(k) for k in range(workers)], starting(size - 1)


@dataclass
class Deployment:
    """One pool, its workers started: the settings the client uses, its mocks, and the
    node that leads its work queue."""

    name: str
    nodes: list[BenchNode]
    client: Settings
    mocks: list[MockProcess]
    leader: BenchNode

    @property
    def work_queue(self) -> str:
        return Names(self.client.prefix).work_queue("bench")


def _settings(stack: Stack, deployment: tuple[str, list[BenchNode]], order: list[int],
              mocks: Sequence[MockProcess], options: ClusterOptions) -> Settings:
    """A process's settings: every node, ``order[0]`` first."""
    name, nodes = deployment
    quorum = name == "quorum"
    return load_settings(
        amqp_url=[nodes[i].amqp_url for i in order],
        management_url=nodes[order[0]].management_url, prefix=stack.prefix,
        shutdown_grace_s=10, reply_queue_type=options.reply_queue_type if quorum else "classic",
        pools=[{"name": "bench", "models": [MODEL], "max_queue_length": 1_000_000,
                "queue_type": name, "backends": [
                    {"name": f"{stack.prefix}-b{i}", "url": mock.url,
                     "max_concurrency": options.concurrency, "timeout_s": 60}
                    for i, mock in enumerate(mocks, 1)]}])


async def _leader(settings: Settings, nodes: Sequence[BenchNode], queue: str) -> BenchNode:
    """The node leading ``queue`` (a classic queue's: the node it lives on)."""
    async with ManagementAPI.from_settings(settings) as api:
        info = await api.get_queue("/", queue) or {}
    nodename = info.get("leader") or info.get("node")
    for node in nodes:
        if node.nodename == nodename:
            return node
    raise StackError(f"queue {queue}: no leader among the nodes ({info.get('leader')!r})")


async def _deploy(stack: Stack, name: str, nodes: list[BenchNode],
                  options: ClusterOptions) -> Deployment:
    """Mocks, topology (declared through the first node), then the workers laid out
    around the work queue's leader; return once each consumes the pool's queue."""
    mocks = [await stack.mock(capacity=2 * options.concurrency, latency_ms=options.service_ms)
             for _ in range(options.backends)]
    first = _settings(stack, (name, nodes), list(range(len(nodes))), mocks, options)
    await apply_topology(first)
    names = Names(stack.prefix)
    leader = await _leader(first, nodes, names.work_queue("bench"))
    workers, client_order = layout(nodes.index(leader), len(nodes), options.backends)
    client = _settings(stack, (name, nodes), client_order, mocks, options)
    # Applied again (a no-op) through the client's node, which is never killed: the stack
    # deletes the topology through it at the end.
    await stack.apply(client)
    for order in workers:
        await stack.worker(_settings(stack, (name, nodes), order, mocks, options))
    await stack.wait_for_consumers(names.triage_queue, options.backends, timeout_s=60)
    await stack.wait_for_consumers(names.work_queue("bench"), options.backends, timeout_s=60)
    return Deployment(name, nodes, client, mocks, leader)


def _row(rate: float, run_: LoadRun) -> dict[str, Any]:
    total = run_.summary["total"]
    return {"offered_rps": rate, "sent": total["sent"], "answered": total["answered"],
            "errors": total["error_count"], "achieved_rps": total["throughput_rps"],
            "latency_ms": total["latency_ms"]}


async def _measure(name: str, clients: Sequence[LoadClient], options: ClusterOptions,
                   out: TextIO) -> dict[str, Any]:
    """Light-load latency, then rising offered loads until the pool saturates."""
    async def load(rate: float, duration_s: float) -> LoadRun:
        return await open_loop(clients, LoadShape(
            rate=rate, duration_s=duration_s, arrival="constant", timeout_s=options.timeout_s,
            seed=options.seed, progress=options.progress))

    await load(options.light_rps, options.warmup_s)  # connections, queue processes
    light = (await load(options.light_rps, options.light_s)).summary["total"]
    print(f"  {name:8s} light load {options.light_rps:g}/s: p50 "
          f"{light['latency_ms']['p50'] or 0:.2f} ms, p99 {light['latency_ms']['p99'] or 0:.2f}"
          f" ms, errors {light['error_count']}", file=out, flush=True)
    rows: list[dict[str, Any]] = []
    for rate in options.rates:
        rows.append(row := _row(rate, await load(rate, options.step_s)))
        print(f"  {name:8s} offered {rate:6g}/s  achieved {row['achieved_rps']:7.1f}/s  "
              f"errors {row['errors']}  p50 {row['latency_ms']['p50'] or 0:7.1f} ms  "
              f"p99 {row['latency_ms']['p99'] or 0:8.1f} ms", file=out, flush=True)
        if row["errors"] or row["achieved_rps"] < 0.9 * rate:
            break  # saturated: higher offers only grow the backlog
        await asyncio.sleep(0.5)
    best = max((r["achieved_rps"] for r in rows if not r["errors"]), default=0.0)
    return {"light_load": {"latency_ms": light["latency_ms"], "answered": light["answered"],
                           "errors": light["error_count"]},
            "sweep": rows, "max_sustained_rps": best}


def failover_times(records: Sequence[RequestRecord], killed_s: float) -> dict[str, Any]:
    """From the kill (seconds into the run): to the next answer, to the first answer to a
    request sent after it, and the longest time without an answer after it (ms)."""
    answered = [r for r in records if r.error is None and r.done_s is not None]
    after = sorted(r.done_s for r in answered if r.done_s is not None and r.done_s > killed_s)
    fresh = [r.done_s for r in answered
             if r.done_s is not None and r.sent_s is not None and r.sent_s > killed_s]
    gaps = [b - a for a, b in zip([killed_s, *after], after, strict=False)]
    return {"killed_at_s": killed_s,
            "next_answer_ms": (after[0] - killed_s) * 1000 if after else None,
            "first_new_answer_ms": (min(fresh) - killed_s) * 1000 if fresh else None,
            "longest_gap_ms": max(gaps) * 1000 if gaps else None}


def answer_timeline(records: Sequence[RequestRecord], window_s: float = 0.25
                    ) -> list[dict[str, Any]]:
    """Answers per second and their latency (p50, max; ms) by answer time, per window."""
    by_window: dict[int, list[float]] = {}
    for r in records:
        if r.error is None and r.done_s is not None and r.latency_s is not None:
            by_window.setdefault(int(r.done_s // window_s), []).append(r.latency_s * 1000)
    timeline = []
    for index in range(max(by_window, default=-1) + 1):
        latencies = by_window.get(index, [])
        spread = distribution(latencies)
        timeline.append({"t_s": round(index * window_s, 6),
                         "answers_per_s": len(latencies) / window_s,
                         "p50_ms": spread["p50"], "max_ms": spread["max"]})
    return timeline


async def _parked(settings: Settings) -> int:
    connection = await connect(settings, name="hutch bench cluster")
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Names(settings.prefix).parked_queue, passive=True)
        return queue.declaration_result.message_count or 0


async def _failover(deployment: Deployment, clients: Sequence[HutchClient], rate: float,
                    options: ClusterOptions) -> dict[str, Any]:
    """The open-loop load with the leader's node killed in it, and what it left."""
    for mock in deployment.mocks:
        await mock.reset()
    dropped = sum(c.dropped_replies for c in clients)
    times = schedule(rate, options.failover_s, arrival="poisson", seed=options.seed)
    plan = LoadPlan(times=times, classes=[_NORMAL] * len(times), models=[MODEL] * len(times),
                    timeout_s=options.timeout_s)
    kill = KillAt(deployment.leader, options.kill_at_s)
    try:
        records, elapsed = await run_load(
            clients, plan, on_start=kill.arm,
            progress=Progress(len(times), options.failover_s, enabled=options.progress))
        killed_s = await kill.moment()
    finally:
        kill.cancel()
    stats = [await mock.stats() for mock in deployment.mocks]
    summary = summarize(records, elapsed, [_NORMAL.name])["total"]
    served = sum(s["served"] for s in stats)
    return {
        "offered_rps": rate, "sent": summary["sent"], "answered": summary["answered"],
        "errors": summary["errors"], "latency_ms": summary["latency_ms"],
        **failover_times(records, killed_s),
        "killed_node": deployment.leader.nodename,
        "new_leader": (await _leader(deployment.client, deployment.nodes,
                                     deployment.work_queue)).nodename,
        "served_beyond_answers": max(0, served - summary["answered"]),
        "duplicate_replies_dropped": sum(c.dropped_replies for c in clients) - dropped,
        "parked": await _parked(deployment.client),
        "max_in_flight": [s["max_in_flight"] for s in stats],
        "timeline": answer_timeline(records),
    }


async def _pool(name: str, nodes: list[BenchNode], options: ClusterOptions, out: TextIO
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One deployment measured; on the cluster, the failover too."""
    async with Stack(nodes[0].amqp_url) as stack:
        deployment = await _deploy(stack, name, nodes, options)
        async with hutch_clients(stack, deployment.client, 1) as clients:
            measured = await _measure(name, clients, options, out)
            if len(nodes) == 1:
                return measured, None
            rate = max(options.failover_load * measured["max_sustained_rps"], 1.0)
            print(f"  failover: {rate:.0f} req/s for {options.failover_s:g} s, kill -9 of "
                  f"{deployment.leader.nodename} (leads the work queue) at "
                  f"{options.kill_at_s:g} s", file=out, flush=True)
            return measured, await _failover(deployment, clients, rate, options)


def _targets(failover: dict[str, Any], concurrency: int) -> list[Target]:
    errors = sum(failover["errors"].values())
    peak = max(failover["max_in_flight"])
    return [
        Target("failover: every request answered",
               f"{failover['answered']} of {failover['sent']}, {errors} errors",
               failover["answered"] == failover["sent"] > 0),
        Target("failover: nothing parked", f"{failover['parked']} parked",
               failover["parked"] == 0),
        Target(f"failover: each backend's cap ({concurrency}) held",
               f"max in flight {peak}", peak <= concurrency),
        Target("failover: the work queue's leader moved",
               f"{failover['killed_node']} -> {failover['new_leader']}",
               failover["new_leader"] != failover["killed_node"]),
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _figure_lines(report: dict[str, Any]) -> list[str]:
    best, f = report["max_sustained_rps"], report["failover"]
    light = {name: report["light_load"][name]["latency_ms"] for name in ("classic", "quorum")}
    return [
        "figures:",
        f"  throughput quorum/classic  {best['quorum']:.0f} vs {best['classic']:.0f} req/s "
        f"= {report['quorum_to_classic']:.2f}x",
        "  light-load latency         " + ", ".join(
            f"{name} p50 {d['p50'] or 0:.2f} / p99 {d['p99'] or 0:.2f} ms"
            for name, d in light.items()),
        f"  failover (kill -9 leader)  next answer {_ms(f['next_answer_ms'])} after the "
        f"kill, first answer to a request sent after it {_ms(f['first_new_answer_ms'])}, "
        f"longest silence {_ms(f['longest_gap_ms'])}",
        f"  failover duplicates        {f['served_beyond_answers']} served twice, "
        f"{f['duplicate_replies_dropped']} duplicate replies dropped by the client",
    ]


async def run(amqp_url: str, options: ClusterOptions, out: TextIO) -> dict[str, Any]:
    print(f"cluster: {options.backends} backends x {options.concurrency} slots x "
          f"{options.service_ms:g} ms, one worker process each; classic pool on one node vs "
          f"quorum pool on three, on RabbitMQ nodes of this run's own (the broker at "
          f"{urlsplit(amqp_url).netloc.rsplit('@', 1)[-1]} is not used)", file=out, flush=True)
    async with BenchNodes(3, timeout_s=options.node_timeout_s) as nodes:
        version = await nodes.single.version()
        print(f"  nodes up: RabbitMQ {version}, "
              f"{', '.join(n.nodename for n in nodes.all)}", file=out, flush=True)
        classic, _ = await _pool("classic", [nodes.single], options, out)
        quorum, failover = await _pool("quorum", nodes.cluster, options, out)
    assert failover is not None
    pools = {"classic": classic, "quorum": quorum}
    best = {name: pool["max_sustained_rps"] for name, pool in pools.items()}
    report: dict[str, Any] = {
        "scenario": "cluster",
        "title": "Classic pool on one node vs quorum pool on three",
        "config": {**asdict(options), "rates": list(options.rates)},
        "rabbitmq_version": version,
        "light_load": {name: pool["light_load"] for name, pool in pools.items()},
        "sweep": {name: pool["sweep"] for name, pool in pools.items()},
        "max_sustained_rps": best,
        "quorum_to_classic": best["quorum"] / best["classic"] if best["classic"] else 0.0,
        "failover": failover,
    }
    targets = _targets(failover, options.concurrency)
    report["targets"] = targets_report(targets)
    print_lines([*_figure_lines(report), "targets:", *format_targets(targets)], out)
    return report
