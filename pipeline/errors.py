"""Every error Hutch raises, in one hierarchy.

Three families, by who must act: the operator (config, topology, its commands), the
worker, the client::

    HutchError
    ├── ConfigError              bad settings: the operator fixes the file or environment
    ├── BrokerConnectionError    no AMQP connection (pipeline.broker.connection says why)
    │   ├── BrokerUnreachableError   no TCP connection: a worker retries (a ConnectionError)
    │   ├── BrokerAuthError          the broker refused the user's credentials
    │   ├── BrokerAccessError        the vhost does not exist or the user may not use it
    │   └── BrokerTLSError           the TLS handshake failed (certificate, CA, client cert)
    ├── TopologyError            the broker disagrees with the config (changed arguments,
    │                            management API unreachable): the operator decides
    ├── OperationError           an operator's command cannot do what it was asked
    │   ├── StatusError          status: the management API is unreachable or refuses
    │   ├── UserError            client/worker-user: the user exists, or is not Hutch's
    │   └── StackError           bench scenario: a process it started did not come up
    ├── BackendCallError         worker side: one call to an HTTP backend failed; .reason
    │   ├── RetryableError       transient: the same request may succeed if tried again
    │   │   ├── BackendUnreachableError    no connection: refused, DNS, TLS     unreachable
    │   │   │   └── BackendConnectTimeoutError  no connection in time       connect_timeout
    │   │   ├── BackendDisconnectedError   closed or reset mid-request         disconnected
    │   │   ├── BackendTimeoutError        no byte for the read timeout             timeout
    │   │   ├── RetryableStatusError       HTTP 408 or 5xx                    http_<status>
    │   │   ├── BackendNotFoundError       HTTP 404 of a path: a wrong url        not_found
    │   │   ├── BackendProtocolError       malformed HTTP response         invalid_response
    │   │   │   └── InvalidCompletionError HTTP 200, body no completion  invalid_completion
    │   │   └── ThrottledError             429: wait retry_after_s                throttled
    │   └── TerminalError        the backend refused the request itself
    │       └── TerminalStatusError        HTTP 4xx other than 408 and 429            other
    └── RequestFailed            client side: the request ended in an error reply
        ├── QueueFullError       the pool's queue is at its limit (publish was nacked)
        ├── QuotaExceededError   the tenant used its token quota (configured to refuse)
        ├── UnknownModelError    no pool serves the model
        ├── DeadlineExceededError the request's deadline passed before an answer
        ├── InvalidRequestError  the request itself is malformed or too large
        ├── BackendError         the backend failed or refused, after retries
        │   └── StreamInterruptedError  a stream ended or restarted after chunks were sent
        ├── RequestCancelledError       the request was cancelled by its owner or an operator
        └── BrokerBlockedError   the broker blocks publishing (a memory or disk alarm)

A :class:`RequestFailed` carries the OpenAI-shaped error of the reply (``code``, ``type``,
``message``); :func:`error_for_code` maps a reply's code to its class, so a caller can catch
exactly the failures it can handle.

A :class:`BackendCallError`'s ``reason`` (right column above) is a bounded metric label:
``unreachable``, ``connect_timeout``, ``disconnected``, ``timeout``, ``invalid_response``,
``invalid_completion``, ``throttled``, ``not_found``, ``http_<status>`` (408, 500-599), else
``other``.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BackendCallError",
    "BackendConnectTimeoutError",
    "BackendDisconnectedError",
    "BackendError",
    "BackendNotFoundError",
    "BackendProtocolError",
    "BackendTimeoutError",
    "BackendUnreachableError",
    "BrokerAccessError",
    "BrokerAuthError",
    "BrokerBlockedError",
    "BrokerConnectionError",
    "BrokerTLSError",
    "BrokerUnreachableError",
    "ConfigError",
    "DeadlineExceededError",
    "GatewayRefusal",
    "HutchError",
    "InvalidCompletionError",
    "InvalidRequestError",
    "OperationError",
    "PauseStateError",
    "QueueFullError",
    "QuotaExceededError",
    "RequestCancelledError",
    "RequestFailed",
    "RetryableError",
    "RetryableStatusError",
    "StackError",
    "StatusError",
    "StreamInterruptedError",
    "TerminalError",
    "TerminalStatusError",
    "ThrottledError",
    "TopologyError",
    "UnknownModelError",
    "UserError",
    "error_for_code",
]


class HutchError(Exception):
    """Base class of every Hutch error."""


class ConfigError(HutchError):
    """The configuration is invalid; the message names the bad key."""


class TopologyError(HutchError):
    """The broker's topology cannot be made to match the configuration."""


