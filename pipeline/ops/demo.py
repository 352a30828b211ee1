"""``hutch demo``: priorities overtaking a saturated backlog, on the real broker.

Against ``HUTCH_AMQP_URL`` (default: the local broker) it applies a topology under a
prefix of its own, starts an embedded mock backend and a worker in this process, sends a
burst of low-priority requests that overloads the backend, then a few high-priority ones,
and prints per-priority counts and latencies. Everything it started stops before it
returns, and its queues are deleted unless ``--keep-topology``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass

from pipeline.client.client import HutchClient
from pipeline.errors import RequestFailed
from pipeline.observe.log import configure_logging
from pipeline.settings import DEFAULT_AMQP_URL
from pipeline.testing.embedded import embedded_hutch

__all__ = ["DemoResult", "run_demo"]

LOW, HIGH = 0, 9
MODEL = "mock-small"


@dataclass
class DemoResult:
    priority: int
    latency_s: float
    finished_at: float
    error: str | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _table(results: list[DemoResult], started: float) -> list[str]:
    order = sorted(results, key=lambda r: r.finished_at)
    position = {id(r): i + 1 for i, r in enumerate(order)}
    header = (f"{'priority':>8} {'sent':>5} {'ok':>5} {'errors':>6} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'max ms':>8} {'finish positions':>18}")
    lines = [header, "-" * len(header)]
    for priority, label in ((HIGH, "high 9"), (LOW, "low 0")):
        group = [r for r in results if r.priority == priority]
        ok = [r.latency_s * 1000 for r in group if r.error is None]
        positions = sorted(position[id(r)] for r in group)
        span = f"{positions[0]}..{positions[-1]}" if positions else "-"
        lines.append(
            f"{label:>8} {len(group):>5} {len(ok):>5} {len(group) - len(ok):>6} "
            f"{_percentile(ok, 0.5):>8.0f} {_percentile(ok, 0.95):>8.0f} "
            f"{max(ok, default=float('nan')):>8.0f} {span:>18}")
    return lines


async def run_demo(*, low: int = 60, high: int = 10, capacity: int = 4,
                   latency_ms: float = 100.0, keep: bool = False) -> int:
    """Run the demo; 0 when every request was answered and high priority overtook."""
    configure_logging("WARNING")
    amqp_url = os.environ.get("HUTCH_AMQP_URL", DEFAULT_AMQP_URL)
    prefix = f"hutch-demo-{os.getpid()}"
    print(f"mock backend: {capacity} slots x {latency_ms:.0f} ms "
          f"= {capacity * 1000 / latency_ms:.0f} requests/s at most")
    async with embedded_hutch(amqp_url, models=[MODEL], capacity=capacity,
                              latency_ms=latency_ms, prefix=prefix, pool="demo",
                              keep_topology=keep) as embedded:
        settings, mock = embedded.settings, embedded.mock
        embedded.client_ids.append(f"{prefix}-client")
        print(f"broker {settings.redacted_amqp_url()}  vhost {settings.vhost!r}  "
              f"prefix {prefix!r}")
        async with HutchClient.from_settings(settings, client_id=f"{prefix}-client") as client:
            started = time.monotonic()

            async def one(priority: int, i: int) -> DemoResult:
                t0 = time.monotonic()
                try:
                    await client.chat(model=MODEL, priority=priority, timeout=60,
                                      messages=[{"role": "user", "content": f"request {i}"}])
                    error = None
                except RequestFailed as exc:
                    error = exc.code
                now = time.monotonic()
                return DemoResult(priority, now - t0, now, error)

            print(f"sending {low} low-priority requests (priority {LOW}) at once ...")
            lows = [asyncio.create_task(one(LOW, i)) for i in range(low)]
            # Let the burst fill the backend's slots and queue up behind them.
            await asyncio.sleep(max(0.3, 2 * latency_ms / 1000))
            print(f"... then {high} high-priority requests (priority {HIGH})")
            highs = [asyncio.create_task(one(HIGH, i)) for i in range(high)]
            results = await asyncio.gather(*lows, *highs)
            elapsed = time.monotonic() - started
        print()
        for line in _table(results, started):
            print(line)
        errors = [r for r in results if r.error is not None]
        stats = mock.stats()
        high_ok = [r.latency_s for r in results if r.priority == HIGH and r.error is None]
        low_ok = [r.latency_s for r in results if r.priority == LOW and r.error is None]
        print()
        print(f"{len(results)} requests in {elapsed:.2f} s = {len(results) / elapsed:.0f} "
              f"requests/s; backend max concurrency {stats['max_concurrency']} "
              f"of {capacity} slots")
        overtook = bool(high_ok and low_ok) and (
            statistics.median(high_ok) < statistics.median(low_ok))
        if overtook:
            print("high-priority requests overtook the low-priority backlog: they waited "
                  "for one free backend slot, not behind the queue")
        else:
            print("high-priority requests did NOT overtake the backlog (too little load?)")
        if keep:
            print(f"topology kept: queues {prefix}.* in vhost {settings.vhost!r}")
        return 0 if not errors and overtook else 1
