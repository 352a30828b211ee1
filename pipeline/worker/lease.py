"""A backend's lease: the exclusive queue ``<prefix>.lease.<backend>``.

The broker lets one connection hold an exclusive queue (others get ``RESOURCE_LOCKED``)
and frees it the moment that connection dies, so whatever the number of worker replicas
exactly one consumes for a backend at a time, and its cap holds. Workers that do not hold
a lease try again every ``lease_retry_s`` (jittered) and take over within seconds of a
crash; the broker redelivers the dead holder's unacked requests.

:class:`Lease` is the queue itself: take, give up, and the worker's ``release()`` command.
:class:`LeaseHolder` is one backend on this worker: take its lease, consume the pool's
queue while holding it (at the prefetch :mod:`pipeline.worker.capacity` keeps), and hand
it over when told: drain, delete the lease, stay away a while.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from pipeline.broker.availability import amqp_reason, home_node_down
from pipeline.observe.log import get_logger
from pipeline.worker.admission import Admission
from pipeline.worker.capacity import LANE_HEADROOM, CapacityController
from pipeline.worker.consumer import Handler, TrackedConsumer
from pipeline.worker.health import BackendHealthReporter, Level

__all__ = ["Intake", "Lease", "LeaseHolder", "LeaseTiming"]

log = get_logger("hutch.worker")


@dataclass(frozen=True)
class LeaseTiming:
    """How often to try for a lease, and how long a hand-over may take."""

    retry_s: float
    grace_s: float  # to drain in-flight requests before giving a lease up

    def first_try(self) -> float:
        """Spread first attempts so replicas started together share the leases."""
        return random.uniform(0, self.retry_s / 4)

    def retry(self) -> float:
        """After RESOURCE_LOCKED: jittered, so the waiting replicas do not move in step."""
        return self.retry_s * random.uniform(0.75, 1.25)

    def stay_away(self) -> float:
        """After a hand-over: long enough for a replica with fewer leases to take it."""
        return self.retry_s * 5


class Lease:
    """The exclusive lease queue of one backend, and whether this worker holds it."""

    def __init__(self, queue: str, backend: str, timing: LeaseTiming,
                 held_gauge: Level) -> None:
        self.queue = queue
        self.backend = backend
        self.timing = timing
        self._held_gauge = held_gauge
        self._held = False
        #: Set by :meth:`release`; the holder hands the backend over, then clears it.
        self.release_requested = asyncio.Event()

    @property
    def held(self) -> bool:
        return self._held

    @property
    def releasing(self) -> bool:
        return self.release_requested.is_set()

    def release(self) -> None:
        """Command (the rebalancer): finish in-flight work, free the lease, stay away."""
        self.release_requested.set()

    async def take(self, connection: AbstractConnection) -> AbstractChannel | None:
        """Declare the lease queue; a channel to consume on if this worker now holds it,
        None if another connection does (the broker closed the channel)."""
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(self.queue, exclusive=True, durable=False,
                                        auto_delete=True)
        except aiormq.exceptions.ChannelLockedResource:
            return None
        self._set_held(True)
        return channel

    def dropped(self) -> None:
        """This worker stopped consuming for the backend (the queue may stay ours while the
        connection lives, but nothing is served under it)."""
        self._set_held(False)

    async def give_up(self, connection: AbstractConnection) -> None:
        """Delete the lease queue, then keep off it a while; ends the release request."""
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.queue_delete(self.queue)
            await channel.close()
            self._set_held(False)
            log.info("lease.released", backend=self.backend, reason="rebalance")
            await asyncio.sleep(self.timing.stay_away())
        finally:
            self.release_requested.clear()

    def _set_held(self, held: bool) -> None:
        self._held = held
        self._held_gauge.set(1 if held else 0)


@dataclass(frozen=True)
class Intake:
    """What a leased backend consumes: its pool's queue and, when the pool sorts by
    tenant, the pool's lanes; and the pool's admission its deliveries wait at for a
    permit (of this or another backend of the pool in this worker)."""

    work_queue: str
    admission: Admission
    lanes: Sequence[str] = ()


class LeaseHolder:
    """One backend on this worker: its lease, its health and (while leased) its consumer."""

    def __init__(self, lease: Lease, health: BackendHealthReporter, pool: str,
                 intake: Intake, capacity_gauge: Level,
                 may_take: Callable[[], bool], draining: asyncio.Event) -> None:
        self.lease = lease
        self.health = health
        self.pool = pool
        self.intake = intake
        self._work_queue = intake.work_queue
        self._capacity_gauge = capacity_gauge
        #: False while this worker holds its fair share: leave free leases to others.
        self._may_take = may_take
        #: The worker stops: nothing may start consuming again (a health change included).
        self._draining = draining
        self.consumer: TrackedConsumer | None = None
        #: Runs while the lease is held: the backend's saturation metrics, if it has any.
        self.watch: Callable[[], Coroutine[Any, Any, None]] | None = None

    @property
    def name(self) -> str:
        return self.lease.backend

    async def run(self, connection: AbstractConnection, handler: Handler) -> None:
        """Take the lease (retrying), then serve until the channel or connection dies."""
        timing = self.lease.timing
        await asyncio.sleep(timing.first_try())
        while True:
            if not self._may_take():
                await asyncio.sleep(timing.retry_s)
                continue
            channel = await self.lease.take(connection)
            if channel is None:
                await asyncio.sleep(timing.retry())
                continue
            consumer = TrackedConsumer(channel, self._work_queue,
                                       self.health.max_concurrency, handler,
                                       lanes=self.intake.lanes,
                                       lane_prefetch=self.health.max_concurrency
                                       + LANE_HEADROOM)
            if await self._hold(connection, consumer):
                continue  # handed over, and stayed away already
            # The lease stays ours while the connection lives; re-consume after a pause.
            await asyncio.sleep(timing.retry_s)

    async def _hold(self, connection: AbstractConnection, consumer: TrackedConsumer) -> bool:
        """Serve with ``consumer`` until its channel closes or a release; True if the
        backend was handed over."""
        self.consumer = consumer
        self.health.limit.reset()  # a new holder starts from a safe value, not the ceiling
        log.info("lease.acquired", backend=self.name, pool=self.pool,
                 prefetch=self.health.max_concurrency)
        watching = (asyncio.create_task(self.watch()) if self.watch is not None
                    else None)
        try:
            controller = CapacityController(consumer, self.health, self._capacity_gauge,
                                            self.intake.admission)
            await controller.run(until=(self.lease.release_requested, self._draining))
            if self._draining.is_set() and not self.lease.releasing:
                await self._draining_wait()
                return False
            if self.lease.releasing:
                await self._hand_over(connection, consumer)
                return True
            log.warning("consumer.channel_closed", backend=self.name)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            if home_node_down(exc):
                log.warning("work_queue.unavailable", queue=self._work_queue,
                            reason=amqp_reason(exc), note="its node is down; retrying")
            else:
                log.error("work_queue.missing", queue=self._work_queue,
                          lanes=len(self.intake.lanes), hint="run `hutch topology apply`")
            await asyncio.sleep(5)
        finally:
            if watching is not None:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
            self.lease.dropped()
            self.consumer = None
            self._capacity_gauge.set(0)
            self.intake.admission.set_limit(self.name, 0)
            self.intake.admission.hand_back(source=self.name)
            await consumer.abort()
        return False

    async def _draining_wait(self) -> None:
        """The worker drains (it stops the consumer itself): hold still until it is done,
        never consuming again in the meantime."""
        await asyncio.Event().wait()

    async def _hand_over(self, connection: AbstractConnection,
                         consumer: TrackedConsumer) -> None:
        """Drain what this worker holds (so the cap still holds when the next holder
        starts), then give the lease up. What waited for a permit goes back at once."""
        await consumer.stop_consuming()
        admission = self.intake.admission
        admission.set_limit(self.name, 0)
        admission.hand_back(source=self.name)
        started = asyncio.get_running_loop().time()
        await consumer.drain(self.lease.timing.grace_s)
        # The admission grants any backend of the pool: a request another backend's
        # consumer delivered may run on this backend's permit. It must end too, or the
        # next holder would start beside it.
        left = self.lease.timing.grace_s - (asyncio.get_running_loop().time() - started)
        if not await admission.drained(self.name, max(0.0, left)):
            log.warning("lease.handed_over_busy", backend=self.name,
                        running=admission.in_use(self.name),
                        note="requests of another backend's consumer still run on it")
        await consumer.abort()
        await self.lease.give_up(connection)
