"""The lease and its holder against a fake connection (no broker).

What the broker does with an exclusive queue (one holder, RESOURCE_LOCKED for the others,
freed with the connection) is tested against the real broker in tests/test_replicas.py;
here: retrying, holding, and handing over in the right order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage

from pipeline.backends.breaker import BackendGate, BreakerPolicy
from pipeline.capacity.limit import AdaptiveLimit, ConcurrencyLimit
from pipeline.worker.admission import Admission
from pipeline.worker.health import BackendHealthReporter
from pipeline.worker.lease import Intake, Lease, LeaseHolder, LeaseTiming
from tests.test_health import FakeGauge


class FakeQueue:
    def __init__(self, log: list[str]) -> None:
        self._log = log

    async def consume(self, callback: Any, no_ack: bool) -> str:
        self._log.append("consume")
        return "ctag"

    async def cancel(self, tag: str) -> None:
        self._log.append("cancel")


class FakeChannel:
    """A channel on which the lease queue is locked the first ``locked`` times."""

    def __init__(self, broker: FakeBroker) -> None:
        self._broker = broker
        self.close_callbacks: set[Callable[..., Any]] = set()
        self.is_closed = False
        self.qos: list[int] = []

    async def declare_queue(self, name: str, **kwargs: Any) -> FakeQueue:
        if kwargs.get("exclusive"):
            self._broker.log.append(f"declare {name}")
            if self._broker.locked > 0:
                self._broker.locked -= 1
                self.is_closed = True
                raise aiormq.exceptions.ChannelLockedResource(name)
        return FakeQueue(self._broker.log)

    async def set_qos(self, prefetch_count: int) -> None:
        self.qos.append(prefetch_count)

    async def queue_delete(self, name: str) -> None:
        self._broker.log.append(f"delete {name}")

    async def close(self) -> None:
        self.is_closed = True


class FakeBroker:
    def __init__(self, locked: int = 0) -> None:
        self.locked = locked
        self.log: list[str] = []
        self.channels: list[FakeChannel] = []

    async def channel(self, **kwargs: Any) -> FakeChannel:
        channel = FakeChannel(self)
        self.channels.append(channel)
        return channel


def holder(may_take: Callable[[], bool] = lambda: True, limit: ConcurrencyLimit | None = None
           ) -> tuple[LeaseHolder, FakeGauge, FakeGauge]:
    timing = LeaseTiming(retry_s=0.01, grace_s=1.0)
    held, capacity = FakeGauge(), FakeGauge()
    lease = Lease("p.lease.b1", "b1", timing, held)
    gate = BackendGate(BreakerPolicy())
    health = BackendHealthReporter("b1", 4, gate, FakeGauge(), limit=limit)
    intake = Intake("p.work.chat", Admission())
    return (LeaseHolder(lease, health, "chat", intake, capacity, may_take, asyncio.Event()),
            held, capacity)


async def nothing(message: AbstractIncomingMessage) -> None:
    pass


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def test_timing_is_jittered_around_the_retry_interval() -> None:
    timing = LeaseTiming(retry_s=1.0, grace_s=30.0)
    for _ in range(100):
        assert 0 <= timing.first_try() <= 0.25
        assert 0.75 <= timing.retry() <= 1.25
    assert timing.stay_away() == 5.0


async def test_take_retries_while_another_connection_holds_the_lease() -> None:
    broker = FakeBroker(locked=3)
    slot, held, capacity = holder()
    task = asyncio.create_task(slot.run(broker, nothing))  # type: ignore[arg-type]
    try:
        await wait_until(lambda: slot.lease.held)
        assert broker.log.count("declare p.lease.b1") == 4  # three refusals, then ours
        assert held.values == [1]
        await wait_until(lambda: capacity.values == [4])  # consuming with the whole cap
        assert slot.consumer is not None and slot.consumer.prefetch == 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_release_drains_deletes_and_stays_away() -> None:
    broker = FakeBroker()
    slot, held, capacity = holder()
    task = asyncio.create_task(slot.run(broker, nothing))  # type: ignore[arg-type]
    try:
        await wait_until(lambda: capacity.values == [4])
        slot.lease.release()
        assert slot.lease.releasing
        await wait_until(lambda: "delete p.lease.b1" in broker.log)
        assert not slot.lease.held and held.values[-1] == 0
        assert broker.log.index("cancel") < broker.log.index("delete p.lease.b1")
        # It stays away (5 x retry_s), then competes again: the release request is over.
        await wait_until(lambda: not slot.lease.releasing and slot.lease.held)
        assert broker.log.count("declare p.lease.b1") == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_at_fair_share_it_does_not_compete() -> None:
    broker = FakeBroker()
    allowed = False
    slot, _, _ = holder(may_take=lambda: allowed)
    task = asyncio.create_task(slot.run(broker, nothing))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.1)
        assert broker.log == [] and not slot.lease.held
        allowed = True
        await wait_until(lambda: slot.lease.held)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_closed_channel_drops_the_lease_and_consumes_again() -> None:
    broker = FakeBroker()
    slot, held, capacity = holder()
    task = asyncio.create_task(slot.run(broker, nothing))  # type: ignore[arg-type]
    try:
        await wait_until(lambda: capacity.values == [4])
        first = slot.consumer
        assert first is not None
        first.closed.set()  # the broker closed the consumer's channel
        await wait_until(lambda: slot.consumer is not None and slot.consumer is not first)
        assert held.values[:3] == [1, 0, 1] and capacity.values[:2] == [4, 0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_new_holder_starts_an_adaptive_limit_from_its_start_not_the_ceiling(
        ) -> None:
    """The limit a lease holder learned is not the next holder's: after the channel (and
    with it the lease) is lost, taking the lease again starts from ``start``."""
    broker = FakeBroker()
    limit = AdaptiveLimit(1, 64, 4)
    slot, _, capacity = holder(limit=limit)
    task = asyncio.create_task(slot.run(broker, nothing))  # type: ignore[arg-type]
    try:
        await wait_until(lambda: capacity.values == [4])
        for _ in range(3):  # it learned 32 while holding the lease
            limit._set(limit.current * 2, "test", fell=False)
        assert limit.current == 32
        first = slot.consumer
        assert first is not None
        first.closed.set()  # the lease is lost with the channel...
        await wait_until(lambda: slot.consumer is not None and slot.consumer is not first)
        assert limit.current == 4 and limit.state == "start"  # ...and taken again: start
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
