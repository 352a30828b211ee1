"""How many requests a backend takes at once: a fixed cap, or a limit that follows it.

A backend's capacity moves (a vLLM fits more short requests than long ones in its KV
cache, slows down as its batch grows, and queues inside itself beyond that, where Hutch's
priorities, fairness and cancels cannot act). :class:`AdaptiveLimit` keeps the number of
requests Hutch lets a backend run between a floor and the configured ceiling
(``max_concurrency``) and moves it once per *window* (enough completions to judge, or a
time bound), on the signals in order of trust:

1. **The backend's own saturation metrics**, when fresh (vLLM's waiting and running
   requests and KV cache use; see :mod:`pipeline.backends.saturation`): requests waiting
   inside the server or a KV cache nearly full mean "no more"; waiting requests mean "less,
   by about that many". A snapshot older than ``stale_s`` counts as *unknown*, never as
   free: the limit then follows the next signals.
2. **Refusals** (429, 503): the backend said no; the limit falls by ``backoff`` at once
   (once per window, however many refusals it holds).
3. **Latency** per output token (total time per token for whole answers and streams alike,
   queueing inside the server included), against the best window recently seen: beyond
   ``tolerance`` times the best, the limit falls in proportion (a gradient, as Envoy's
   adaptive concurrency filter and Netflix's gradient2 do).

It rises only while the limit is what holds the backend back (the backend ran at the limit
during the window), the latest signals allow it and the window had successes: by half
again per window from a cold start until the first sign of saturation, then by one, and
not again for ``hold_windows`` windows after a fall (the level just above the fall is
where the backend queued). A rise by one is a probe: one that fails (the limit falls again
within ``probe_windows`` windows, or before the metrics could show it) doubles the next
hold, up to ``2 ** probe_backoff_max`` times, and one that holds ends the doubling. A
backend whose room stays put is probed less and less often (each failed probe queued a
request inside it: the p99 pays for those), while one whose room grew is found again
within a few holds. Failed calls are never latency samples: a backend that answers every
request in 1 ms with an error does not look fast. After a lease moves, the new holder
starts from ``start`` (a safe value), not from the ceiling.

No I/O and no clock of its own beyond the one it is given: tested with a fake clock.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["AdaptiveLimit", "ConcurrencyLimit", "FixedLimit", "LimitTuning", "Saturation"]


class Saturation(Protocol):
    """What a backend's metrics said (:class:`pipeline.backends.saturation.Saturation`):
    any field may be None (the backend does not export it)."""

    @property
    def running(self) -> float | None: ...
    @property
    def waiting(self) -> float | None: ...
    @property
    def kv_usage(self) -> float | None: ...


class ConcurrencyLimit(Protocol):
    """What a backend's health reads (``current``) and tells (each call's outcome)."""

    @property
    def current(self) -> int: ...
    @property
    def ceiling(self) -> int: ...
    @property
    def state(self) -> str: ...
    def completed(self, elapsed_s: float, tokens: int | None, in_flight: int) -> bool: ...
    def refused(self, in_flight: int) -> bool: ...
    def saturation(self, snapshot: Saturation | None, in_flight: int = 0) -> bool: ...
    def reset(self) -> None: ...
    def set_ceiling(self, ceiling: int) -> None: ...


class FixedLimit:
    """``max_concurrency`` as configured: today's behaviour, every signal ignored."""

    def __init__(self, ceiling: int) -> None:
        self._ceiling = ceiling

    @property
    def current(self) -> int:
        return self._ceiling

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @property
    def state(self) -> str:
        return "fixed"

    def completed(self, elapsed_s: float, tokens: int | None, in_flight: int) -> bool:
        return False

    def refused(self, in_flight: int) -> bool:
        return False

    def saturation(self, snapshot: Saturation | None, in_flight: int = 0) -> bool:
        return False

    def reset(self) -> None:
        return None

    def set_ceiling(self, ceiling: int) -> None:
        """A new cap (a config reload, a stricter cap another worker claims)."""
        self._ceiling = ceiling


