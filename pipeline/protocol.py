"""The wire contract: header names, error codes, and how replies and parked messages look.

Everything a client in another language needs to speak to Hutch is defined here and
documented in the README's "Wire contract" section; the client and the worker both import
it, so the two sides cannot drift apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

__all__ = [
    "H_ATTEMPTS",
    "H_BACKEND",
    "H_BACKEND_MS",
    "H_DEADLINE",
    "H_ENDPOINT",
    "H_ERROR_CODE",
    "H_ERROR_MESSAGE",
    "H_ERROR_TYPE",
    "H_FIRST_FAILED_AT",
    "H_KIND",
    "H_LAST_BACKEND",
    "H_LAST_ERROR",
    "H_MODEL",
    "H_ORIGINAL_ROUTING_KEY",
    "H_OUTCOME",
    "H_PARKED_AT",
    "H_POOL",
    "H_QUEUE_WAIT_MS",
    "H_REASON",
    "H_REPLAYED",
    "H_RETRIES",
    "H_RETRY_TIER",
    "H_SENT_AT",
    "H_SEQ",
    "H_STATUS_AFTER_MS",
    "H_STATUS_SENT",
    "H_STREAM_ID",
    "H_TIMEOUT_MS",
    "H_USER",
    "KIND_CHUNK",
    "KIND_FINAL",
    "KIND_STATUS",
    "STATUS_OBJECT",
    "Endpoint",
    "ErrorCode",
    "ParkReason",
    "deadline_ms",
    "death_reason",
    "error_body",
    "error_type",
    "int_header",
    "now_ms",
    "sent_at_ms",
    "status_after_ms",
    "text_header",
    "timeout_ms",
]

# Request headers (optional; set by pipeline.client.client, any client may set them).
H_DEADLINE = "x-hutch-deadline"  # absolute deadline, epoch milliseconds
H_SENT_AT = "x-hutch-sent-at"  # publish time, epoch milliseconds (queue wait metric)
# The timeout relative to the first receipt, milliseconds: the worker that receives the
# request turns it into a deadline on its own clock, so a client's clock does not matter.
# It wins over x-hutch-deadline; a worker republishing the request (a retry tier, a
# hand-back) replaces it with the absolute deadline it computed (docs/operations/clocks.md).
H_TIMEOUT_MS = "x-hutch-timeout-ms"

# Which OpenAI endpoint a request is for (absent: chat completions). The worker validates
# the body for it and calls the backend's matching endpoint.
H_ENDPOINT = "x-hutch-endpoint"


class Endpoint(StrEnum):
    """The OpenAI endpoints a request may be for (``x-hutch-endpoint``)."""

    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"

    @property
    def path(self) -> str:
        """The backend's path, under its ``/v1`` base URL."""
        return "/" + self.value.replace(".", "/")


# Opt-in queue status (docs/contract/index.md, "Queue status"): a request that waits behind a
# saturated pool and whose estimated start is more than this many ms after it was sent gets
# one status message (x-hutch-kind "status") on its reply_to before its answer.
H_STATUS_AFTER_MS = "x-hutch-status-after-ms"
# Set by a worker on a copy (lane, retry tier, parking lot) of a request whose status
# message it sent: a request is told at most once.
H_STATUS_SENT = "x-hutch-status-sent"

# Set by workers on a request they send to a retry tier.
# The tier's delay in ms; the retry (headers) exchange routes on it. No "x-" prefix:
# a headers exchange ignores x- headers when matching.
H_RETRY_TIER = "hutch-retry-tier"
H_RETRIES = "x-hutch-retries"  # trips through a retry tier so far
# Kept across retry tiers and hand-backs, so a later reply or parked copy still says where
# and how the request last failed (a request that then expires in its queue included).
H_LAST_BACKEND = "x-hutch-last-backend"
H_LAST_ERROR = "x-hutch-last-error"
# The client user a request was published by (its broker-validated ``user_id``). Set by
# workers when they republish a request (retry tier, parking lot), which they must do as
# themselves. Believed only when the message's own ``user_id`` is the worker's user (or a
# trusted one): a client cannot set that user_id, so it cannot forge this header.
H_USER = "x-hutch-user"
#: A request moved into a lane keeps its model here (its routing key is the lane's name);
#: believed only from a trusted publisher (a worker).
H_MODEL = "x-hutch-model"

# Reply headers.
H_OUTCOME = "x-hutch-outcome"  # "ok" or "error"
H_ERROR_CODE = "x-hutch-error-code"
H_QUEUE_WAIT_MS = "x-hutch-queue-wait-ms"
H_BACKEND_MS = "x-hutch-backend-ms"
H_ATTEMPTS = "x-hutch-attempts"
H_BACKEND = "x-hutch-backend"
H_POOL = "x-hutch-pool"

