"""The delivery hooks: one seam around a delivery, where metrics and logging attach.

The dispatcher and the settler call these events and know nothing of who listens::

    received(delivery)                       parsed, before any decision
    call_started(delivery)                   one backend attempt begins
    call_ended(delivery, kind, elapsed_s, error)   it ended: kind is "ok", "throttled",
                                             "retryable", "terminal" or "deadline" (the
                                             call was cut at the request's deadline: the
                                             request ran out of time, not the backend)
    first_chunk(delivery)                    a stream's first chunk message went out
    retrying(delivery, error)                another attempt follows on the same slot
    settled(delivery, outcome, settlement)   the outcome was carried out (or abandoned)
    set_aside(delivery, moved)               admission did not start it: moved into its
                                             tenant's lane, or handed back (no outcome:
                                             it is delivered again later)

``settled`` is called exactly once per delivery. A new concern (OpenTelemetry spans, a
tenant meter) is one more :class:`DeliveryHook` in the list given to the worker, with no
change to the dispatcher. A hook that raises is logged and skipped: observing must never
break a delivery.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import protocol as p
from pipeline.delivery import Delivery
from pipeline.errors import BackendCallError
from pipeline.observe.log import get_logger
from pipeline.outcome import Abandoned, Outcome, RetryLater

__all__ = ["DeliveryHook", "Hooks", "LoggingHook", "Settlement"]

log = get_logger("hutch.hooks")


@dataclass(frozen=True, slots=True)
class Settlement:
    """What settling an outcome did: the request's final label (``ok``, an error code or
    ``undeliverable``; None while it is not final: retried or handed back) and the reason
    it was parked, if it was."""

    label: str | None = None
    parked: p.ParkReason | None = None
    parked_message: str = ""


class DeliveryHook:
    """Base class of a hook: every event is a no-op until overridden."""

    def received(self, delivery: Delivery) -> None:
        """A delivery was parsed."""

    def call_started(self, delivery: Delivery) -> None:
        """A backend attempt starts (``delivery.attempts`` counts it)."""

    def call_ended(self, delivery: Delivery, kind: str, elapsed_s: float,
                   error: BackendCallError | None) -> None:
        """A backend attempt ended (see the module docstring for ``kind``)."""

    def first_chunk(self, delivery: Delivery) -> None:
        """A stream's first chunk message was published (time to first token)."""

    def retrying(self, delivery: Delivery, error: BackendCallError) -> None:
        """Another attempt follows on the slot this delivery holds."""

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        """The delivery's outcome was published and acked, nacked, or abandoned."""

    def set_aside(self, delivery: Delivery, moved: bool) -> None:
        """Not started here: moved into its tenant's lane (``moved``) or handed back."""


class Hooks(DeliveryHook):
    """Several hooks as one, called in order."""

    def __init__(self, *hooks: DeliveryHook) -> None:
        self._hooks = hooks

    def _emit(self, event: str, *args: object) -> None:
        for hook in self._hooks:
            try:
                getattr(hook, event)(*args)
            except Exception:
                log.error("hook.failed", exc_info=True, hook=type(hook).__name__, hook_event=event)

    def received(self, delivery: Delivery) -> None:
        self._emit("received", delivery)

    def call_started(self, delivery: Delivery) -> None:
        self._emit("call_started", delivery)

    def call_ended(self, delivery: Delivery, kind: str, elapsed_s: float,
                   error: BackendCallError | None) -> None:
        self._emit("call_ended", delivery, kind, elapsed_s, error)

    def first_chunk(self, delivery: Delivery) -> None:
        self._emit("first_chunk", delivery)

    def retrying(self, delivery: Delivery, error: BackendCallError) -> None:
        self._emit("retrying", delivery, error)

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        self._emit("settled", delivery, outcome, settlement)

    def set_aside(self, delivery: Delivery, moved: bool) -> None:
        self._emit("set_aside", delivery, moved)


class LoggingHook(DeliveryHook):
    """The structured log lines of a delivery's life (never its body or any secret)."""

    def call_started(self, delivery: Delivery) -> None:
        # The id `hutch cancel` takes (the backend gets it as x-request-id): at debug, as a
        # line per request is too many at info.
        log.debug("request.started", correlation_id=delivery.correlation_id,
                  pool=delivery.pool, backend=delivery.backend, model=delivery.model,
                  attempt=delivery.attempts, priority=delivery.priority)

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        if settlement.parked is not None:
            log.info("request.parked", reason=str(settlement.parked), pool=delivery.pool,
                     correlation_id=delivery.correlation_id,
                     message=settlement.parked_message[:200])
        if isinstance(outcome, RetryLater):
            log.info("request.retry_later", pool=delivery.pool, backend=delivery.backend,
                     correlation_id=delivery.correlation_id, attempts=delivery.attempts,
                     delay_ms=outcome.delay_ms, error=outcome.error[:200])
        elif isinstance(outcome, Abandoned):
            log.warning("request.unacked", pool=delivery.pool, backend=delivery.backend,
                        correlation_id=delivery.correlation_id, error=outcome.error)
