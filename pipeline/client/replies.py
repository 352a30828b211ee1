"""Reading reply messages: what kind a message is, its completion, its error.

A reply message is a final (the request's one answer, ``x-hutch-kind: final`` or no kind
at all: workers before streaming sent none), a chunk of a stream, or a queued request's
status (``status``, only when asked for: never an answer). These helpers read
only what the wire contract defines, so the router, the stream assembly and ``result()``
agree on it; they take any object with ``correlation_id``, ``headers`` and ``body``
(aio-pika's incoming message, or a test's fake).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from pipeline import protocol as p
from pipeline.errors import RequestFailed, StreamInterruptedError, error_for_code
from pipeline.models import ChatCompletion, ErrorReply, QueueStatus

__all__ = [
    "GRACE_S",
    "RawReply",
    "Reply",
    "ReplyMessage",
    "completion_of",
    "failure_of",
    "header_int",
    "header_str",
    "is_chunk",
    "is_status",
    "queue_status_of",
]


#: How long past its deadline a caller waits for the worker's authoritative answer.
GRACE_S = 2.0


class ReplyMessage(Protocol):
    """What the client reads of a reply message."""

    @property
    def correlation_id(self) -> str | None: ...

    @property
    def headers(self) -> Mapping[str, Any]: ...

    @property
    def body(self) -> bytes: ...


@dataclass(frozen=True)
class Reply:
    """A successful reply: the completion and what the worker reported about it."""

    completion: ChatCompletion
    correlation_id: str = ""
    headers: Mapping[str, Any] = field(default_factory=dict)
    latency_s: float = 0.0

    @property
    def queue_wait_ms(self) -> int | None:
        value = self.headers.get(p.H_QUEUE_WAIT_MS)
        return int(value) if value is not None else None

    @property
    def backend(self) -> str | None:
        value = self.headers.get(p.H_BACKEND)
        return str(value) if value is not None else None


@dataclass(frozen=True)
class RawReply:
    """A successful reply of any endpoint: its body unparsed, as the backend sent it."""

    body: bytes
    correlation_id: str = ""
    headers: Mapping[str, Any] = field(default_factory=dict)
    latency_s: float = 0.0


def header_str(message: ReplyMessage, name: str) -> str | None:
    """A string header (the broker may hand it over as bytes)."""
    value = (message.headers or {}).get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def header_int(message: ReplyMessage, name: str) -> int | None:
    """A non-negative integer header, None if absent or junk."""
    return p.int_header(message.headers or {}, name, low=0, high=2**63 - 1)


def is_chunk(message: ReplyMessage) -> bool:
    """A chunk message of a stream (anything else is a final: the request's answer)."""
    return header_str(message, p.H_KIND) == p.KIND_CHUNK


def is_status(message: ReplyMessage) -> bool:
    """A queued request's status message: never its answer, nor part of one."""
    return header_str(message, p.H_KIND) == p.KIND_STATUS


def queue_status_of(message: ReplyMessage) -> QueueStatus | None:
    """The status a status message carries (None: unreadable, ignored)."""
    try:
        return QueueStatus.model_validate_json(message.body)
    except ValidationError:
        return None


def _count(extra: Mapping[str, Any], key: str) -> int:
    value = extra.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def failure_of(body: bytes) -> RequestFailed:
    """The exception of an error reply: the :class:`RequestFailed` subclass of its code,
    with ``chunks_sent`` / ``content_chars_sent`` for ``stream_interrupted``, and the
    backend's own ``param`` and ``backend`` fields when the worker kept them."""
    try:
        detail = ErrorReply.model_validate_json(body).error
    except ValidationError:
        return RequestFailed(f"unreadable error reply: {body[:200]!r}")
    extra = detail.model_extra or {}
    status = extra.get("status")
    status = status if isinstance(status, int) else None
    cls = error_for_code(detail.code)
    if issubclass(cls, StreamInterruptedError):
        return cls(detail.message, code=detail.code, type=detail.type, status=status,
                   chunks_sent=_count(extra, "chunks_sent"),
                   content_chars_sent=_count(extra, "content_chars_sent"))
    param, backend = extra.get("param"), extra.get("backend")
    return cls(detail.message, code=detail.code, type=detail.type, status=status,
               param=param if isinstance(param, str | int) else None,
               backend=backend if isinstance(backend, dict) else None)


def completion_of(message: ReplyMessage) -> ChatCompletion:
    """The completion of a final message; raises its error if it is an error reply."""
    if header_str(message, p.H_OUTCOME) != "ok":
        raise failure_of(message.body)
    try:
        return ChatCompletion.model_validate_json(message.body)
    except ValidationError as exc:
        raise RequestFailed(f"unreadable completion in reply: {exc}") from None