# -- the AMQP connection ------------------------------------------------------------------


class BrokerConnectionError(HutchError):
    """No AMQP connection could be opened; the message says why and what to do."""


class BrokerUnreachableError(BrokerConnectionError, ConnectionError):
    """No connection to the broker's address (refused, unknown host, timeout): the one
    connection failure that retrying can cure, so it is also a :class:`ConnectionError`."""


class BrokerAuthError(BrokerConnectionError):
    """The broker refused the credentials: retrying cannot help."""


class BrokerAccessError(BrokerConnectionError):
    """The vhost does not exist or the user has no access to it: retrying cannot help."""


class BrokerTLSError(BrokerConnectionError):
    """The TLS handshake failed (untrusted or wrong certificate, client certificate
    missing or refused): retrying cannot help."""


# -- operator tools: status, users, benchmarks ------------------------------------------


class OperationError(HutchError):
    """An operator's command cannot do what it was asked; the message says why."""


class StatusError(OperationError):
    """``hutch status`` cannot read the broker (management API unreachable or refusing)."""


class UserError(OperationError):
    """A user cannot be added or removed (it exists, or it is not a Hutch user)."""


class PauseStateError(OperationError):
    """A pool's pause state cannot be read or changed now (its queue's node is down, its
    quorum queue has no leader): the message says which pool and why."""


class StackError(OperationError):
    """A process a benchmark scenario started did not come up (the message quotes its log)."""


# -- worker side: calling a backend ----------------------------------------------------


class BackendCallError(HutchError):
    """One HTTP call to a backend failed."""

    #: The class's metric label; None: derived from ``status`` (see :attr:`reason`).
    kind: ClassVar[str | None] = None

    def __init__(self, message: str, *, status: int | None = None,
                 detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        #: The backend's own error fields (OpenAI's ``type``, ``code``, ``param``), if it
        #: sent an OpenAI-shaped error: clients act on them (``context_length_exceeded``).
        self.detail = detail or {}

    @property
    def reason(self) -> str:
        """A bounded metric label for why the call failed (``http_503``, ``timeout``...)."""
        if self.kind is not None:
            return self.kind
        status = self.status
        if status == 200:
            return "invalid_completion"
        if status is not None and (status == 408 or 500 <= status <= 599):
            return f"http_{status}"
        return "other"


class RetryableError(BackendCallError):
    """A transient failure: the same request may succeed if tried again."""


class BackendUnreachableError(RetryableError):
    """No connection (refused, DNS, TLS handshake): the request never reached the backend."""

    kind = "unreachable"


class BackendConnectTimeoutError(BackendUnreachableError):
    """No connection within the connect timeout: the request never reached the backend."""

    kind = "connect_timeout"


class BackendDisconnectedError(RetryableError):
    """The backend closed or reset the connection mid-request: it may have started on it."""

    kind = "disconnected"


class BackendTimeoutError(RetryableError):
    """No byte from the backend for the read timeout (before the headers or mid-body)."""

    kind = "timeout"


class RetryableStatusError(RetryableError):
    """HTTP 408 or 5xx: the backend failed this time; ``reason`` is ``http_<status>``."""


class BackendNotFoundError(RetryableError):
    """HTTP 404 whose error names no model: the path does not exist on the server (a base
    url without ``/v1``), so the backend is misconfigured, not the request. Retried elsewhere
    and counted toward the circuit, so a wrong url takes the backend out of service
    rather than failing every request as the client's fault."""

    kind = "not_found"


class BackendProtocolError(RetryableError):
    """The backend's response is not valid HTTP (status line, headers or framing)."""

    kind = "invalid_response"


class InvalidCompletionError(BackendProtocolError):
    """HTTP 200 whose body is not a chat completion."""

    kind = "invalid_completion"


class ThrottledError(RetryableError):
    """HTTP 429: the backend is saturated or rate-limited; honour ``retry_after_s``."""

    kind = "throttled"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message, status=429)
        self.retry_after_s = retry_after_s


