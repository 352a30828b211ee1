"""A pool's backlog in tokens and its drain time (pipeline.capacity.backlog), and a
worker exporting them against the real broker."""

from __future__ import annotations

import asyncio
import json
import math

import httpx

from hutch import HutchClient
from pipeline.broker.topology import apply_topology
from pipeline.capacity.backlog import BacklogEstimate, ServiceRate
from pipeline.ops.status import format_status, status
from tests.conftest import SettingsFactory, running_worker, wait_for
from tests.fakes import completion


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_and_tokens_follow_the_last_window() -> None:
    clock = Clock()
    rate = ServiceRate(window_s=60, clock=clock)
    assert rate.per_second() == 0 and rate.tokens_per_request() is None
    clock.now += 10
    for tokens in (100, 300, None):
        rate.completed(tokens)
    assert rate.per_second() == 3 / 10  # counting began 10 s ago
    assert rate.tokens_per_request() == 200  # usage-less completions are not averaged in
    clock.now += 100  # the window moves on: nothing recent
    assert rate.per_second() == 0 and rate.tokens_per_request() is None


def test_the_estimate_scales_this_workers_rate_to_the_whole_pool() -> None:
    clock = Clock()
    rate = ServiceRate(window_s=60, clock=clock)
    clock.now += 60
    for _ in range(120):  # 2 per second here
        rate.completed(50)
    # This worker holds 1 of the pool's 2 backends: the pool serves 4 per second.
    estimate = BacklogEstimate.of(40, rate, share=0.5)
    assert estimate == BacklogEstimate(40, 2000.0, 10.0)
    assert BacklogEstimate.of(0, rate, share=0.5) == BacklogEstimate(0, 0.0, 0.0)
    idle = ServiceRate(clock=clock)
    assert BacklogEstimate.of(5, idle, share=1.0).drain_s is None  # no rate: unknown


async def test_a_worker_exports_its_pools_backlog(make_settings: SettingsFactory) -> None:
    settings = make_settings([("b1", "http://backlog.invalid/v1", 2)])

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.1)
        return httpx.Response(200, json=completion(
            model=json.loads(request.content)["model"],
            usage={"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}))

    await apply_topology(settings)
    async with running_worker(settings, transport_factory=lambda _: httpx.MockTransport(
            slow)) as worker, HutchClient.from_settings(settings) as client:
        sample = worker.metrics.registry.get_sample_value
        calls = [asyncio.create_task(client.chat(
            model="mock-small", messages=[{"role": "user", "content": str(i)}], timeout=60))
            for i in range(300)]
        # 2 slots x 0.1 s: ~20 per second, 300 queued: the backlog is read every 5 s.

        async def exported() -> bool:
            return (sample("hutch_pool_backlog_requests", {"pool": "chat"}) or 0) > 0

        await wait_for(exported, timeout=30)
        requests = sample("hutch_pool_backlog_requests", {"pool": "chat"})
        tokens = sample("hutch_pool_backlog_tokens", {"pool": "chat"})
        drain = sample("hutch_pool_drain_seconds", {"pool": "chat"})
        server = worker.metrics.serve(0, addr="127.0.0.1")  # what `hutch status` reads
        try:
            report = await status(settings, [f"127.0.0.1:{server.port}"])
        finally:
            server.close()
        await asyncio.gather(*calls)
    pool = report.queue("work", "chat")
    assert pool.backlog_tokens is not None and pool.wait_s is not None and pool.wait_s > 0
    text = format_status(report)
    assert "BACKLOG TOKENS" in text and "EST. WAIT" in text and f"{pool.wait_s:.1f}s" in text
    assert requests is not None and 0 < requests < 300
    assert tokens == requests * 50  # every completion so far reported 50 tokens
    assert drain is not None and not math.isnan(drain) and drain > 0
