"""Replies and errors as the OpenAI API answers them: status codes, bodies, SSE events.

Error bodies have OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``), so
the SDKs raise their usual exception classes; the status follows the wire contract's code:

============================  ======  ==============================================
code                          status  note
============================  ======  ==============================================
``queue_full``                429     with ``Retry-After``
``unknown_model``             404     code ``model_not_found``, as OpenAI names it
``invalid_request``           400     (the gateway's own refusals carry their status)
``deadline_exceeded``         504
``backend_error``             502     the backend's status in the body (``status``)
``stream_interrupted``        502
``cancelled``                 503     an operator cancelled it (the gateway cancels
                                      only for clients that are gone)
``broker_blocked``            503     with ``Retry-After``: a resource alarm of the
                                      broker blocks publishing (nothing was queued)
``internal_error``            500
============================  ======  ==============================================

``deadline_exceeded`` and ``cancelled`` carry ``x-should-retry: false``: the OpenAI SDKs
would otherwise retry them (twice by default), calling the backend again for nothing.

What the backend said of a refused or failed call is passed through: its HTTP ``status``,
``param`` at the top, and ``backend: {type, code, param}``; a request the backend refused
as the client's fault (``invalid_request``, 400) also carries the backend's own ``type``
and ``code`` at the top, so an SDK's ``error.code`` reads ``context_length_exceeded`` as
it would from the backend itself (``hutch_code`` then keeps the wire contract's code).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from pipeline import protocol as p
from pipeline.errors import GatewayRefusal, RequestFailed
from pipeline.models import ChatCompletionChunk, QueueStatus

__all__ = [
    "DONE",
    "H_REQUEST_ID",
    "H_SHOULD_RETRY",
    "error_body",
    "error_response",
    "reply_headers",
    "sse_chunk",
    "sse_error",
    "sse_queued",
    "status_of",
]

H_REQUEST_ID = "x-request-id"
#: The last event of a stream that ended well.
DONE = b"data: [DONE]\n\n"

_STATUS: dict[str, int] = {
    p.ErrorCode.QUEUE_FULL: 429,
    p.ErrorCode.QUOTA_EXCEEDED: 429,
    p.ErrorCode.UNKNOWN_MODEL: 404,
    p.ErrorCode.INVALID_REQUEST: 400,
    p.ErrorCode.DEADLINE_EXCEEDED: 504,
    p.ErrorCode.BACKEND_ERROR: 502,
    p.ErrorCode.STREAM_INTERRUPTED: 502,
    p.ErrorCode.CANCELLED: 503,
    p.ErrorCode.BROKER_BLOCKED: 503,
}
#: Answers a retry cannot change: the OpenAI SDKs retry 408, 409, 429 and 5xx (twice, by
#: default) unless ``x-should-retry: false`` says not to. A deadline that passed stays
#: passed (three backend calls and 4.3 s for a 1 s deadline otherwise); an operator's
#: cancel was meant.
_NO_RETRY = frozenset({p.ErrorCode.DEADLINE_EXCEEDED, p.ErrorCode.CANCELLED})
H_SHOULD_RETRY = "x-should-retry"
#: Reply headers passed on to the HTTP response (the worker's names).
_PASSED = (p.H_QUEUE_WAIT_MS, p.H_BACKEND, p.H_BACKEND_MS, p.H_ATTEMPTS, p.H_POOL)


def status_of(error: RequestFailed) -> int:
    """The HTTP status of an error."""
    if isinstance(error, GatewayRefusal) and error.status is not None:
        return error.status
    return _STATUS.get(error.code, 500)


def error_body(error: RequestFailed) -> dict[str, Any]:
    """The OpenAI-shaped body of an error, with what the backend said passed through:
    ``param``, ``status``, ``backend`` and, for a request the backend refused (400), its
    own ``type`` and ``code`` (``context_length_exceeded``), as OpenAI would answer."""
    code = "model_not_found" if error.code == p.ErrorCode.UNKNOWN_MODEL else error.code
    detail: dict[str, Any] = {"message": error.message, "type": error.type,
                              "param": error.param, "code": code}
    if isinstance(error, GatewayRefusal):
        return {"error": detail}
    if error.status is not None:
        detail["status"] = error.status  # the backend's HTTP status
    if error.backend:
        detail["backend"] = error.backend
        if error.code == p.ErrorCode.INVALID_REQUEST:
            own = {f: error.backend[f] for f in ("type", "code")
                   if isinstance(error.backend.get(f), str)}
            if own:
                detail.update(own, hutch_code=error.code)  # Hutch's code stays readable
    return {"error": detail}


def error_response(error: RequestFailed, *, correlation_id: str | None,
                   retry_after_s: int) -> web.Response:
    """The HTTP answer of an error."""
    status = status_of(error)
    headers = {} if correlation_id is None else {H_REQUEST_ID: correlation_id}
    if status == 429 or error.code == p.ErrorCode.BROKER_BLOCKED:
        headers["Retry-After"] = str(retry_after_s)
    if error.code in _NO_RETRY:
        headers[H_SHOULD_RETRY] = "false"
    return web.json_response(error_body(error), status=status, headers=headers)


def reply_headers(correlation_id: str, headers: Mapping[str, Any]) -> dict[str, str]:
    """Response headers of an answer: the request id and what the worker reported."""
    out = {H_REQUEST_ID: correlation_id}
    for name in _PASSED:
        value = headers.get(name)
        if value is not None:
            out[name] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def sse_chunk(chunk: ChatCompletionChunk) -> bytes:
    """One ``data:`` event: the chunk as the backend sent it (fields it did not send stay
    out; the assembly's own catch-up chunk gets its ``object``)."""
    data = chunk.model_dump(exclude_unset=True)
    data.setdefault("object", "chat.completion.chunk")
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def sse_error(error: RequestFailed) -> bytes:
    """The event of a stream that failed after it started (the SDKs raise on it)."""
    return b"data: " + json.dumps(error_body(error)).encode() + b"\n\n"


def sse_queued(status: QueueStatus) -> bytes:
    """A queued stream's status as an SSE comment line, which OpenAI's SDKs (and any SSE
    client) skip: ``: queued position=812 tokens_ahead=48720 estimated_start_s=7.9
    estimated_start_at=2026-12-08T03:30:07.900Z`` (``-``: not known yet)."""
    def shown(value: object) -> str:
        return "-" if value is None else str(value)

    at = status.estimated_start_at_ms
    when = "-" if at is None else (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at / 1000))
                                   + f".{at % 1000:03d}Z")
    return (f": queued position={status.position} tokens_ahead={shown(status.tokens_ahead)}"
            f" estimated_start_s={shown(status.estimated_start_s)} estimated_start_at={when}"
            "\n\n").encode()
