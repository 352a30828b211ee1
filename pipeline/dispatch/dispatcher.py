"""Dispatch: one delivery from a pool's work queue becomes exactly one reply.

The steps follow the data: validate the request, check its deadline, call the backend
(retrying transient failures in-process, on the slot the delivery already holds, so the
backend's cap is never exceeded), publish the reply with confirms, and only then ack.
Whatever goes wrong with the request itself ends in an error reply plus a parked copy; a
lost connection leaves the delivery unacked, so the broker hands it to another worker.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from pipeline import protocol as p
from pipeline.backends.http import Backend, BackendResult
from pipeline.errors import BackendCallError, RetryableError, ThrottledError
from pipeline.models import ChatRequest
from pipeline.observe.log import get_logger
from pipeline.observe.metrics import Metrics, retry_reason
from pipeline.settings import PoolSettings, Settings
from pipeline.settle.publisher import Failure, Publisher, ReplyInfo

__all__ = ["BackendHealth", "Dispatcher", "validate_request"]

log = get_logger("hutch.dispatch")

_JSON_TYPES = ("application/json",)


def _content_type_ok(content_type: str | None) -> bool:
    if not content_type:
        return True  # many AMQP clients leave it unset; the body decides
    return content_type.split(";")[0].strip().lower() in _JSON_TYPES


def validate_request(body: bytes, *, content_type: str | None, reply_to_ok: bool,
                     correlation_id: str | None, pool: PoolSettings,
                     max_body_bytes: int) -> ChatRequest | Failure:
    """Check a request before it may take a backend's time; pure, so unit-tested alone."""
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
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in ("json_invalid", "json_type"):
            return Failure(p.ParkReason.INVALID_JSON, bad,
                           f"the request body is not valid JSON: {first['msg']}")
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return Failure(p.ParkReason.INVALID_REQUEST, bad,
                       f"not a valid chat completions request: {where}: {first['msg']}")
    if request.model not in pool.models:
        return Failure(p.ParkReason.INVALID_REQUEST, bad,
                       f"model {request.model!r} in the body is not served by pool "
                       f"{pool.name!r} (it serves {', '.join(pool.models)})")
    if request.stream:
        return Failure(p.ParkReason.INVALID_REQUEST, bad,
                       "streaming (\"stream\": true) is not supported yet; send the request "
                       "without it")
    return request


