"""The clock skew a worker sees: its own clock minus the clients' ``x-hutch-sent-at``.

One delivery's difference is its queue wait plus the skew between the two clocks, and the
two cannot be told apart from it. Over many deliveries the smallest difference is the
skew: a request delivered at once (an idle pool) has no queue wait. So a worker exports
the smallest difference of the last minute's first deliveries (retries and redeliveries
carry an older send time): near 0 when the clocks agree, negative when a client's clock is
ahead (certain: no wait is negative), positive when it is behind (or when every request
of the minute waited that long: a backlog, which the queue-wait metrics show).
"""

from __future__ import annotations

import math
import time
from collections import deque

__all__ = ["SkewWindow"]


class SkewWindow:
    """The smallest difference observed in the last ``window_s`` seconds (NaN: none)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self._window_s = window_s
        #: (monotonic time, difference in seconds), the differences increasing: an entry
        #: with a larger difference than a later one can never be the minimum again.
        self._entries: deque[tuple[float, float]] = deque()

    def observe(self, difference_s: float) -> None:
        now = time.monotonic()
        while self._entries and self._entries[-1][1] >= difference_s:
            self._entries.pop()
        self._entries.append((now, difference_s))
        self._expire(now)

    def value(self) -> float:
        """The smallest difference of the window, in seconds; NaN if nothing was seen."""
        self._expire(time.monotonic())
        return self._entries[0][1] if self._entries else math.nan

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] < now - self._window_s:
            self._entries.popleft()
