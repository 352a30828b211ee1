"""Availability gate per backend: a circuit breaker plus 429 throttling, no I/O.

The worker reports each backend call's outcome here and then asks :meth:`BackendGate.capacity`
for the consumer's prefetch: ``max_concurrency`` when healthy, 1 for a half-open probe, 0
(cancel the consumer) while the backend is open or throttled, for
:meth:`BackendGate.available_in` seconds. Keeping it pure (an injected clock, no tasks)
makes every transition testable without sleeping.

Two independent signals, because they mean different things:

* **Failures** (connection errors, timeouts, 5xx) say the backend is unhealthy. After
  ``failure_threshold`` in a row the circuit opens for ``cooldown_s``, then goes half-open:
  one probe decides. A failed probe re-opens it with the cooldown doubled (capped).
* **Throttles** (429) say the backend is healthy but busy. They pause it until the
  ``Retry-After`` time (or a doubling backoff, whose streak decays by one doubling per
  ``throttle_decay_s`` of quiet) and never count as failures.

Terminal 4xx errors are about the request, not the backend: the worker reports nothing.

Stragglers (calls that started before the gate closed) finish afterwards. They must not
undo the decision: while open, ``success()`` is ignored and ``failure()`` does not extend
the cooldown; while throttled, a further 429 does not double the backoff and a success does
not lift the throttle. A straggler that outlives the whole cooldown is indistinguishable
from the probe, so backend timeouts should stay below ``cooldown_s``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["BackendGate", "BreakerPolicy", "LatencyFloor", "State"]


@dataclass(frozen=True)
class BreakerPolicy:
    """Thresholds and delays; validated up front so a typo cannot disable the breaker."""

    failure_threshold: int = 5
    cooldown_s: float = 10.0
    max_cooldown_s: float = 300.0
    throttle_backoff_s: float = 1.0
    #: Each this long without a 429 forgets one doubling of the throttle backoff, so a
    #: 429 an hour after a burst starts from ``throttle_backoff_s`` again.
    throttle_decay_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.failure_threshold, bool) or not isinstance(
                self.failure_threshold, int) or self.failure_threshold < 1:
            raise ValueError(
                f"failure_threshold must be an int >= 1, got {self.failure_threshold!r}")
        for name in ("cooldown_s", "max_cooldown_s", "throttle_backoff_s", "throttle_decay_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.max_cooldown_s < max(self.cooldown_s, self.throttle_backoff_s):
            raise ValueError(
                "max_cooldown_s must be >= cooldown_s and throttle_backoff_s, "
                f"got {self.max_cooldown_s!r}")


class State(StrEnum):
    """What the gate lets through: all, one probe, or nothing."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    THROTTLED = "throttled"


_STATE_CODE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2, State.THROTTLED: 3}


class BackendGate:
    """The breaker and throttle state of one backend, read against ``clock``."""

    def __init__(self, policy: BreakerPolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.consecutive_failures: int = 0
        # Breaker: open until _open_until (then half-open); None when closed.
        self._open_until: float | None = None
        self._cooldown_s = policy.cooldown_s  # the next (or current) opening's cooldown
        # Throttle: unavailable until _throttled_until; the streak drives the backoff.
        self._throttled_until = -math.inf
        self._throttle_streak = 0

    def sibling(self) -> BackendGate:
        """A new gate with this one's policy and clock (one model's throttle, say)."""
        return BackendGate(self.policy, self._clock)

    # -- outcomes ---------------------------------------------------------------------

    def success(self) -> None:
        """A call succeeded: close a half-open circuit, reset the failure count."""
        now = self._clock()
        if self._is_open(now):
            return  # a straggler from before the circuit opened
        if now >= self._throttled_until:
            self._throttle_streak = 0
        self.consecutive_failures = 0
        self._open_until = None
        self._cooldown_s = self.policy.cooldown_s

    def failure(self) -> None:
        """A retryable call failed: count it; open (or re-open) the circuit if due."""
        now = self._clock()
        if self._is_open(now):
            return  # a straggler: the cooldown already runs
        self.consecutive_failures += 1
        if self._open_until is not None:  # half-open: the probe failed
            self._cooldown_s = min(self._cooldown_s * 2, self.policy.max_cooldown_s)
            self._open_until = now + self._cooldown_s
        elif self.consecutive_failures >= self.policy.failure_threshold:
            self._open_until = now + self._cooldown_s

    def throttled(self, retry_after_s: float | None = None) -> None:
        """A 429: pause until ``Retry-After``, else for a backoff doubling per episode.

        Not a failure: the backend answered. A 429 arriving while already throttled comes
        from the same burst, so it can lengthen the pause but not double the backoff.
        """
        now = self._clock()
        if retry_after_s is not None and not (
                math.isfinite(retry_after_s) and retry_after_s >= 0):
            retry_after_s = None
        if now >= self._throttled_until:
            quiet_s = now - self._throttled_until
            forgotten = int(quiet_s // self.policy.throttle_decay_s) if math.isfinite(
                quiet_s) else self._throttle_streak
            self._throttle_streak = max(0, self._throttle_streak - forgotten) + 1
        if retry_after_s is None:
            retry_after_s = min(
                self.policy.throttle_backoff_s * 2 ** (self._throttle_streak - 1),
                self.policy.max_cooldown_s)
        self._throttled_until = max(self._throttled_until, now + retry_after_s)

    # -- queries ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The state now: an elapsed cooldown reads HALF_OPEN, an elapsed throttle CLOSED."""
        now = self._clock()
        if self._is_open(now):
            return State.OPEN
        if now < self._throttled_until:
            return State.THROTTLED
        return State.CLOSED if self._open_until is None else State.HALF_OPEN

    @property
    def state_code(self) -> int:
        """The state as a number for a Prometheus gauge (0 closed .. 3 throttled)."""
        return _STATE_CODE[self.state]

    def available_in(self) -> float:
        """Seconds until the backend may take requests again (0 if it may now)."""
        now = self._clock()
        until = max(self._throttled_until, self._open_until or -math.inf)
        return max(0.0, until - now)

    def capacity(self, max_concurrency: int) -> int:
        """The consumer's prefetch: all slots, one probe, or 0 (no consumer)."""
        state = self.state
        if state is State.CLOSED:
            return max_concurrency
        return 1 if state is State.HALF_OPEN else 0

    def _is_open(self, now: float) -> bool:
        return self._open_until is not None and now < self._open_until


class LatencyFloor:
    """The fastest of a backend's last ``window`` successful calls.

    Under overload the oldest requests reach the head of the queue with little time left.
    Calling the backend for one that cannot finish wastes a slot for nothing (the call is
    cut at the deadline) while fresher requests expire behind it: goodput collapses. A
    request whose remaining time is below even the fastest recent call is answered
    ``deadline_exceeded`` at once instead. The minimum, not a mean, so only requests that
    certainly cannot make it are shed; 0 until a call has succeeded.
    """

    def __init__(self, window: int = 32) -> None:
        self._recent: deque[float] = deque(maxlen=window)

    def observe(self, elapsed_s: float) -> None:
        self._recent.append(elapsed_s)

    def seconds(self) -> float:
        return min(self._recent, default=0.0)
