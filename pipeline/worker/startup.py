"""Before a worker session starts: is the topology there, and can its queues be used?

A queue that does not exist means the topology was never applied: the worker stops with
the fix. A queue whose node is down exists (RabbitMQ answers "home node ... is down or
inaccessible", see :mod:`pipeline.broker.availability`): the worker says so and waits
for it if every session needs it (triage, parking lot, presence), or goes on without it
(a pool's own queues: that pool is served once its node is back).
"""

from __future__ import annotations

import asyncio

import aiormq
from aio_pika.abc import AbstractConnection

from pipeline.broker.availability import amqp_reason, home_node_down
from pipeline.broker.names import Names
from pipeline.errors import TopologyError
from pipeline.observe.log import get_logger
from pipeline.settings import Settings

__all__ = ["await_topology"]

log = get_logger("hutch.worker")


async def _unavailable(connection: AbstractConnection, queue: str, vhost: str) -> str | None:
    """Why ``queue`` cannot be used now (its node is down), None if it can; a
    :class:`TopologyError` if it does not exist."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        if home_node_down(exc):
            return amqp_reason(exc)
        raise TopologyError(
            f"queue {queue!r} does not exist in vhost {vhost!r}: run "
            "`hutch topology apply --config <file>` first") from None
    await channel.close()
    return None


async def await_topology(connection: AbstractConnection, settings: Settings,
                         stopping: asyncio.Event) -> None:
    """Return once every queue a session needs can be used (or on ``stopping``)."""
    names = Names(settings.prefix)
    shared = [names.triage_queue, names.parked_queue, names.workers_queue]
    pooled = [queue for pool in settings.pools for queue in (
        names.work_queue(pool.name), names.pool_workers_queue(pool.name),
        names.pause_state_queue(pool.name))]
    while not stopping.is_set():
        down = {queue: reason for queue in shared + pooled
                if (reason := await _unavailable(connection, queue, settings.vhost))
                is not None}
        for queue, reason in down.items():
            log.warning("worker.queue_unavailable", queue=queue, reason=reason,
                        action="waiting for its node" if queue in shared
                        else "serving the other pools meanwhile")
        if not set(down) & set(shared):
            return
        try:
            await asyncio.wait_for(stopping.wait(), settings.lease_retry_s * 4)
        except TimeoutError:
            pass
