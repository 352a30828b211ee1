"""Phase (d) of scenario ``capacity``: wait estimates against the measured starts.

An open-loop overload (``rate`` above the pool's capacity for ``duration_s``, so the queue
and the waits grow through the run), every request asking for its status
(``status_after=0``), spread over tenants by ``shares`` (each tenant its own lane; the
bench's user is the worker's, so its ``x-hutch-user`` is believed). For each request that
was told: its **estimated start** (``estimated_start_at_ms`` of its status message) and its
**actual start**, when the worker started it: its send time plus the reply's
``x-hutch-queue-wait-ms`` (measured by the worker when the request takes its permit,
against ``x-hutch-sent-at``; one machine, one clock). The figure issue 22 targets: the
median of ``|estimated - actual| / actual wait``, over the requests that waited more than
1 s (under 20%).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TextIO

from hutch_bench.loadgen import schedule
from hutch_bench.report import percentile
from hutch_bench.scenarios.common import Target, print_lines
from pipeline import protocol as p
from pipeline.client.client import HutchClient
from pipeline.errors import RequestFailed
from pipeline.models import QueueStatus

__all__ = [
    "LOADS",
    "WaitLoad",
    "WaitRecord",
    "accuracy",
    "measure_waits",
    "wait_lines",
    "wait_phase",
    "wait_target",
]

#: The loads of the phase: one tenant (one lane, served in order), then three tenants 6:3:1
#: (three lanes taking turns: where the estimate approximates the fair scheduler).
LOADS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("waits, one tenant", (1.0,)), ("waits, tenants 6:3:1", (0.6, 0.3, 0.1)))


@dataclass(frozen=True)
class WaitLoad:
    rate: float
    duration_s: float
    #: Each tenant's share of the requests (tenants ``t0``, ``t1``, ...).
    shares: tuple[float, ...] = (1.0,)
    timeout_s: float = 300.0
    seed: int = 1


@dataclass
class WaitRecord:
    """One request: its tenant, send time and, if known, status and start (epoch ms)."""

    tenant: str
    sent_ms: int
    status: QueueStatus | None = None
    started_ms: int | None = None
    error: str | None = None

    @property
    def waited_s(self) -> float | None:
        return None if self.started_ms is None else (self.started_ms - self.sent_ms) / 1000


async def _one(client: HutchClient, index: int, tenant: str, load: WaitLoad
               ) -> WaitRecord:
    record = WaitRecord(tenant, p.now_ms())

    def told(status: QueueStatus) -> None:
        record.status = status

    body = {"model": "mock-small", "messages": [{"role": "user", "content": f"w{index}"}]}
    try:
        cid = await client.submit(body, model="mock-small", timeout=load.timeout_s,
                                  headers={p.H_USER: tenant}, status_after=0,
                                  on_status=told)
        reply = await client.result(cid)
    except RequestFailed as exc:
        record.error = exc.code or type(exc).__name__
        return record
    if reply.queue_wait_ms is not None:
        record.started_ms = record.sent_ms + reply.queue_wait_ms
    return record


async def measure_waits(client: HutchClient, load: WaitLoad) -> list[WaitRecord]:
    """Run ``load`` on ``client``; every request's record, in send order."""
    times = schedule(load.rate, load.duration_s, arrival="poisson", seed=load.seed)
    rng = random.Random(load.seed)
    tenants = [f"t{i}" for i in range(len(load.shares))]
    start = time.monotonic()
    tasks: list[asyncio.Task[WaitRecord]] = []
    for index, at in enumerate(times):
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        tenant = rng.choices(tenants, weights=load.shares)[0]
        tasks.append(asyncio.create_task(_one(client, index, tenant, load)))
    return list(await asyncio.gather(*tasks))


