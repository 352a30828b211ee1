"""Scenario ``gateway``: Hutch behind its OpenAI HTTP gateway, against LiteLLM's proxy.

Three ways to make the same OpenAI HTTP call to one instant mock backend, in one run,
each driven by the same HTTP client (aiohttp, one keep-alive pool) so they differ only in
what stands between the client and the mock:

* ``direct``: the mock itself: the floor;
* ``gateway``: ``hutch gateway`` -> broker -> ``hutch worker`` -> mock (one process each);
* ``litellm``: LiteLLM's proxy (``litellm --num_workers 1``) -> mock, when installed (the
  ``litellm`` extra, in a virtualenv of its own; ``--litellm-bin``, ``$HUTCH_LITELLM_BIN``
  or ``litellm`` on PATH). Without it the scenario says how to install it and runs the
  rest.

``--gateway-port`` and ``--litellm-port`` pin their ports (a firewall, a profiler);
by default each takes a free one. The broker is the one configured (``HUTCH_AMQP_URL`` or
``-c FILE``), checked against its management API before anything starts.

Measured: the latency each adds at a light load (p50, p99 over ``direct``), the highest
throughput each sustains over a sweep of offered loads, and, through the gateway, the
latency of each priority class under 3x overload of a backend of ``overload_capacity``
slots x ``overload_service_ms`` (issue 12's targets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp

from hutch_bench.report import latency_series
from hutch_bench.scenarios.common import (
    BackendLoad,
    LoadRun,
    LoadShape,
    Target,
    format_targets,
    loaded_backend,
    open_loop,
    print_lines,
    start_hutch,
    targets_report,
)
from hutch_bench.scenarios.litellm import (
    API_KEY,
    LITELLM_HINT,
    find_litellm,
    start_litellm,
    versus_litellm,
)
from hutch_bench.stack import Stack, free_port, until_http
from pipeline import protocol as p
from pipeline.errors import RequestFailed
from pipeline.settings import Settings, dump_toml

__all__ = ["GatewayOptions", "HttpLoadClient", "run", "start_gateway"]

SYSTEMS = ("direct", "gateway", "litellm")


@dataclass(frozen=True)
class GatewayOptions:
    #: Slots of the worker's backend and HTTP connections of each system's client.
    concurrency: int = 64
    light_rps: float = 25.0
    light_s: float = 20.0
    warmup_s: float = 2.0
    rates: tuple[float, ...] = (50, 100, 200, 300, 400, 600, 800, 1000, 1200, 1500, 2000)
    step_s: float = 5.0
    #: A step is sustained when all is answered, >= 90% of the offer, p99 under this.
    sustained_p99_ms: float = 1000.0
    overload_capacity: int = 8
    overload_service_ms: float = 200.0
    overload_factor: float = 3.0
    overload_s: float = 30.0
    overload_mix: str = "high=0.1,low=0.9"
    overload_timeout_s: float = 30.0
    litellm_bin: str = ""
    #: Ports of the gateway and of LiteLLM's proxy on 127.0.0.1; 0: a free one each.
    gateway_port: int = 0
    litellm_port: int = 0
    seed: int = 1
    progress: bool = False

    def overload(self) -> BackendLoad:
        return BackendLoad(capacity=self.overload_capacity,
                           service_ms=self.overload_service_ms, factor=self.overload_factor,
                           duration_s=self.overload_s, mix=self.overload_mix,
                           timeout_s=self.overload_timeout_s, seed=self.seed,
                           progress=self.progress)


@dataclass(frozen=True)
class HttpReply:
    queue_wait_ms: int | None = None


def _failure(status: int, body: bytes) -> RequestFailed:
    """An HTTP error answer as the generator counts it: by its OpenAI ``code``."""
    try:
        error = json.loads(body)["error"]
        code = error.get("hutch_code") or error.get("code") or f"http_{status}"
        return RequestFailed(str(error.get("message", ""))[:200], code=str(code),
                             status=status)
    except (ValueError, KeyError, TypeError, AttributeError):
        return RequestFailed(body[:200].decode(errors="replace"), code=f"http_{status}",
                             status=status)


class HttpLoadClient:
    """An OpenAI ``/chat/completions`` endpoint driven like the generator's other paths
    (:class:`~hutch_bench.loadgen.LoadClient`). ``hutch``: send the priority and the
    deadline as the gateway's headers."""

    def __init__(self, base_url: str, *, connections: int, hutch: bool = False) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._hutch = hutch
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, force_close=False),
            headers={"Authorization": f"Bearer {API_KEY}"})
        self._calls: dict[str, asyncio.Task[HttpReply]] = {}

    async def aclose(self) -> None:
        for task in self._calls.values():
            task.cancel()
        await self._session.close()

    async def _call(self, body: bytes, priority: int, timeout: float) -> HttpReply:
        headers = {"Content-Type": "application/json"}
        if self._hutch:
            headers |= {"x-hutch-priority": str(priority), "x-hutch-timeout": f"{timeout:g}"}
        async with self._session.post(self.url, data=body, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=timeout + 5)
                                      ) as response:
            data = await response.read()
            if response.status != 200:
                raise _failure(response.status, data)
            wait = response.headers.get(p.H_QUEUE_WAIT_MS)
            return HttpReply(int(wait) if wait and wait.isdigit() else None)

    async def submit(self, body: dict[str, Any], *, model: str, priority: int = 0,
                     timeout: float = 60.0) -> str:
        cid = uuid.uuid4().hex
        self._calls[cid] = asyncio.create_task(
            self._call(json.dumps(body).encode(), priority, timeout))
        return cid

    async def result(self, correlation_id: str) -> HttpReply:
        return await self._calls.pop(correlation_id)


