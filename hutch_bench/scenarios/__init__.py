"""The benchmark scenarios of ``hutch bench scenario NAME``: one module each.

- :mod:`~hutch_bench.scenarios.overhead`: direct call vs minimal aio-pika RPC vs Hutch;
- :mod:`~hutch_bench.scenarios.overload`: priority under 3x overload;
- :mod:`~hutch_bench.scenarios.globalcap`: one backend's cap across 3 worker processes;
- :mod:`~hutch_bench.scenarios.backlog`: 100,000 queued requests drained by one worker;
- :mod:`~hutch_bench.scenarios.streaming`: streams direct vs a minimal aio-pika relay vs
  Hutch, and cancels (issue 15);
- :mod:`~hutch_bench.scenarios.cluster`: a classic pool on one node vs a quorum pool on
  three, and the work queue leader's node killed under load (issue 13);
- :mod:`~hutch_bench.scenarios.gateway`: OpenAI HTTP calls to the mock directly vs
  through Hutch's gateway vs LiteLLM's proxy, and priority under overload (issue 12);
- :mod:`~hutch_bench.scenarios.fairness`: the fair scheduler against FIFO on the same
  loads: a noisy neighbour, a late joiner, weights, bands, cost, a worker killed, and
  short requests (issue 18);
- :mod:`~hutch_bench.scenarios.capacity`: fixed caps against the adaptive limit on a
  server that queues inside itself, its room halved, two backends 2:1 (issue 22);
- :mod:`~hutch_bench.scenarios.partition`: a network partition between the nodes of a
  three-node cluster, under ``pause_minority``, ``ignore`` and ``autoheal``: the backend's real peak
  concurrency, how long it lasts, lost or twice-answered requests (issue 21);
- :mod:`~hutch_bench.scenarios.soak`: mixed traffic with restarts and faults for a long
  run, memory and connections over time (issue 21);
- :mod:`~hutch_bench.scenarios.fuzz`: Hypothesis at a live worker, raw requests across the
  wire contract with cancels and valid traffic alongside (issue 21).

Each has an options dataclass (its defaults are issue 5's measurements; every field is a
command-line option) and a ``quick`` preset: the same code on a tiny load, for the smoke
tests and a first look.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO

from hutch_bench.scenarios import (
    backlog,
    capacity,
    cluster,
    fairness,
    fuzz,
    gateway,
    globalcap,
    overhead,
    overload,
    partition,
    soak,
    streaming,
)

__all__ = ["SCENARIOS", "Scenario"]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    options: type[Any]
    run: Callable[[str, Any, TextIO], Awaitable[dict[str, Any]]]
    quick: dict[str, Any]
    #: False: it runs nodes of its own and never touches the broker it was given.
    on_user_broker: bool = True


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
    Scenario("streaming", "concurrent streams direct vs a minimal aio-pika relay vs "
             "Hutch: added time to first token, max streams, cancel latency",
             streaming.StreamingOptions, streaming.run,
             {"concurrency": (4, 8), "step_s": 1.5, "tokens": 20, "itl_ms": 10,
              "light_rps": 10, "light_s": 1, "warmup_s": 0.3, "cancels": 6,
              "cancel_concurrency": 3, "cancel_hold_ms": 50, "cancel_tokens": 100}),
    Scenario("cluster", "classic pool on one node vs quorum pool on a three-node cluster "
             "(nodes of its own): throughput, latency, kill -9 of the leader under load",
             cluster.ClusterOptions, cluster.run,
             {"light_rps": 20, "light_s": 1, "warmup_s": 0.5, "rates": (40,), "step_s": 1,
              "failover_s": 4, "kill_at_s": 1.5}, on_user_broker=False),
    Scenario("gateway", "OpenAI HTTP to the mock directly vs Hutch's gateway vs LiteLLM's "
             "proxy: added latency, max throughput; priority under 3x overload",
             gateway.GatewayOptions, gateway.run,
             {"light_rps": 20, "light_s": 1, "warmup_s": 0.5, "rates": (40,), "step_s": 1,
              "overload_service_ms": 100, "overload_s": 3, "overload_timeout_s": 5}),
    Scenario("fairness", "fair scheduler vs FIFO on the same loads: noisy neighbour, late "
             "joiner, weights 2:1, bands, cost, a worker killed, short requests",
             fairness.FairnessOptions, fairness.run,
             {"noisy_s": 4, "join_at_s": 2, "weights_s": 4, "cost_s": 2, "kill_s": 4,
              "short_backlog": 300, "timeout_s": 5}),
    Scenario("capacity", "fixed caps vs the adaptive limit on a server that queues inside "
             "itself (vLLM's metrics): sweep, cold start, room halved, two speeds, wait "
             "estimates",
             capacity.CapacityOptions, capacity.run,
             {"caps": (4, 12), "step_s": 3, "adaptive_s": 4, "halve_s": 6, "two_s": 3,
              "warm_s": 1, "timeout_s": 5, "wait_s": 3}),
    Scenario("partition", "a network partition on a three-node cluster (nodes of its own), "
             "pause_minority, ignore, autoheal: a backend's real peak concurrency, lost or "
             "duplicated answers", partition.PartitionOptions, partition.run,
             {"cap": 2, "service_ms": 1500, "partition_at_s": 4, "partition_s": 5,
              "after_heal_s": 5, "tail_s": 3, "modes": "pause_minority,ignore",
              "queue_types": "quorum", "timeout_s": 60},
             on_user_broker=False),
    Scenario("fuzz", "Hypothesis at a live worker: raw requests across the wire contract, "
             "cancels, valid traffic alongside: crashes, stalls, wrong answers",
             fuzz.FuzzOptions, fuzz.run, {"examples": 300, "batch": 30}),
    Scenario("soak", "mixed traffic at half capacity for --duration (30m): worker "
             "restarts, faults, the gateway; memory, fds, connections over time, every "
             "request one answer", soak.SoakOptions, soak.run,
             {"duration": "30s", "sample_s": 1.0, "restart_every": "8s"}),
)}
