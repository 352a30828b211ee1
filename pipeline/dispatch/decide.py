"""The dispatcher's decisions, as pure functions over the delivery context.

Everything a delivery can end in is decided here and returned as a value of
:mod:`pipeline.outcome` (or :class:`TryAgain`): validate the request, check its deadline,
classify a failed backend attempt, retry it in place, send it through a retry tier, hand it
back, or fail it for good. Nothing here touches the broker, the backend or the clock's
side effects, so every row of the README's failure table has a unit test
(tests/test_decide.py); :mod:`pipeline.dispatch.dispatcher` only runs the steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline import protocol as p
from pipeline.delivery import Delivery
from pipeline.errors import BackendCallError, RetryableError, TerminalError, ThrottledError
from pipeline.models import ChatRequest, CompletionRequest, EmbeddingsRequest
from pipeline.outcome import Cancelled, Failed, Failure, Outcome, Requeue, RetryLater
from pipeline.settings import PoolSettings

__all__ = [
    "Request",
    "TryAgain",
    "admit",
    "after_failure",
    "attempt_kind",
    "backend_failure",
    "before_attempt",
    "counts_against_backend",
    "deadline_failure",
    "no_reply_to",
    "stream_interrupted",
    "validate_request",
    "wait_for_model",
]

_JSON_TYPES = ("application/json",)


@dataclass(frozen=True, slots=True)
class TryAgain:
    """Try the backend again on the slot this delivery holds, after ``sleep_s``."""

    sleep_s: float


def _content_type_ok(content_type: str | None) -> bool:
    if not content_type:
        return True  # many AMQP clients leave it unset; the body decides
    return content_type.split(";")[0].strip().lower() in _JSON_TYPES


Request = ChatRequest | CompletionRequest | EmbeddingsRequest

#: The body model of each endpoint, and what the body must be called in errors.
_BODIES: dict[p.Endpoint, tuple[type[Request], str]] = {
    p.Endpoint.CHAT: (ChatRequest, "chat completions"),
    p.Endpoint.COMPLETIONS: (CompletionRequest, "completions"),
    p.Endpoint.EMBEDDINGS: (EmbeddingsRequest, "embeddings"),
}


#: The names pydantic gives the members of a union in an error's location: not fields.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)\b|[\[(]")


def _param(loc: tuple[int | str, ...]) -> dict[str, Any]:
    """The ``param`` of a validation error, as OpenAI writes it (``temperature``,
    ``messages.[0].content``): the field a client fixes, not only named in the message."""
    parts = []
    for part in loc:
        if isinstance(part, str) and _TYPE_TAG.search(part):
            break
        parts.append(f"[{part}]" if isinstance(part, int) else part)
    return {"param": ".".join(parts)} if parts else {}


def _parse_body(body: bytes, endpoint: p.Endpoint) -> Request | Failure:
    bad = p.ErrorCode.INVALID_REQUEST
    model, name = _BODIES[endpoint]
    try:
        request = model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in ("json_invalid", "json_type"):
            return Failure(p.ParkReason.INVALID_JSON, bad,
                           f"the request body is not valid JSON: {first['msg']}")
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return Failure(p.ParkReason.INVALID_REQUEST, bad,
                       f"not a valid {name} request: {where}: {first['msg']}",
                       _param(first["loc"]))
    if endpoint is not p.Endpoint.CHAT and getattr(request, "stream", False):
        return Failure(p.ParkReason.INVALID_REQUEST, bad,
                       f"streaming is served for chat completions only, not {name}",
                       {"param": "stream"})
    return request


def no_reply_to(reply_to: str | None, reply_queue: str) -> Failure:
    """Why a ``reply_to`` cannot be answered, and what to use instead. Direct reply-to and
    server-named exclusive queues are refused on purpose: they die with the client's
    connection, so a reply ready after a reconnect would be lost."""
    fix = (f"publish with reply_to naming a durable queue of your own, {reply_queue!r} "
           "(declared durable with x-expires, consumed with manual acks)")
    if not reply_to:
        message = f"the request has no reply_to, so nobody can be answered: {fix}"
    elif reply_to.startswith(("amq.rabbitmq.reply-to", "amq.gen-")):
        kind = ("direct reply-to" if reply_to.startswith("amq.rabbitmq.")
                else "a server-named exclusive queue")
        message = (f"reply_to {reply_to!r} is {kind}, which Hutch does not answer: it dies "
                   f"with your connection and would lose the reply. Nothing was sent to it: "
                   f"{fix}")
    else:
        message = f"reply_to {reply_to!r} is not a Hutch reply queue; nothing was sent to it: {fix}"
    return Failure(p.ParkReason.NO_REPLY_TO, p.ErrorCode.INVALID_REQUEST, message)


def validate_request(body: bytes, *, content_type: str | None, reply_to_ok: bool,
                     correlation_id: str | None, pool: PoolSettings, max_body_bytes: int,
                     endpoint: p.Endpoint = p.Endpoint.CHAT) -> Request | Failure:
    """Check a request before it may take a backend's time (``reply_to_ok``: see
    :func:`no_reply_to` for the failure that explains a bad one)."""
    bad = p.ErrorCode.INVALID_REQUEST
    if not reply_to_ok:
        return Failure(p.ParkReason.NO_REPLY_TO, bad,
                       "the request has no usable reply_to (it must name the client's reply "
                       "queue); nobody can be answered, so it was parked")
    if not correlation_id:
        return Failure(p.ParkReason.INVALID_REQUEST, bad,
                       "the request has no correlation_id; its reply could not be matched")
    if len(body) > max_body_bytes:
        return Failure(p.ParkReason.TOO_LARGE, bad,
                       f"the request body is {len(body)} bytes; the limit is {max_body_bytes}")
    if not _content_type_ok(content_type):
        return Failure(p.ParkReason.INVALID_REQUEST, bad,
                       f"content_type {content_type!r} is not application/json")
    request = _parse_body(body, endpoint)
    if isinstance(request, Failure):
        return request
    if request.model not in pool.models:
        return Failure(p.ParkReason.INVALID_REQUEST, bad,
                       f"model {request.model!r} in the body is not served by pool "
                       f"{pool.name!r} (it serves {', '.join(pool.models)})",
                       {"param": "model"})
    return request


def deadline_failure(pool: str, detail: str = "") -> Failure:
    return Failure(p.ParkReason.DEADLINE_EXCEEDED, p.ErrorCode.DEADLINE_EXCEEDED,
                   f"the request's deadline passed before a backend of pool {pool!r} could "
                   f"answer it{detail}")


def stream_interrupted(delivery: Delivery, error: BackendCallError) -> Failure:
    """A stream that failed after chunks went out: the client has part of an answer, so
    it cannot be retried invisibly; the error says how much was sent."""
    sent = delivery.stream
    chunks, chars = (sent.chunks, sent.content_chars) if sent is not None else (0, 0)
    return Failure(p.ParkReason.STREAM_INTERRUPTED, p.ErrorCode.STREAM_INTERRUPTED,
                   f"the stream was interrupted after {chunks} chunks ({chars} characters "
                   f"of content): {error.message}",
                   {"chunks_sent": chunks, "content_chars_sent": chars})


def admit(delivery: Delivery, pool: PoolSettings, *, max_body_bytes: int,
          available: bool, cancelled: bool = False, model_wait_s: float = 0.0,
          reply_queue: str = "<prefix>.reply.<client-id>") -> Outcome | Request:
    """May this delivery take a backend slot? The request if so, else its outcome.
    ``reply_queue`` is the name a client should use, for the error that says so."""
    if delivery.refusal is not None:
        # reply_to is not the publisher's own reply queue: park it, answer nobody.
        return Failed(delivery.refusal)
    if not delivery.reply_to_ok:
        return Failed(no_reply_to(delivery.reply_to, reply_queue))
    if cancelled:
        return Cancelled("queued")
    if delivery.endpoint is None:
        return Failed(Failure(
            p.ParkReason.INVALID_REQUEST, p.ErrorCode.INVALID_REQUEST,
            f"header {p.H_ENDPOINT} names no endpoint Hutch serves (it serves "
            f"{', '.join(e.value for e in p.Endpoint)})"))
    message = delivery.message
    checked = validate_request(message.body, content_type=message.content_type,
                               reply_to_ok=delivery.reply_to_ok,
                               correlation_id=delivery.correlation_id, pool=pool,
                               max_body_bytes=max_body_bytes, endpoint=delivery.endpoint)
    if isinstance(checked, Failure):
        return Failed(checked)
    if delivery.deadline_passed():
        return Failed(deadline_failure(pool.name))
    if not available:
        # Throttled, circuit open or paused, and the consumer is being cancelled: hand it
        # back so another backend (or this one, later) takes it.
        return Requeue("backend unavailable")
    if model_wait_s > 0:
        return wait_for_model(delivery, pool, model_wait_s)
    return checked


def quota_exceeded(delivery: Delivery) -> Failed:
    """Its tenant used a token quota configured to refuse the excess (``over_quota =
    "reject"``): answered at once, never at a backend."""
    return Failed(Failure(
        p.ParkReason.QUOTA_EXCEEDED, p.ErrorCode.QUOTA_EXCEEDED,
        f"tenant {delivery.tenant!r} used its tokens_per_minute quota; retry later"))


def wait_for_model(delivery: Delivery, pool: PoolSettings, wait_s: float) -> Outcome:
    """This backend rate-limits the request's model for ``wait_s`` more seconds (a 429
    scoped per model): wait in the shortest retry tier that covers it, so the slot serves
    other models meanwhile and the request does not bounce straight back (a hand-back would
    return it to this same consumer at once). Not an attempt."""
    delays = pool.retry_delays_ms
    if not delays:
        return Requeue("model throttled")
    wait_ms = wait_s * 1000
    delay = min((d for d in delays if d >= wait_ms), default=max(delays))
    remaining = delivery.remaining_s()
    if remaining is not None and remaining * 1000 <= delay:
        return Failed(deadline_failure(
            delivery.pool, f"; the backend rate-limits model {delivery.model!r} for "
            f"{wait_s:.1f} s more"))
    return RetryLater(delay, f"model {delivery.model!r} is rate-limited here for "
                      f"{wait_s:.1f} s", "throttled")


def before_attempt(delivery: Delivery, number: int, *, available: bool,
                   fastest_s: float) -> Outcome | None:
    """Whether attempt ``number`` (from 1, in this delivery) may start; None if it may."""
    if number > 1 and not available:
        return Requeue("the circuit opened meanwhile")  # free the slot, let others serve
    remaining = delivery.remaining_s()
    if remaining is None:
        return None
    if remaining <= 0:
        return Failed(deadline_failure(delivery.pool))
    if remaining < fastest_s:
        return Failed(deadline_failure(
            delivery.pool, f"; {remaining * 1000:.0f} ms were left, less than the "
            f"{fastest_s * 1000:.0f} ms of the backend's fastest recent answer"))
    return None


def attempt_kind(delivery: Delivery, error: BackendCallError) -> str:
    """How a failed attempt counts: ``throttled`` (429), ``deadline`` (a call cut at the
    request's deadline: the request ran out of time, the backend did not fail -- counting it
    would let an overload open the circuit of a healthy backend), ``retryable``, or
    ``terminal``."""
    if isinstance(error, ThrottledError):
        return "throttled"
    if isinstance(error, RetryableError):
        # A stream under way is past its start deadline by design: its failure counts.
        cut = delivery.stream is None and delivery.deadline_passed()
        return "deadline" if cut else "retryable"
    return "terminal"


def counts_against_backend(delivery: Delivery) -> bool:
    """Whether a transient failure counts toward the backend's circuit breaker: only a
    request's first failed attempt does. A poison request (one the server chokes on, such
    as a body it answers 500 to) fails on every backend and every attempt while other
    requests succeed: counting each of those would let one bad client open the circuit of a
    healthy backend for everyone, and fail every half-open probe it happens to be."""
    return delivery.attempts <= 1


def after_failure(delivery: Delivery, error: BackendCallError, kind: str, number: int,
                  pool: PoolSettings, backoff_s: float,
                  model_wait_s: float = 0.0) -> TryAgain | Outcome:
    """What follows failed attempt ``number``: another try on this slot, a retry tier, a
    hand-back, or a terminal failure (``model_wait_s``: a 429 scoped to the model)."""
    if kind == "throttled":
        # Not retried on this backend: it asked for time, another may answer.
        if model_wait_s > 0:
            return wait_for_model(delivery, pool, model_wait_s)
        return Requeue("throttled")
    if delivery.stream is not None:
        return Failed(stream_interrupted(delivery, error))
    if kind == "deadline" or delivery.deadline_passed():
        return Failed(deadline_failure(delivery.pool))
    retryable = kind == "retryable"
    budget = max(1, min(pool.attempts_per_delivery, pool.max_attempts - delivery.prior_attempts))
    remaining = delivery.remaining_s()
    if retryable and number < budget and (remaining is None or remaining > backoff_s):
        return TryAgain(backoff_s)
    if retryable and delivery.attempts < pool.max_attempts and pool.retry_delays_ms:
        delays = pool.retry_delays_ms
        delay = delays[min(delivery.retries, len(delays) - 1)]
        if remaining is None or remaining * 1000 > delay:
            return RetryLater(delay, error.message, error.reason)
    return Failed(backend_failure(delivery, error))


#: Backend statuses that mean the request itself is wrong (too long for the context,
#: a field the server rejects, a model it does not have): the client's to fix.
_CLIENT_FAULT_STATUSES = frozenset({400, 404, 413, 422})


def backend_failure(delivery: Delivery, error: BackendCallError) -> Failure:
    """The terminal failure of a backend call, with what the backend said kept (its
    ``status``, and its own ``type``, ``code`` and ``param`` under ``backend``, ``param``
    also at the top as OpenAI's errors carry it). A 400/404/413/422 is the request's
    fault (``invalid_request``: a context-length error is not a backend failure); anything
    else is ``backend_error``."""
    plural = "s" if delivery.attempts != 1 else ""
    extra: dict[str, Any] = {"status": error.status} if error.status is not None else {}
    if error.detail:
        extra["backend"] = dict(error.detail)
        if "param" in error.detail:
            extra["param"] = error.detail["param"]
    client_fault = isinstance(error, TerminalError) and error.status in _CLIENT_FAULT_STATUSES
    reason, code = ((p.ParkReason.INVALID_REQUEST, p.ErrorCode.INVALID_REQUEST) if client_fault
                    else (p.ParkReason.BACKEND_ERROR, p.ErrorCode.BACKEND_ERROR))
    return Failure(reason, code,
                   f"{error.message} (after {delivery.attempts} attempt{plural})", extra)
