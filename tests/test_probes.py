"""The worker's /healthz (its event loop turns) and /readyz (connected, serving)."""

from __future__ import annotations

import asyncio

from pipeline.observe.probes import LoopHeartbeat
from pipeline.worker.worker import Worker
from tests.conftest import SettingsFactory


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_heartbeat_fails_when_the_loop_stops_turning() -> None:
    clock = Clock()
    heartbeat = LoopHeartbeat(interval_s=0.01, stall_s=30, clock=clock)
    beating = asyncio.create_task(heartbeat.run())
    await asyncio.sleep(0.05)
    assert heartbeat.check() == (True, "ok")
    beating.cancel()  # the loop no longer refreshes it...
    clock.now += 31  # ...and time passes
    ok, reason = heartbeat.check()
    assert not ok and "stalled for 31s" in reason


def test_readiness_follows_the_workers_state(make_settings: SettingsFactory) -> None:
    worker = Worker(make_settings())
    assert worker.readiness() == (False, "connecting to the broker")
    worker.ready.set()
    ok, reason = worker.readiness()
    assert ok and reason.startswith("serving")
    worker.stop()
    assert worker.readiness() == (False, "draining")
