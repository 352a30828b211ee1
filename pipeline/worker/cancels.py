"""This worker's subscription to cancels (see :mod:`pipeline.dispatch.cancels`).

Every worker binds an exclusive queue of its own to the fanout exchange
``<prefix>.cancel``, so each cancel reaches every worker; the registry decides what it
means for the deliveries that worker has or will get. A cancel whose ``reply_to`` is the
publisher's direct reply-to (an operator's ``hutch cancel``) is answered: whether the
request was at one of this worker's backends, and whether it was aborted. No other
``reply_to`` is answered: the worker's user may write anywhere, so answering one would let
any client put a message (with a correlation id of its choice) into any queue: another
client's reply queue, a work queue, the parking lot.
"""

from __future__ import annotations

import json

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from pipeline.broker.names import Names
from pipeline.dispatch.cancels import CancelRegistry
from pipeline.observe.log import get_logger

__all__ = ["CancelSubscription"]

log = get_logger("hutch.cancels")

#: What RabbitMQ makes of a publisher's ``amq.rabbitmq.reply-to``: it reaches only the
#: channel that published the cancel.
_DIRECT_REPLY_TO = "amq.rabbitmq.reply-to."


class CancelSubscription:
    """This worker's exclusive queue on the cancel exchange, feeding the registry."""

    def __init__(self, names: Names, worker_id: str, registry: CancelRegistry) -> None:
        self._exchange = names.cancel_exchange
        self._queue = names.cancel_queue(worker_id)
        self._registry = registry
        self._worker_id = worker_id
        self._channel: AbstractChannel | None = None

    async def start(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        self._channel = channel
        queue = await channel.declare_queue(self._queue, exclusive=True, auto_delete=True)
        await queue.bind(self._exchange)
        await queue.consume(self._on_cancel, no_ack=True)

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        cid, user = message.correlation_id, message.user_id
        if not cid or not user:
            log.warning("cancel.ignored", correlation_id=cid,
                        reason="a cancel needs correlation_id and user_id")
            return
        in_flight = self._registry.in_flight(cid)
        aborted = self._registry.cancel(cid, user)
        log.info("cancel.received", correlation_id=cid, user=user, aborted=aborted)
        if (message.reply_to and message.reply_to.startswith(_DIRECT_REPLY_TO)
                and self._channel is not None):
            await self._answer(self._channel, message.reply_to, cid, in_flight=in_flight,
                               aborted=aborted)

    async def _answer(self, channel: AbstractChannel, reply_to: str, cid: str, *,
                      in_flight: bool, aborted: bool) -> None:
        """Tell an operator's ``hutch cancel`` (its direct reply-to) what this worker did:
        it cannot otherwise know whether an id was at a backend, refused, or unknown."""
        body = json.dumps({"worker": self._worker_id, "in_flight": in_flight,
                           "aborted": aborted}).encode()
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(body, correlation_id=cid), routing_key=reply_to)
        except Exception as exc:  # the answer is advice: never break the subscription
            log.debug("cancel.answer_failed", correlation_id=cid, error=repr(exc))
