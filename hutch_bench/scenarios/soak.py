"""Scenario ``soak``: mixed traffic at about half capacity for a long time (issue 21).

Two mock backends (``capacity`` slots x ``service_ms`` each, with backend errors and 429s
from their fault options), two worker processes, the gateway, and two HutchClients. The
traffic (:mod:`~hutch_bench.scenarios.soak_traffic`) is a Poisson mix of whole and
streamed requests, cancels, callers that leave, and OpenAI HTTP calls through the gateway,
offered at ``load`` x the backends' capacity. Every ``restart_every`` the second worker
(``worker-b``) is restarted, by SIGTERM (a drain) and by kill -9 in turn; ``worker-a`` runs
throughout, so its memory is the worker's trend.

Every ``sample_s`` the memory (RSS), open descriptors and broker connections of each
process and of the broker are sampled (:mod:`~hutch_bench.scenarios.soak_probe`). After a
warm-up of a third of the run, the memory may grow less than 10% (median of the first
window after warm-up vs the last window); each request gets exactly one terminal answer
at the client: none lost, none duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from hutch_bench.scenarios.common import (
    MODEL,
    Target,
    format_targets,
    hutch_clients,
    print_lines,
    targets_report,
    utilisation,
)
from hutch_bench.scenarios.gateway import start_gateway
from hutch_bench.scenarios.soak_figures import (
    growth,
    outcomes,
    parse_duration,
    write_csv,
    write_requests_csv,
)
from hutch_bench.scenarios.soak_probe import BrokerProbe, process_sample, tcp_ports
from hutch_bench.scenarios.soak_traffic import (
    KINDS,
    FinalCounter,
    RequestLog,
    Traffic,
)
from hutch_bench.stack import Child, MockProcess, Stack
from pipeline.settings import Settings

__all__ = ["SoakOptions", "run"]

#: Memory growth after warm-up the issue allows.
GROWTH_LIMIT = 0.10
#: The processes whose memory growth is judged (worker-b restarts, so it has no trend).
JUDGED = {"worker-a rss_mib": "worker-a", "gateway rss_mib": "gateway",
          "broker rss_mib": "broker (the node's: shared)"}
_STREAMED = ("stream", "disconnect", "http_stream")


@dataclass(frozen=True)
class SoakOptions:
    #: How long traffic runs: 30m, 2m, 90s, 1h.
    duration: str = "30m"
    #: Offered load as a fraction of the backends' capacity.
    load: float = 0.5
    backends: int = 2
    capacity: int = 4
    service_ms: float = 200.0
    stream_tokens: int = 16
    itl_ms: float = 10.0
    fail_rate: float = 0.02
    throttle_rate: float = 0.02
    retry_after_s: float = 0.5
    timeout_s: float = 30.0
    #: Between two restarts of worker-b: 30m, 90s; empty: a fifth of the run, 20 s..4 min.
    restart_every: str = ""
    sample_s: float = 2.0
    #: Also write the samples as CSV to this file.
    csv: str = ""
    seed: int = 1
    progress: bool = False

    @property
    def duration_s(self) -> float:
        return parse_duration(self.duration)

    @property
    def restart_every_s(self) -> float:
        if self.restart_every:
            return parse_duration(self.restart_every)
        return min(240.0, max(20.0, self.duration_s / 5))

    def mean_service_s(self) -> float:
        """Slot time of the average request of the mix (streams add their tokens)."""
        streamed = sum(KINDS[k] for k in _STREAMED) + KINDS["http_disconnect"] / 2
        stream_s = (self.service_ms + self.stream_tokens * self.itl_ms) / 1000
        return streamed * stream_s + (1 - streamed) * self.service_ms / 1000

    @property
    def capacity_rps(self) -> float:
        return self.backends * self.capacity / self.mean_service_s()

    @property
    def rate(self) -> float:
        return self.load * self.capacity_rps


class _Workers:
    """worker-a (runs throughout) and worker-b (restarted), and the restarts done."""

    def __init__(self, stack: Stack, settings: Settings) -> None:
        self.stack, self.settings = stack, settings
        self.a: Child | None = None
        self.b: Child | None = None
        self.restarts: list[dict[str, Any]] = []
        self.b_started_s = 0.0

    async def start(self) -> None:
        self.a = await self.stack.worker(self.settings)
        self.b = await self.stack.worker(self.settings)
        await self.stack.wait_for_consumers(self.stack.names.triage_queue, 2)
        await self.stack.wait_for_consumers(self.stack.names.work_queue("bench"), 1)

    async def restart_b(self, now_s: float, kill: bool) -> None:
        assert self.b is not None
        old, began = self.b, time.monotonic()
        if kill:
            old.process.send_signal(signal.SIGKILL)
            code = await old.process.wait()
        else:
            code = await old.stop()
        self.b = await self.stack.worker(self.settings)
        with contextlib.suppress(Exception):
            await self.stack.wait_for_consumers(self.stack.names.triage_queue, 2)
        self.b_started_s = now_s + time.monotonic() - began
        self.restarts.append({"t_s": round(now_s, 2), "signal": "SIGKILL" if kill
                              else "SIGTERM", "old_pid": old.pid, "exit_code": code,
                              "new_pid": self.b.pid,
                              "back_s": round(time.monotonic() - began, 2)})


class _Sampler:
    """Samples every process of the run and the broker every ``sample_s``."""

    def __init__(self, workers: _Workers, gateway: Child, probe: BrokerProbe,
                 amqp_port: int, started: float) -> None:
        self.workers, self.gateway, self.probe = workers, gateway, probe
        self.amqp_port, self.started = amqp_port, started
        self.samples: list[dict[str, Any]] = []

    async def sample(self) -> None:
        sockets = tcp_ports(self.amqp_port)
        sample: dict[str, Any] = {"t_s": round(time.monotonic() - self.started, 2)}
        pids = {"worker-a": self.workers.a, "worker-b": self.workers.b,
                "gateway": self.gateway}
        ports: set[int] = set()
        for role, child in pids.items():
            if child is not None and child.process.returncode is None:
                sample[role] = process_sample(child.pid, sockets)
                ports.update(sample[role]["ports"])
        # The benchmark's own process: its clients' connections.
        sample["bench"] = process_sample(os.getpid(), sockets)
        ports.update(sample["bench"]["ports"])
        sample["broker"] = await self.probe.sample(ports)
        self.samples.append(sample)

    async def run(self, interval_s: float) -> None:
        """A sample every ``interval_s`` on a fixed clock (a slow management API delays
        one sample, not all the later ones)."""
        due = time.monotonic()
        while True:
            await self.sample()
            due = max(due + interval_s, time.monotonic())
            await asyncio.sleep(due - time.monotonic())


async def _start_backends(stack: Stack, options: SoakOptions) -> list[MockProcess]:
    extra = ["--itl-ms", f"{options.itl_ms:g}", "--fail-rate", f"{options.fail_rate:g}",
             "--throttle-rate", f"{options.throttle_rate:g}",
             "--retry-after", f"{options.retry_after_s:g}", "--seed", str(options.seed)]
    return [await stack.mock(capacity=options.capacity, latency_ms=options.service_ms,
                             extra=extra) for _ in range(options.backends)]


def _settings(stack: Stack, mocks: list[MockProcess], options: SoakOptions) -> Settings:
    backends = [{"name": f"{stack.prefix}-{mock.name}", "url": mock.url,
                 "max_concurrency": options.capacity, "timeout_s": 20} for mock in mocks]
    return stack.settings(pools=[{"name": "bench", "models": [MODEL], "backends": backends}],
                          shutdown_grace_s=10)


async def _traffic(traffic: Traffic, options: SoakOptions, out: TextIO) -> None:
    """Fire the Poisson mix for the run's duration, then wait for every request."""
    rng = random.Random(options.seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    tasks: set[asyncio.Task[None]] = set()
    duration, index, next_s = options.duration_s, 0, 0.0
    next_report = 60.0
    while next_s < duration:
        delay = next_s - traffic.now()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(traffic.fire(index, rng.choices(kinds, weights)[0]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
        next_s += rng.expovariate(options.rate)
        if options.progress and traffic.now() >= next_report:
            print(f"  {traffic.now():6.0f} s: {index} sent, {len(tasks)} open", file=out,
                  flush=True)
            next_report += 60
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=options.timeout_s + 30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _restarts(workers: _Workers, traffic: Traffic, options: SoakOptions) -> None:
    every, kill = options.restart_every_s, False
    at = every
    while at < options.duration_s - 5:
        await asyncio.sleep(max(0.0, at - traffic.now()))
        await workers.restart_b(traffic.now(), kill)
        kill, at = not kill, at + every


async def _settle(log: RequestLog, wait_s: float = 30.0) -> int:
    """Wait (bounded) for the finals of callers that left; how many still have none."""
    deadline = time.monotonic() + wait_s
    missing = log.settle_answers()
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # the finals come on the clients' consumers
        missing = log.settle_answers()
    return missing


async def _soak(amqp_url: str, options: SoakOptions, out: TextIO) -> dict[str, Any]:
    async with Stack(amqp_url) as stack, contextlib.AsyncExitStack() as opened:
        mocks = await _start_backends(stack, options)
        settings = _settings(stack, mocks, options)
        await stack.apply(settings)
        workers = _Workers(stack, settings)
        await workers.start()
        gateway_url = await start_gateway(stack, settings)
        gateway = next(c for c in stack.children if c.name.startswith("gateway-"))
        probe = BrokerProbe(settings, stack.prefix)
        opened.push_async_callback(probe.aclose)
        clients = await opened.enter_async_context(hutch_clients(stack, settings, 2))
        log = RequestLog(counters=[FinalCounter(client) for client in clients])
        traffic = Traffic(clients, gateway_url, log, timeout_s=options.timeout_s,
                          tokens=options.stream_tokens, seed=options.seed)
        opened.push_async_callback(traffic.aclose)
        before = [await mock.stats() for mock in mocks]
        sampler = _Sampler(workers, gateway, probe,
                           urlsplit(amqp_url).port or 5672, traffic.started)
        background = [asyncio.create_task(sampler.run(options.sample_s)),
                      asyncio.create_task(_restarts(workers, traffic, options))]
        try:
            await _traffic(traffic, options, out)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        after = [await mock.stats() for mock in mocks]
        missing = await _settle(log)
        await sampler.sample()
        alive = {c.name: c.process.returncode is None for c in (workers.a, workers.b, gateway)
                 if c is not None}
    used = [utilisation(b, a) for b, a in zip(before, after, strict=True)]
    return {"samples": sampler.samples, "restarts": workers.restarts,
            "records": log.records, "missing_finals": missing,
            "b_started_s": workers.b_started_s, "alive": alive,
            "utilisation": sum(used) / len(used),
            "served": sum(a["served"] for a in after) - sum(b["served"] for b in before),
            "faults": {key: sum(a["faults"][key] - b["faults"][key]
                                for b, a in zip(before, after, strict=True))
                       for key in after[0]["faults"]}}


def _targets(figures: dict[str, Any], grown: dict[str, dict[str, Any]],
             restarts: list[dict[str, Any]]) -> list[Target]:
    targets = [
        Target("0 lost (every request one terminal answer)", f"{figures['lost']} lost of "
               f"{figures['requests']}", figures["lost"] == 0 and figures["requests"] > 0),
        Target("0 duplicated (answers to a caller)", f"{figures['duplicated']} duplicated; "
               f"{figures['wire_duplicates']} second finals dropped by the client",
               figures["duplicated"] == 0),
        Target("worker restarts, SIGTERM and kill -9", ", ".join(
            f"{r['signal']} at {r['t_s']:.0f} s" for r in restarts) or "none",
            {r["signal"] for r in restarts} == {"SIGTERM", "SIGKILL"}),
    ]
    for name in JUDGED:
        value = grown[name]["growth"]
        targets.append(Target(
            f"{JUDGED[name]} memory growth after warm-up < {GROWTH_LIMIT:.0%}",
            "not measured" if value is None else f"{value:+.1%} ({grown[name]['first']:.1f}"
            f" -> {grown[name]['last']:.1f} MiB)", value is not None and value < GROWTH_LIMIT))
    return targets


def _growth_lines(grown: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["after warm-up (median of the first and of the last window):"]
    for name, g in grown.items():
        if g["first"] is None:
            lines.append(f"  {name:28s} not sampled")
            continue
        change = "n/a" if g["growth"] is None else f"{g['growth']:+7.1%}"
        lines.append(f"  {name:28s} {g['first']:9.1f} -> {g['last'] or 0:9.1f}  {change}  "
                     f"(max {g['max']:.1f})")
    return lines


async def run(amqp_url: str, options: SoakOptions, out: TextIO) -> dict[str, Any]:
    duration = options.duration_s
    print(f"soak: {duration:g} s of mixed traffic at {options.rate:.1f} req/s "
          f"({options.load:g}x of {options.capacity_rps:.1f} req/s: {options.backends} "
          f"backends x {options.capacity} slots, {options.service_ms:g} ms, streams of "
          f"{options.stream_tokens} tokens); faults: {options.fail_rate:g} errors, "
          f"{options.throttle_rate:g} 429s; worker-b restarted every "
          f"{options.restart_every_s:g} s; sampled every {options.sample_s:g} s",
          file=out, flush=True)
    result = await _soak(amqp_url, options, out)
    figures = outcomes(result["records"])
    grown = growth(result["samples"], duration, {"worker-b": result["b_started_s"]})
    targets = _targets(figures, grown, result["restarts"])
    print(f"requests: {figures['requests']}, answered once {figures['answered_once']}, "
          f"lost {figures['lost']}, duplicated {figures['duplicated']} (finals twice on "
          f"the wire, dropped by the client: {figures['wire_duplicates']}); backend "
          f"utilisation {result['utilisation']:.1%}, served {result['served']}; injected: "
          f"{result['faults']['failed']} backend errors, {result['faults']['throttled']} "
          "429s", file=out)
    for kind, counts in figures["by_kind"].items():
        print(f"  {kind:16s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
              file=out)
    print(f"restarts: {len(result['restarts'])}; samples: {len(result['samples'])}",
          file=out)
    print_lines([*_growth_lines(grown), "targets:", *format_targets(targets)], out)
    if options.csv:
        requests = Path(options.csv).with_name(Path(options.csv).stem + "-requests.csv")
        write_csv(result["samples"], Path(options.csv))
        write_requests_csv(result["records"], requests)
        print(f"samples written to {options.csv}, requests to {requests}", file=out)
    return {
        "scenario": "soak",
        "title": f"Soak: {duration / 60:g} min of mixed traffic at {options.load:g}x capacity",
        "config": {**asdict(options), "duration_s": duration, "rate": options.rate,
                   "capacity_rps": options.capacity_rps,
                   "restart_every_s": options.restart_every_s, "kinds": KINDS},
        "outcomes": figures,
        "missing_finals": result["missing_finals"],
        "restarts": result["restarts"],
        "alive_at_end": result["alive"],
        "backend_utilisation": result["utilisation"],
        "served": result["served"],
        "backend_faults": result["faults"],
        "growth": grown,
        "soak_samples": result["samples"],
        "targets": targets_report(targets),
    }
