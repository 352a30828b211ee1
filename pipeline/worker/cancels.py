"""This worker's subscription to cancels (see :mod:`pipeline.dispatch.cancels`).

Every worker binds an exclusive queue of its own to the fanout exchange
``<prefix>.cancel``, so each cancel reaches every worker; the registry decides what it
means for the deliveries that worker has or will get.
"""

from __future__ import annotations

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from pipeline.broker.names import Names
from pipeline.dispatch.cancels import CancelRegistry
from pipeline.observe.log import get_logger

__all__ = ["CancelSubscription"]

log = get_logger("hutch.cancels")


class CancelSubscription:
    """This worker's exclusive queue on the cancel exchange, feeding the registry."""

    def __init__(self, names: Names, worker_id: str, registry: CancelRegistry) -> None:
        self._exchange = names.cancel_exchange
        self._queue = names.cancel_queue(worker_id)
        self._registry = registry

    async def start(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        queue = await channel.declare_queue(self._queue, exclusive=True, auto_delete=True)
        await queue.bind(self._exchange)
        await queue.consume(self._on_cancel, no_ack=True)

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        cid, user = message.correlation_id, message.user_id
        if not cid or not user:
            log.warning("cancel.ignored", correlation_id=cid,
                        reason="a cancel needs correlation_id and user_id")
            return
        aborted = self._registry.cancel(cid, user)
        log.info("cancel.received", correlation_id=cid, user=user, aborted=aborted)
