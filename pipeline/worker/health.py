"""A backend's health as this worker sees it: what dispatch reports, what the prefetch reads.

Dispatch reports each call's outcome here (the
:class:`~pipeline.dispatch.dispatcher.BackendHealth` protocol) and asks whether the backend
may take a request at all. The prefetch controller (:mod:`pipeline.worker.capacity`) asks
how many requests it may hold: the gate's answer (the backend's limit while healthy -- its
``max_concurrency``, or an adaptive limit (:mod:`pipeline.capacity.limit`) that each call's
outcome moves --, 1 for a circuit probe, 0 while open or throttled), or 0 while the
operator paused the pool. Every kind of change wakes the controller through
:attr:`BackendHealthReporter.changed`, so it never polls. The state gauge is read from
the gate when it is scraped: a cooldown that ends with no request in sight shows
half-open at once, not open until the next call. No I/O here: it is tested with a fake
clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from pipeline.backends.breaker import BackendGate, LatencyFloor
from pipeline.capacity.limit import ConcurrencyLimit, FixedLimit, Saturation
from pipeline.observe.log import get_logger

__all__ = ["BackendHealthReporter", "Level"]

log = get_logger("hutch.worker")


class Level(Protocol):
    """A gauge with its labels applied (prometheus-client's, or a test's fake)."""

    def set(self, value: float) -> None: ...


class BackendHealthReporter:
    """One backend's gate, limit, latency floor and pause flag; signals every change."""

    def __init__(self, backend: str, max_concurrency: int, gate: BackendGate,
                 state_gauge: Level, *, per_model_throttle: bool = False,
                 limit: ConcurrencyLimit | None = None,
                 in_flight: Callable[[], int] = lambda: 0) -> None:
        self.backend = backend
        #: ``max_concurrency`` (fixed), or an adaptive limit below it.
        self.limit: ConcurrencyLimit = limit if limit is not None else FixedLimit(
            max_concurrency)
        #: Calls running on the backend now (the pool admission's permits in use).
        self._in_flight = in_flight
        self.gate = gate
        #: ``throttle_scope = "model"``: a 429 pauses only its model, each with a gate of
        #: its own (the same backoff and decay), and the consumer keeps running.
        self._per_model = per_model_throttle
        self._model_gates: dict[str, BackendGate] = {}
        self.latency_floor = LatencyFloor()
        #: Set on a gate state change or a pause/resume: the prefetch may have to change.
        self.changed = asyncio.Event()
        self._paused = False
        self._state_gauge = state_gauge
        self._state_gauge.set(gate.state_code)
        live = getattr(state_gauge, "set_function", None)
        if callable(live):  # prometheus-client's gauge: read the gate when scraped, so an
            live(lambda: float(gate.state_code))  # idle pool's cooldown ends as half-open

    # -- BackendHealth (what dispatch reports and asks) ---------------------------------

    def available(self) -> bool:
        return self.allowed() > 0

    def fastest_s(self) -> float:
        return self.latency_floor.seconds()

    def success(self, elapsed_s: float, tokens: int | None = None) -> None:
        self.latency_floor.observe(elapsed_s)
        if self.limit.completed(elapsed_s, tokens, self._in_flight()):
            self.changed.set()
        self._report(self.gate.success)

    def failure(self, refused: bool = False) -> None:
        """A retryable failure; ``refused``: the backend said it is full (a 503)."""
        if refused and self.limit.refused(self._in_flight()):
            self.changed.set()
        self._report(self.gate.failure)

    def saturation(self, snapshot: Saturation | None) -> None:
        """The backend's metrics, just scraped (None: unknown)."""
        if self.limit.saturation(snapshot, self._in_flight()):
            self.changed.set()

    def throttled(self, retry_after_s: float | None, model: str | None = None) -> None:
        if self.limit.refused(self._in_flight()):
            self.changed.set()
        if self._per_model and model is not None:
            gate = self._model_gates.get(model)
            if gate is None:
                gate = self._model_gates[model] = self.gate.sibling()
            gate.throttled(retry_after_s)
            log.warning("backend.model_throttled", backend=self.backend, model=model,
                        available_in_s=round(gate.available_in(), 3))
            return
        self._report(lambda: self.gate.throttled(retry_after_s))

    def model_wait_s(self, model: str | None) -> float:
        """Seconds until ``model`` may be sent here again (0: now; always 0 unless 429s
        are scoped per model)."""
        gate = self._model_gates.get(model) if model is not None else None
        return gate.available_in() if gate is not None else 0.0

    # -- commands (the worker follows the pool's pause flag) ---------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> bool:
        """The pool is paused: take nothing. True if this changed anything."""
        return self._set_paused(True)

    def resume(self) -> bool:
        """The pool is resumed: the gate decides again. True if this changed anything."""
        return self._set_paused(False)

    # -- what the prefetch controller reads --------------------------------------------

    @property
    def adaptive(self) -> bool:
        """The limit moves by itself (resize the consumer lazily)."""
        return self.limit.state != "fixed"

    @property
    def max_concurrency(self) -> int:
        """The configured cap: the ceiling of any limit."""
        return self.limit.ceiling

    @max_concurrency.setter
    def max_concurrency(self, cap: int) -> None:
        """A new cap, in place (a reload, a stricter cap claimed by another worker)."""
        if cap != self.limit.ceiling:
            self.limit.set_ceiling(cap)
            self.changed.set()

    def allowed(self) -> int:
        """The permits the backend may have now: 0 while paused, else the gate's (the
        current limit while healthy)."""
        return 0 if self._paused else self.gate.capacity(self.limit.current)

    def reopens_in(self) -> float | None:
        """Seconds until the gate lets requests through again by the clock alone (an open
        circuit's cooldown or a throttle ending); None when no timer is due (serving, or
        paused: only a resume changes that)."""
        if self._paused or self.allowed() > 0:
            return None
        return self.gate.available_in()

    def describe(self) -> str:
        state = str(self.gate.state)
        return state if self.limit.state == "fixed" else f"{state}, limit {self.limit.state}"

    def _set_paused(self, paused: bool) -> bool:
        if self._paused == paused:
            return False
        self._paused = paused
        self.changed.set()
        return True

    def _report(self, update: Callable[[], None]) -> None:
        before = self.gate.state
        update()
        after = self.gate.state
        self._state_gauge.set(self.gate.state_code)
        if after != before:
            log.warning("backend.state", backend=self.backend, before=str(before),
                        after=str(after), available_in_s=round(self.gate.available_in(), 3))
            self.changed.set()