# Streaming replies (see the README's "Streaming replies"): every message of a stream, and
# every final reply, says which it is; chunks are numbered within their stream id.
H_KIND = "x-hutch-kind"  # "chunk" or "final"
H_STREAM_ID = "x-hutch-stream-id"  # a fresh id per attempt at streaming the request
H_SEQ = "x-hutch-seq"  # chunk: its number from 0; final: how many chunks were sent
KIND_CHUNK = "chunk"
KIND_FINAL = "final"
#: Neither an answer nor part of one: a queued request's estimated start (opt-in, at most
#: one per request, before its answer). A client must take only ``final`` (or no kind:
#: workers before streaming) as the answer, and may ignore kinds it does not know.
KIND_STATUS = "status"
#: The ``object`` of a status message's JSON body.
STATUS_OBJECT = "hutch.queue_status"

# Parking-lot headers (in addition to H_POOL, H_BACKEND, H_ATTEMPTS, H_ERROR_CODE).
H_REASON = "x-hutch-reason"
H_ERROR_TYPE = "x-hutch-error-type"
H_ERROR_MESSAGE = "x-hutch-error-message"
H_PARKED_AT = "x-hutch-parked-at"
H_ORIGINAL_ROUTING_KEY = "x-hutch-original-routing-key"
# Kept across replays (see pipeline.ops.dlq): when the request first failed, how often replayed.
H_FIRST_FAILED_AT = "x-hutch-first-failed-at"  # UTC, ISO 8601, like x-hutch-parked-at
H_REPLAYED = "x-hutch-replayed"  # times `hutch dlq replay` sent it back


class ErrorCode(StrEnum):
    """``error.code`` of an error reply; each maps to one client exception."""

    QUEUE_FULL = "queue_full"
    UNKNOWN_MODEL = "unknown_model"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INVALID_REQUEST = "invalid_request"
    BACKEND_ERROR = "backend_error"
    INTERNAL_ERROR = "internal_error"
    #: The request's owner (or an operator) cancelled it; not a failure, never parked.
    CANCELLED = "cancelled"
    #: A stream failed after chunks were sent; the error says how much was sent.
    STREAM_INTERRUPTED = "stream_interrupted"
    #: The tenant used its token quota and its configuration refuses the excess.
    QUOTA_EXCEEDED = "quota_exceeded"
    #: The broker blocked the publish (a resource alarm): never a reply, raised by the
    #: client (and answered 503 by the gateway) when its publish bound passed.
    BROKER_BLOCKED = "broker_blocked"


class ParkReason(StrEnum):
    """``x-hutch-reason`` of a parked message: why it ended in the parking lot."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    TOO_LARGE = "too_large"
    NO_REPLY_TO = "no_reply_to"
    UNKNOWN_MODEL = "unknown_model"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    QUEUE_FULL = "queue_full"
    BACKEND_ERROR = "backend_error"
    REJECTED = "rejected"
    INTERNAL_ERROR = "internal_error"
    #: ``reply_to`` is not a reply queue of the publishing user: nothing was sent to it.
    FORGED_REPLY_TO = "forged_reply_to"
    #: No ``user_id`` while the worker requires one (``require_user_id``): not answered.
    NO_USER_ID = "no_user_id"
    #: A quorum queue gave up on it after ``delivery_limit`` hand-backs.
    DELIVERY_LIMIT = "delivery_limit"
    #: A stream failed after chunks were sent (the client got ``stream_interrupted``).
    STREAM_INTERRUPTED = "stream_interrupted"
    #: Refused: its tenant is over a token quota configured to ``reject`` the excess.
    QUOTA_EXCEEDED = "quota_exceeded"


#: The OpenAI ``error.type`` for each code.
_ERROR_TYPE = {
    ErrorCode.QUEUE_FULL: "rate_limit_error",
    ErrorCode.UNKNOWN_MODEL: "invalid_request_error",
    ErrorCode.DEADLINE_EXCEEDED: "timeout_error",
    ErrorCode.INVALID_REQUEST: "invalid_request_error",
    ErrorCode.BACKEND_ERROR: "api_error",
    ErrorCode.INTERNAL_ERROR: "api_error",
    ErrorCode.CANCELLED: "invalid_request_error",
    ErrorCode.STREAM_INTERRUPTED: "api_error",
    ErrorCode.QUOTA_EXCEEDED: "rate_limit_error",
    ErrorCode.BROKER_BLOCKED: "api_error",
}


def now_ms() -> int:
    return int(time.time() * 1000)


def error_type(code: ErrorCode) -> str:
    """The OpenAI ``error.type`` that goes with a code."""
    return _ERROR_TYPE[code]


def error_body(code: ErrorCode, message: str, **extra: Any) -> bytes:
    """An OpenAI-shaped error reply body."""
    error: dict[str, Any] = {"type": error_type(code), "code": str(code), "message": message}
    error.update(extra)
    return json.dumps({"error": error}, separators=(",", ":")).encode()


#: Epoch-millisecond headers outside this range are not believed (year 2000..2100):
#: a client's absurd value must not overflow the int64 header it is echoed back in.
_MIN_EPOCH_MS, _MAX_EPOCH_MS = 946_684_800_000, 4_102_444_800_000


def text_header(value: Any) -> str | None:
    """A string header's value: a string that is not valid UTF-8 arrives as bytes (decoded
    with replacement characters); anything else is no string at all."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    return value if isinstance(value, str) else None


