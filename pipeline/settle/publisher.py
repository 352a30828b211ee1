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
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import PublishError

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.observe.log import get_logger
from pipeline.observe.metrics import Metrics
from pipeline.settings import Settings

__all__ = ["Failure", "Publisher", "ReplyGuard", "ReplyInfo", "copy_message", "encodable"]

log = get_logger("hutch.replies")

_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


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


def _text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ReplyGuard:
    """Who published a request, and whether its ``reply_to`` is theirs.

    The broker validates ``user_id`` (a publisher can only set its own user), so it names
    the client. A client user ``U`` owns the reply queues ``<prefix>.reply.U`` and
    ``<prefix>.reply.U.<suffix>`` (the queues its permissions let it declare and read,
    see topology.clients); a request naming any other queue is refused unanswered.

    A worker republishes requests (retry tiers) as itself: it sets ``user_id`` to its own
    user and carries the client in ``x-hutch-user``, which is believed only when
    ``user_id`` is the worker's user or a trusted one. Those users' own requests are not
    checked (a single-user setup, guest everywhere, keeps working).
    """

    names: Names
    #: The user the worker publishes as: the ``user_id`` it sets on retries. None: unknown
    #: (retries then carry no identity).
    worker_user: str | None = None
    trusted_users: frozenset[str] = frozenset()
    require_user_id: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplyGuard:
        return cls(Names(settings.prefix), settings.amqp_user,
                   frozenset(settings.trusted_users), settings.require_user_id)

    def _trusted(self, user: str) -> bool:
        return user == self.worker_user or user in self.trusted_users

    def client_user(self, user_id: str | None, headers: Mapping[str, Any]) -> str | None:
        """The client a request comes from (validated by the broker), or None."""
        if not user_id:
            return None
        if self._trusted(user_id):
            on_behalf = _text(headers.get(p.H_USER))
            if on_behalf:
                return on_behalf
        return user_id

    def owns(self, user: str, reply_to: str) -> bool:
        """True if ``reply_to`` is one of ``user``'s reply queues."""
        own = self.names.reply_queue(user)
        return reply_to == own or (reply_to.startswith(own + ".") and len(reply_to) > len(own) + 1)

    def refusal(self, request: AbstractIncomingMessage) -> Failure | None:
        """Why the worker must not answer this request's ``reply_to``, or None."""
        user = self.client_user(request.user_id, request.headers or {})
        code = p.ErrorCode.INVALID_REQUEST
        if user is None:
            if self.require_user_id:
                return Failure(p.ParkReason.NO_USER_ID, code,
                               "the request carries no user_id, which this worker requires "
                               "(it proves which client's reply queue may be answered); "
                               "nothing was sent to its reply_to")
            return None
        if self._trusted(user) or request.reply_to is None:
            return None  # no reply_to at all is refused by validation as no_reply_to
        if self.owns(user, request.reply_to):
            return None
        return Failure(p.ParkReason.FORGED_REPLY_TO, code,
                       f"reply_to {request.reply_to!r} is not a reply queue of user "
                       f"{user!r} (those are {self.names.reply_queue(user)!r} and "
                       f"{self.names.reply_queue(user)!r}.<suffix>); nothing was sent to it")


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