def _judged(records: Sequence[WaitRecord], min_wait_s: float) -> list[tuple[int, int, int]]:
    """(estimated start, actual start, sent), epoch ms, of each request that was told an
    estimated start and waited more than ``min_wait_s``."""
    out = []
    for r in records:
        estimated = r.status.estimated_start_at_ms if r.status is not None else None
        if (estimated is not None and r.started_ms is not None
                and r.started_ms - r.sent_ms > min_wait_s * 1000):
            out.append((estimated, r.started_ms, r.sent_ms))
    return out


def accuracy(records: Sequence[WaitRecord], min_wait_s: float = 1.0) -> dict[str, Any]:
    """The error distribution of the estimates of requests that waited > ``min_wait_s``:
    relative errors (|estimated - actual start| / actual wait) and the signed bias (s)."""
    judged = _judged(records, min_wait_s)
    errors = [abs(est - actual) / (actual - sent) for est, actual, sent in judged]
    bias = [(est - actual) / 1000 for est, actual, _ in judged]
    waits = [w for r in records if (w := r.waited_s) is not None and w > min_wait_s]
    # Those that started while requests still arrived: the traffic the estimate assumes
    # goes on (after the last send, the other tenants' turns stop and queues drain faster).
    last_sent = max((r.sent_ms for r in records), default=0)
    steady = [abs(est - actual) / (actual - sent) for est, actual, sent in judged
              if actual <= last_sent]

    def pct(values: Sequence[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    return {"requests": len(records), "told": sum(1 for r in records if r.status),
            "errors": sum(1 for r in records if r.error), "waited": len(waits),
            "judged": len(judged), "max_wait_s": max(waits, default=None),
            "median_wait_s": pct(waits, 50),
            "median_error": pct(errors, 50), "p90_error": pct(errors, 90),
            "median_bias_s": pct(bias, 50), "steady_judged": len(steady),
            "steady_median_error": pct(steady, 50), "steady_p90_error": pct(steady, 90)}


def wait_lines(label: str, figures: dict[str, Any]) -> list[str]:
    def shown(value: float | None, unit: str = "") -> str:
        if value is None:
            return "-"
        return f"{value:.0%}" if unit == "%" else f"{value:.1f}{unit}"

    return [f"{label:>22}: {figures['requests']} requests, {figures['told']} told, "
            f"{figures['waited']} waited > 1 s (median {shown(figures['median_wait_s'], ' s')}"
            f", max {shown(figures['max_wait_s'], ' s')}), errors {figures['errors']}",
            f"{'':>22}  estimate error (of {figures['judged']}): median "
            f"{shown(figures['median_error'], '%')}, p90 {shown(figures['p90_error'], '%')}"
            f", median bias {shown(figures['median_bias_s'], ' s')} (+: estimated late)",
            f"{'':>22}  of {figures['steady_judged']} started while requests still arrived: "
            f"median {shown(figures['steady_median_error'], '%')}, p90 "
            f"{shown(figures['steady_p90_error'], '%')}"]


async def wait_phase(pool: Callable[[], AbstractAsyncContextManager[HutchClient]],
                     rate: float, duration_s: float, seed: int, out: TextIO
                     ) -> dict[str, Any]:
    """Each of :data:`LOADS` on a fresh pool (``pool()``: a client of it): its figures."""
    figures: dict[str, Any] = {}
    for label, shares in LOADS:
        async with pool() as client:
            records = await measure_waits(client, WaitLoad(rate, duration_s, shares,
                                                           seed=seed))
        figures[label] = accuracy(records)
        print_lines(wait_lines(label, figures[label]), out)
    return figures


def wait_target(figures: dict[str, Any]) -> Target:
    errors = {label: f["median_error"] for label, f in figures.items()}
    return Target("wait estimates: median error < 20% of the wait (waited > 1 s)",
                  ", ".join(f"{label.removeprefix('waits, ')}: "
                            f"{'-' if e is None else f'{e:.0%}'}"
                            for label, e in errors.items()),
                  all(e is not None and e < 0.2 for e in errors.values()))
