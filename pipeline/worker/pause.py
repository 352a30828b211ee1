"""Pausing a pool: workers set the prefetch of its backends to 0 while it is paused.

The state is the message count of ``<prefix>.pause.<pool>`` (see
:mod:`pipeline.broker.pauses`): replicated with the pool, read without a channel error.
Requests stay queued (in priority order, bounded by the pool's policy) and in-flight ones
finish. Workers read it every ``2 x lease_retry_s``; when a read cannot tell (a quorum
queue without a leader answers 0, a classic queue's node is down) the worker keeps the
state it knew and logs so, once per outage.
"""

from __future__ import annotations

from collections.abc import Iterable

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from pipeline.broker.availability import amqp_reason
from pipeline.broker.connection import connect
from pipeline.broker.names import Names
from pipeline.broker.pauses import read_pause, set_paused
from pipeline.errors import PauseStateError
from pipeline.observe.log import get_logger
from pipeline.settings import Settings
from pipeline.worker.lease import LeaseHolder

__all__ = ["PauseFollower", "pause_pool", "paused_pools", "pool_pause_states", "resume_pool"]

log = get_logger("hutch.worker")

#: What a read that could not tell says, for the log.
_NO_ANSWER = "the broker answered 0 messages (a quorum queue without a reachable leader)"


class PauseFollower:
    """The pause state of the pools a worker serves, as last read."""

    def __init__(self, names: Names, pools: list[str]) -> None:
        self._names = names
        self._queues = {pool: names.pause_state_queue(pool) for pool in pools}
        #: Last known state per pool (a pool never read counts as running).
        self._known: dict[str, bool] = {}
        self._unreadable: set[str] = set()
        self._channel: AbstractChannel | None = None

    def follow(self, pool: str) -> None:
        """Read ``pool``'s state too from the next poll (a reload added the pool)."""
        self._queues[pool] = self._names.pause_state_queue(pool)

    def unfollow(self, pool: str) -> None:
        self._queues.pop(pool, None)

    def paused(self, pool: str) -> bool:
        return self._known.get(pool, False)

    def unknown(self) -> list[str]:
        """Pools whose state has never been read yet."""
        return [pool for pool in self._queues if pool not in self._known]

    async def apply(self, connection: AbstractConnection,
                    holders: Iterable[LeaseHolder]) -> None:
        """Read the states (keeping the last known where a read cannot tell); pause or
        resume the backends whose pool changed."""
        await self.poll(connection)
        for holder in holders:
            pool, health = holder.pool, holder.health
            paused = self.paused(pool)
            if paused and health.pause():
                log.warning("pool.paused", pool=pool, backend=holder.name)
            elif not paused and health.resume():
                log.info("pool.resumed", pool=pool, backend=holder.name)

    async def poll(self, connection: AbstractConnection) -> None:
        """Read every pool's state once; a read that cannot tell changes nothing."""
        for pool, queue in list(self._queues.items()):
            state, why = await self._read(connection, queue)
            if state is None:
                if pool not in self._unreadable:
                    self._unreadable.add(pool)
                    log.warning("pause.state_unreadable", pool=pool, queue=queue, reason=why,
                                keeping="paused" if self.paused(pool) else "running")
                continue
            if pool in self._unreadable:
                self._unreadable.discard(pool)
                log.info("pause.state_readable", pool=pool, paused=state)
            self._known[pool] = state

    async def _read(self, connection: AbstractConnection, queue: str
                    ) -> tuple[bool | None, str]:
        """One read on this follower's channel (opened again after a 404 closed it)."""
        if self._channel is None or self._channel.is_closed:
            self._channel = await connection.channel(publisher_confirms=False)
        try:
            state = await read_pause(self._channel, queue)
        except aiormq.exceptions.ChannelClosed as exc:
            return None, amqp_reason(exc)
        return state, _NO_ANSWER


async def _change(settings: Settings, pool: str, paused: bool) -> None:
    queue = Names(settings.prefix).pause_state_queue(pool)
    try:
        async with await connect(settings, name="hutch pool") as connection:
            channel = await connection.channel(publisher_confirms=True)
            await set_paused(channel, queue, paused)
    except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError,
            TimeoutError) as exc:
        raise PauseStateError(
            f"cannot {'pause' if paused else 'resume'} pool {pool!r} now: {queue}: "
            f"{amqp_reason(exc)}; try again (`hutch topology apply` first if the queue is "
            "missing)") from None


async def pause_pool(settings: Settings, pool: str) -> None:
    settings.pool(pool)  # KeyError for an unknown pool; the CLI turns it into a message
    await _change(settings, pool, True)


async def resume_pool(settings: Settings, pool: str) -> None:
    settings.pool(pool)
    await _change(settings, pool, False)


async def pool_pause_states(connection: AbstractConnection, names: Names, pools: list[str]
                            ) -> dict[str, bool | None]:
    """Each pool's state: paused, running, or None (cannot tell now, or no state queue)."""
    states: dict[str, bool | None] = {}
    channel = await connection.channel(publisher_confirms=False)
    for pool in pools:
        if channel.is_closed:
            channel = await connection.channel(publisher_confirms=False)
        try:
            states[pool] = await read_pause(channel, names.pause_state_queue(pool))
        except aiormq.exceptions.ChannelClosed:
            states[pool] = None
    if not channel.is_closed:
        await channel.close()
    return states


async def paused_pools(settings: Settings) -> list[str]:
    """The configured pools whose state reads paused."""
    async with await connect(settings, name="hutch pool") as connection:
        states = await pool_pause_states(connection, Names(settings.prefix),
                                         [pool.name for pool in settings.pools])
    return [pool for pool, paused in states.items() if paused]
