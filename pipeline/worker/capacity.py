"""The capacity controller: a leased backend takes exactly what it may serve.

The pool's admission (:mod:`pipeline.worker.admission`) holds as many permits for the
backend as its health allows -- ``max_concurrency`` while healthy, 1 while a circuit
probe is due -- and the consumer's prefetch is that plus the pool's lookahead, so a freed
slot starts the next request at once and the scheduler has a choice, while nothing waits
at a backend that cannot serve it: no consumer at all while the circuit is open, a 429
asked for time or the pool is paused, and what waited goes to another backend of the pool
here, or back to the broker when none is left serving.

On RabbitMQ 3.10 a live prefetch change has no effect on a consumer, so resizing means
cancelling and consuming again; the permits keep the cap meanwhile, since a lower limit
stops granting instead of aborting what runs. An adaptive limit moves every fraction of a
second: its permits follow at once, the prefetch at most once per
:data:`MIN_RESIZE_INTERVAL_S` (what arrives beyond the permits meanwhile waits in the
admission, in the policy's order).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from pipeline.observe.log import get_logger
from pipeline.worker.admission import Admission
from pipeline.worker.health import Level

__all__ = ["LANE_HEADROOM", "MIN_RESIZE_INTERVAL_S", "CapacityController", "CapacitySource",
           "PrefetchConsumer"]

#: An adaptive limit's consumer is resized (cancel, consume again) at most this often.
MIN_RESIZE_INTERVAL_S = 1.0

#: Each lane of the pool is consumed with the backend's current limit plus this: one
#: tenant alone can fill every permit from its lane, and its next heads wait at the
#: admission. Following the limit (not the ceiling), a backend whose adaptive limit is far
#: below its ceiling does not hold a lane's backlog it cannot serve soon.
LANE_HEADROOM = 2

log = get_logger("hutch.worker")


class PrefetchConsumer(Protocol):
    """What the controller drives: :class:`~pipeline.worker.consumer.TrackedConsumer`."""

    @property
    def prefetch(self) -> int: ...
    @property
    def consuming(self) -> bool: ...
    @property
    def closed(self) -> asyncio.Event: ...
    async def start(self, prefetch: int | None = None, lane_prefetch: int | None = None
                    ) -> None: ...
    async def stop_consuming(self) -> None: ...


class CapacitySource(Protocol):
    """What the controller reads: :class:`~pipeline.worker.health.BackendHealthReporter`."""

    @property
    def backend(self) -> str: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def changed(self) -> asyncio.Event: ...
    @property
    def adaptive(self) -> bool: ...
    def allowed(self) -> int: ...
    def reopens_in(self) -> float | None: ...
    def describe(self) -> str: ...


class CapacityController:
    """Keeps ``admission``'s permits equal to what ``source`` allows, and ``consumer``'s
    prefetch equal to them plus the lookahead."""

    def __init__(self, consumer: PrefetchConsumer, source: CapacitySource,
                 capacity_gauge: Level, admission: Admission, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._consumer = consumer
        self._source = source
        self._gauge = capacity_gauge
        self._admission = admission
        self._clock = clock
        self._resized_at = -MIN_RESIZE_INTERVAL_S
        #: Seconds until a deferred resize is due (None: none is).
        self._resize_due_in: float | None = None

    async def run(self, until: Sequence[asyncio.Event]) -> None:
        """Follow the source until the consumer's channel closes or one of ``until`` is
        set (a lease hand-over, the worker draining: nothing may consume again then)."""
        consumer, source = self._consumer, self._source
        while not consumer.closed.is_set() and not any(event.is_set() for event in until):
            source.changed.clear()
            applied = await self.adjust()
            if source.allowed() != applied:
                # The gate moved by the clock alone while adjust awaited the broker (a
                # throttle ended during the cancel): no timer is due any more and nobody
                # will signal it, so follow it now (issue 21's soak: a pool stalled).
                continue
            # Wake on a change, on the channel closing, on ``until``, or when an open
            # circuit or a throttle is due to end (the gate reads half-open/closed by the
            # clock alone, nobody signals it).
            waiters = {asyncio.ensure_future(source.changed.wait()),
                       asyncio.ensure_future(consumer.closed.wait()),
                       *(asyncio.ensure_future(event.wait()) for event in until)}
            timeouts = [t for t in (source.reopens_in(), self._resize_due_in) if t is not None]
            try:
                await asyncio.wait(waiters, timeout=min(timeouts, default=None),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def adjust(self) -> int:
        """One step: set the permits; cancel and consume again if the prefetch changes.
        Returns the limit it applied (what the source allowed when it started)."""
        consumer, source, admission = self._consumer, self._source, self._admission
        limit = source.allowed()
        want = limit + admission.prefetch_extra if limit else 0
        current = consumer.prefetch if consumer.consuming else 0
        # What waits may start on any backend of the pool here; with none left serving,
        # the admission hands it all back to the broker.
        admission.set_limit(source.backend, limit)
        self._resize_due_in = None
        if want == current:
            return limit
        if want and current and source.adaptive:
            self._gauge.set(limit)
            wait = self._resized_at + MIN_RESIZE_INTERVAL_S - self._clock()
            if wait > 0:  # the permits hold the limit meanwhile
                self._resize_due_in = wait
                return limit
        self._resized_at = self._clock()
        if consumer.consuming:
            await consumer.stop_consuming()
            if not want:
                self._gauge.set(0)
        if want:
            await consumer.start(want, lane_prefetch=limit + LANE_HEADROOM)
            self._gauge.set(limit)
        log.info("consumer.prefetch", backend=source.backend, limit=limit, prefetch=want,
                 state=source.describe())
        return limit
