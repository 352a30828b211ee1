"""The prefetch controller: a leased backend's consumer holds exactly what it may take.

Prefetch = the backend's free slots is what makes priority hold (README, "The worker"), so
the consumer's prefetch follows the backend's health: ``max_concurrency`` while healthy, 1
while a circuit probe is due, no consumer at all while the circuit is open, a 429 asked
for time or the pool is paused. No request then waits on a backend that cannot serve it.

On RabbitMQ 3.10 a live prefetch change has no effect on a consumer, so resizing means
cancelling and consuming again, and the new consumer starts only once the old one's
leftovers plus the new prefetch fit the cap.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from pipeline.observe.log import get_logger
from pipeline.worker.health import Level

__all__ = ["CapacityController", "CapacitySource", "PrefetchConsumer"]

log = get_logger("hutch.worker")


class PrefetchConsumer(Protocol):
    """What the controller drives: :class:`~pipeline.worker.consumer.TrackedConsumer`."""

    @property
    def prefetch(self) -> int: ...
    @property
    def consuming(self) -> bool: ...
    @property
    def closed(self) -> asyncio.Event: ...
    async def start(self, prefetch: int | None = None) -> None: ...
    async def stop_consuming(self) -> None: ...
    async def wait_in_flight_at_most(self, n: int) -> None: ...


class CapacitySource(Protocol):
    """What the controller reads: :class:`~pipeline.worker.health.BackendHealthReporter`."""

    @property
    def backend(self) -> str: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def changed(self) -> asyncio.Event: ...
    def allowed(self) -> int: ...
    def reopens_in(self) -> float | None: ...
    def describe(self) -> str: ...


class CapacityController:
    """Keeps ``consumer``'s prefetch equal to what ``source`` allows."""

    def __init__(self, consumer: PrefetchConsumer, source: CapacitySource,
                 capacity_gauge: Level) -> None:
        self._consumer = consumer
        self._source = source
        self._gauge = capacity_gauge

    async def run(self, until: asyncio.Event) -> None:
        """Follow the source until the consumer's channel closes or ``until`` is set."""
        consumer, source = self._consumer, self._source
        while not consumer.closed.is_set() and not until.is_set():
            source.changed.clear()
            await self.adjust()
            # Wake on a change, on the channel closing, on ``until``, or when an open
            # circuit or a throttle is due to end (the gate reads half-open/closed by the
            # clock alone, nobody signals it).
            waiters = {asyncio.ensure_future(source.changed.wait()),
                       asyncio.ensure_future(consumer.closed.wait()),
                       asyncio.ensure_future(until.wait())}
            try:
                await asyncio.wait(waiters, timeout=source.reopens_in(),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def adjust(self) -> None:
        """One step: cancel and consume again if the prefetch must change."""
        consumer, source = self._consumer, self._source
        want = source.allowed()
        current = consumer.prefetch if consumer.consuming else 0
        if want == current:
            return
        if consumer.consuming:
            await consumer.stop_consuming()
            self._gauge.set(0)
        if want:
            await consumer.wait_in_flight_at_most(source.max_concurrency - want)
            await consumer.start(want)
            self._gauge.set(want)
        log.info("consumer.prefetch", backend=source.backend, prefetch=want,
                 state=source.describe())
