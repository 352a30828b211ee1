"""Scenario ``capacity``: fixed caps against the adaptive limit, on a server that queues.

The mock runs its realistic engine (``hutch mock-backend --realistic``): ``room`` requests
run at once (``--max-running``), each output token takes ``tpot_ms`` and more as the batch
grows, and whatever is sent beyond the room waits *inside* the server, where Hutch's
priorities cannot reach it; it exports vLLM's saturation metrics. In one run:

(a) **sweep**: fixed caps (``caps``) at ``factor`` x the server's capacity, 10% high
    priority, ``step_s`` each: throughput in the steady part (from ``warm_s``) and the
    high class's p99; the best fixed cap is the one with the most throughput (ties: the
    lower p99). Then the adaptive limit (``concurrency = "adaptive"``, the server's
    ``/metrics``) from a cold start, as long: its throughput, p99, and how soon it
    reached 95% of the best fixed cap's throughput.
(b) **halving**: the adaptive limit at 0.8x the server's capacity; a third into the run
    the server's room halves (``POST /admin/capacity``), two thirds in it comes back: the
    limit over time, how long it took to settle, and errors (none may come of it).
(c) **two speeds**: two backends, one ``speed_ratio`` times slower per token, each alone
    and then both in one pool, at ``two_factor`` x capacity: the pool's throughput
    against the sum of the two alone, and how the work split between them.

(d) **wait estimates** (:mod:`.capacity_wait`): ``wait_factor`` x capacity for ``wait_s``,
    every request asking for its status: estimated against actual starts. Spill-over and
    shards (issue 22 items 5-6) are not built yet: the scenario does not claim them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hutch_bench.report import RequestRecord
from hutch_bench.scenarios.capacity_wait import wait_phase, wait_target
from hutch_bench.scenarios.common import (
    MODEL,
    LoadShape,
    Target,
    format_targets,
    hutch_clients,
    open_loop,
    print_lines,
    targets_report,
)
from hutch_bench.stack import MockProcess, Stack, free_port
from pipeline.client.client import HutchClient

__all__ = ["CapacityOptions", "run"]


@dataclass(frozen=True)
class CapacityOptions:
    room: int = 12
    reply_tokens: int = 20
    tpot_ms: float = 10.0
    ttft_ms: float = 10.0
    batch_slowdown: float = 0.02
    factor: float = 3.0
    mix: str = "high=0.1,low=0.9"
    caps: tuple[int, ...] = (4, 8, 12, 16, 24, 64)
    ceiling: int = 64
    step_s: float = 20.0
    adaptive_s: float = 20.0
    halve_s: float = 30.0
    speed_ratio: float = 2.0
    #: Two backends saturate at any overload; a small one keeps the bench machine's own
    #: work (answering what expires) from being what is measured.
    two_factor: float = 1.3
    two_s: float = 20.0
    wait_factor: float = 1.5
    wait_s: float = 20.0
    timeout_s: float = 10.0
    warm_s: float = 3.0
    seed: int = 1
    progress: bool = False

    def service_s(self, room: int | None = None, tpot_ms: float | None = None) -> float:
        """One request's time with ``room`` running (the engine's pace, no queue)."""
        running = room if room is not None else self.room
        tpot = (tpot_ms if tpot_ms is not None else self.tpot_ms) / 1000
        return self.ttft_ms / 1000 + self.reply_tokens * tpot * (
            1 + self.batch_slowdown * (running - 1))

    def capacity_rps(self, tpot_ms: float | None = None) -> float:
        return self.room / self.service_s(tpot_ms=tpot_ms)


@dataclass
class Backend:
    """One mock, and how Hutch is told to treat it."""

    mock: MockProcess
    fields: dict[str, Any]

    @property
    def base(self) -> str:
        return self.mock.url.removesuffix("/v1")


@dataclass
class Measured:
    """One load through Hutch: steady throughput, the high class's p99, the limit over
    time (``(s, limit)`` pairs of the first backend), per-second throughput, errors."""

    label: str
    steady_rps: float
    high_p99_ms: float | None
    errors: dict[str, int]
    per_second: list[int]
    limits: list[tuple[float, float]]
    sent: int

    def line(self) -> str:
        p99 = "-" if self.high_p99_ms is None else f"{self.high_p99_ms:.0f} ms"
        peak = max((limit for _, limit in self.limits), default=0)
        return (f"{self.label:>22}: {self.steady_rps:6.1f} req/s steady, high p99 {p99:>8},"
                f" errors {sum(self.errors.values())} of {self.sent}"
                + (f", limit peak {peak:g} last {self.limits[-1][1]:g}" if self.limits
                   else ""))


async def _mock(stack: Stack, options: CapacityOptions, tpot_ms: float) -> MockProcess:
    return await stack.mock(capacity=options.room, latency_ms=100, extra=[
        "--realistic", "--max-running", str(options.room),
        "--kv-tokens", str(options.room * 1000), "--tpot-ms", f"{tpot_ms:g}",
        "--batch-slowdown", f"{options.batch_slowdown:g}", "--ttft-ms",
        f"{options.ttft_ms:g}", "--reply-tokens", str(options.reply_tokens)])


def _backend_entry(stack: Stack, name: str, backend: Backend, ceiling: int) -> dict[str, Any]:
    return {"name": f"{stack.prefix}-{name}", "url": backend.mock.url, "timeout_s": 60,
            "max_concurrency": ceiling, **backend.fields}


def adaptive(backend_base: str, ceiling: int) -> dict[str, Any]:
    return {"concurrency": "adaptive", "max_concurrency": ceiling,
            "metrics_url": f"{backend_base}/metrics"}


async def _limits(url: str, backend: str, until: asyncio.Event, started: float
                  ) -> list[tuple[float, float]]:
    """``hutch_backend_capacity`` of ``backend`` every 0.5 s from a worker's /metrics."""
    seen: list[tuple[float, float]] = []
    async with httpx.AsyncClient(timeout=2) as http:
        while not until.is_set():
            with contextlib.suppress(httpx.HTTPError):
                text = (await http.get(url)).text
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if (sample.name == "hutch_backend_capacity"
                                and sample.labels.get("backend") == backend):
                            seen.append((round(time.monotonic() - started, 2), sample.value))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), 0.5)
    return seen


