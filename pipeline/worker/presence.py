"""Who is alive: every worker consumes ``<prefix>.workers`` once, nothing else does.

Leases spread over the replicas by a fair share, ``ceil(backends / live workers)``. The
number of live workers is the consumer count of this dedicated queue: the broker keeps it
exact (a consumer goes with its connection) and, unlike the triage queue's, no operator
tool ever consumes it, so an extra triage consumer cannot shrink every worker's share.
Nothing is published to the queue; a stray message is dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from pipeline.errors import TopologyError
from pipeline.observe.log import get_logger
from pipeline.worker.consumer import TrackedConsumer

__all__ = ["FairShare", "Presence"]

log = get_logger("hutch.worker")


class Presence:
    """This worker's mark in the presence queue, and the count of everyone's."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self._consumer: TrackedConsumer | None = None

    async def join(self, connection: AbstractConnection) -> None:
        """Consume the queue once; the mark goes when the connection does. A user that
        may not read it is a set-up error to fix, not a reason to reconnect forever."""
        consumer = TrackedConsumer(await connection.channel(publisher_confirms=False),
                                   self.queue, 1, self._stray)
        try:
            await consumer.start()
        except aiormq.exceptions.ChannelAccessRefused:
            raise TopologyError(
                f"this worker's user may not consume the presence queue {self.queue!r}: "
                "give it read permission there (`hutch worker-user add` grants it; see the "
                "docs, page Security: docs/security.md)") from None
        self._consumer = consumer

    async def leave(self) -> None:
        if self._consumer is not None:
            await self._consumer.abort()
            self._consumer = None

    async def count(self, channel: AbstractChannel) -> int:
        """Live workers now (at least 1: this one), by a passive declare."""
        queue = await channel.declare_queue(self.queue, passive=True)
        return max(1, queue.declaration_result.consumer_count or 1)

    async def _stray(self, message: AbstractIncomingMessage) -> None:
        log.warning("presence.stray_message", queue=self.queue,
                    routing_key=message.routing_key, note="dropped: nothing is published here")
        await message.reject(requeue=False)


class FairShare:
    """This worker's share of the backends, from a recent count of live workers."""

    def __init__(self, backends: int, fresh_for_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._backends = backends
        self._fresh_for_s = fresh_for_s
        self._clock = clock
        self._share = 0
        self._measured_at = -math.inf

    def update(self, workers: int) -> int:
        """Record a count of live workers; the share it gives (a ceiling)."""
        self._share = -(-self._backends // max(1, workers))
        self._measured_at = self._clock()
        return self._share

    def reached(self, held: int) -> bool:
        """True while ``held`` leases are this worker's share, by a count still fresh (a
        stale count never holds a worker back from a free lease)."""
        fresh = self._clock() - self._measured_at < self._fresh_for_s
        return fresh and held >= self._share
