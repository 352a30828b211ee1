"""What the wire contract says becomes of one raw request: the oracle of the fuzz tests.

One source of truth for ``tests/test_fuzz.py`` (a seeded fuzzer), ``tests/test_properties.py``
(Hypothesis) and ``hutch bench scenario fuzz``: a generator describes a message by what is
wrong with it (:class:`Case`), and :func:`expect` fills in the answer the contract
(docs/contract/) gives, in the order the broker and the worker decide
(:func:`pipeline.dispatch.decide.admit`; the alternate exchange catches unknown models
before any check).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import protocol as p

__all__ = [
    "BACKEND_ERROR",
    "DEADLINE_EXCEEDED",
    "INVALID_JSON",
    "INVALID_REQUEST",
    "NO_REPLY_TO",
    "TOO_LARGE",
    "UNKNOWN_MODEL",
    "Case",
    "expect",
]

# Reasons, as the wire contract names them.
INVALID_JSON = str(p.ParkReason.INVALID_JSON)
INVALID_REQUEST = str(p.ParkReason.INVALID_REQUEST)
TOO_LARGE = str(p.ParkReason.TOO_LARGE)
NO_REPLY_TO = str(p.ParkReason.NO_REPLY_TO)
UNKNOWN_MODEL = str(p.ParkReason.UNKNOWN_MODEL)
DEADLINE_EXCEEDED = str(p.ParkReason.DEADLINE_EXCEEDED)
BACKEND_ERROR = str(p.ParkReason.BACKEND_ERROR)


@dataclass
class Case:
    """One raw message, what is wrong with it, and what must become of it."""

    fuzz_id: str
    body: bytes
    routing_key: str
    correlation_id: str | None
    reply_to: str | None
    content_type: str | None
    priority: int
    headers: dict[str, Any]
    defects: list[str] = field(default_factory=list)
    # What makes the outcome (set by the generators, read by expect).
    unroutable: bool = False
    reply_to_kind: str = "ok"  # ok | missing | forged | ghost (a reply name, no such queue)
    too_large: bool = False
    bad_content_type: bool = False
    bad_endpoint: bool = False  # x-hutch-endpoint names no endpoint Hutch serves
    body_class: str = "valid"  # valid | invalid_json | invalid_request | backend_rejects
    deadline_past: bool = False
    cancelled: bool = False  # a valid cancel of its id reached the worker before it
    # Filled in by expect.
    reason: str | None = None  # x-hutch-reason in the parking lot; None: not parked
    code: str | None = None  # x-hutch-error-code of the parked copy
    reply: str | None = None  # "ok", an error code, or None: no reply may arrive
    backend_refuses: bool = False  # it reaches the backend, which answers 400

    @property
    def malformed(self) -> bool:
        return self.reason is not None

    @property
    def reaches_backend(self) -> bool:
        """Whether the backend is called for it (once): answered, parked because its
        reply queue was gone, or refused by the backend itself."""
        return self.reply == "ok" or self.backend_refuses or (
            self.reply_to_kind == "ghost" and self.reason == NO_REPLY_TO)


def _failure(case: Case) -> tuple[str, str, bool] | None:
    """(reason, code, whether the backend was called) of the first check the request fails
    after its reply_to, or None."""
    checks: list[tuple[bool, str, str, bool]] = [
        (case.bad_endpoint, INVALID_REQUEST, "invalid_request", False),
        (not case.correlation_id, INVALID_REQUEST, "invalid_request", False),
        (case.too_large, TOO_LARGE, "invalid_request", False),
        (case.bad_content_type, INVALID_REQUEST, "invalid_request", False),
        (case.body_class == "invalid_json", INVALID_JSON, "invalid_request", False),
        (case.body_class == "invalid_request", INVALID_REQUEST, "invalid_request", False),
        (case.deadline_past, DEADLINE_EXCEEDED, "deadline_exceeded", False),
        # Hutch cannot see it is wrong; the backend answers 400: the request's fault.
        (case.body_class == "backend_rejects", INVALID_REQUEST, "invalid_request", True),
        # A completion nobody can receive: parked as the client's, nothing replied.
        (case.reply_to_kind == "ghost", NO_REPLY_TO, "invalid_request", False),
    ]
    return next(((reason, code, called) for failed, reason, code, called in checks
                 if failed), None)


def expect(case: Case) -> None:
    """Fill in the outcome the contract gives, in the order the broker and worker decide."""
    answerable = case.reply_to_kind == "ok" and bool(case.correlation_id)
    case.reason = case.code = case.reply = None
    case.backend_refuses = False
    if case.unroutable:
        # Caught by the alternate exchange: triage answers and parks, whatever the body.
        case.reason, case.code = UNKNOWN_MODEL, "unknown_model"
    elif case.reply_to_kind in ("missing", "forged"):
        case.reason, case.code = NO_REPLY_TO, "invalid_request"
        answerable = False
    elif case.cancelled and case.correlation_id and case.reply_to_kind == "ok":
        # A tombstone is checked before the body: answered, never parked, no backend call.
        case.reply = "cancelled"
        return
    elif (failure := _failure(case)) is not None:
        case.reason, case.code, case.backend_refuses = failure
    else:
        case.reply = "ok"
        return
    case.reply = case.code if answerable else None
