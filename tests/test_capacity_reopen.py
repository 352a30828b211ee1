"""The capacity controller when a throttle ends while it is still resizing: found by the
soak (issue 21), where both backends of a pool stopped consuming for good.

A 429 with ``Retry-After: 0.5`` takes the prefetch to 0: ``basic.cancel`` on a busy broker
can take longer than the half second. The throttle has then ended by the clock alone, so
the controller saw no timer due (``reopens_in`` is None for a serving gate) and waited for
a change nobody would signal, with no consumer: the backend never took a request again.
"""

from __future__ import annotations

import asyncio

from tests.test_capacity import FakeConsumer, setup
from tests.test_health import FakeClock


class SlowCancel(FakeConsumer):
    """A consumer whose ``basic.cancel`` takes longer than the throttle lasts."""

    def __init__(self, clock: FakeClock, cancel_s: float) -> None:
        super().__init__()
        self.clock, self.cancel_s = clock, cancel_s

    async def stop_consuming(self) -> None:
        await super().stop_consuming()
        self.clock.now += self.cancel_s


async def test_a_throttle_that_ends_during_the_cancel_is_followed_at_once() -> None:
    clock = FakeClock()
    health, _, _, controller = setup(clock)
    consumer = SlowCancel(clock, cancel_s=1.0)
    controller._consumer = consumer  # the same controller, on the slow consumer
    until = asyncio.Event()
    task = asyncio.create_task(controller.run([until]))
    try:
        async with asyncio.timeout(2):
            while not consumer.consuming:
                await asyncio.sleep(0.01)
            health.throttled(0.5)  # signalled: the consumer is cancelled (1 s)
            while ("stop", 0) not in consumer.calls:
                await asyncio.sleep(0.01)
            # The throttle ended during the cancel: consume again without any signal.
            while not consumer.consuming:
                await asyncio.sleep(0.01)
        assert consumer.calls == [("start", 4), ("stop", 0), ("start", 4)]
    finally:
        until.set()
        health.changed.set()
        async with asyncio.timeout(1):
            await task