@dataclass(frozen=True)
class LimitTuning:
    """The adaptive limit's constants (the defaults suit LLM servers: calls of 0.1-60 s)."""

    #: A window ends after this many successes (at least; the limit's half counts too)...
    min_samples: int = 3
    #: ...and at least this long after it began, so a burst of short calls is one window...
    min_window_s: float = 0.25
    #: ...or after this long with at least one success (a slow backend still adapts).
    max_window_s: float = 5.0
    #: A metrics snapshot older than this is unknown (the poller scrapes every 0.5 s).
    stale_s: float = 2.0
    #: KV cache use at which a backend counts as full (llm-d's detector uses 0.8 as
    #: "saturated" with a margin; vLLM preempts near 1.0).
    kv_full: float = 0.9
    #: On a refusal or a latency rise, the limit is multiplied by at most this.
    backoff: float = 0.7
    #: Latency per token beyond this multiple of the best recent window: saturated.
    tolerance: float = 1.5
    #: The best window's latency ages upward by this factor per window, so a backend that
    #: got slower for good (a bigger model, a busier GPU) sets a new baseline.
    best_decay: float = 1.02
    #: Windows without a rise after a fall.
    hold_windows: int = 8
    #: A fall within this many windows of a rise by one (and within ``stale_s``, the time
    #: fresh metrics need to show it) means that probe failed...
    probe_windows: int = 2
    #: ...and each failed probe in a row doubles the hold, at most this many times.
    probe_backoff_max: int = 2
    #: From a cold start the limit grows by this factor per window until the first sign
    #: of saturation (1.5, not TCP's 2: a probe past the room queues at most half again).
    slow_start_factor: float = 1.5


