"""Pausing a pool: the flag is a queue, so the broker keeps it and the UI shows it.

While ``<prefix>.paused.<pool>`` exists, every worker sets the prefetch of that pool's
backends to 0: requests stay queued (in priority order, bounded by the pool's policy)
and in-flight ones finish. Deleting the queue resumes the pool. Workers look every
``pause_poll_s``; the state survives worker restarts and needs no extra service.
"""

from __future__ import annotations

import aio_pika
import aiormq

from pipeline.broker.connection import connect
from pipeline.broker.names import Names
from pipeline.settings import Settings

__all__ = ["is_paused", "pause_pool", "paused_pools", "resume_pool"]


def _check_pool(settings: Settings, pool: str) -> None:
    settings.pool(pool)  # KeyError for an unknown pool; the CLI turns it into a message


async def pause_pool(settings: Settings, pool: str) -> None:
    _check_pool(settings, pool)
    connection = await connect(settings, name="hutch pool")
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(Names(settings.prefix).pause_queue(pool), durable=True,
                                    arguments={"x-queue-type": "classic"})


async def resume_pool(settings: Settings, pool: str) -> None:
    _check_pool(settings, pool)
    connection = await connect(settings, name="hutch pool")
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(Names(settings.prefix).pause_queue(pool))


async def is_paused(channel: aio_pika.abc.AbstractChannel, names: Names, pool: str) -> bool:
    """A passive declare: the queue exists, or the broker closes the channel (404)."""
    try:
        await channel.declare_queue(names.pause_queue(pool), passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    return True


async def paused_pools(settings: Settings) -> list[str]:
    names = Names(settings.prefix)
    connection = await connect(settings, name="hutch pool")
    paused = []
    async with connection:
        for pool in settings.pools:
            channel = await connection.channel()
            if await is_paused(channel, names, pool.name):
                paused.append(pool.name)
                await channel.close()
    return paused