@contextlib.asynccontextmanager
async def _hutch(stack: Stack, backends: Sequence[Backend], ceiling: int
                 ) -> AsyncIterator[tuple[Any, str]]:
    """One pool of ``backends`` and one worker with a metrics port: (settings, its URL)."""
    settings = stack.settings(pools=[{"name": "bench", "models": [MODEL], "backends": [
        _backend_entry(stack, f"b{i}", b, ceiling) for i, b in enumerate(backends)]}],
        shutdown_grace_s=5)
    await stack.apply(settings)
    port = free_port()
    await stack.worker(settings, extra=["--metrics-port", str(port)])
    await stack.wait_for_consumers(stack.names.work_queue("bench"), len(backends))
    yield settings, f"http://127.0.0.1:{port}/metrics"


@contextlib.asynccontextmanager
async def _one_pool(amqp_url: str, options: CapacityOptions) -> AsyncIterator[HutchClient]:
    """A fresh stack, one backend capped at its room, a client speaking for tenants."""
    async with Stack(amqp_url) as stack:
        mock = await _mock(stack, options, options.tpot_ms)
        async with _hutch(stack, [Backend(mock, {})], options.room) as (settings, _):
            stack.client_ids.append(client_id := f"{settings.amqp_user}.{stack.prefix}-w")
            async with HutchClient.from_settings(settings, client_id=client_id) as client:
                yield client


def _steady(records: Sequence[RequestRecord], warm_s: float, end_s: float) -> float:
    done = [r for r in records if r.error is None and r.done_s is not None
            and warm_s <= r.done_s <= end_s]
    return len(done) / max(1e-9, end_s - warm_s)


def _per_second(records: Sequence[RequestRecord], end_s: float) -> list[int]:
    bins = [0] * max(1, int(end_s) + 1)
    for r in records:
        if r.error is None and r.done_s is not None and r.done_s < len(bins):
            bins[int(r.done_s)] += 1
    return bins


@dataclass(frozen=True)
class Phase:
    """One load: its name, rate, length, the backends' ceiling and the deadline."""

    label: str
    rate: float
    duration_s: float
    ceiling: int
    timeout_s: float | None = None