class TerminalError(BackendCallError):
    """The backend rejected this request; trying again cannot help."""


class TerminalStatusError(TerminalError):
    """HTTP 4xx other than 408 and 429 (``reason`` ``other``: never retried)."""


# -- client side: the error reply of a request ----------------------------------------


class RequestFailed(HutchError):
    """A request ended in an error reply. ``code`` is the wire contract's error code;
    ``param`` and ``backend`` (the backend's own ``type``, ``code``, ``param``) are what
    the backend said, kept so a client (or the HTTP gateway's answer) can act on them."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, type: str | None = None,
                 status: int | None = None, param: str | int | None = None,
                 backend: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.type = type or "hutch_error"
        self.status = status
        self.param = param
        self.backend = backend


class QueueFullError(RequestFailed):
    code = "queue_full"


class QuotaExceededError(RequestFailed):
    """The tenant is over its ``tokens_per_minute`` and its ``over_quota`` is ``reject``."""

    code = "quota_exceeded"


class UnknownModelError(RequestFailed):
    code = "unknown_model"


class DeadlineExceededError(RequestFailed, TimeoutError):
    code = "deadline_exceeded"


class InvalidRequestError(RequestFailed):
    code = "invalid_request"


class BackendError(RequestFailed):
    code = "backend_error"


class RequestCancelledError(RequestFailed):
    """The request was cancelled (by its owner or an operator) before it finished."""

    code = "cancelled"


class BrokerBlockedError(RequestFailed):
    """The broker blocked the publish (a memory or disk alarm) for longer than the
    client's bound: the request was not accepted; try again once the alarm has cleared.
    ``may_have_gone_out``: the block began mid-publish, so the broker may still take the
    request (the client then cancels it)."""

    code = "broker_blocked"

    def __init__(self, message: str, *, may_have_gone_out: bool = False) -> None:
        super().__init__(message, type="api_error")
        self.may_have_gone_out = may_have_gone_out


class GatewayRefusal(RequestFailed):
    """The HTTP gateway answers a request itself, before or instead of the queue (a bad
    key, body or header): ``status`` is the HTTP status it answers with."""

    code = "invalid_request"


class StreamInterruptedError(BackendError):
    """A stream ended early after chunks were sent (the backend failed or went silent
    mid-stream), or restarted: a worker died mid-stream and the request is being streamed
    again from the start (``restarted``). ``chunks_sent`` and ``content_chars_sent`` say
    how much of the interrupted stream was sent."""

    code = "stream_interrupted"

    def __init__(self, message: str, *, code: str | None = None, type: str | None = None,
                 status: int | None = None, chunks_sent: int = 0,
                 content_chars_sent: int = 0, restarted: bool = False) -> None:
        super().__init__(message, code=code, type=type, status=status)
        self.chunks_sent = chunks_sent
        self.content_chars_sent = content_chars_sent
        self.restarted = restarted


_BY_CODE: dict[str, type[RequestFailed]] = {
    cls.code: cls
    for cls in (
        QueueFullError,
        QuotaExceededError,
        UnknownModelError,
        DeadlineExceededError,
        InvalidRequestError,
        BackendError,
        RequestCancelledError,
        StreamInterruptedError,
        BrokerBlockedError,
    )
}


def error_for_code(code: str) -> type[RequestFailed]:
    """The exception class for an error reply's code (``RequestFailed`` if unknown)."""
    return _BY_CODE.get(code, RequestFailed)