@dataclass
class _Deadline:
    """A request's absolute deadline in epoch seconds (None: only the backend timeout)."""

    at: float | None

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.time()

    def passed(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0


def _wait(retry_state: RetryCallState) -> float:
    """Jittered exponential backoff, but never shorter than a 429's Retry-After."""
    jitter = wait_random_exponential(multiplier=0.05, max=2.0)(retry_state)
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome is not None else None
    if isinstance(exc, ThrottledError) and exc.retry_after_s is not None:
        return max(jitter, exc.retry_after_s)
    return jitter


class BackendHealth(Protocol):
    """What dispatch tells the worker about a backend after each call, and asks it."""

    def available(self) -> bool: ...
    def fastest_s(self) -> float: ...
    def success(self, elapsed_s: float) -> None: ...
    def failure(self) -> None: ...
    def throttled(self, retry_after_s: float | None) -> None: ...


@dataclass(frozen=True)
class _Retry:
    """Go through the retry tier with this delay (the slot is freed meanwhile)."""

    delay_ms: int
    error: str
    reason: str


@dataclass(frozen=True)
class _Requeue:
    """Hand the delivery back to the queue: this backend cannot take it now."""


def _count(headers: Mapping[str, Any], name: str, high: int) -> int:
    """A counter header set by an earlier delivery (attempts, retries). A client can set
    it too, so anything outside 0..high counts as 0 or high: never unlimited retries."""
    value = p.int_header(headers, name, low=-(2**63), high=2**63 - 1)
    return 0 if value is None else max(0, min(value, high))


class _StopAtDeadline(stop_base):
    """Stop retrying when the next backoff would end past the request's deadline."""

    def __init__(self, deadline: _Deadline) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        remaining = self._deadline.remaining()
        return remaining is not None and remaining <= retry_state.upcoming_sleep


class Dispatcher:
    """Handles the deliveries of one pool, on whichever backend's consumer they arrive."""

    def __init__(self, settings: Settings, pool: PoolSettings, publisher: Publisher,
                 metrics: Metrics) -> None:
        self._settings = settings
        self._pool = pool
        self._publisher = publisher
        self._metrics = metrics

    async def handle(self, message: AbstractIncomingMessage, backend: Backend,
                     health: BackendHealth) -> None:
        """Process one delivery to its single outcome (reply, retry tier, or requeue)."""
        info = ReplyInfo(pool=self._pool.name, backend=backend.name)
        timestamp = message.timestamp.timestamp() if message.timestamp else None
        headers = message.headers or {}
        sent_at = p.sent_at_ms(headers, timestamp)
        if sent_at is not None:
            info.queue_wait_ms = max(0, p.now_ms() - sent_at)
            self._metrics.queue_waited(self._pool.name, message.priority,
                                       info.queue_wait_ms / 1000)
        in_flight = self._metrics.child(self._metrics.in_flight, backend.name)
        in_flight.inc()
        try:
            await self._process(message, backend, health, info, headers, timestamp)
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            # The channel or connection is gone: the broker redelivers this request.
            log.warning("request.unacked", pool=self._pool.name, backend=backend.name,
                        correlation_id=message.correlation_id, error=repr(exc))
        except Exception:
            # A bug must neither stall a backend slot nor loop: answer, park, ack.
            log.error("request.internal_error", exc_info=True, pool=self._pool.name,
                      correlation_id=message.correlation_id)
            await self._give_up(message, info)
        finally:
            in_flight.dec()

    async def _give_up(self, message: AbstractIncomingMessage, info: ReplyInfo) -> None:
        failure = Failure(p.ParkReason.INTERNAL_ERROR, p.ErrorCode.INTERNAL_ERROR,
                          "the worker failed while handling this request; it was parked "
                          "for inspection")
        try:
            await self._publisher.fail(message, failure, info)
            await message.ack()
        except Exception:
            # Last resort: the broker dead-letters it to triage, which answers and parks.
            log.error("request.reject", exc_info=True, correlation_id=message.correlation_id)
            try:
                await message.reject(requeue=False)
            except Exception:
                pass

    async def _process(self, message: AbstractIncomingMessage, backend: Backend,
                       health: BackendHealth, info: ReplyInfo, headers: Mapping[str, Any],
                       timestamp: float | None) -> None:
        refusal = self._publisher.refusal(message)
        if refusal is not None:
            # reply_to is not the publisher's own reply queue: park it, answer nobody.
            await self._publisher.fail(message, refusal, info)
            await message.ack()
            return
        checked = validate_request(
            message.body,
            content_type=message.content_type,
            reply_to_ok=self._publisher.valid_reply_to(message.reply_to),
            correlation_id=message.correlation_id,
            pool=self._pool,
            max_body_bytes=self._settings.max_body_bytes,
        )
        if isinstance(checked, Failure):
            await self._publisher.fail(message, checked, info)
            await message.ack()
            return
        expiration = message.expiration
        expiration_s = float(expiration) if isinstance(expiration, int | float) else None
        deadline_ms = p.deadline_ms(headers, expiration_s, timestamp)
        deadline = _Deadline(deadline_ms / 1000 if deadline_ms is not None else None)
        if deadline.passed():
            await self._publisher.fail(message, self._deadline_failure(), info)
            await message.ack()
            return
        if not health.available():
            # Throttled or circuit open, and the consumer is being cancelled: hand the
            # request back so another backend (or this one, later) takes it.
            await message.nack(requeue=True)
            return
        prior = _count(headers, p.H_ATTEMPTS, self._pool.max_attempts)
        outcome = await self._call(message, backend, health, info, deadline, prior)
        if isinstance(outcome, _Requeue):
            await message.nack(requeue=True)
            return
        if isinstance(outcome, _Retry):
            await self._retry_later(message, info, outcome, headers, deadline_ms)
            await message.ack()
            return
        if isinstance(outcome, Failure):
            await self._publisher.fail(message, outcome, info)
            await message.ack()
            return
        info.backend_ms = int(outcome.elapsed_s * 1000)
        self._metrics.tokens(self._pool.name, checked.model, outcome.completion.usage)
        if await self._publisher.reply_ok(message, outcome.body, info):
            self._metrics.finished(self._pool.name, message, "ok")
        else:
            failure = Failure(p.ParkReason.NO_REPLY_TO, p.ErrorCode.BACKEND_ERROR,
                              f"the completion could not be delivered: reply queue "
                              f"{message.reply_to!r} does not exist")
            self._metrics.finished(self._pool.name, message, "undeliverable")
            await self._publisher.park(message, failure, info)
        await message.ack()

    async def _retry_later(self, message: AbstractIncomingMessage, info: ReplyInfo,
                           retry: _Retry, headers: Mapping[str, Any],
                           deadline_ms: int | None) -> None:
        """Send the request through a delayed retry tier, freeing this backend slot."""
        new_headers = dict(headers)
        new_headers[p.H_ATTEMPTS] = info.attempts
        new_headers[p.H_RETRIES] = _count(headers, p.H_RETRIES, 1000) + 1
        if deadline_ms is not None:
            new_headers[p.H_DEADLINE] = deadline_ms  # survives the trip; expiration does not
        await self._publisher.retry(message, new_headers, retry.delay_ms)
        self._metrics.retried_tier(self._pool.name, retry.delay_ms, retry.reason)
        log.info("request.retry_later", pool=self._pool.name, backend=info.backend,
                 correlation_id=message.correlation_id, attempts=info.attempts,
                 delay_ms=retry.delay_ms, error=retry.error[:200])

    def _deadline_failure(self, detail: str = "") -> Failure:
        return Failure(p.ParkReason.DEADLINE_EXCEEDED, p.ErrorCode.DEADLINE_EXCEEDED,
                       f"the request's deadline passed before a backend of pool "
                       f"{self._pool.name!r} could answer it{detail}")

    def _retry_delay(self, headers_retries: int) -> int | None:
        delays = self._pool.retry_delays_ms
        if not delays:
            return None
        return delays[min(headers_retries, len(delays) - 1)]

    async def _attempt(self, number: int, message: AbstractIncomingMessage, backend: Backend,
                       health: BackendHealth, info: ReplyInfo, deadline: _Deadline,
                       prior: int) -> BackendResult | Failure | _Requeue:
        """One backend attempt (``number`` counts from 1 in this delivery)."""
        info.attempts = prior + number
        if number > 1 and not health.available():
            # The circuit opened meanwhile: free the slot, let others serve.
            info.attempts -= 1
            return _Requeue()
        remaining = deadline.remaining()
        if remaining is not None and remaining <= 0:
            return self._deadline_failure()
        fastest = health.fastest_s()
        if remaining is not None and remaining < fastest:
            return self._deadline_failure(
                f"; {remaining * 1000:.0f} ms were left, less than the {fastest * 1000:.0f} "
                "ms of the backend's fastest recent answer")
        try:
            result = await backend.chat(message.body, timeout_s=remaining,
                                        request_id=message.correlation_id)
        except ThrottledError as exc:
            self._metrics.backend_errors.labels(backend.name, "throttled").inc()
            health.throttled(exc.retry_after_s)
            raise
        except RetryableError:
            if remaining is not None and deadline.passed():
                # The call was cut to the request's deadline: the request ran
                # out of time, the backend did not fail. Counting it would let
                # an overload open the circuit of a healthy backend.
                return self._deadline_failure()
            self._metrics.backend_errors.labels(backend.name, "retryable").inc()
            health.failure()
            raise
        except BackendCallError:
            self._metrics.backend_errors.labels(backend.name, "terminal").inc()
            raise
        health.success(result.elapsed_s)
        self._metrics.child(self._metrics.backend_latency, backend.name).observe(
            result.elapsed_s)
        return result

    async def _call(self, message: AbstractIncomingMessage, backend: Backend,
                    health: BackendHealth, info: ReplyInfo, deadline: _Deadline,
                    prior: int) -> BackendResult | Failure | _Retry | _Requeue:
        """Call the backend: a few attempts here, on the slot this delivery holds; then
        a delayed retry tier, while attempts and the deadline allow; else a failure."""
        budget = max(1, min(self._pool.attempts_per_delivery, self._pool.max_attempts - prior))
        try:
            # The first attempt runs without tenacity (most calls need no other): if it
            # fails in a way tenacity would retry, tenacity takes over from its outcome,
            # so the retry decisions, waits and hooks are exactly the ones it would make.
            try:
                return await self._attempt(1, message, backend, health, info, deadline,
                                           prior)
            except RetryableError as exc:
                if isinstance(exc, ThrottledError) or budget <= 1:
                    raise  # what tenacity does: not retried here, or out of attempts
                first_failure = exc
            retrying = AsyncRetrying(
                stop=stop_any(stop_after_attempt(budget), _StopAtDeadline(deadline)),
                wait=_wait,
                # A 429 is not retried here: the backend asked for time, another may answer.
                before_sleep=self._metrics.before_sleep(self._pool.name),
                retry=retry_if_exception_type(RetryableError)
                & retry_if_not_exception_type(ThrottledError),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    if number == 1:
                        raise first_failure  # the attempt above, as tenacity's first
                    return await self._attempt(number, message, backend, health, info,
                                               deadline, prior)
        except ThrottledError:
            info.attempts -= 1  # a 429 is not an attempt: the request was not served
            return _Requeue()
        except BackendCallError as exc:
            if deadline.passed():
                return self._deadline_failure()
            plural = "s" if info.attempts != 1 else ""
            if isinstance(exc, RetryableError) and info.attempts < self._pool.max_attempts:
                delay = self._retry_delay(_count(message.headers or {}, p.H_RETRIES, 1000))
                remaining = deadline.remaining()
                if delay is not None and (remaining is None or remaining * 1000 > delay):
                    return _Retry(delay, exc.message, retry_reason(exc))
            extra = {"status": exc.status} if exc.status is not None else {}
            return Failure(p.ParkReason.BACKEND_ERROR, p.ErrorCode.BACKEND_ERROR,
                           f"{exc.message} (after {info.attempts} attempt{plural})", extra)
        raise AssertionError("unreachable: tenacity either returns or raises")
