"""How a delivery ends: the Outcome the dispatcher decides and the settler carries out.

Deciding and settling are separate so that every decision is a plain value, testable
without a broker (tests/test_decide.py), and so that there is exactly one place that turns
a decision into replies, parked copies, retry-tier publishes, acks and nacks
(:mod:`pipeline.settle.settler`)::

    Outcome
    ├── Completed    the backend answered: reply with the completion, ack
    ├── Failed       terminal: error reply (when someone may be answered), park, ack
    ├── RetryLater   transient: through the retry tier of ``delay_ms``, ack
    ├── Requeue      this backend cannot take it now (429, circuit, pause): nack + requeue
    ├── Cancelled    its owner cancelled it, or its client is gone: answer, ack, not parked
    └── Abandoned    the channel or connection is gone: no ack; the broker redelivers
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import protocol as p
from pipeline.models import Usage

__all__ = [
    "Abandoned",
    "Cancelled",
    "Completed",
    "Failed",
    "Failure",
    "Outcome",
    "Requeue",
    "RetryLater",
]


@dataclass
class Failure:
    """A terminal failure: the error the client gets and why the request is parked."""

    reason: p.ParkReason
    code: p.ErrorCode
    message: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Completed:
    """The backend's completion, as it sent it (``body``), with its usage if any."""

    body: bytes
    usage: Usage | None
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class Failed:
    """A terminal failure of the request itself."""

    failure: Failure


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Go through the retry tier of ``delay_ms``; the backend slot is freed meanwhile."""

    delay_ms: int
    error: str
    #: The bounded metric label of the failure that sent it there (``BackendCallError.reason``).
    reason: str


@dataclass(frozen=True, slots=True)
class Requeue:
    """Hand the delivery back to its queue: this backend cannot take it now."""

    why: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Cancelled before it finished: ``queued`` (never reached a backend), ``in_flight``
    (the backend call was aborted) or ``client_gone`` (its reply queue vanished mid-stream:
    nobody is left to answer). Not a failure: never parked."""

    stage: str


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Nothing can be settled (the channel or connection died): the broker redelivers."""

    error: str


Outcome = Completed | Failed | RetryLater | Requeue | Cancelled | Abandoned
