"""Cancels: tombstones published to the fanout exchange ``<prefix>.cancel``.

A cancel is an empty message with the request's ``correlation_id`` and the publisher's
``user_id`` (the broker checks it is the connection's user; a worker honours it only from
the request's owner, its own user or a trusted user). Every worker gets a copy, so a
queued request is answered ``cancelled`` when a worker reaches it and one at a backend is
aborted at once.

:class:`BackgroundCancels` publishes the cancels a caller cannot wait for (its task was
cancelled, it broke out of a stream): each in a task of its own, a failure logged, never
lost silently, and awaited by ``HutchClient.close()``. :func:`publish_cancels` is the
operator's ``hutch cancel``: one short connection, no reply queue.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable

import aio_pika
import aiormq

from pipeline.broker.connection import connect_url
from pipeline.client.connection import missing_exchange
from pipeline.observe.log import get_logger

__all__ = ["BackgroundCancels", "cancel_message", "publish_cancels"]

log = get_logger("hutch.client")


def cancel_message(correlation_id: str, user: str) -> aio_pika.Message:
    """The cancel of one request, published as ``user``."""
    if not correlation_id:
        raise ValueError("a cancel needs the request's correlation id")
    return aio_pika.Message(b"", correlation_id=correlation_id, user_id=user,
                            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)


async def publish_cancels(amqp_url: str, exchange: str, user: str,
                          correlation_ids: Iterable[str], *,
                          tls: ssl.SSLContext | None = None) -> int:
    """Publish one cancel per id (with confirms) as ``user``; how many were confirmed.
    Raises :class:`TopologyError` if the cancel exchange does not exist."""
    connection = await connect_url(amqp_url, name="hutch cancel", tls=tls)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            target = await channel.get_exchange(exchange, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise missing_exchange(exchange, amqp_url) from None
        sent = 0
        for correlation_id in correlation_ids:
            await target.publish(cancel_message(correlation_id, user), routing_key="")
            sent += 1
        return sent


class BackgroundCancels:
    """Cancels published in the background; each failure is logged."""

    def __init__(self, cancel: Callable[[str], Awaitable[None]]) -> None:
        self._cancel = cancel
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, correlation_id: str, reason: str) -> None:
        """Publish the cancel of ``correlation_id`` soon (``reason``: for the log)."""
        task = asyncio.get_running_loop().create_task(self._run(correlation_id, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, correlation_id: str, reason: str) -> None:
        try:
            await self._cancel(correlation_id)
        except asyncio.CancelledError:
            log.warning("cancel.not_sent", correlation_id=correlation_id, reason=reason,
                        error="the client closed before the cancel was confirmed")
            raise
        except Exception as exc:
            log.warning("cancel.not_sent", correlation_id=correlation_id, reason=reason,
                        error=repr(exc))
        else:
            log.debug("cancel.sent", correlation_id=correlation_id, reason=reason)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the cancels still being published."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
