"""Triage: answer what the broker dead-lettered or could not route, then park it.

The broker itself turns some requests away: one whose model no pool serves (caught by the
alternate exchange), one that expired while queued, one refused by a full queue. Each still
owes its client exactly one answer. Workers consume the triage queue, reply with the
error ``x-death`` (or its absence) implies, and move the message to the parking lot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.delivery import Delivery, ReplyPolicy
from pipeline.outcome import Failed, Failure
from pipeline.settle.settler import Settler

__all__ = ["PoolStatus", "Triage", "triage_failure"]

#: Attempts of earlier deliveries shown on a triage reply are clamped to this.
_MAX_ATTEMPTS_SHOWN = 1000

_CODE = {
    p.ParkReason.UNKNOWN_MODEL: p.ErrorCode.UNKNOWN_MODEL,
    p.ParkReason.DEADLINE_EXCEEDED: p.ErrorCode.DEADLINE_EXCEEDED,
    p.ParkReason.QUEUE_FULL: p.ErrorCode.QUEUE_FULL,
    p.ParkReason.REJECTED: p.ErrorCode.BACKEND_ERROR,
    p.ParkReason.DELIVERY_LIMIT: p.ErrorCode.BACKEND_ERROR,
}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def triage_failure(headers: Mapping[str, Any], routing_key: str | None,
                   names: Names, exchange: str | None = None) -> tuple[Failure, str]:
    """The failure a dead or unrouted message stands for, and the pool it belonged to.

    ``exchange`` is the delivery's exchange: the alternate exchange keeps the request
    exchange's name, real dead letters come through the dead-letter exchange. A client
    can forge ``x-death`` (RabbitMQ 3.10 keeps it), so the exchange decides first.
    """
    if exchange == names.requests_exchange:
        return Failure(p.ParkReason.UNKNOWN_MODEL, p.ErrorCode.UNKNOWN_MODEL,
                       f"no pool serves model {routing_key or ''!r}"), "-"
    reason = p.death_reason(headers)
    queue = ""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        queue = _text(deaths[0].get("queue", ""))
        routing_keys = deaths[0].get("routing-keys")
        if isinstance(routing_keys, list) and routing_keys:
            routing_key = _text(routing_keys[0])
    pool = queue.removeprefix(names.work_queue("")) if queue else "-"
    if queue and queue.startswith(names.lanes_prefix):  # <p>.lane.<pool>.<band>.<n>
        pool = queue.removeprefix(names.lanes_prefix).rsplit(".", 2)[0]
    model = routing_key or ""
    if reason is p.ParkReason.UNKNOWN_MODEL:
        message = f"no pool serves model {model!r}"
    elif reason is p.ParkReason.DEADLINE_EXCEEDED:
        message = f"the request expired while waiting in queue {queue!r}"
    elif reason is p.ParkReason.QUEUE_FULL:
        message = (f"queue {queue!r} is full (its max-length policy refused the request); "
                   "retry later or at a lower rate")
    elif reason is p.ParkReason.DELIVERY_LIMIT:
        message = (f"quorum queue {queue!r} gave up on the request after its delivery-limit "
                   "of hand-backs (backends throttled, paused or failing, or workers dying)")
    else:
        message = f"the request was rejected by a consumer of queue {queue!r}"
    return Failure(reason, _CODE[reason], message), pool


#: What the worker knows of a pool's backends now: a sentence if none is serving, else None.
PoolStatus = Callable[[str], "str | None"]


class Triage:
    """Consumes the triage queue: one error reply, then the parking lot, then ack."""

    def __init__(self, settler: Settler, policy: ReplyPolicy, names: Names,
                 pool_status: PoolStatus | None = None) -> None:
        self._settler = settler
        self._policy = policy
        self._names = names
        self._pool_status = pool_status or (lambda pool: None)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        failure, pool = triage_failure(message.headers or {}, message.routing_key, self._names,
                                       message.exchange)
        # Attempts of earlier deliveries are kept (x-hutch-attempts): none is made here.
        delivery = Delivery.parse(message, pool=pool, backend=None, policy=self._policy,
                                  max_attempts=_MAX_ATTEMPTS_SHOWN,
                                  lane_prefix=self._names.lanes_prefix)
        delivery.queue_wait_ms = None
        failure.message += self._why(delivery, pool)
        try:
            await self._settler.settle(delivery, Failed(failure))
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            self._settler.abandoned(delivery, exc)

    def _why(self, delivery: Delivery, pool: str) -> str:
        """What else is known: the request's last failure, and whether its pool had a
        backend serving (a request that expires because every backend is down should say
        so, not only that it waited)."""
        extra = ""
        if delivery.last_error:
            extra += (f"; its last attempt (backend {delivery.last_backend or '?'}) failed: "
                      f"{delivery.last_error[:300]}")
        status = self._pool_status(pool)
        if status:
            extra += f"; {status}"
        return extra
