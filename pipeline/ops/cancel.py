"""``hutch cancel``: publish cancels as an operator, and say what became of each id.

A cancel goes to every worker through the fanout exchange ``<prefix>.cancel``. Published
``mandatory``, it comes back when no worker's cancel queue is bound (no worker runs): that
is said, not counted as sent. Each worker answers on the publisher's direct reply-to
whether the request was at one of its backends and whether it aborted it, so an id that
no worker is serving is reported as such: it is then either still queued (answered
``cancelled`` when a worker reaches it, within ``cancel_ttl_s``) or unknown (finished, or
never sent), and nothing else happens to it.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from pipeline.broker.connection import connect
from pipeline.broker.names import Names
from pipeline.client.cancel import cancel_message
from pipeline.client.connection import missing_exchange
from pipeline.settings import Settings

__all__ = ["CancelResult", "operator_cancel"]

#: RabbitMQ's direct reply-to pseudo-queue: answers without declaring a queue.
_DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


@dataclass
class CancelResult:
    """What became of one cancel."""

    correlation_id: str
    #: False: the broker returned it, no worker listens for cancels.
    delivered: bool = True
    #: Workers that answered; those that had it at a backend and aborted or refused it.
    answered: list[str] = field(default_factory=list)
    aborted_by: list[str] = field(default_factory=list)
    refused_by: list[str] = field(default_factory=list)

    def text(self, user: str, ttl_s: float) -> str:
        """One line for the operator."""
        cid = self.correlation_id
        if not self.delivered:
            return (f"{cid}: not delivered: no worker is listening for cancels (is any "
                    "worker running?); nothing was cancelled")
        if self.aborted_by:
            return f"{cid}: aborted at a backend (worker {', '.join(self.aborted_by)})"
        if self.refused_by:
            return (f"{cid}: at a backend (worker {', '.join(self.refused_by)}), but user "
                    f"{user!r} may not cancel it: only the request's own user, the workers' "
                    "user or a trusted_users entry may")
        workers = len(self.answered)
        return (f"{cid}: at no backend now ({workers} worker{'s' if workers != 1 else ''} "
                f"answered): if it is still queued, it is answered `cancelled` when a "
                f"worker reaches it (within {ttl_s:g} s); otherwise the id is unknown "
                "(finished already, or never sent) and nothing happens")


async def operator_cancel(settings: Settings, correlation_ids: list[str], *,
                          wait_s: float = 2.0) -> list[CancelResult]:
    """Publish one cancel per id (mandatory, confirmed) as the settings' user and collect
    the workers' answers for up to ``wait_s``."""
    names = Names(settings.prefix)
    answers: dict[str, list[dict[str, object]]] = defaultdict(list)
    results = [CancelResult(cid) for cid in correlation_ids]
    async with await connect(settings, name="hutch cancel") as connection:
        workers = await _live_workers(connection, names.workers_queue)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            exchange = await channel.get_exchange(names.cancel_exchange, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise missing_exchange(names.cancel_exchange, settings.amqp_url) from None
        arrived = asyncio.Event()

        async def on_answer(message: AbstractIncomingMessage) -> None:
            try:
                answers[message.correlation_id or ""].append(json.loads(message.body))
            except ValueError:
                return
            arrived.set()

        replies = aio_pika.Queue(channel, _DIRECT_REPLY_TO, durable=False, exclusive=False,
                                 auto_delete=False, arguments=None, passive=True)
        await replies.consume(on_answer, no_ack=True)
        for result in results:
            message = cancel_message(result.correlation_id, settings.amqp_user)
            message.reply_to = _DIRECT_REPLY_TO
            try:
                await exchange.publish(message, routing_key="", mandatory=True)
            except aiormq.exceptions.DeliveryError:
                result.delivered = False
        await _wait_for_answers(results, answers, arrived, workers, wait_s)
    for result in results:
        _fill(result, answers.get(result.correlation_id, []))
    return results


async def _live_workers(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """The presence queue's consumer count: how many workers should answer."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()


async def _wait_for_answers(results: list[CancelResult],
                            answers: dict[str, list[dict[str, object]]],
                            arrived: asyncio.Event, workers: int, wait_s: float) -> None:
    """Until every delivered cancel has an answer from each live worker, or ``wait_s``."""
    def complete() -> bool:
        return all(len(answers.get(r.correlation_id, [])) >= max(1, workers)
                   for r in results if r.delivered)

    try:
        async with asyncio.timeout(wait_s):
            while not complete():
                arrived.clear()
                await arrived.wait()
    except TimeoutError:
        pass


def _fill(result: CancelResult, answers: list[dict[str, object]]) -> None:
    for answer in answers:
        worker = str(answer.get("worker", "?"))
        result.answered.append(worker)
        if answer.get("aborted"):
            result.aborted_by.append(worker)
        elif answer.get("in_flight"):
            result.refused_by.append(worker)