class AdaptiveLimit:
    """A backend's concurrency limit between ``floor`` and ``ceiling`` (see the module)."""

    def __init__(self, floor: int, ceiling: int, start: int | None = None, *,
                 tuning: LimitTuning | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int, int, str], None] | None = None) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor ({floor}) <= ceiling ({ceiling})")
        self.floor = floor
        self._ceiling = ceiling
        self._start = min(ceiling, max(floor, start if start is not None else min(4, ceiling)))
        self.tuning = tuning or LimitTuning()
        self._clock = clock
        #: Told ``(before, after, reason)`` on every change: one log line per change.
        self._on_change = on_change
        self._samples: list[float] = []
        self._peak = 0
        self._refused = False
        self._fell_this_window = False
        self._window_start = 0.0
        self._fell_at = -math.inf
        self._changed_at = -math.inf
        self._windows = 0  # windows ended since the last reset
        #: The window and the time of the last rise by one, until it is judged.
        self._probed_at: tuple[int, float] | None = None
        self._failed_probes = 0
        self.reset()

    # -- what the health reads ---------------------------------------------------------

    @property
    def current(self) -> int:
        return self._limit

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @property
    def state(self) -> str:
        """Why the limit is where it is: the last decision's reason."""
        return self._reason

    def reset(self) -> None:
        """Start again from the safe value (a lease just taken: the last holder's view of
        the backend is not this worker's, and the ceiling is never a safe guess)."""
        self._limit = self._start
        self._slow_start = True
        self._reason = "start"
        self._hold = 0
        self._probed_at = None
        self._failed_probes = 0
        self._best: float | None = None
        self._snapshot: Saturation | None = None
        self._snapshot_at = -math.inf
        self._new_window(self._clock())

    def set_ceiling(self, ceiling: int) -> None:
        """A new ceiling (a config reload, a stricter cap another worker claims): the
        limit (and the floor and start) come down under it at once, or may now rise."""
        self._ceiling = max(1, ceiling)
        self.floor = min(self.floor, self._ceiling)
        self._start = min(self._start, self._ceiling)
        if self._limit > self._ceiling:
            self._set(self._ceiling, "ceiling_lowered", fell=False)

    # -- what dispatch and the metrics poller tell -------------------------------------

    def completed(self, elapsed_s: float, tokens: int | None, in_flight: int) -> bool:
        """A call succeeded in ``elapsed_s`` with ``tokens`` output tokens (None: not
        known), ``in_flight`` calls running on the backend when it ended (itself
        included). True if the limit changed."""
        per_token = elapsed_s / tokens if tokens else elapsed_s
        self._samples.append(max(per_token, 1e-6))
        self._peak = max(self._peak, in_flight)
        return self._maybe_step()

    def refused(self, in_flight: int) -> bool:
        """The backend refused a call (429, 503): fall now, once per window."""
        self._peak = max(self._peak, in_flight)
        if self._refused:
            return False
        self._refused = True
        return self._set(max(self.floor, math.floor(self._limit * self.tuning.backoff)),
                         "refused", fell=True)

    def saturation(self, snapshot: Saturation | None, in_flight: int = 0) -> bool:
        """The backend's metrics, just scraped (None: missing, slow or malformed), with
        ``in_flight`` calls of Hutch's running there. A server that queues inside itself
        makes the limit fall at once to what it runs of them (again only after a window
        ended, or ``max_window_s`` if none does: its queue drains only as calls end)."""
        if snapshot is None:
            return False
        self._snapshot, self._snapshot_at = snapshot, self._clock()
        waiting = math.ceil(snapshot.waiting or 0)
        recently = self._clock() - self._fell_at < self.tuning.max_window_s
        if waiting > 0 and not (self._fell_this_window and recently):
            # Of Hutch's calls the server runs ``in_flight - waiting`` (as far as Hutch is
            # its only client): that is its room now; at least one less than the limit.
            runs = in_flight - waiting if in_flight > waiting else self._limit - waiting
            return self._set(max(self.floor, min(self._limit - 1, runs)),
                             "backend_queueing", fell=True)
        return False

    # -- the window -------------------------------------------------------------------

    def _new_window(self, now: float) -> None:
        self._window_start = now
        self._samples = []
        self._peak = 0
        self._refused = False
        self._fell_this_window = False

    def _maybe_step(self) -> bool:
        now = self._clock()
        age = now - self._window_start
        enough = len(self._samples) >= max(self.tuning.min_samples, self._limit // 2)
        if not ((enough and age >= self.tuning.min_window_s)
                or (self._samples and age >= self.tuning.max_window_s)):
            return False
        changed = self._step(now)
        self._windows += 1
        if self._probed_at is not None:
            window, at = self._probed_at
            if (self._windows - window > self.tuning.probe_windows
                    and now - at >= self.tuning.stale_s):
                self._probed_at, self._failed_probes = None, 0  # the probe held
        self._new_window(now)
        return changed

    def _fresh_snapshot(self, now: float) -> Saturation | None:
        if now - self._snapshot_at > self.tuning.stale_s:
            return None
        return self._snapshot

    def _step(self, now: float) -> bool:
        tuning = self.tuning
        latency = statistics.median(self._samples)
        best = self._best
        self._best = latency if best is None else min(best * tuning.best_decay, latency)
        if self._refused or self._fell_this_window:
            return False  # already fell in this window
        snapshot = self._fresh_snapshot(now)
        if snapshot is not None and (snapshot.running is not None
                                     or snapshot.waiting is not None
                                     or snapshot.kv_usage is not None):
            if (snapshot.waiting or 0) > 0:
                return False  # :meth:`saturation` fell already
            if snapshot.kv_usage is not None and snapshot.kv_usage >= tuning.kv_full:
                self._slow_start = False
                self._reason = "backend_full"
                return False
            if self._snapshot_at <= self._changed_at:
                return False  # the metrics do not show the last change's effect yet
            return self._rise("backend_has_room")
        if best is not None and latency > best * tuning.tolerance:
            factor = max(tuning.backoff, best * tuning.tolerance / latency)
            return self._set(max(self.floor, math.floor(self._limit * factor)),
                             "latency_rose", fell=True)
        return self._rise("latency_holds")

    def _rise(self, reason: str) -> bool:
        if self._hold > 0:
            self._hold -= 1
            return False
        if self._peak < self._limit:
            return False  # the limit did not hold the backend back: no evidence to rise
        target = (max(self._limit + 1, math.ceil(self._limit * self.tuning.slow_start_factor))
                  if self._slow_start else self._limit + 1)
        if not self._slow_start:
            if self._probed_at is not None:
                self._failed_probes = 0  # the last probe held: rising again says so
            self._probed_at = (self._windows, self._clock())
        return self._set(min(self._ceiling, target), reason, fell=False)

    def _set(self, limit: int, reason: str, *, fell: bool) -> bool:
        if fell:
            self._fell_at = self._clock()
            self._slow_start = False
            if self._probed_at is not None:  # the last probe failed: wait longer
                self._failed_probes = min(self._failed_probes + 1,
                                          self.tuning.probe_backoff_max)
                self._probed_at = None
            self._hold = self.tuning.hold_windows * 2 ** self._failed_probes
            self._fell_this_window = True
        before, self._limit = self._limit, limit
        if limit == before:
            return False
        self._changed_at = self._clock()
        self._reason = reason
        if self._on_change is not None:
            self._on_change(before, limit, reason)
        return True