async def _load(stack: Stack, backends: Sequence[Backend], options: CapacityOptions,
                phase: Phase, during: Any = None) -> Measured:
    label, duration_s = phase.label, phase.duration_s
    async with _hutch(stack, backends, phase.ceiling) as (settings, metrics_url), \
            hutch_clients(stack, settings, 1) as clients:
        stop = asyncio.Event()
        started = time.monotonic()
        watcher = asyncio.create_task(_limits(
            metrics_url, f"{stack.prefix}-b0", stop, started))
        side = asyncio.create_task(during(started)) if during is not None else None
        shape = LoadShape(rate=phase.rate, duration_s=duration_s, mix=options.mix,
                          timeout_s=phase.timeout_s or options.timeout_s, seed=options.seed,
                          progress=options.progress)
        run_ = await open_loop(clients, shape)
        stop.set()
        limits = await watcher
        if side is not None:
            await side
    high = run_.summary["classes"].get("high")
    p99 = high["latency_ms"]["p99"] if high is not None else None
    return Measured(label, _steady(run_.records, options.warm_s, duration_s), p99,
                    run_.summary["total"]["errors"], _per_second(run_.records, duration_s),
                    limits, run_.summary["total"]["sent"])


async def _sweep(amqp_url: str, options: CapacityOptions, out: TextIO
                 ) -> tuple[list[Measured], Measured]:
    rate = options.factor * options.capacity_rps()
    fixed: list[Measured] = []
    for cap in options.caps:
        async with Stack(amqp_url) as stack:
            mock = await _mock(stack, options, options.tpot_ms)
            measured = await _load(stack, [Backend(mock, {})], options,
                                   Phase(f"fixed {cap}", rate, options.step_s, cap))
        print(measured.line(), file=out)
        fixed.append(measured)
    async with Stack(amqp_url) as stack:
        mock = await _mock(stack, options, options.tpot_ms)
        backend = Backend(mock, {})
        backend.fields = adaptive(backend.base, options.ceiling)
        cold = await _load(stack, [backend], options, Phase(
            "adaptive (cold start)", rate, options.adaptive_s, options.ceiling))
    print(cold.line(), file=out)
    return fixed, cold


