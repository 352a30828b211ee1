"""``hutch pool list|pause|resume``, checked against the broker's topology.

A pool's pause state is the message count of a queue next to its work queue (see
:mod:`pipeline.broker.pauses`). Pausing a pool the broker has no work queue for would
report success for nothing; listing such a pool as ``running`` would claim it serves
requests. So each command first looks for the pool's work queue (a passive declare) and,
when it is not there, stops with "run `hutch topology apply`" instead of pretending. A
queue whose node is down, or a state the broker cannot tell now, is said in one line
(``unknown`` in the list), never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractConnection

from pipeline.broker.availability import amqp_reason, home_node_down
from pipeline.broker.connection import connect
from pipeline.broker.names import Names
from pipeline.errors import PauseStateError, TopologyError
from pipeline.settings import Settings
from pipeline.worker.pause import pause_pool, pool_pause_states, resume_pool

__all__ = ["PoolState", "missing_pools_error", "pause", "pool_states", "resume"]


@dataclass(frozen=True)
class PoolState:
    """One configured pool as the broker has it."""

    name: str
    models: tuple[str, ...]
    #: Its work queue exists (False: the topology was never applied for it).
    exists: bool
    #: None: the broker cannot tell now (a node down, a quorum queue without a leader).
    paused: bool | None

    @property
    def state(self) -> str:
        if not self.exists:
            return "missing"
        if self.paused is None:
            return "unknown"
        return "paused" if self.paused else "running"


async def _connect(settings: Settings) -> AbstractConnection:
    return await connect(settings, name="hutch pool")


async def _exists(connection: AbstractConnection, queue: str) -> bool:
    """A passive declare on a channel of its own (a 404 closes the channel). A queue
    whose node is down exists: a :class:`PauseStateError` says so."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        if home_node_down(exc):
            raise PauseStateError(f"{queue} cannot be reached now ({amqp_reason(exc)}): "
                                  "try again once its node is back") from None
        return False
    await channel.close()
    return True


def missing_pools_error(settings: Settings, pools: list[str]) -> TopologyError:
    """The error for pools whose work queue the broker does not have."""
    names = Names(settings.prefix)
    queues = ", ".join(repr(names.work_queue(pool)) for pool in pools)
    return TopologyError(
        f"no work queue {queues} in vhost {settings.vhost!r}: the topology is missing; run "
        "`hutch topology apply --config <file>` first")


async def pool_states(settings: Settings) -> list[PoolState]:
    """Every configured pool: whether its work queue exists and whether it is paused."""
    names = Names(settings.prefix)
    async with await _connect(settings) as connection:
        paused = await pool_pause_states(connection, names,
                                         [pool.name for pool in settings.pools])
        states = []
        for pool in settings.pools:
            try:
                exists = await _exists(connection, names.work_queue(pool.name))
            except PauseStateError:
                exists = True  # its node is down: it exists, its state is unknown
            states.append(PoolState(pool.name, tuple(pool.models), exists, paused[pool.name]))
    return states


async def _require_work_queue(settings: Settings, pool: str, action: str) -> None:
    settings.pool(pool)  # KeyError for a pool the configuration does not have
    async with await _connect(settings) as connection:
        try:
            exists = await _exists(connection, Names(settings.prefix).work_queue(pool))
        except PauseStateError as exc:
            raise PauseStateError(f"cannot {action} pool {pool!r} now: {exc}") from None
        if not exists:
            raise missing_pools_error(settings, [pool])


async def pause(settings: Settings, pool: str) -> None:
    """Pause ``pool``; a :class:`TopologyError` if the broker has no queue for it."""
    await _require_work_queue(settings, pool, "pause")
    await pause_pool(settings, pool)


async def resume(settings: Settings, pool: str) -> None:
    """Resume ``pool``; a :class:`TopologyError` if the broker has no queue for it."""
    await _require_work_queue(settings, pool, "resume")
    await resume_pool(settings, pool)
