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
import json
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from pipeline import protocol as p
from pipeline.backends.http import Backend
from pipeline.broker.names import Names
from pipeline.delivery import Delivery, ReplyPolicy
from pipeline.dispatch import decide
from pipeline.dispatch.cancels import CancelRegistry
from pipeline.dispatch.streaming import stream_attempt
from pipeline.errors import BackendCallError, ThrottledError
from pipeline.models import ChatRequest, CompletionRequest, EmbeddingsRequest
from pipeline.observe.hooks import DeliveryHook
from pipeline.observe.log import get_logger
from pipeline.outcome import Cancelled, Completed, Failed, Failure, Outcome
from pipeline.protocol import Endpoint
from pipeline.scheduling.lanes import LaneMap
from pipeline.scheduling.policy import PoolScheduler
from pipeline.settings import BackendSettings, PoolSettings, Settings
from pipeline.settle.settler import Settler
from pipeline.settle.stream import ReplyQueueGone

__all__ = ["BackendHealth", "Dispatcher", "backend_body", "backoff_s"]

log = get_logger("hutch.dispatch")

#: The channel or connection is gone (a closed channel raises a RuntimeError in aiormq):
#: the broker redelivers what was unacked on it.
_CHANNEL_GONE = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError,
                 ConnectionError)

#: Jittered exponential backoff between in-place attempts (tenacity's strategy).
_BACKOFF = wait_random_exponential(multiplier=0.05, max=2.0)
_RETRYING = AsyncRetrying()


def backoff_s(attempt_number: int) -> float:
    """The pause after in-place attempt ``attempt_number`` (from 1) failed."""
    state = RetryCallState(_RETRYING, None, (), {})
    state.attempt_number = attempt_number
    return float(_BACKOFF(state))


def backend_body(delivery: Delivery, backend: BackendSettings, max_priority: int) -> bytes:
    """The request body as the backend gets it: as the client wrote it, unless the backend
    schedules by priority (``send_priority``): then with vLLM's ``priority`` field, lower
    served earlier, the opposite of AMQP (a client's own ``priority`` is kept)."""
    body = delivery.message.body
    if not backend.send_priority:
        return body
    request = json.loads(body)
    if isinstance(request, dict) and "priority" not in request:
        request["priority"] = max_priority - min(delivery.priority, max_priority)
        return json.dumps(request, separators=(",", ":")).encode()
    return body


class BackendHealth(Protocol):
    """What dispatch tells the worker about a backend after each call, and asks it."""

    def available(self) -> bool: ...
    def fastest_s(self) -> float: ...
    def success(self, elapsed_s: float, tokens: int | None = None) -> None: ...
    def failure(self, refused: bool = False) -> None: ...
    def throttled(self, retry_after_s: float | None, model: str | None = None) -> None: ...
    def model_wait_s(self, model: str | None) -> float: ...


