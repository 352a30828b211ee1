"""The one confirming publisher: every reply, parked copy and retry-tier publish.

Everything the worker publishes goes through :meth:`Publisher.publish`, on one channel with
publisher confirms and ``mandatory``: the worker acks a request only after what it
published for it is confirmed, so a crash in between redelivers the request (the client
drops the duplicate reply) and never loses one. A message the broker cannot route (a reply
queue that is gone, a retry tier never declared) comes back as a return, reported as
``False``, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import PublishError

__all__ = ["Publisher", "copy_message", "encodable", "reply_properties"]


_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
_TRANSIENT = int(aio_pika.DeliveryMode.NOT_PERSISTENT)


def encodable(value: Any) -> Any:
    """Headers as they can be published again. A string header that is not valid UTF-8
    arrives as ``bytes``, which the AMQP encoder refuses: re-publishing it (to park or
    retry the request) must not fail, so it becomes a byte array, kept as it came."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, Mapping):
        return {str(key): encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encodable(item) for item in value]
    return value


def copy_message(request: AbstractIncomingMessage, headers: Mapping[str, Any], *,
                 user_id: str | None = None) -> aio_pika.Message:
    """The request as a new, persistent message (to park, retry or replay it).

    ``expiration`` is dropped: it would expire where it does not belong. ``user_id`` is
    the publisher's own or none: the broker only accepts the publishing connection's user.
    """
    return aio_pika.Message(
        request.body,
        content_type=request.content_type,
        content_encoding=request.content_encoding,
        correlation_id=request.correlation_id,
        reply_to=request.reply_to,
        message_id=request.message_id,
        timestamp=request.timestamp,
        priority=request.priority,
        type=request.type,
        app_id=request.app_id,
        headers=encodable(headers),
        user_id=user_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def reply_properties(correlation_id: str | None, priority: int, headers: dict[str, Any], *,
                     persistent: bool = True) -> aiormq.spec.Basic.Properties:
    """The properties of a message to a client's reply queue (a final reply, or a transient
    chunk of a stream): what ``aio_pika.Message(body, content_type="application/json",
    ...).properties`` would be, built directly (one per message on the hot path)."""
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        correlation_id=correlation_id,
        delivery_mode=_PERSISTENT if persistent else _TRANSIENT,
        headers=headers,
        priority=priority,
    )


class Publisher:
    """Publishes on one confirming channel (opened with ``on_return_raises=True``)."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    async def publish(self, body: bytes, properties: aiormq.spec.Basic.Properties, *,
                      routing_key: str, exchange: str = "") -> bool:
        """Publish mandatory and wait for the confirm. True if the broker accepted it,
        False if it was returned (nothing to route it to) or refused (nacked).

        On the underlying channel with ready-made properties: a reply is one publish per
        request, and building an ``aio_pika.Message`` (a lock check on every attribute
        set) cost more than the publish itself."""
        channel = self._channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        try:
            confirm = await underlay.basic_publish(body, exchange=exchange,
                                                   routing_key=routing_key,
                                                   properties=properties, mandatory=True)
        except PublishError:
            return False
        # A nack: the queue refused it (a full lane's ``overflow: reject-publish``).
        return not isinstance(confirm, aiormq.spec.Basic.Nack)
