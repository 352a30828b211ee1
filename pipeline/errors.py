"""Every error Hutch raises, in one hierarchy.

Three families, by who must act::

    HutchError
    ├── ConfigError              bad settings: the operator fixes the file or environment
    ├── TopologyError            the broker disagrees with the config (changed arguments,
    │                            management API unreachable): the operator decides
    ├── BackendCallError         worker side: one call to an HTTP backend failed
    │   ├── RetryableError       transient (connection, timeout, 5xx, 408): try again
    │   │   └── ThrottledError   429: the backend asked us to wait (retry_after_s)
    │   └── TerminalError        the backend refused the request itself (other 4xx)
    └── RequestFailed            client side: the request ended in an error reply
        ├── QueueFullError       the pool's queue is at its limit (publish was nacked)
        ├── UnknownModelError    no pool serves the model
        ├── DeadlineExceededError the request's deadline passed before an answer
        ├── InvalidRequestError  the request itself is malformed or too large
        └── BackendError         the backend failed or refused, after retries

A :class:`RequestFailed` carries the OpenAI-shaped error of the reply (``code``, ``type``,
``message``); :func:`error_for_code` maps a reply's code to its class, so a caller can catch
exactly the failures it can handle.
"""

from __future__ import annotations

__all__ = [
    "BackendCallError",
    "BackendError",
    "ConfigError",
    "DeadlineExceededError",
    "HutchError",
    "InvalidRequestError",
    "QueueFullError",
    "RequestFailed",
    "RetryableError",
    "TerminalError",
    "ThrottledError",
    "TopologyError",
    "UnknownModelError",
    "error_for_code",
]


class HutchError(Exception):
    """Base class of every Hutch error."""


class ConfigError(HutchError):
    """The configuration is invalid; the message names the bad key."""


class TopologyError(HutchError):
    """The broker's topology cannot be made to match the configuration."""


# -- worker side: calling a backend ----------------------------------------------------


class BackendCallError(HutchError):
    """One HTTP call to a backend failed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RetryableError(BackendCallError):
    """A transient failure: the same request may succeed if tried again."""


class ThrottledError(RetryableError):
    """HTTP 429: the backend is saturated or rate-limited; honour ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message, status=429)
        self.retry_after_s = retry_after_s


class TerminalError(BackendCallError):
    """The backend rejected this request; trying again cannot help."""


# -- client side: the error reply of a request ----------------------------------------


class RequestFailed(HutchError):
    """A request ended in an error reply. ``code`` is the wire contract's error code."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, type: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.type = type or "hutch_error"
        self.status = status


class QueueFullError(RequestFailed):
    code = "queue_full"


class UnknownModelError(RequestFailed):
    code = "unknown_model"


class DeadlineExceededError(RequestFailed, TimeoutError):
    code = "deadline_exceeded"


class InvalidRequestError(RequestFailed):
    code = "invalid_request"


class BackendError(RequestFailed):
    code = "backend_error"


_BY_CODE: dict[str, type[RequestFailed]] = {
    cls.code: cls
    for cls in (
        QueueFullError,
        UnknownModelError,
        DeadlineExceededError,
        InvalidRequestError,
        BackendError,
    )
}


def error_for_code(code: str) -> type[RequestFailed]:
    """The exception class for an error reply's code (``RequestFailed`` if unknown)."""
    return _BY_CODE.get(code, RequestFailed)
