"""Scenario ``overhead``: what does the Hutch path cost over the call it makes?

Three ways to make the same HTTP call to an instant mock backend, in one run on one broker:

* ``direct``: the benchmark calls the mock itself, with Hutch's own HTTP client
  (:class:`~pipeline.backends.http.Backend`): the floor;
* ``baseline``: a minimal hand-written aio-pika RPC (:mod:`hutch_bench.baseline`):
  publish, consume, the same call, reply; what any queue in front of a backend costs;
* ``hutch``: the full path (client, exchange, priority queue, worker, dispatch, reply).

Two measurements: latency at a light load (what Hutch adds to one request: ``hutch``
minus ``direct``, p50 and p99), and a sweep of offered loads for the throughput each path
sustains (the ``hutch`` / ``baseline`` ratio says what Hutch's features cost). Both
workers run as separate processes with the same concurrency against the same mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from hutch_bench.baseline import READY_LINE, BaselineClient
from hutch_bench.loadgen import LoadClient
from hutch_bench.scenarios.common import (
    LoadRun,
    LoadShape,
    Target,
    format_targets,
    hutch_clients,
    open_loop,
    print_lines,
    start_hutch,
    targets_report,
)
from hutch_bench.stack import Stack
from pipeline.backends.http import Backend
from pipeline.errors import BackendCallError, BackendError, ConfigError
from pipeline.runtime.eventloop import LOOPS
from pipeline.settings import BackendSettings

__all__ = ["DirectClient", "OverheadOptions", "run"]

SYSTEMS = ("direct", "baseline", "hutch")


@dataclass(frozen=True)
class OverheadOptions:
    concurrency: int = 64
    light_rps: float = 25.0
    light_s: float = 20.0
    rates: tuple[float, ...] = (100, 200, 400, 600, 800, 1000, 1200, 1400, 1700, 2000, 2500)
    step_s: float = 5.0
    warmup_s: float = 2.0
    seed: int = 1
    #: The event loop of both workers (``hutch worker --loop``): asyncio or uvloop.
    loop: str = "asyncio"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ConfigError(f"--loop {self.loop!r}: expected one of {', '.join(LOOPS)}")


@dataclass(frozen=True)
class DirectReply:
    body: bytes
    queue_wait_ms: int | None = None


class DirectClient:
    """Path (a): the generator calls the backend itself; same call shape as the others."""

    def __init__(self, url: str, concurrency: int) -> None:
        self._backend = Backend(BackendSettings(name="direct", url=url,
                                                max_concurrency=concurrency, timeout_s=60))
        self._calls: dict[str, asyncio.Task[bytes]] = {}

    async def aclose(self) -> None:
        for task in self._calls.values():
            task.cancel()
        await self._backend.aclose()

    async def _call(self, body: bytes, timeout: float) -> bytes:
        try:
            return (await self._backend.chat(body, timeout_s=timeout)).body
        except BackendCallError as exc:
            raise BackendError(exc.message, status=exc.status) from None

    async def submit(self, body: dict[str, Any], *, model: str, priority: int = 0,
                     timeout: float = 60.0) -> str:
        cid = uuid.uuid4().hex
        self._calls[cid] = asyncio.create_task(self._call(json.dumps(body).encode(), timeout))
        return cid

    async def result(self, correlation_id: str) -> DirectReply:
        return DirectReply(await self._calls.pop(correlation_id))


def _row(name: str, run_: LoadRun) -> dict[str, Any]:
    total = run_.summary["total"]
    return {"system": name, "sent": total["sent"], "answered": total["answered"],
            "errors": total["error_count"], "achieved_rps": total["throughput_rps"],
            "latency_ms": total["latency_ms"]}


_Load = Callable[[str, float, float], Awaitable[LoadRun]]


async def _start_systems(stack: Stack, opened: contextlib.AsyncExitStack, amqp_url: str,
                         options: OverheadOptions) -> dict[str, Sequence[LoadClient]]:
    """Start the mock, Hutch and the baseline worker; one client per system."""
    mock = await stack.mock(capacity=max(256, 4 * options.concurrency), latency_ms=0)
    settings = await start_hutch(stack, mock, capacity=options.concurrency,
                                 loop=options.loop, max_queue_length=1_000_000)
    queue = f"{stack.prefix}.baseline"
    stack.queues.append(queue)
    baseline = await stack.spawn("baseline", "hutch_bench.baseline", [
        "--amqp-url", amqp_url, "--queue", queue, "--backend-url", mock.url,
        "--prefetch", str(options.concurrency), "--loop", options.loop])
    await baseline.wait_for_line(READY_LINE)
    direct = DirectClient(mock.url, options.concurrency)
    opened.push_async_callback(direct.aclose)
    baseline_client = await opened.enter_async_context(BaselineClient(amqp_url, queue))
    (hutch,) = await opened.enter_async_context(hutch_clients(stack, settings, 1))
    return {"direct": [direct], "baseline": [baseline_client], "hutch": [hutch]}


async def _sweep(load: _Load, name: str, options: OverheadOptions, out: TextIO
                 ) -> list[dict[str, Any]]:
    """Offer rising rates to one system until it saturates."""
    rows: list[dict[str, Any]] = []
    for rate in options.rates:
        row = _row(name, await load(name, rate, options.step_s))
        row["offered_rps"] = rate
        rows.append(row)
        print(f"  {name:8s} offered {rate:6g}/s  achieved {row['achieved_rps']:7.1f}/s"
              f"  errors {row['errors']}  p50 {row['latency_ms']['p50'] or 0:7.1f} ms"
              f"  p99 {row['latency_ms']['p99'] or 0:8.1f} ms", file=out, flush=True)
        if row["errors"] or row["achieved_rps"] < 0.9 * rate:
            break  # saturated: higher offers only grow the backlog
        await asyncio.sleep(0.5)
    return rows


async def _measure(amqp_url: str, options: OverheadOptions, out: TextIO
                   ) -> tuple[dict[str, LoadRun], dict[str, list[dict[str, Any]]]]:
    """The light-load runs and the throughput sweep of every system."""
    async with Stack(amqp_url) as stack, contextlib.AsyncExitStack() as opened:
        clients = await _start_systems(stack, opened, amqp_url, options)

        async def load(name: str, rate: float, duration_s: float) -> LoadRun:
            return await open_loop(clients[name], LoadShape(
                rate=rate, duration_s=duration_s, arrival="constant", seed=options.seed,
                progress=options.progress))

        for name in SYSTEMS:  # connection pools, caches, the broker's queue processes
            await load(name, options.light_rps, options.warmup_s)
        light = {name: await load(name, options.light_rps, options.light_s)
                 for name in SYSTEMS}
        sweep = {name: await _sweep(load, name, options, out) for name in SYSTEMS}
    return light, sweep


def _targets(best: dict[str, float], ratio: float, added: dict[str, float]) -> list[Target]:
    return [
        Target("Hutch throughput >= 0.6x the aio-pika baseline",
               f"{best['hutch']:.0f} vs {best['baseline']:.0f} req/s = {ratio:.2f}x",
               ratio >= 0.6),
        Target("added latency p50 < 2 ms (light load)",
               f"{added.get('p50', float('nan')):.2f} ms", added.get("p50", 99) < 2),
        Target("added latency p99 < 10 ms (light load)",
               f"{added.get('p99', float('nan')):.2f} ms", added.get("p99", 99) < 10),
    ]


async def run(amqp_url: str, options: OverheadOptions, out: TextIO) -> dict[str, Any]:
    print(f"overhead: instant mock, concurrency {options.concurrency}, {options.loop} "
          f"workers; light load "
          f"{options.light_rps:g} req/s for {options.light_s:g} s, then offered "
          f"{', '.join(f'{r:g}' for r in options.rates)} req/s for {options.step_s:g} s each",
          file=out)
    light, sweep = await _measure(amqp_url, options, out)
    light_ms = {name: run_.summary["total"]["latency_ms"] for name, run_ in light.items()}
    best = {name: max((r["achieved_rps"] for r in rows if not r["errors"]), default=0.0)
            for name, rows in sweep.items()}
    ratio = best["hutch"] / best["baseline"] if best["baseline"] else 0.0
    added = {k: light_ms["hutch"][k] - light_ms["direct"][k] for k in ("p50", "p99")
             if light_ms["hutch"][k] is not None and light_ms["direct"][k] is not None}
    light_errors = {name: run_.summary["total"]["error_count"] for name, run_ in light.items()}
    targets = _targets(best, ratio, added)
    report: dict[str, Any] = {
        "scenario": "overhead",
        "title": "Throughput vs offered load (instant mock backend)",
        "config": {**options.__dict__, "rates": list(options.rates)},
        "light_load": {name: {"latency_ms": light_ms[name], "errors": light_errors[name],
                              "answered": light[name].summary["total"]["answered"]}
                       for name in SYSTEMS},
        "added_latency_ms": added,
        "sweep": sweep,
        "max_sustained_rps": best,
        "hutch_to_baseline": ratio,
        "targets": targets_report(targets),
    }
    print(f"light load, {options.light_rps:g} req/s (ms):", file=out)
    for name in SYSTEMS:
        d = light_ms[name]
        print(f"  {name:8s} p50 {d['p50'] or 0:7.2f}  p95 {d['p95'] or 0:7.2f}  "
              f"p99 {d['p99'] or 0:7.2f}  max {d['max'] or 0:7.2f}  "
              f"errors {light_errors[name]}", file=out)
    print("max sustained throughput (req/s): " + ", ".join(
        f"{name} {best[name]:.0f}" for name in SYSTEMS), file=out)
    print_lines(["targets:", *format_targets(targets)], out)
    return report
