"""Who is alive: every worker consumes ``<prefix>.workers`` once, and
``<prefix>.workers.<pool>`` once for every pool it serves; nothing else does.

Leases spread over the replicas by a fair share computed **per pool**:
``ceil(the pool's backends / live workers serving the pool)``. A share over all workers
would strand backends when workers serve different pools (a worker of pool A next to one
of pools B and C: the second's share is one backend, and nobody else may take the
other). Per pool, the shares of the workers that can take a pool's leases add up to at
least its backends, so a free lease always has a taker, and a lease given up by
rebalancing goes to a worker of the same pool. The counts are consumer counts of
dedicated queues: the broker keeps them exact (a consumer goes with its connection) and
no operator tool consumes them. ``<prefix>.workers`` (all workers) stays for
``hutch status``. Nothing is published to these queues; a stray message is dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from pipeline.broker.availability import amqp_reason, home_node_down
from pipeline.broker.names import Names
from pipeline.errors import TopologyError
from pipeline.observe.log import get_logger
from pipeline.worker.consumer import TrackedConsumer

__all__ = ["FairShare", "PoolPresence", "Presence"]

log = get_logger("hutch.worker")


class Presence:
    """This worker's mark in the presence queue, and the count of everyone's."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self._consumer: TrackedConsumer | None = None

    async def join(self, connection: AbstractConnection,
                   arguments: Mapping[str, Any] | None = None) -> None:
        """Consume the queue once; the mark goes when the connection does. A user that
        may not read it is a set-up error to fix, not a reason to reconnect forever.
        ``arguments``: what the mark says (the management API lists them per consumer)."""
        consumer = TrackedConsumer(await connection.channel(publisher_confirms=False),
                                   self.queue, 1, self._stray, arguments=arguments)
        try:
            await consumer.start()
        except aiormq.exceptions.ChannelAccessRefused:
            raise TopologyError(
                f"this worker's user may not consume the presence queue {self.queue!r}: "
                "give it read permission there (`hutch worker-user add` grants it; see the "
                "docs, page Security: docs/security.md)") from None
        self._consumer = consumer

    async def rejoin(self, connection: AbstractConnection,
                     arguments: Mapping[str, Any] | None = None) -> None:
        """Show new ``arguments``: the new mark first, then the old one goes, so the
        worker is never missing from the count (nor is it if the new one fails)."""
        old, self._consumer = self._consumer, None
        try:
            await self.join(connection, arguments)
        except BaseException:
            self._consumer = old
            raise
        if old is not None:
            await old.abort()

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

    def resize(self, backends: int) -> None:
        """The pool now has ``backends`` backends (a reload): the next count's share."""
        self._backends = backends

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


class PoolPresence:
    """This worker's mark in the presence queue of each pool it serves, and each pool's
    fair share for it. A pool whose presence queue is on a node that is down is joined
    when the node is back (:meth:`refresh`); meanwhile its share is never fresh, so it
    holds nobody back."""

    def __init__(self, names: Names, backends: dict[str, int], fresh_for_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._names = names
        self._fresh_for_s = fresh_for_s
        self._clock = clock
        self._members = {pool: Presence(names.pool_workers_queue(pool)) for pool in backends}
        self.shares = {pool: FairShare(count, fresh_for_s, clock)
                       for pool, count in backends.items()}
        self._joined: set[str] = set()
        self._down: set[str] = set()
        self._channel: AbstractChannel | None = None

    def reached(self, pool: str, held: int) -> bool:
        """True while ``held`` leases of ``pool`` are this worker's share of it."""
        return self.shares[pool].reached(held)

    # -- a reload's changes: joined at the next join()/refresh() ------------------------

    def add(self, pool: str, backends: int) -> None:
        self._members[pool] = Presence(self._names.pool_workers_queue(pool))
        self.shares[pool] = FairShare(backends, self._fresh_for_s, self._clock)

    def resize(self, pool: str, backends: int) -> None:
        if pool in self.shares:
            self.shares[pool].resize(backends)

    async def remove(self, pool: str) -> None:
        member = self._members.pop(pool, None)
        self._joined.discard(pool)
        self._down.discard(pool)
        if member is not None:
            await member.leave()

    async def join(self, connection: AbstractConnection) -> None:
        """Join every pool not joined yet; a missing queue is a set-up error."""
        for pool, member in list(self._members.items()):
            if pool in self._joined:
                continue
            try:
                await member.join(connection)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                if not home_node_down(exc):
                    raise TopologyError(
                        f"queue {member.queue!r} does not exist: run `hutch topology apply "
                        "--config <file>` first (presence per pool)") from None
                if pool not in self._down:  # once per outage
                    self._down.add(pool)
                    log.warning("presence.pool_unavailable", pool=pool, queue=member.queue,
                                reason=amqp_reason(exc), note="joined when its node is back")
                continue
            self._joined.add(pool)
            self._down.discard(pool)

    async def refresh(self, connection: AbstractConnection) -> dict[str, tuple[int, int]]:
        """Join what is left to join, then count each pool's live workers and update its
        share: {pool: (workers, share)} for the pools counted (not one whose queue is
        down)."""
        await self.join(connection)
        counted = {}
        for pool, member in list(self._members.items()):
            if self._channel is None or self._channel.is_closed:
                self._channel = await connection.channel(publisher_confirms=False)
            try:
                workers = await member.count(self._channel)
            except aiormq.exceptions.ChannelClosed:
                continue
            share = self.shares.get(pool)
            if share is not None:  # not removed by a reload meanwhile
                counted[pool] = (workers, share.update(workers))
        return counted

    async def leave(self) -> None:
        for member in list(self._members.values()):
            await member.leave()
        self._joined.clear()
        self._channel = None