def int_header(headers: Mapping[str, Any], name: str, *, low: int, high: int) -> int | None:
    """An integer header within ``low..high``, else None (absent, junk or absurd)."""
    value = headers.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        value = int(value)
    elif isinstance(value, bytes | str):
        try:
            value = int(value)
        except ValueError:
            return None
    if not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def _epoch_header(headers: Mapping[str, Any], name: str, *, clamp: bool) -> int | None:
    """An epoch-ms header. ``clamp``: an absurd value is pulled into range (a deadline
    long past is still past); otherwise it is ignored (a send time from 1970 is junk)."""
    value = int_header(headers, name, low=-(2**63), high=2**63 - 1)
    if value is None or _MIN_EPOCH_MS <= value <= _MAX_EPOCH_MS:
        return value
    return max(_MIN_EPOCH_MS, min(value, _MAX_EPOCH_MS)) if clamp else None


#: A relative timeout is believed from 1 ms to 30 days.
_MAX_TIMEOUT_MS = 30 * 24 * 3600 * 1000


def timeout_ms(headers: Mapping[str, Any]) -> int | None:
    """``x-hutch-timeout-ms``: a whole number of milliseconds in 1..30 days, else None."""
    return int_header(headers, H_TIMEOUT_MS, low=1, high=_MAX_TIMEOUT_MS)


def status_after_ms(headers: Mapping[str, Any]) -> int | None:
    """``x-hutch-status-after-ms``: 0 ms .. 30 days, else None (not asked for)."""
    return int_header(headers, H_STATUS_AFTER_MS, low=0, high=_MAX_TIMEOUT_MS)


def deadline_ms(headers: Mapping[str, Any], expiration_s: float | None,
                timestamp_s: float | None, received_ms: int | None = None) -> int | None:
    """The request's absolute deadline (epoch ms, the worker's clock), or None.

    A relative ``x-hutch-timeout-ms`` wins: the deadline is that long after
    ``received_ms`` (default: now), the receipt by this worker, so the client's clock
    does not count. Then an explicit ``x-hutch-deadline`` header (epoch ms of the client's
    clock). Otherwise a request that carries both ``expiration`` and ``timestamp`` may
    wait until timestamp + expiration. A request with only ``expiration`` is bounded by
    the broker alone (it expires it while queued).
    """
    relative = timeout_ms(headers)
    if relative is not None:
        return (now_ms() if received_ms is None else received_ms) + relative
    explicit = _epoch_header(headers, H_DEADLINE, clamp=True)
    if explicit is not None:
        return explicit
    if expiration_s is not None and timestamp_s is not None:
        return int((timestamp_s + expiration_s) * 1000)
    return None


def sent_at_ms(headers: Mapping[str, Any], timestamp_s: float | None) -> int | None:
    """When the request was published: ``x-hutch-sent-at``, else the AMQP timestamp."""
    explicit = _epoch_header(headers, H_SENT_AT, clamp=False)
    if explicit is not None:
        return explicit
    return int(timestamp_s * 1000) if timestamp_s is not None else None


_DEATH_REASONS = {
    "expired": ParkReason.DEADLINE_EXCEEDED,
    "maxlen": ParkReason.QUEUE_FULL,
    "rejected": ParkReason.REJECTED,
    # A quorum queue's delivery-limit (every hand-back and dead channel counts).
    "delivery_limit": ParkReason.DELIVERY_LIMIT,
}


def death_reason(headers: Mapping[str, Any]) -> ParkReason:
    """Why the broker dead-lettered a message, from its ``x-death`` header.

    A message in the triage queue without ``x-death`` came through the alternate
    exchange: no pool serves its model.
    """
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths:
        return ParkReason.UNKNOWN_MODEL
    latest = deaths[0]  # RabbitMQ keeps the most recent death first
    reason = latest.get("reason") if isinstance(latest, dict) else None
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    return _DEATH_REASONS.get(str(reason), ParkReason.REJECTED)
