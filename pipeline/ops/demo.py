"""``hutch demo``: priorities overtaking a saturated backlog, on the real broker.

Against ``HUTCH_AMQP_URL`` (default: the local broker) it applies a topology under a
prefix of its own, starts an embedded mock backend and a worker in this process, sends a
burst of low-priority requests that overloads the backend, then a few high-priority ones,
and prints per-priority counts and latencies. Everything it started stops before it
returns, and its queues are deleted unless ``--keep-topology``; what it kept is removed
later with ``hutch demo --remove-topology <prefix>`` (it prints that command).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from dataclasses import dataclass

from pipeline.broker.connection import connect
from pipeline.broker.management import ManagementAPI
from pipeline.client.client import HutchClient
from pipeline.errors import OperationError, RequestFailed
from pipeline.observe.log import configure_logging
from pipeline.settings import DEFAULT_AMQP_URL, load_settings
from pipeline.testing.embedded import embedded_hutch

__all__ = ["DemoResult", "remove_demo_topology", "run_demo"]

LOW, HIGH = 0, 9
MODEL = "mock-small"
#: Every demo works under a prefix of this form; removal refuses any other prefix, so it
#: can never delete a real deployment's ``llm.*``.
PREFIX_PATTERN = r"hutch-demo-\d+"


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


def _positions(results: list[DemoResult]) -> dict[int, list[int]]:
    """Each priority's finish positions: ranks in the order all answers arrived."""
    order = sorted(results, key=lambda r: r.finished_at)
    positions: dict[int, list[int]] = {LOW: [], HIGH: []}
    for rank, result in enumerate(order, start=1):
        positions[result.priority].append(rank)
    return positions


def _span(positions: list[int]) -> str:
    return f"{positions[0]}..{positions[-1]}" if positions else "-"


def _table(results: list[DemoResult]) -> list[str]:
    positions = _positions(results)
    header = (f"{'priority':>8} {'sent':>5} {'ok':>5} {'errors':>6} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'max ms':>8} {'finish positions':>18}")
    lines = [header, "-" * len(header)]
    for priority, label in ((HIGH, "high 9"), (LOW, "low 0")):
        group = [r for r in results if r.priority == priority]
        ok = [r.latency_s * 1000 for r in group if r.error is None]
        lines.append(
            f"{label:>8} {len(group):>5} {len(ok):>5} {len(group) - len(ok):>6} "
            f"{_percentile(ok, 0.5):>8.0f} {_percentile(ok, 0.95):>8.0f} "
            f"{max(ok, default=float('nan')):>8.0f} {_span(positions[priority]):>18}")
    highs, lows = len(positions[HIGH]), len(positions[LOW])
    lines += [
        f"finish positions: ranks in the order all {highs + lows} answers arrived "
        f"(1 = first). The {highs} high-priority",
        f"requests were sent last, after the {lows} low ones, yet finished at "
        f"{_span(positions[HIGH])}: only low-priority",
        "requests answered or already at the backend by then finished before them."]
    return lines


def _summary(results: list[DemoResult], elapsed: float, max_concurrency: object,
             capacity: int) -> bool:
    """Print the table and the verdict; True when high priority overtook."""
    print()
    for line in _table(results):
        print(line)
    high_ok = [r.latency_s for r in results if r.priority == HIGH and r.error is None]
    low_ok = [r.latency_s for r in results if r.priority == LOW and r.error is None]
    print()
    print(f"{len(results)} requests in {elapsed:.2f} s = {len(results) / elapsed:.0f} "
          f"requests/s; backend max concurrency {max_concurrency} of {capacity} slots")
    overtook = bool(high_ok and low_ok) and (
        statistics.median(high_ok) < statistics.median(low_ok))
    if overtook:
        print("high-priority requests overtook the low-priority backlog: they waited "
              "for one free backend slot, not behind the queue")
    else:
        print("high-priority requests did NOT overtake the backlog (too little load?)")
    return overtook


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
        errors = [r for r in results if r.error is not None]
        overtook = _summary(results, elapsed, mock.stats()["max_concurrency"], capacity)
        if keep:
            print(f"topology kept: exchanges, queues and a policy named {prefix}.* in "
                  f"vhost {settings.vhost!r}. Remove them with (the same HUTCH_AMQP_URL "
                  "and, if set, HUTCH_MANAGEMENT_URL):")
            print(f"  hutch demo --remove-topology {prefix}")
        return 0 if not errors and overtook else 1


async def remove_demo_topology(prefix: str) -> str:
    """Delete what ``hutch demo --keep-topology`` kept under ``prefix`` (on
    ``HUTCH_AMQP_URL``): every policy, queue and exchange named ``<prefix>.*``. Only a
    demo's prefix is accepted. Returns a line saying what was removed."""
    if not re.fullmatch(PREFIX_PATTERN, prefix):
        raise OperationError(f"{prefix!r} is not a demo's prefix (hutch-demo-<pid>, as "
                             "`hutch demo --keep-topology` printed it); nothing removed")
    settings = load_settings(amqp_url=os.environ.get("HUTCH_AMQP_URL", DEFAULT_AMQP_URL),
                             prefix=prefix)
    vhost, mine = settings.vhost, prefix + "."
    async with ManagementAPI.from_settings(settings) as api:
        await api.check_same_broker()
        policies = [p["name"] for p in await api.list_policies(vhost)
                    if p["name"].startswith(mine)]
        # Exclusive queues (a running worker's lease) vanish with their connection.
        queues = [q["name"] for q in await api.list_queues(vhost)
                  if q["name"].startswith(mine) and not q.get("exclusive")]
        exchanges = [e["name"] for e in await api.list_exchanges(vhost)
                     if e["name"].startswith(mine)]
        for policy in policies:
            await api.delete_policy(vhost, policy)
    async with await connect(settings, name="hutch demo") as connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    if not (queues or exchanges or policies):
        return (f"nothing named {mine}* in vhost {vhost!r} of {settings.redacted_amqp_url()}: "
                "removed already, or kept on another broker? Use the HUTCH_AMQP_URL (and "
                "HUTCH_MANAGEMENT_URL) the demo ran with")
    return (f"removed {len(queues)} queue(s), {len(exchanges)} exchange(s) and "
            f"{len(policies)} polic{'y' if len(policies) == 1 else 'ies'} named {mine}* from "
            f"vhost {vhost!r}")