async def start_gateway(stack: Stack, settings: Settings, port: int = 0) -> str:
    """``hutch gateway`` (open mode) as a child process on ``port`` (0: a free one); its
    OpenAI base URL once ready."""
    index = sum(c.name.startswith("gateway-") for c in stack.children) + 1
    config = stack.dir / f"gateway-{index}.toml"
    config.touch(mode=0o600)
    config.write_text(dump_toml(settings))
    port, replica = port or free_port(), f"bench-{index}"
    stack.client_ids.append(f"{settings.amqp_user}.{replica}")  # its reply queue goes too
    child = await stack.spawn(f"gateway-{index}", "pipeline.cli.main", [
        "gateway", "-c", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--replica-id", replica, "--log-level", "WARNING"])
    await until_http(child, f"http://127.0.0.1:{port}/readyz", timeout_s=30)
    return f"http://127.0.0.1:{port}/v1"


def _row(name: str, run_: LoadRun) -> dict[str, Any]:
    total = run_.summary["total"]
    return {"system": name, "sent": total["sent"], "answered": total["answered"],
            "errors": total["error_count"], "achieved_rps": total["throughput_rps"],
            "latency_ms": total["latency_ms"]}


def _sustained(row: dict[str, Any], options: GatewayOptions) -> bool:
    p99 = row["latency_ms"]["p99"]
    return (not row["errors"] and row["achieved_rps"] >= 0.9 * row["offered_rps"]
            and p99 is not None and p99 < options.sustained_p99_ms)


class _Systems:
    """The clients of the systems that run, and the loads offered to them."""

    def __init__(self, clients: dict[str, HttpLoadClient], options: GatewayOptions,
                 out: TextIO) -> None:
        self.clients, self.options, self.out = clients, options, out

    async def load(self, name: str, rate: float, duration_s: float) -> LoadRun:
        return await open_loop([self.clients[name]], LoadShape(
            rate=rate, duration_s=duration_s, arrival="constant", seed=self.options.seed,
            progress=self.options.progress))

    async def sweep(self, name: str) -> list[dict[str, Any]]:
        """Offer rising rates until one is not sustained."""
        rows: list[dict[str, Any]] = []
        for rate in self.options.rates:
            row = {**_row(name, await self.load(name, rate, self.options.step_s)),
                   "offered_rps": rate}
            row["sustained"] = _sustained(row, self.options)
            rows.append(row)
            print(f"  {name:8s} offered {rate:6g}/s  achieved {row['achieved_rps']:7.1f}/s"
                  f"  errors {row['errors']}  p50 {row['latency_ms']['p50'] or 0:7.1f} ms"
                  f"  p99 {row['latency_ms']['p99'] or 0:8.1f} ms", file=self.out, flush=True)
            if not row["sustained"]:
                break
            await asyncio.sleep(0.5)
        return rows


async def _compare(amqp_url: str, options: GatewayOptions, litellm: str | None,
                   out: TextIO) -> tuple[dict[str, LoadRun], dict[str, list[dict[str, Any]]]]:
    """Light load and throughput sweep of direct, gateway and (if found) LiteLLM."""
    async with Stack(amqp_url) as stack, contextlib.AsyncExitStack() as opened:
        mock = await stack.mock(capacity=max(256, 4 * options.concurrency), latency_ms=0)
        settings = await start_hutch(stack, mock, capacity=options.concurrency,
                                     max_queue_length=1_000_000)
        urls = {"direct": mock.url,
                "gateway": await start_gateway(stack, settings, options.gateway_port)}
        if litellm is not None:
            urls["litellm"] = await start_litellm(stack, litellm, mock, options.litellm_port)
        print("systems: " + ", ".join(f"{name} {url}" for name, url in urls.items()),
              file=out, flush=True)
        clients = {name: HttpLoadClient(url, connections=options.concurrency,
                                        hutch=name == "gateway") for name, url in urls.items()}
        for client in clients.values():
            opened.push_async_callback(client.aclose)
        systems = _Systems(clients, options, out)
        for name in clients:  # connection pools, caches, the broker's queue processes
            await systems.load(name, options.light_rps, options.warmup_s)
        light = {name: await systems.load(name, options.light_rps, options.light_s)
                 for name in clients}
        sweep = {name: await systems.sweep(name) for name in clients}
    return light, sweep


async def _overload(amqp_url: str, load: BackendLoad, gateway_port: int
                    ) -> tuple[LoadRun, dict[str, Any]]:
    """Priority under overload, through the gateway: one worker, one backend."""
    async with Stack(amqp_url) as stack, contextlib.AsyncExitStack() as opened:
        mock = await stack.mock(capacity=load.capacity, latency_ms=load.service_ms)
        settings = await start_hutch(stack, mock, capacity=load.capacity)
        # Every waiting request holds its HTTP connection: no client-side pool limit (a
        # pool's FIFO wait would hide the queue's priority order).
        client = HttpLoadClient(await start_gateway(stack, settings, gateway_port),
                                connections=0, hutch=True)
        opened.push_async_callback(client.aclose)
        run_, backend = await loaded_backend(mock, [client], load.shape())
    return run_, backend.figures()


def _best(sweep: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each system's highest sustained throughput (answers/s)."""
    return {name: max((r["achieved_rps"] for r in rows if r["sustained"]), default=0.0)
            for name, rows in sweep.items()}


def _added(light: dict[str, LoadRun]) -> dict[str, dict[str, float]]:
    ms = {name: run_.summary["total"]["latency_ms"] for name, run_ in light.items()}
    return {name: {k: ms[name][k] - ms["direct"][k] for k in ("p50", "p99")
                   if ms[name][k] is not None and ms["direct"][k] is not None}
            for name in ms if name != "direct"}


def _targets(added: dict[str, float], versus_litellm: tuple[str, bool],
             high: dict[str, Any] | None, load: BackendLoad) -> list[Target]:
    nan = float("nan")
    limit = 2 * load.service_ms
    p99 = high["latency_ms"]["p99"] if high else None
    errors = high["error_count"] if high else 0
    return [
        Target("gateway added latency p50 < 3 ms (light load)",
               f"{added.get('p50', nan):.2f} ms", added.get("p50", 99) < 3),
        Target("gateway added latency p99 < 10 ms (light load)",
               f"{added.get('p99', nan):.2f} ms", added.get("p99", 99) < 10),
        Target("gateway throughput >= 3x LiteLLM's proxy", *versus_litellm),
        Target(f"overload: high-priority p99 < {limit:g} ms (2x service)",
               "no answer" if p99 is None else f"{p99:.1f} ms", p99 is not None and p99 < limit),
        Target("overload: zero high-priority errors",
               f"{errors} errors of {high['sent'] if high else 0}",
               high is not None and errors == 0 and high["sent"] > 0),
    ]


def _print_light(light: dict[str, LoadRun], options: GatewayOptions, out: TextIO) -> None:
    print(f"light load, {options.light_rps:g} req/s (ms):", file=out)
    for name, run_ in light.items():
        d, errors = run_.summary["total"]["latency_ms"], run_.summary["total"]["error_count"]
        print(f"  {name:8s} p50 {d['p50'] or 0:7.2f}  p95 {d['p95'] or 0:7.2f}  "
              f"p99 {d['p99'] or 0:7.2f}  max {d['max'] or 0:7.2f}  errors {errors}",
              file=out)


def _report(options: GatewayOptions, light: dict[str, LoadRun],
            sweep: dict[str, list[dict[str, Any]]], overload: tuple[LoadRun, dict[str, Any]],
            targets: Sequence[Target]) -> dict[str, Any]:
    load, (run_, backend) = options.overload(), overload
    best = _best(sweep)
    return {
        "scenario": "gateway",
        "title": f"Hutch's HTTP gateway: vs LiteLLM, and {load.factor:g}x overload",
        "config": {**options.__dict__, "rates": list(options.rates),
                   "overload_rps": load.rate},
        "systems": list(light),
        "light_load": {name: {"latency_ms": r.summary["total"]["latency_ms"],
                              "errors": r.summary["total"]["error_count"],
                              "answered": r.summary["total"]["answered"]}
                       for name, r in light.items()},
        "added_latency_ms": _added(light),
        "sweep": sweep,
        "max_sustained_rps": best,
        "gateway_to_litellm": best["gateway"] / best["litellm"] if best.get("litellm")
        else None,
        "overload": {**run_.summary, "priorities": run_.priorities, "backend": backend},
        "service_ms": load.service_ms,
        "series": latency_series(run_.records, list(run_.priorities)),
        "targets": targets_report(targets),
    }


async def run(amqp_url: str, options: GatewayOptions, out: TextIO) -> dict[str, Any]:
    litellm = find_litellm(options.litellm_bin)
    load = options.overload()
    print(f"gateway: instant mock, concurrency {options.concurrency}; light load "
          f"{options.light_rps:g} req/s for {options.light_s:g} s, then offered "
          f"{', '.join(f'{r:g}' for r in options.rates)} req/s for {options.step_s:g} s "
          f"each; LiteLLM: {litellm or 'not found'}", file=out, flush=True)
    if litellm is None:
        print(LITELLM_HINT, file=out, flush=True)
    light, sweep = await _compare(amqp_url, options, litellm, out)
    _print_light(light, options, out)
    print(f"overload through the gateway: {load.describe()}", file=out, flush=True)
    overload = await _overload(amqp_url, load, options.gateway_port)
    run_, best = overload[0], _best(sweep)
    targets = _targets(_added(light).get("gateway", {}), versus_litellm(best, sweep),
                       run_.summary["classes"].get("high"), load)
    print("max sustained throughput (req/s): " + ", ".join(
        f"{name} {value:.0f}" for name, value in best.items()), file=out)
    print_lines(run_.table(), out)
    print_lines(["targets:", *format_targets(targets)], out)
    return _report(options, light, sweep, overload, targets)
