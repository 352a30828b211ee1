"""A pool's backlog in tokens and the time to drain it: what a scaler should act on.

Message counts are the wrong unit for LLM work (one request may be 50 tokens, the next
50,000), and a queue's length says nothing about how long it takes to clear. Each worker
measures what it served of each pool (:class:`BacklogMeter`, a delivery hook: completions
and their tokens over the last ``window_s``) and, from the pool's ready requests (its
queue and lanes, read by the worker), estimates:

- the backlog in tokens: ready requests x the mean tokens (prompt + completion) of the
  requests served recently;
- the drain time: ready requests / the pool's service rate, where the pool's rate is this
  worker's rate divided by the share of the pool's backends it holds (backends of one
  pool are assumed alike; a worker holding none of them estimates nothing).

Estimates, not promises: a burst of long prompts or a backend that slows down shows up
within ``window_s``. No I/O and an injectable clock: tested with a fake one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.delivery import Delivery
from pipeline.observe.hooks import DeliveryHook, Settlement
from pipeline.outcome import Completed, Outcome

__all__ = ["BacklogEstimate", "BacklogMeter", "ServiceRate"]


class ServiceRate:
    """One pool's completions in this worker over the last ``window_s``."""

    def __init__(self, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._since = clock()
        #: (when, tokens or None) of each completion in the window.
        self._done: deque[tuple[float, int | None]] = deque()

    def completed(self, tokens: int | None) -> None:
        self._done.append((self._clock(), tokens))
        if len(self._done) % 64 == 0:
            self._trim()  # bounded even if nobody reads it

    def count(self) -> int:
        """Completions in the window."""
        self._trim()
        return len(self._done)

    def _trim(self) -> float:
        now = self._clock()
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()
        return now

    def per_second(self) -> float:
        """Completions per second (over the window, or since counting began if shorter)."""
        now = self._trim()
        span = min(self.window_s, now - self._since)
        return len(self._done) / span if span > 0 else 0.0

    def recent_per_second(self, last: int = 200) -> float:
        """Completions per second over the last ``last`` completions of the window: what
        the pool does now (a flood after a quiet minute is not averaged with the quiet),
        and it falls while nothing completes. Below two completions, :meth:`per_second`."""
        now = self._trim()
        if len(self._done) < 2:
            return self.per_second()
        first = self._done[max(0, len(self._done) - last)][0]
        count = min(last, len(self._done))
        return (count - 1) / (now - first) if now > first else 0.0

    def tokens_per_request(self) -> float | None:
        """Mean tokens of the completions in the window that reported usage (None: none)."""
        self._trim()
        known = [tokens for _, tokens in self._done if tokens is not None]
        return sum(known) / len(known) if known else None


@dataclass(frozen=True)
class BacklogEstimate:
    """A pool's backlog as one worker estimates it (None: not known yet)."""

    requests: int
    tokens: float | None
    drain_s: float | None

    @classmethod
    def of(cls, ready: int, rate: ServiceRate, share: float) -> BacklogEstimate:
        """``ready`` requests waiting; ``share``: the fraction of the pool's backends this
        worker holds (> 0)."""
        per_token = rate.tokens_per_request()
        tokens = ready * per_token if per_token is not None else None
        pool_rate = rate.per_second() / share
        if ready == 0:
            return cls(0, 0.0, 0.0)
        return cls(ready, tokens, ready / pool_rate if pool_rate > 0 else None)


class BacklogMeter(DeliveryHook):
    """Counts each pool's completions (and their tokens) as they settle."""

    def __init__(self, pools: Sequence[str], *, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rates = {pool: ServiceRate(window_s, clock) for pool in pools}

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        rate = self.rates.get(delivery.pool)
        if rate is None or not isinstance(outcome, Completed):
            return
        usage = outcome.usage
        rate.completed(usage.total_tokens or (usage.prompt_tokens + usage.completion_tokens)
                       if usage is not None else None)
