"""The delivery context: one request delivery, parsed once, carried through every stage.

A delivery from a work queue (or the triage queue) is read here exactly once: its routing
facts, its client (as the broker validated it), whether its ``reply_to`` may be answered,
its deadline, send time and attempt counters. Dispatch decides on it, the backend call
updates its progress (attempts, timings), the settler answers from it, and the delivery
hooks observe it. Nothing downstream parses headers again.

Later stages add to it (the tenant, a cancel handle, a stream sink), not to parameter lists.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aio_pika.abc import AbstractIncomingMessage

from pipeline import protocol as p
from pipeline.models import ChatRequest, CompletionRequest, EmbeddingsRequest
from pipeline.outcome import Failure

__all__ = ["Delivery", "ReplyPolicy", "StreamProgress", "count_header"]

#: Retry-tier trips are counted up to this; a client-set header cannot make it unbounded.
_MAX_RETRIES_COUNTED = 1000


class ReplyPolicy(Protocol):
    """Who sent a request and whether its ``reply_to`` may be answered
    (:class:`pipeline.settle.guard.ReplyGuard`)."""

    def client_user(self, user_id: str | None, headers: Mapping[str, Any]) -> str | None: ...

    def refusal(self, user: str | None, reply_to: str | None,
                publisher: str | None = None) -> Failure | None: ...

    def valid_reply_to(self, reply_to: str | None) -> bool: ...

    def vouches(self, user_id: str | None) -> bool: ...


def _endpoint(value: Any) -> p.Endpoint | None:
    if value is None:
        return p.Endpoint.CHAT
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode(errors="replace")
    try:
        return p.Endpoint(value)
    except ValueError:
        return None


def count_header(headers: Mapping[str, Any], name: str, high: int) -> int:
    """A counter header set by an earlier delivery (attempts, retries). A client can set
    it too, so anything outside 0..high counts as 0 or high: never unlimited retries."""
    value = p.int_header(headers, name, low=-(2**63), high=2**63 - 1)
    return 0 if value is None else max(0, min(value, high))


@dataclass(slots=True)
class StreamProgress:
    """What a streaming attempt has sent: its stream id, chunk messages and characters."""

    stream_id: str
    messages: int = 0
    chunks: int = 0
    content_chars: int = 0


@dataclass(slots=True)
class Delivery:
    """One delivery and what is known about it; built by :meth:`parse`."""

    message: AbstractIncomingMessage
    #: The pool it belongs to (``-`` for what no pool serves) and the backend serving it.
    pool: str
    backend: str | None
    headers: Mapping[str, Any]
    #: The client user, validated by the broker (``user_id``, or ``x-hutch-user`` when a
    #: trusted user republished it); None if it carries no identity.
    client: str | None
    #: Why its ``reply_to`` must not be answered (a forged one), or None.
    refusal: Failure | None
    #: ``reply_to`` names a reply queue (never a work queue or the parking lot).
    reply_to_ok: bool
    deadline_ms: int | None
    sent_at_ms: int | None
    #: Backend attempts made by earlier deliveries of this request (``x-hutch-attempts``).
    prior_attempts: int
    #: Trips through a retry tier so far (``x-hutch-retries``).
    retries: int
    #: Attempts so far, earlier deliveries included; the reply's ``x-hutch-attempts``.
    attempts: int = 0
    queue_wait_ms: int | None = None
    backend_ms: int | None = None
    #: The endpoint the request is for (``x-hutch-endpoint``); None if it names none Hutch
    #: knows (refused as ``invalid_request``).
    endpoint: p.Endpoint | None = p.Endpoint.CHAT
    #: The validated request body, once dispatch has checked it.
    request: ChatRequest | CompletionRequest | EmbeddingsRequest | None = None
    #: A streaming request's progress, once its first chunk message went out.
    stream: StreamProgress | None = None
    #: Set when a valid cancel for this request arrived while it was at the backend.
    cancel_requested: bool = False
    #: Where and how the request last failed, in this delivery or an earlier one.
    last_backend: str | None = None
    last_error: str | None = None
    received_at: float = field(default_factory=time.monotonic)
    #: The model (the routing key, or ``x-hutch-model`` of a request moved into a lane).
    model_name: str | None = None
    #: The lane it was delivered from (:mod:`pipeline.worker.lanes`), or None (the pool's
    #: queue): a request already sorted is never moved again.
    lane: str | None = None
    #: Who goes next (:mod:`pipeline.scheduling`): its tenant, its band (0: lowest), the
    #: priority it is served at (a tenant's ceiling lowers it) and the virtual tokens
    #: charged to its tenant so far.
    tenant: str = "default"
    band: int = 0
    served_priority: int = 0
    charged: float = 0.0
    #: ``x-hutch-status-after-ms``: a status message is wanted if it waits longer (None:
    #: not asked for); ``status_sent``: one was sent already (``x-hutch-status-sent``).
    status_after_ms: int | None = None
    status_sent: bool = False

    @classmethod
    def parse(cls, message: AbstractIncomingMessage, *, pool: str, backend: str | None,
              policy: ReplyPolicy, max_attempts: int,
              lane_prefix: str | None = None) -> Delivery:
        """Read everything the later stages need from ``message``, once. ``lane_prefix``:
        the names of the pool's lanes (a request in one keeps its model in a header)."""
        headers = message.headers or {}
        model, lane = message.routing_key, None
        if (lane_prefix and model and model.startswith(lane_prefix)
                and policy.vouches(message.user_id)):
            model, lane = p.text_header(headers.get(p.H_MODEL)), model
        timestamp = message.timestamp.timestamp() if message.timestamp else None
        expiration = message.expiration
        expiration_s = float(expiration) if isinstance(expiration, int | float) else None
        client = policy.client_user(message.user_id, headers)
        refusal = policy.refusal(client, message.reply_to, message.user_id)
        prior = count_header(headers, p.H_ATTEMPTS, max_attempts)
        sent_at = p.sent_at_ms(headers, timestamp)
        return cls(
            message=message, pool=pool, backend=backend, headers=headers, client=client,
            refusal=refusal,
            reply_to_ok=policy.valid_reply_to(message.reply_to),
            deadline_ms=p.deadline_ms(headers, expiration_s, timestamp),
            sent_at_ms=sent_at,
            prior_attempts=prior,
            retries=count_header(headers, p.H_RETRIES, _MAX_RETRIES_COUNTED),
            attempts=prior,
            queue_wait_ms=None if sent_at is None else max(0, p.now_ms() - sent_at),
            endpoint=_endpoint(headers.get(p.H_ENDPOINT)),
            last_backend=p.text_header(headers.get(p.H_LAST_BACKEND)),
            last_error=p.text_header(headers.get(p.H_LAST_ERROR)),
            model_name=model, lane=lane, served_priority=message.priority or 0,
            status_after_ms=p.status_after_ms(headers), status_sent=p.H_STATUS_SENT in headers,
        )

    # -- facts read by several stages -------------------------------------------------------

    @property
    def correlation_id(self) -> str | None:
        return self.message.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self.message.reply_to

    @property
    def answerable(self) -> bool:
        """An answer can be sent: not refused, a reply queue, a correlation id."""
        return self.refusal is None and self.reply_to_ok and bool(self.correlation_id)

    @property
    def priority(self) -> int:
        return self.message.priority or 0

    @property
    def model(self) -> str | None:
        """The routing key: requests are routed by model; retries and dead letters keep it
        (a request moved into a lane carries it in ``x-hutch-model``)."""
        return self.model_name

    def remaining_s(self) -> float | None:
        """Seconds until the deadline (negative once past), None without a deadline."""
        return None if self.deadline_ms is None else self.deadline_ms / 1000 - time.time()

    def deadline_passed(self) -> bool:
        remaining = self.remaining_s()
        return remaining is not None and remaining <= 0

    def seconds_since_sent(self) -> float | None:
        """Seconds since the request was first published, None if unknown."""
        if self.sent_at_ms is None:
            return None
        return max(0, p.now_ms() - self.sent_at_ms) / 1000

    def reply_headers(self) -> dict[str, Any]:
        """Timings and routing facts every reply and parked copy carries."""
        headers: dict[str, Any] = {p.H_POOL: self.pool, p.H_ATTEMPTS: self.attempts}
        if self.stream is not None:
            headers[p.H_STREAM_ID] = self.stream.stream_id
        # The backend that tried it: this one if this delivery called it, else the last
        # one an earlier delivery called; none for a request refused before any call
        # (invalid, cancelled or expired while queued), whichever consumer picked it up.
        tried_here = self.attempts > self.prior_attempts
        backend = self.backend if tried_here and self.backend else self.last_backend
        if backend is not None:
            headers[p.H_BACKEND] = backend
        if self.queue_wait_ms is not None:
            headers[p.H_QUEUE_WAIT_MS] = self.queue_wait_ms
        if self.backend_ms is not None:
            headers[p.H_BACKEND_MS] = self.backend_ms
        return headers
