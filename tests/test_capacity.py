"""The capacity controller against a fake consumer: the admission's permits and the
consumer's prefetch follow the health (no broker)."""

from __future__ import annotations

import asyncio

from pipeline.backends.breaker import BackendGate, BreakerPolicy
from pipeline.worker.admission import Admission
from pipeline.worker.capacity import LANE_HEADROOM, CapacityController
from pipeline.worker.health import BackendHealthReporter
from tests.test_health import FakeClock, FakeGauge


class FakeConsumer:
    """Records what the controller asks of a TrackedConsumer."""

    def __init__(self) -> None:
        self.prefetch = 4
        self.consuming = False
        self.closed = asyncio.Event()
        self.calls: list[tuple[str, int]] = []
        self.lane_prefetch = 1

    async def start(self, prefetch: int | None = None, lane_prefetch: int | None = None
                    ) -> None:
        if prefetch is not None:
            self.prefetch = prefetch
        if lane_prefetch is not None:
            self.lane_prefetch = lane_prefetch
        self.consuming = True
        self.calls.append(("start", self.prefetch))

    async def stop_consuming(self) -> None:
        self.consuming = False
        self.calls.append(("stop", 0))



def setup(clock: FakeClock | None = None, cooldown_s: float = 10.0, lookahead: int = 0
          ) -> tuple[BackendHealthReporter, FakeConsumer, FakeGauge, CapacityController]:
    kwargs = {"clock": clock} if clock is not None else {}
    gate = BackendGate(BreakerPolicy(failure_threshold=1, cooldown_s=cooldown_s), **kwargs)
    health = BackendHealthReporter("b1", 4, gate, FakeGauge())
    consumer, gauge = FakeConsumer(), FakeGauge()
    admission = Admission(lookahead=lookahead)
    return health, consumer, gauge, CapacityController(consumer, health, gauge, admission)


async def test_prefetch_follows_the_gate() -> None:
    clock = FakeClock()
    health, consumer, gauge, controller = setup(clock)
    await controller.adjust()
    assert consumer.calls == [("start", 4)]
    assert gauge.values == [4]
    await controller.adjust()  # nothing changed: nothing done
    assert len(consumer.calls) == 1
    health.failure()  # open: no consumer at all
    await controller.adjust()
    assert consumer.calls[-1] == ("stop", 0) and not consumer.consuming
    assert gauge.values[-1] == 0
    clock.now += 10.0  # half-open: one probe (the permits keep leftovers within the cap)
    consumer.calls.clear()
    await controller.adjust()
    assert consumer.calls == [("start", 1)]
    assert gauge.values[-1] == 1
    health.success(0.1)  # closed again: cancel and consume with the whole cap
    consumer.calls.clear()
    await controller.adjust()
    assert consumer.calls == [("stop", 0), ("start", 4)]


async def test_lookahead_adds_to_the_prefetch_not_to_the_permits() -> None:
    health, consumer, gauge, controller = setup(lookahead=3)
    await controller.adjust()
    assert consumer.calls == [("start", 7)] and gauge.values == [4]
    assert consumer.lane_prefetch == 4 + LANE_HEADROOM  # the lanes follow the limit
    health.max_concurrency = 2  # a lower limit (a re-cap; an adaptive limit's fall)
    await controller.adjust()
    assert consumer.calls[-1] == ("start", 5) and consumer.lane_prefetch == 2 + LANE_HEADROOM
    health.failure()
    await controller.adjust()
    assert not consumer.consuming


async def test_pause_takes_the_prefetch_to_zero_and_resume_restores_it() -> None:
    health, consumer, gauge, controller = setup()
    await controller.adjust()
    health.pause()
    await controller.adjust()
    assert not consumer.consuming and gauge.values[-1] == 0
    health.resume()
    await controller.adjust()
    assert consumer.consuming and consumer.prefetch == 4


async def test_run_wakes_on_changes_and_on_the_cooldown_timer() -> None:
    health, consumer, _, controller = setup(cooldown_s=0.1)
    until = asyncio.Event()
    task = asyncio.create_task(controller.run([until]))
    async with asyncio.timeout(2):
        while not consumer.consuming:
            await asyncio.sleep(0.01)
        health.failure()  # signalled: the consumer is cancelled at once
        while consumer.consuming:
            await asyncio.sleep(0.01)
        # Nobody signals the end of the cooldown: the controller's own timer does.
        while not consumer.consuming:
            await asyncio.sleep(0.01)
    assert consumer.prefetch == 1
    until.set()
    async with asyncio.timeout(1):
        await task


async def test_run_ends_when_the_channel_closes() -> None:
    _, consumer, _, controller = setup()
    task = asyncio.create_task(controller.run([asyncio.Event()]))
    await asyncio.sleep(0.05)
    consumer.closed.set()
    async with asyncio.timeout(1):
        await task
