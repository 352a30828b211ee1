"""Publishing what a request ends in: its reply, and, for failures, its parked copy.

Both are published with publisher confirms and ``mandatory``, and the worker acks a
request only after they are confirmed: a crash in between redelivers the request (the
client drops the duplicate reply), it never loses one. A reply whose queue is gone comes
back as a return, not silently dropped, and the request is parked with that reason.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import PublishError

from pipeline import protocol as p
from pipeline.log import get_logger
from pipeline.metrics import Metrics
from topology.names import Names

__all__ = ["Failure", "Publisher", "ReplyInfo", "encodable"]

log = get_logger("hutch.replies")


@dataclass
class ReplyInfo:
    """Timings and routing facts carried in a reply's headers."""

    pool: str
    backend: str | None = None
    attempts: int = 0
    queue_wait_ms: int | None = None
    backend_ms: int | None = None

    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {p.H_POOL: self.pool, p.H_ATTEMPTS: self.attempts}
        if self.backend is not None:
            headers[p.H_BACKEND] = self.backend
        if self.queue_wait_ms is not None:
            headers[p.H_QUEUE_WAIT_MS] = self.queue_wait_ms
        if self.backend_ms is not None:
            headers[p.H_BACKEND_MS] = self.backend_ms
        return headers


@dataclass
class Failure:
    """A terminal failure: the error the client gets and why the request is parked."""

    reason: p.ParkReason
    code: p.ErrorCode
    message: str
    extra: dict[str, Any] = field(default_factory=dict)


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


class Publisher:
    """Publishes replies and parked messages on one confirming channel."""

    def __init__(self, channel: AbstractChannel, names: Names, metrics: Metrics) -> None:
        self._channel = channel
        self._names = names
        self._metrics = metrics

    def valid_reply_to(self, reply_to: str | None) -> bool:
        """Replies go only to reply queues: never into a work queue or the parking lot,
        where a forged ``reply_to`` would make the worker feed itself."""
        prefix = self._names.reply_queue("")
        return reply_to is not None and reply_to.startswith(prefix) and len(reply_to) > len(
            prefix)

    async def _publish(self, message: aio_pika.Message, routing_key: str) -> bool:
        """True if the broker accepted it, False if it was returned (no such queue)."""
        try:
            await self._channel.default_exchange.publish(message, routing_key, mandatory=True)
        except PublishError:
            return False
        return True

    async def reply_ok(self, request: AbstractIncomingMessage, body: bytes,
                       info: ReplyInfo) -> bool:
        headers = info.headers()
        headers[p.H_OUTCOME] = "ok"
        return await self._reply(request, body, headers)

    async def reply_error(self, request: AbstractIncomingMessage, failure: Failure,
                          info: ReplyInfo) -> bool:
        headers = info.headers()
        headers[p.H_OUTCOME] = "error"
        headers[p.H_ERROR_CODE] = str(failure.code)
        body = p.error_body(failure.code, failure.message, **failure.extra)
        return await self._reply(request, body, headers)

    async def _reply(self, request: AbstractIncomingMessage, body: bytes,
                     headers: dict[str, Any]) -> bool:
        assert request.reply_to is not None
        message = aio_pika.Message(
            body,
            content_type="application/json",
            correlation_id=request.correlation_id,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=request.priority,
        )
        return await self._publish(message, request.reply_to)

    async def retry(self, request: AbstractIncomingMessage, headers: dict[str, Any],
                    delay_ms: int) -> None:
        """Publish the request to the retry tier of ``delay_ms``; when its TTL expires the
        broker dead-letters it back to the request exchange under its original model."""
        headers = dict(headers)
        headers[p.H_RETRY_TIER] = str(delay_ms)
        message = self._copy(request, headers)
        try:
            exchange = await self._channel.get_exchange(self._names.retry_exchange, ensure=False)
            await exchange.publish(message, request.routing_key or "", mandatory=True)
        except PublishError:
            raise RuntimeError(f"retry tier {self._names.retry_queue(delay_ms)!r} does not "
                               "exist; run `hutch topology apply`") from None

    def _copy(self, request: AbstractIncomingMessage, headers: Mapping[str, Any]
              ) -> aio_pika.Message:
        """The request as a new message: ``expiration`` is dropped (it would expire where
        it does not belong) and so is ``user_id`` (the broker only accepts the publishing
        connection's own user)."""
        return aio_pika.Message(
            request.body,
            content_type=request.content_type,
            content_encoding=request.content_encoding,
            correlation_id=request.correlation_id,
            reply_to=request.reply_to,
            message_id=request.message_id,
            timestamp=request.timestamp,
            priority=request.priority,
            app_id=request.app_id,
            headers=encodable(headers),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def park(self, request: AbstractIncomingMessage, failure: Failure,
                   info: ReplyInfo) -> None:
        """Copy the request into the parking lot with headers saying why it ended there."""
        headers = dict(request.headers or {})
        headers.update(info.headers())
        parked_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        headers.update({
            p.H_REASON: str(failure.reason),
            p.H_ERROR_CODE: str(failure.code),
            p.H_ERROR_TYPE: p.error_type(failure.code),
            p.H_ERROR_MESSAGE: failure.message[:1000],
            p.H_PARKED_AT: parked_at,
            p.H_ORIGINAL_ROUTING_KEY: request.routing_key or "",
        })
        # A replayed request (pipeline.dlq) that fails again keeps its first failure time.
        headers.setdefault(p.H_FIRST_FAILED_AT, parked_at)
        message = self._copy(request, headers)
        if not await self._publish(message, self._names.parked_queue):
            raise RuntimeError(f"parking lot {self._names.parked_queue!r} does not exist; "
                               "run `hutch topology apply`")
        self._metrics.parked.labels(str(failure.reason)).inc()
        log.info("request.parked", reason=str(failure.reason), pool=info.pool,
                 correlation_id=request.correlation_id, message=failure.message[:200])

    async def fail(self, request: AbstractIncomingMessage, failure: Failure,
                   info: ReplyInfo) -> None:
        """Answer the client (when there is a valid reply queue), then park the request."""
        if self.valid_reply_to(request.reply_to) and request.correlation_id:
            delivered = await self.reply_error(request, failure, info)
            if not delivered:
                failure.message += f" (reply queue {request.reply_to!r} does not exist)"
        self._metrics.finished(info.pool, request, str(failure.code))
        await self.park(request, failure, info)