class Dispatcher:
    """Handles the deliveries of one pool, on whichever backend's consumer they arrive."""

    def __init__(self, settings: Settings, pool: PoolSettings, settler: Settler,
                 policy: ReplyPolicy, hooks: DeliveryHook, cancels: CancelRegistry,
                 scheduler: PoolScheduler) -> None:
        self._settings = settings
        self._pool = pool
        self._settler = settler
        self._policy = policy
        self._hooks = hooks
        self._cancels = cancels
        self.scheduler = scheduler
        names = Names(settings.prefix)
        self.lanes = LaneMap(names, pool.name, pool.scheduling)
        self._reply_queue_hint = names.reply_queue("<client-id>")

    def parse(self, message: AbstractIncomingMessage, backend: str) -> Delivery:
        """The delivery's context, read once, with its tenant and band (for admission)."""
        delivery = Delivery.parse(message, pool=self._pool.name, backend=backend,
                                  policy=self._policy, max_attempts=self._pool.max_attempts,
                                  lane_prefix=self.lanes.prefix)
        self.scheduler.classify(delivery)
        return delivery

    async def set_aside(self, delivery: Delivery, move: bool) -> bool:
        """A request admission did not start: into its tenant's lane (``move``), or back
        to the broker for any backend of the pool. Neither is an outcome: it is served
        later, by whichever backend takes it then. True if it went into its lane."""
        moved = False
        try:
            moved = move and await self._settler.to_lane(delivery,
                                                         self.lanes.lane_for(delivery))
            if not moved:
                await delivery.message.nack(requeue=True)
        except _CHANNEL_GONE:
            pass  # the channel is gone: the broker redelivers it
        self._hooks.set_aside(delivery, moved)
        return moved

    async def queue_status(self, delivery: Delivery, body: bytes) -> bool:
        """Send a queued request's status message (see the settler's); False if it did
        not go out (the reply queue is gone, or the channel)."""
        try:
            return await self._settler.queue_status(delivery, body)
        except _CHANNEL_GONE:
            return False

    async def handle(self, delivery: Delivery, backend: Backend,
                     health: BackendHealth) -> None:
        """Process one admitted delivery to its single outcome (reply, retry tier, or
        requeue)."""
        message = delivery.message
        if delivery.sent_at_ms is not None:  # it may have waited for a permit here too
            delivery.queue_wait_ms = max(0, p.now_ms() - delivery.sent_at_ms)
        self._hooks.received(delivery)
        try:
            outcome = await self._run(delivery, backend, health)
            await self._settler.settle(delivery, outcome)
        except _CHANNEL_GONE as exc:
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
                                available=health.available(),
                                cancelled=self._cancels.is_cancelled(delivery),
                                model_wait_s=health.model_wait_s(delivery.model),
                                reply_queue=self._reply_queue_hint)
        if not isinstance(admitted, ChatRequest | CompletionRequest | EmbeddingsRequest):
            return admitted
        if self.scheduler.rejects(delivery):
            return decide.quota_exceeded(delivery)
        delivery.request = admitted
        body = backend_body(delivery, backend.settings, self._settings.max_priority)
        try:
            async with self._cancels.at_backend(delivery):
                if isinstance(admitted, ChatRequest) and admitted.stream:
                    return await self._stream(delivery, backend, health, body)
                return await self._call(delivery, health,
                                        lambda: self._chat(delivery, backend, body))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not delivery.cancel_requested or task is None:
                raise  # the worker is stopping or lost its connection
            if task.uncancel() > 0:
                raise  # the worker aborts it too (stopping): its cancellation wins
            return Cancelled("in_flight")
        except ReplyQueueGone:
            return Cancelled("client_gone")

    async def _stream(self, delivery: Delivery, backend: Backend, health: BackendHealth,
                      body: bytes) -> Outcome:
        sink = self._settler.stream_sink(delivery)
        try:
            return await self._call(delivery, health, lambda: stream_attempt(
                delivery, backend, body, sink,
                idle_timeout_s=self._settings.stream_idle_timeout_s, hooks=self._hooks))
        finally:
            await sink.close()

    @staticmethod
    async def _chat(delivery: Delivery, backend: Backend, body: bytes) -> Completed:
        result = await backend.call(delivery.endpoint or Endpoint.CHAT, body,
                                    timeout_s=delivery.remaining_s(),
                                    request_id=delivery.correlation_id)
        return Completed(result.body, result.usage, result.elapsed_s)

    async def _call(self, delivery: Delivery, health: BackendHealth,
                    attempt: Callable[[], Awaitable[Completed]]) -> Outcome:
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
                completed = await attempt()
            except BackendCallError as error:
                step = self._failed(delivery, error, number, health,
                                    time.monotonic() - started)
                if not isinstance(step, decide.TryAgain):
                    return step
                self._hooks.retrying(delivery, error)
                await asyncio.sleep(step.sleep_s)
                continue
            usage = completed.usage
            health.success(completed.elapsed_s, usage.completion_tokens if usage else None)
            self._hooks.call_ended(delivery, "ok", completed.elapsed_s, None)
            return completed

    def _failed(self, delivery: Delivery, error: BackendCallError, number: int,
                health: BackendHealth, elapsed_s: float) -> decide.TryAgain | Outcome:
        """Report a failed attempt to the backend's health and the hooks; decide the next."""
        kind = decide.attempt_kind(delivery, error)
        delivery.last_backend, delivery.last_error = delivery.backend, error.message[:500]
        if isinstance(error, ThrottledError):
            health.throttled(error.retry_after_s, delivery.model)
            delivery.attempts -= 1  # a 429 is not an attempt: the request was not served
        elif kind == "retryable" and decide.counts_against_backend(delivery):
            health.failure(refused=error.status == 503)
        self._hooks.call_ended(delivery, kind, elapsed_s, error)
        return decide.after_failure(delivery, error, kind, number, self._pool,
                                    backoff_s(number), health.model_wait_s(delivery.model))