async def _halving(amqp_url: str, options: CapacityOptions, out: TextIO) -> dict[str, Any]:
    rate = 0.8 * options.capacity_rps()
    third = options.halve_s / 3
    half = max(1, options.room // 2)
    async with Stack(amqp_url) as stack:
        mock = await _mock(stack, options, options.tpot_ms)
        backend = Backend(mock, {})
        backend.fields = adaptive(backend.base, options.ceiling)

        async def switch(started: float) -> None:
            async with httpx.AsyncClient(timeout=5) as http:
                await asyncio.sleep(max(0.0, started + third - time.monotonic()))
                await http.post(f"{backend.base}/admin/capacity", json={"max_running": half})
                await asyncio.sleep(max(0.0, started + 2 * third - time.monotonic()))
                await http.post(f"{backend.base}/admin/capacity",
                                json={"max_running": options.room})

        measured = await _load(stack, [backend], options, Phase(
            "adaptive, room halved", rate, options.halve_s, options.ceiling, timeout_s=120),
            during=switch)
    print(measured.line(), file=out)
    settle = settle_time(measured.limits, third, 2 * third, half)
    print(f"room {options.room} -> {half} at {third:.0f} s, back at {2 * third:.0f} s: "
          f"limit settled {'never' if settle is None else f'{settle:.1f} s'} after the "
          f"halving; limit over time: {_compact(measured.limits)}", file=out)
    return {"measured": asdict(measured), "settle_s": settle, "halved_to": half,
            "halved_at_s": third, "restored_at_s": 2 * third}


def settle_time(limits: Sequence[tuple[float, float]], start: float, end: float,
                target: int) -> float | None:
    """Seconds after ``start`` from which the limit stays within [target - 1, target + 2]
    until ``end`` (None: it never did)."""
    inside = [(t, value) for t, value in limits if start <= t < end]
    settled_at: float | None = None
    for t, value in inside:
        if target - 1 <= value <= target + 2:
            if settled_at is None:
                settled_at = t
        else:
            settled_at = None
    return None if settled_at is None else settled_at - start


def _compact(limits: Sequence[tuple[float, float]]) -> str:
    """One ``t:limit`` per change."""
    shown: list[str] = []
    last = None
    for t, value in limits:
        if value != last:
            shown.append(f"{t:.0f}s:{value:g}")
            last = value
    return " ".join(shown)


async def _two_speeds(amqp_url: str, options: CapacityOptions, out: TextIO) -> dict[str, Any]:
    slow_tpot = options.tpot_ms * options.speed_ratio
    alone: list[Measured] = []
    for label, tpot in (("fast alone", options.tpot_ms), ("slow alone", slow_tpot)):
        async with Stack(amqp_url) as stack:
            mock = await _mock(stack, options, tpot)
            backend = Backend(mock, {})
            backend.fields = adaptive(backend.base, options.ceiling)
            measured = await _load(stack, [backend], options, Phase(
                label, options.two_factor * options.capacity_rps(tpot), options.two_s,
                options.ceiling))
        print(measured.line(), file=out)
        alone.append(measured)
    async with Stack(amqp_url) as stack:
        pair = []
        for tpot in (options.tpot_ms, slow_tpot):
            backend = Backend(await _mock(stack, options, tpot), {})
            backend.fields = adaptive(backend.base, options.ceiling)
            pair.append(backend)
        rate = options.two_factor * (options.capacity_rps(options.tpot_ms)
                                     + options.capacity_rps(slow_tpot))
        both = await _load(stack, pair, options, Phase(
            "both in one pool", rate, options.two_s, options.ceiling))
        shares = [(await b.mock.stats())["served"] for b in pair]
    print(both.line(), file=out)
    total = sum(m.steady_rps for m in alone)
    ratio = both.steady_rps / total if total else 0.0
    print(f"pool {both.steady_rps:.1f} req/s = {ratio:.0%} of the two alone "
          f"({total:.1f}); served fast:slow = {shares[0]}:{shares[1]}", file=out)
    return {"alone": [asdict(m) for m in alone], "both": asdict(both), "ratio": ratio,
            "served": shares}


def _reach_s(measured: Measured, target_rps: float, window: int = 3) -> float | None:
    """First second at which the mean of ``window`` seconds reaches ``target_rps``."""
    bins = measured.per_second
    for i in range(len(bins) - window + 1):
        if sum(bins[i:i + window]) / window >= target_rps:
            return float(i + window)
    return None


async def run(amqp_url: str, options: CapacityOptions, out: TextIO) -> dict[str, Any]:
    print(f"capacity: a server with room for {options.room} (tpot {options.tpot_ms:g} ms, "
          f"{options.reply_tokens} tokens, slowdown {options.batch_slowdown:g}/request): "
          f"~{options.capacity_rps():.0f} req/s; offered {options.factor:g}x, mix "
          f"{options.mix}", file=out)
    fixed, cold = await _sweep(amqp_url, options, out)
    best = max(fixed, key=lambda m: (round(m.steady_rps), -(m.high_p99_ms or 1e9)))
    reach = _reach_s(cold, 0.95 * best.steady_rps)
    halving = await _halving(amqp_url, options, out)
    two = await _two_speeds(amqp_url, options, out)
    waits = await wait_phase(functools.partial(_one_pool, amqp_url, options),
                             options.wait_factor * options.capacity_rps(), options.wait_s,
                             options.seed, out)
    p99_ratio = ((cold.high_p99_ms or 1e9) / best.high_p99_ms
                 if best.high_p99_ms else None)
    targets = [
        Target("adaptive reaches 95% of the best fixed cap's throughput within 30 s",
               f"best fixed: {best.label} {best.steady_rps:.1f} req/s; adaptive "
               f"{cold.steady_rps:.1f} req/s steady, 95% reached "
               f"{'never' if reach is None else f'at {reach:.0f} s'}",
               reach is not None and reach <= 30),
        Target("adaptive high p99 at most 1.2x the best fixed cap's",
               "-" if p99_ratio is None else f"{p99_ratio:.2f}x "
               f"({cold.high_p99_ms or 0:.0f} vs {best.high_p99_ms or 0:.0f} ms)",
               p99_ratio is not None and p99_ratio <= 1.2),
        Target("after the room halves, the limit settles within 10 s",
               "never" if halving["settle_s"] is None else f"{halving['settle_s']:.1f} s",
               halving["settle_s"] is not None and halving["settle_s"] <= 10),
        Target("no request errors because of the halving",
               f"{sum(halving['measured']['errors'].values())} errors",
               not halving["measured"]["errors"]),
        Target("two backends 2:1: pool throughput >= 95% of the sum alone",
               f"{two['ratio']:.0%}", two["ratio"] >= 0.95),
        wait_target(waits),
    ]
    print_lines(["targets:", *format_targets(targets)], out)
    report = {"scenario": "capacity", "config": asdict(options),
              "fixed": [asdict(m) for m in fixed], "best_fixed": best.label,
              "adaptive": asdict(cold), "reach_95_s": reach, "halving": halving,
              "two_speeds": two, "waits": waits, "targets": targets_report(targets)}
    return dict(json.loads(json.dumps(report)))  # as --json writes it: tuples are lists