class Publisher:
    """Publishes replies and parked messages on one confirming channel."""

    def __init__(self, channel: AbstractChannel, names: Names, metrics: Metrics,
                 guard: ReplyGuard | None = None) -> None:
        self._channel = channel
        self._names = names
        self._metrics = metrics
        self.guard = guard or ReplyGuard(names)

    def refusal(self, request: AbstractIncomingMessage) -> Failure | None:
        """See :meth:`ReplyGuard.refusal`: a forged ``reply_to`` is never answered."""
        return self.guard.refusal(request)

    def _identity_headers(self, request: AbstractIncomingMessage,
                          headers: Mapping[str, Any]) -> dict[str, Any]:
        """``headers`` with ``x-hutch-user`` set to the request's validated client (or
        removed: a client-set one must never be republished under the worker's user)."""
        out = dict(headers)
        user = self.guard.client_user(request.user_id, request.headers or {})
        if user is None:
            out.pop(p.H_USER, None)
        else:
            out[p.H_USER] = user
        return out

    def valid_reply_to(self, reply_to: str | None) -> bool:
        """Replies go only to reply queues: never into a work queue or the parking lot,
        where a forged ``reply_to`` would make the worker feed itself."""
        prefix = self._names.reply_queue("")
        return reply_to is not None and reply_to.startswith(prefix) and len(reply_to) > len(
            prefix)

    async def _publish(self, body: bytes, properties: aiormq.spec.Basic.Properties,
                       queue: str) -> bool:
        """Publish to ``queue`` through the default exchange, mandatory, with a confirm.
        True if the broker accepted it, False if it was returned (no such queue).

        On the underlying channel with ready-made properties: a reply is one publish per
        request, and building an ``aio_pika.Message`` (a lock check on every attribute
        set) cost more than the publish itself."""
        channel = self._channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        try:
            await underlay.basic_publish(body, exchange="", routing_key=queue,
                                         properties=properties, mandatory=True)
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
        if self.refusal(request) is not None:
            raise RuntimeError("refusing to reply to a reply_to the publisher does not own")
        # What aio_pika.Message(body, content_type="application/json", correlation_id=...,
        # headers=..., delivery_mode=PERSISTENT, priority=...).properties would be.
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            correlation_id=request.correlation_id,
            delivery_mode=_PERSISTENT,
            headers=headers,
            priority=request.priority or 0,
        )
        return await self._publish(body, properties, request.reply_to)

    async def retry(self, request: AbstractIncomingMessage, headers: dict[str, Any],
                    delay_ms: int) -> None:
        """Publish the request to the retry tier of ``delay_ms``; when its TTL expires the
        broker dead-letters it back to the request exchange under its original model."""
        headers = self._identity_headers(request, headers)
        headers[p.H_RETRY_TIER] = str(delay_ms)
        message = copy_message(request, headers)
        if p.H_USER in headers and self.guard.worker_user is not None:
            # The broker checks it: only this worker's user can vouch for x-hutch-user.
            message.user_id = self.guard.worker_user
        try:
            exchange = await self._channel.get_exchange(self._names.retry_exchange, ensure=False)
            await exchange.publish(message, request.routing_key or "", mandatory=True)
        except PublishError:
            raise RuntimeError(f"retry tier {self._names.retry_queue(delay_ms)!r} does not "
                               "exist; run `hutch topology apply`") from None

    async def park(self, request: AbstractIncomingMessage, failure: Failure,
                   info: ReplyInfo) -> None:
        """Copy the request into the parking lot with headers saying why it ended there."""
        headers = self._identity_headers(request, request.headers or {})
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
        # A replayed request (pipeline.ops.dlq) that fails again keeps its first failure time.
        headers.setdefault(p.H_FIRST_FAILED_AT, parked_at)
        message = copy_message(request, headers)
        if not await self._publish(message.body, message.properties,
                                   self._names.parked_queue):
            raise RuntimeError(f"parking lot {self._names.parked_queue!r} does not exist; "
                               "run `hutch topology apply`")
        self._metrics.parked.labels(str(failure.reason)).inc()
        log.info("request.parked", reason=str(failure.reason), pool=info.pool,
                 correlation_id=request.correlation_id, message=failure.message[:200])

    async def fail(self, request: AbstractIncomingMessage, failure: Failure,
                   info: ReplyInfo) -> None:
        """Answer the client (when there is a valid reply queue that the publisher owns),
        then park the request."""
        refusal = self.refusal(request)
        if refusal is not None and failure.reason is not refusal.reason:
            # Dead letters and unknown models too: a forged reply_to is never answered.
            refusal.message += f"; the request had also failed: {failure.message}"
            failure = refusal
        if refusal is None and self.valid_reply_to(request.reply_to) and request.correlation_id:
            delivered = await self.reply_error(request, failure, info)
            if not delivered:
                failure.message += f" (reply queue {request.reply_to!r} does not exist)"
        self._metrics.finished(info.pool, request, str(failure.code))
        await self.park(request, failure, info)
