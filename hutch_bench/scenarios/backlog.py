"""Scenario ``backlog``: 100,000 requests wait before any worker runs; then one drains them.

Shows that a backlog costs the broker disk and memory, not the worker: the worker's
prefetch bounds what it holds, so its memory stays flat however deep the queue. Reports
the publish rate, the drain rate (answers per second from the moment the worker consumes
to the last answer), the worker's resident memory (sampled, and the kernel's high-water mark) and
the queue depth over time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from hutch_bench.loadgen import build_prompt
from hutch_bench.scenarios.common import (
    MODEL,
    Target,
    apply_hutch,
    format_targets,
    hutch_clients,
    print_lines,
    start_workers,
    targets_report,
)
from hutch_bench.stack import Child, Stack
from pipeline.broker.connection import connect_url
from pipeline.client.client import HutchClient
from pipeline.errors import RequestFailed

__all__ = ["BacklogOptions", "run"]


@dataclass(frozen=True)
class BacklogOptions:
    requests: int = 100_000
    capacity: int = 64
    service_ms: float = 1.0
    publish_concurrency: int = 256
    rss_limit_mib: float = 200.0
    sample_every_s: float = 0.5
    progress: bool = False


async def _watch(stack: Stack, worker: Child, every_s: float, samples: list[dict[str, Any]],
                 started: float, out: TextIO | None) -> None:
    """Sample the worker's RSS and the queue depth until cancelled."""
    connection = await connect_url(stack.amqp_url, name="hutch bench backlog")
    async with connection:
        channel = await connection.channel()
        queue = stack.names.work_queue("bench")
        while True:
            declared = await channel.declare_queue(queue, passive=True)
            sample = {"t_s": round(time.monotonic() - started, 3),
                      "queue_depth": declared.declaration_result.message_count or 0,
                      "rss_mib": worker.rss_mib()}
            samples.append(sample)
            if out is not None:
                print(f"  t={sample['t_s']:7.1f}s  queued {sample['queue_depth']:7d}  "
                      f"worker RSS {sample['rss_mib'] or 0:6.1f} MiB", file=out, flush=True)
            await asyncio.sleep(every_s)


async def _publish(client: HutchClient, n: int, concurrency: int) -> list[str]:
    """Queue ``n`` requests, at most ``concurrency`` publishes awaiting their confirm."""
    gate = asyncio.Semaphore(concurrency)

    async def submit(i: int) -> str:
        body = {"model": MODEL,
                "messages": [{"role": "user", "content": build_prompt(i, 16)}]}
        async with gate:
            return await client.submit(body, model=MODEL, timeout=3600)

    return list(await asyncio.gather(*(submit(i) for i in range(n))))


async def _collect(client: HutchClient, ids: list[str]) -> tuple[int, dict[str, int]]:
    """Wait for every answer: how many were ok, and the error codes of the others."""
    ok = 0
    errors: dict[str, int] = {}
    for cid in ids:  # replies arrive in any order; each is kept until claimed
        try:
            await client.result(cid)
            ok += 1
        except RequestFailed as exc:
            errors[exc.code] = errors.get(exc.code, 0) + 1
    return ok, errors


@dataclass
class _Drain:
    """What a run measured."""

    publish_s: float = 0.0
    ready_s: float = 0.0
    drain_s: float = 0.0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    peak_hwm: float | None = None


async def _measure(stack: Stack, options: BacklogOptions, out: TextIO) -> _Drain:
    """Publish the backlog, then start one worker and time how it drains."""
    n = options.requests
    result = _Drain()
    mock = await stack.mock(capacity=options.capacity, latency_ms=options.service_ms)
    settings = await apply_hutch(stack, mock, capacity=options.capacity,
                                 max_queue_length=max(10_000, 2 * n))
    async with hutch_clients(stack, settings, 1) as (client,):
        t0 = time.monotonic()
        ids = await _publish(client, n, options.publish_concurrency)
        result.publish_s = time.monotonic() - t0
        print(f"published {n} in {result.publish_s:.1f} s ({n / result.publish_s:.0f}/s)",
              file=out)
        t1 = time.monotonic()
        (worker,) = await start_workers(stack, settings, 1)
        result.ready_s = time.monotonic() - t1  # process start, connect, lease, consume
        watcher = asyncio.create_task(_watch(
            stack, worker, options.sample_every_s if n > 1000 else 0.1, result.samples, t1,
            out if options.progress else None))
        try:
            result.ok, result.errors = await _collect(client, ids)
            result.drain_s = time.monotonic() - t1 - result.ready_s
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        result.peak_hwm = worker.peak_rss_mib()
    return result


async def run(amqp_url: str, options: BacklogOptions, out: TextIO) -> dict[str, Any]:
    n = options.requests
    print(f"backlog: {n} requests queued first, then one worker drains them into a mock "
          f"of {options.capacity} slots x {options.service_ms:g} ms", file=out)
    async with Stack(amqp_url) as stack:
        m = await _measure(stack, options, out)
    sampled = [s["rss_mib"] for s in m.samples if s["rss_mib"] is not None]
    peak = max([*sampled, *([m.peak_hwm] if m.peak_hwm is not None else [])], default=None)
    rate = n / m.drain_s
    report: dict[str, Any] = {
        "scenario": "backlog",
        "title": f"Backlog: {n} requests drained by one worker",
        "config": options.__dict__,
        "publish_s": m.publish_s, "publish_rps": n / m.publish_s,
        "worker_ready_s": m.ready_s, "drain_s": m.drain_s, "drain_rps": rate,
        "answered": m.ok, "errors": m.errors,
        "worker_rss_mib": {"peak": peak, "high_water_mark": m.peak_hwm,
                           "max_sampled": max(sampled, default=None),
                           "min_sampled": min(sampled, default=None)},
        "samples": m.samples,
    }
    targets = [
        Target(f"worker RSS < {options.rss_limit_mib:g} MiB while {n} drain",
               "unknown (no /proc)" if peak is None else f"peak {peak:.1f} MiB",
               peak is not None and peak < options.rss_limit_mib),
        Target("every request answered", f"{m.ok} of {n}", m.ok == n),
    ]
    report["targets"] = targets_report(targets)
    print(f"drained {m.ok} of {n} in {m.drain_s:.1f} s: {rate:.0f} answers/s (after the "
          f"worker's {m.ready_s:.1f} s start); errors {m.errors or 'none'}", file=out)
    print(f"worker RSS: peak {peak if peak is None else round(peak, 1)} MiB "
          f"(high-water mark {m.peak_hwm if m.peak_hwm is None else round(m.peak_hwm, 1)}, "
          f"{len(sampled)} samples)", file=out)
    print_lines(["targets:", *format_targets(targets)], out)
    return report
