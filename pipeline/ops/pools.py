"""``hutch pool list|pause|resume``, checked against the broker's topology.

A pause is a queue next to the pool's work queue (see :mod:`pipeline.worker.pause`).
Pausing a pool the broker has no work queue for would create a pause flag for nothing and
report success; listing such a pool as ``running`` would claim it serves requests. So
each command first looks for the pool's work queue (a passive declare) and, when it is
not there, stops with "run `hutch topology apply`" instead of pretending.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractConnection

from pipeline.broker.connection import connect
from pipeline.broker.names import Names
from pipeline.errors import TopologyError
from pipeline.settings import Settings
from pipeline.worker.pause import is_paused, pause_pool, resume_pool

__all__ = ["PoolState", "missing_pools_error", "pause", "pool_states", "resume"]


@dataclass(frozen=True)
class PoolState:
    """One configured pool as the broker has it."""

    name: str
    models: tuple[str, ...]
    #: Its work queue exists (False: the topology was never applied for it).
    exists: bool
    paused: bool

    @property
    def state(self) -> str:
        if not self.exists:
            return "missing"
        return "paused" if self.paused else "running"


async def _connect(settings: Settings) -> AbstractConnection:
    return await connect(settings, name="hutch pool")


async def _exists(connection: AbstractConnection, queue: str) -> bool:
    """A passive declare on a channel of its own (a 404 closes the channel)."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
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
    states = []
    async with await _connect(settings) as connection:
        for pool in settings.pools:
            exists = await _exists(connection, names.work_queue(pool.name))
            paused = await is_paused(await connection.channel(), names, pool.name)
            states.append(PoolState(pool.name, tuple(pool.models), exists, paused))
    return states


async def _require_work_queue(settings: Settings, pool: str) -> None:
    settings.pool(pool)  # KeyError for a pool the configuration does not have
    async with await _connect(settings) as connection:
        if not await _exists(connection, Names(settings.prefix).work_queue(pool)):
            raise missing_pools_error(settings, [pool])


async def pause(settings: Settings, pool: str) -> None:
    """Pause ``pool``; a :class:`TopologyError` if the broker has no queue for it."""
    await _require_work_queue(settings, pool)
    await pause_pool(settings, pool)


async def resume(settings: Settings, pool: str) -> None:
    """Resume ``pool``; a :class:`TopologyError` if the broker has no queue for it."""
    await _require_work_queue(settings, pool)
    await resume_pool(settings, pool)
