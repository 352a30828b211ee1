"""The settler: the one place an Outcome becomes broker actions.

Each outcome of :mod:`pipeline.outcome` is carried out here, in the order that keeps the
promises of the README: publish (with confirms) what the request ends in -- its reply, its
parked copy, or its trip through a retry tier -- and only then ack; or hand it back
(nack + requeue); or, when the channel is gone, leave it to the broker. The delivery hooks
hear of it once, with what was done (:class:`~pipeline.observe.hooks.Settlement`).
"""

from __future__ import annotations

import time
from typing import Any

import aio_pika

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.delivery import Delivery
from pipeline.errors import TopologyError
from pipeline.observe.hooks import DeliveryHook, Settlement
from pipeline.outcome import (
    Abandoned,
    Cancelled,
    Completed,
    Failed,
    Failure,
    Outcome,
    Requeue,
    RetryLater,
)
from pipeline.settle.publisher import Publisher, copy_message, reply_properties
from pipeline.settle.stream import StreamSink

__all__ = ["Settler"]

#: The longest per-message TTL RabbitMQ accepts (milliseconds, a signed 32-bit value).
_MAX_EXPIRATION_S = (2**31 - 1) / 1000

class Settler:
    """Carries out outcomes on one confirming :class:`Publisher`."""

    def __init__(self, publisher: Publisher, names: Names, hooks: DeliveryHook, *,
                 worker_user: str | None = None, stream_window_s: float = 0.025,
                 stream_max_chunks: int = 64) -> None:
        self._publisher = publisher
        self._names = names
        self._hooks = hooks
        #: The ``user_id`` retries are published with, vouching for ``x-hutch-user``.
        self._worker_user = worker_user
        self._stream_window_s = stream_window_s
        self._stream_max_chunks = stream_max_chunks

    def stream_sink(self, delivery: Delivery) -> StreamSink:
        """Where a streaming delivery's chunks go, before its final message."""
        return StreamSink(self._publisher, delivery, window_s=self._stream_window_s,
                          max_chunks=self._stream_max_chunks)

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Carry ``outcome`` out for ``delivery``; the hooks hear of it once. AMQP errors
        propagate (the caller turns them into :class:`Abandoned`)."""
        settlement = Settlement()
        if isinstance(outcome, Completed):
            settlement = await self._complete(delivery, outcome)
            await delivery.message.ack()
        elif isinstance(outcome, Failed):
            settlement = await self._fail(delivery, outcome.failure)
            await delivery.message.ack()
        elif isinstance(outcome, RetryLater):
            await self._retry(delivery, outcome.delay_ms)
            await delivery.message.ack()
        elif isinstance(outcome, Cancelled):
            settlement = await self._cancel(delivery, outcome)
            await delivery.message.ack()
        elif isinstance(outcome, Requeue):
            await self._requeue(delivery)
        self._hooks.settled(delivery, outcome, settlement)

    def abandoned(self, delivery: Delivery, error: BaseException) -> None:
        """The channel or connection died: nothing to do but tell the hooks."""
        self._hooks.settled(delivery, Abandoned(repr(error)), Settlement())

    # -- the outcomes -----------------------------------------------------------------------

    async def _complete(self, delivery: Delivery, outcome: Completed) -> Settlement:
        delivery.backend_ms = int(outcome.elapsed_s * 1000)
        headers = delivery.reply_headers()
        headers[p.H_OUTCOME] = "ok"
        if await self._reply(delivery, outcome.body, headers):
            return Settlement("ok")
        # The backend answered: the client's reply queue is gone (its x-expires passed, or
        # it was a one-shot client's). Not a backend_error, which would blame the backend.
        failure = Failure(p.ParkReason.NO_REPLY_TO, p.ErrorCode.INVALID_REQUEST,
                          f"the backend answered, but the completion could not be delivered: "
                          f"reply queue {delivery.reply_to!r} does not exist (the client is "
                          "gone); replaying it would call the backend again for nobody")
        await self._park(delivery, failure)
        return Settlement("undeliverable", failure.reason, failure.message)

    async def _cancel(self, delivery: Delivery, outcome: Cancelled) -> Settlement:
        """Answer ``cancelled`` (unless the client is gone); a cancel is not a failure:
        nothing is parked."""
        if delivery.answerable and outcome.stage != "client_gone":
            where = ("before it reached a backend" if outcome.stage == "queued"
                     else "while at a backend; the backend call was aborted")
            await self._reply_error(delivery, p.ErrorCode.CANCELLED,
                                    f"the request was cancelled {where}")
        return Settlement(str(p.ErrorCode.CANCELLED))

    async def _reply_error(self, delivery: Delivery, code: p.ErrorCode, message: str,
                           extra: dict[str, Any] | None = None) -> bool:
        headers = delivery.reply_headers()
        headers[p.H_OUTCOME] = "error"
        headers[p.H_ERROR_CODE] = str(code)
        return await self._reply(delivery, p.error_body(code, message, **(extra or {})),
                                 headers)

    async def _fail(self, delivery: Delivery, failure: Failure) -> Settlement:
        """Answer the client when someone may be answered, then park the request."""
        refusal = delivery.refusal
        if refusal is not None and failure.reason is not refusal.reason:
            # Dead letters and unknown models too: a forged reply_to is never answered.
            failure = Failure(refusal.reason, refusal.code,
                              f"{refusal.message}; the request had also failed: "
                              f"{failure.message}", refusal.extra)
        if delivery.answerable:
            if not await self._reply_error(delivery, failure.code, failure.message,
                                           failure.extra):
                failure = Failure(failure.reason, failure.code,
                                  f"{failure.message} (reply queue {delivery.reply_to!r} "
                                  "does not exist)", failure.extra)
        await self._park(delivery, failure)
        return Settlement(str(failure.code), failure.reason, failure.message)

    async def _reply(self, delivery: Delivery, body: bytes, headers: dict[str, Any]) -> bool:
        """The final message of a request (the only one, unless it streamed)."""
        assert delivery.reply_to is not None and delivery.refusal is None
        headers[p.H_KIND] = p.KIND_FINAL
        if delivery.stream is not None:
            headers[p.H_SEQ] = delivery.stream.messages
        properties = reply_properties(delivery.correlation_id, delivery.priority, headers)
        return await self._publisher.publish(body, properties, routing_key=delivery.reply_to)

    def _identity_headers(self, delivery: Delivery) -> dict[str, Any]:
        """The request's headers with ``x-hutch-user`` set to its validated client (or
        removed: a client-set one must never be republished under the worker's user)."""
        out = dict(delivery.headers)
        if delivery.client is None:
            out.pop(p.H_USER, None)
        else:
            out[p.H_USER] = delivery.client
        return out

    async def _park(self, delivery: Delivery, failure: Failure) -> None:
        """Copy the request into the parking lot with headers saying why it ended there."""
        headers = self._identity_headers(delivery)
        headers.update(delivery.reply_headers())
        parked_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        headers.update({
            p.H_REASON: str(failure.reason),
            p.H_ERROR_CODE: str(failure.code),
            p.H_ERROR_TYPE: p.error_type(failure.code),
            p.H_ERROR_MESSAGE: failure.message[:1000],
            p.H_PARKED_AT: parked_at,
            p.H_ORIGINAL_ROUTING_KEY: delivery.model or "",
        })
        # A replayed request (pipeline.ops.dlq) that fails again keeps its first failure time.
        headers.setdefault(p.H_FIRST_FAILED_AT, parked_at)
        message = copy_message(delivery.message, headers)
        queue = self._names.parked_queue
        if not await self._publisher.publish(message.body, message.properties,
                                             routing_key=queue):
            raise TopologyError(f"parking lot {queue!r} does not exist; run "
                                "`hutch topology apply`")

    def _history_headers(self, delivery: Delivery) -> dict[str, Any]:
        """The request's headers for a republish: its client, attempts so far, deadline,
        and where and how it last failed, so whatever answers it later can say so."""
        headers = self._identity_headers(delivery)
        headers[p.H_ATTEMPTS] = delivery.attempts
        # The deadline this worker computed replaces a relative timeout, which would start
        # again at the next receipt.
        headers.pop(p.H_TIMEOUT_MS, None)
        if delivery.deadline_ms is not None:
            headers[p.H_DEADLINE] = delivery.deadline_ms  # survives; expiration does not
        if delivery.last_backend is not None:
            headers[p.H_LAST_BACKEND] = delivery.last_backend
        if delivery.last_error is not None:
            headers[p.H_LAST_ERROR] = delivery.last_error[:500]
        if delivery.status_sent:  # told its estimated start once: never again
            headers[p.H_STATUS_SENT] = 1
        return headers

    async def to_lane(self, delivery: Delivery, lane: str) -> bool:
        """Move a waiting request into ``lane`` (the scheduler sorts a saturated pool's
        requests by tenant), then ack it. False, and nothing acked, if the lane refused
        it (full): the caller hands it back instead."""
        headers = self._history_headers(delivery)
        headers[p.H_MODEL] = delivery.model or ""
        message = self._copy(delivery, headers, expire=True)
        message.priority = delivery.served_priority  # a tenant's ceiling lowered it
        if not await self._publisher.publish(message.body, message.properties,
                                             routing_key=lane):
            return False
        await delivery.message.ack()
        return True

    async def queue_status(self, delivery: Delivery, body: bytes) -> bool:
        """Tell a queued request's client where it stands: a transient ``status`` message
        (never an answer) on its reply queue; False if it could not be delivered. Nothing
        is settled: the request is still queued."""
        if not delivery.answerable or delivery.reply_to is None:
            return False
        headers: dict[str, Any] = {p.H_KIND: p.KIND_STATUS, p.H_POOL: delivery.pool}
        properties = reply_properties(delivery.correlation_id, delivery.priority, headers,
                                      persistent=False)
        return await self._publisher.publish(body, properties, routing_key=delivery.reply_to)

    def _copy(self, delivery: Delivery, headers: dict[str, Any], *,
              expire: bool) -> aio_pika.Message:
        """The request as this worker republishes it, vouching for what it vouches for."""
        vouch = (p.H_USER in headers or p.H_MODEL in headers) and self._worker_user is not None
        # The broker checks user_id: only this worker's user can vouch for x-hutch-user.
        message = copy_message(delivery.message, headers,
                               user_id=self._worker_user if vouch else None)
        remaining = delivery.remaining_s()
        if expire and remaining is not None and remaining < _MAX_EXPIRATION_S:
            # Back in a queue, the broker expires it at its deadline (and triage answers
            # it) even while no consumer can take it. A deadline beyond what the broker
            # accepts as a TTL (refused with a channel error) is left to the header.
            message.expiration = max(0.001, remaining)
        return message

    async def _republish(self, delivery: Delivery, headers: dict[str, Any], exchange: str,
                         what: str, *, expire: bool = False) -> None:
        message = self._copy(delivery, headers, expire=expire)
        if not await self._publisher.publish(message.body, message.properties,
                                             routing_key=delivery.model or "",
                                             exchange=exchange):
            raise TopologyError(f"{what} does not exist; run `hutch topology apply`")

    async def _retry(self, delivery: Delivery, delay_ms: int) -> None:
        """Publish the request to the retry tier of ``delay_ms``; when its TTL expires the
        broker dead-letters it back to the request exchange under its original model."""
        headers = self._history_headers(delivery)
        headers[p.H_RETRIES] = delivery.retries + 1
        headers[p.H_RETRY_TIER] = str(delay_ms)
        await self._republish(delivery, headers, self._names.retry_exchange,
                              f"retry tier {self._names.retry_queue(delay_ms)!r}")

    async def _requeue(self, delivery: Delivery) -> None:
        """Hand the request back to its queue. If this delivery made attempts, as a copy
        that keeps them (a nack would drop them, and a request that later expires would
        be parked saying 0 attempts); else a plain nack, which keeps its place."""
        if delivery.attempts <= delivery.prior_attempts:
            await delivery.message.nack(requeue=True)
            return
        await self._republish(delivery, self._history_headers(delivery),
                              self._names.requests_exchange,
                              f"request exchange {self._names.requests_exchange!r}",
                              expire=True)
        await delivery.message.ack()
