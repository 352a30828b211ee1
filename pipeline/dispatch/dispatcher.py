"""Dispatch: one delivery from a pool's work queue becomes exactly one outcome.

The steps follow the data: parse the delivery once (:class:`~pipeline.delivery.Delivery`),
admit it (validate, deadline, backend available), call the backend -- retrying transient
failures in place, on the slot the delivery already holds, so the backend's cap is never
exceeded -- and hand the outcome to the settler, which publishes with confirms and only then
acks. Every decision is made by :mod:`pipeline.dispatch.decide`; this module runs the steps
and tells the backend's health and the delivery hooks what happened.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from pipeline import protocol as p
from pipeline.backends.http import Backend
from pipeline.delivery import Delivery, ReplyPolicy
from pipeline.dispatch import decide
from pipeline.errors import BackendCallError, ThrottledError
from pipeline.models import ChatRequest
from pipeline.observe.hooks import DeliveryHook
from pipeline.observe.log import get_logger
from pipeline.outcome import Completed, Failed, Failure, Outcome
from pipeline.settings import PoolSettings, Settings
from pipeline.settle.settler import Settler

__all__ = ["BackendHealth", "Dispatcher", "backoff_s"]

log = get_logger("hutch.dispatch")

#: Jittered exponential backoff between in-place attempts (tenacity's strategy).
_BACKOFF = wait_random_exponential(multiplier=0.05, max=2.0)
_RETRYING = AsyncRetrying()


def backoff_s(attempt_number: int) -> float:
    """The pause after in-place attempt ``attempt_number`` (from 1) failed."""
    state = RetryCallState(_RETRYING, None, (), {})
    state.attempt_number = attempt_number
    return float(_BACKOFF(state))


class BackendHealth(Protocol):
    """What dispatch tells the worker about a backend after each call, and asks it."""

    def available(self) -> bool: ...
    def fastest_s(self) -> float: ...
    def success(self, elapsed_s: float) -> None: ...
    def failure(self) -> None: ...
    def throttled(self, retry_after_s: float | None) -> None: ...


class Dispatcher:
    """Handles the deliveries of one pool, on whichever backend's consumer they arrive."""

    def __init__(self, settings: Settings, pool: PoolSettings, settler: Settler,
                 policy: ReplyPolicy, hooks: DeliveryHook) -> None:
        self._settings = settings
        self._pool = pool
        self._settler = settler
        self._policy = policy
        self._hooks = hooks

    async def handle(self, message: AbstractIncomingMessage, backend: Backend,
                     health: BackendHealth) -> None:
        """Process one delivery to its single outcome (reply, retry tier, or requeue)."""
        delivery = Delivery.parse(message, pool=self._pool.name, backend=backend.name,
                                  policy=self._policy, max_attempts=self._pool.max_attempts)
        self._hooks.received(delivery)
        try:
            outcome = await self._run(delivery, backend, health)
            await self._settler.settle(delivery, outcome)
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            # The channel or connection is gone: the broker redelivers this request.
            self._settler.abandoned(delivery, exc)
        except Exception:
            # A bug must neither stall a backend slot nor loop: answer, park, ack.
            log.error("request.internal_error", exc_info=True, pool=self._pool.name,
                      correlation_id=message.correlation_id)
            await self._give_up(delivery)

    async def _give_up(self, delivery: Delivery) -> None:
        failure = Failure(p.ParkReason.INTERNAL_ERROR, p.ErrorCode.INTERNAL_ERROR,
                          "the worker failed while handling this request; it was parked "
                          "for inspection")
        try:
            await self._settler.settle(delivery, Failed(failure))
        except Exception as exc:
            # Last resort: the broker dead-letters it to triage, which answers and parks.
            log.error("request.reject", exc_info=True, correlation_id=delivery.correlation_id)
            try:
                await delivery.message.reject(requeue=False)
            except Exception:
                pass
            self._settler.abandoned(delivery, exc)

    async def _run(self, delivery: Delivery, backend: Backend,
                   health: BackendHealth) -> Outcome:
        admitted = decide.admit(delivery, self._pool,
                                max_body_bytes=self._settings.max_body_bytes,
                                available=health.available())
        if not isinstance(admitted, ChatRequest):
            return admitted
        delivery.request = admitted
        return await self._call(delivery, backend, health)

    async def _call(self, delivery: Delivery, backend: Backend,
                    health: BackendHealth) -> Outcome:
        """Attempts on the slot this delivery holds, until one decides the outcome."""
        number = 0
        while True:
            number += 1
            blocked = decide.before_attempt(delivery, number, available=health.available(),
                                            fastest_s=health.fastest_s())
            if blocked is not None:
                return blocked
            delivery.attempts += 1
            self._hooks.call_started(delivery)
            started = time.monotonic()
            try:
                result = await backend.chat(delivery.message.body,
                                            timeout_s=delivery.remaining_s(),
                                            request_id=delivery.correlation_id)
            except BackendCallError as error:
                step = self._failed(delivery, error, number, health,
                                    time.monotonic() - started)
                if not isinstance(step, decide.TryAgain):
                    return step
                self._hooks.retrying(delivery, error)
                await asyncio.sleep(step.sleep_s)
                continue
            health.success(result.elapsed_s)
            self._hooks.call_ended(delivery, "ok", result.elapsed_s, None)
            return Completed(result.body, result.completion.usage, result.elapsed_s)

    def _failed(self, delivery: Delivery, error: BackendCallError, number: int,
                health: BackendHealth, elapsed_s: float) -> decide.TryAgain | Outcome:
        """Report a failed attempt to the backend's health and the hooks; decide the next."""
        kind = decide.attempt_kind(delivery, error)
        if isinstance(error, ThrottledError):
            health.throttled(error.retry_after_s)
            delivery.attempts -= 1  # a 429 is not an attempt: the request was not served
        elif kind == "retryable":
            health.failure()
        self._hooks.call_ended(delivery, kind, elapsed_s, error)
        return decide.after_failure(delivery, error, kind, number, self._pool,
                                    backoff_s(number))
