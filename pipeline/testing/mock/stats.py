"""What the mock counts: requests served, aborted and faulted, peaks of concurrency, busy
time.

A benchmark proves a cap held by reading ``max_concurrency`` (requests ever in service
at once) and ``max_in_flight`` (in service plus waiting for a slot), and computes the
backend's utilisation from ``busy_slot_s`` over ``elapsed_s``. A cancel test proves a
cancel reached the backend by finding its request id in ``aborted_ids``. The id lists keep
only the most recent ids, so ``/stats`` stays small however long the mock runs.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

__all__ = ["Counters"]


class Counters:
    """The mock's counters and gauges; ``reset`` zeroes the counters, not the gauges."""

    def __init__(self, ids_kept: int = 1000) -> None:
        self.ids_kept = ids_kept
        self.in_service = 0
        self.waiting = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters; peaks restart from what is open now so they stay truthful."""
        self.served = 0
        self.streamed = 0
        self.errors = 0
        self.aborted = 0
        self.failed = 0
        self.throttled = 0
        self.hung = 0
        self.cut = 0
        self.malformed = 0
        self.stalled = 0
        self.max_concurrency = self.in_service
        self.max_in_flight = self.in_service + self.waiting
        self.served_ids: deque[str] = deque(maxlen=self.ids_kept)
        self.aborted_ids: deque[str] = deque(maxlen=self.ids_kept)
        # When each kept abort was seen (time.monotonic(): CLOCK_MONOTONIC, one clock for
        # every process on a Linux machine), so a benchmark can time a cancel's arrival.
        self.aborted_at: deque[tuple[str, float]] = deque(maxlen=self.ids_kept)
        # Utilisation: slot-seconds in service, integrated at every change of in_service.
        self._busy_slot_s = 0.0
        self._busy_mark = time.monotonic()
        self._since = self._busy_mark

    def _account_busy(self) -> None:
        now = time.monotonic()
        self._busy_slot_s += self.in_service * (now - self._busy_mark)
        self._busy_mark = now

    def start_waiting(self) -> None:
        self.waiting += 1
        self.max_in_flight = max(self.max_in_flight, self.waiting + self.in_service)

    def stop_waiting(self) -> None:
        self.waiting -= 1

    def enter_service(self) -> None:
        self._account_busy()
        self.in_service += 1
        self.max_concurrency = max(self.max_concurrency, self.in_service)

    def leave_service(self) -> None:
        self._account_busy()
        self.in_service -= 1

    def serve(self, request_id: str | None, *, streamed: bool = False) -> None:
        """A request answered in full (a stream: up to its ``[DONE]``)."""
        self.served += 1
        self.streamed += int(streamed)
        if request_id is not None:
            self.served_ids.append(request_id)

    def abort(self, request_id: str | None) -> None:
        """A request its client abandoned: waiting for a slot, in service, or mid-stream."""
        self.aborted += 1
        if request_id is not None:
            self.aborted_ids.append(request_id)
            self.aborted_at.append((request_id, time.monotonic()))

    def snapshot(self) -> dict[str, Any]:
        """The counters as ``GET /stats`` shows them (without the configuration)."""
        self._account_busy()
        return {
            "served": self.served,
            "streamed": self.streamed,
            "errors": self.errors,
            "aborted": self.aborted,
            # The older name of ``aborted``, kept for the scripts that read it.
            "disconnected": self.aborted,
            "in_service": self.in_service,
            "waiting": self.waiting,
            "max_concurrency": self.max_concurrency,
            "max_in_flight": self.max_in_flight,
            "busy_slot_s": round(self._busy_slot_s, 6),
            "elapsed_s": round(self._busy_mark - self._since, 6),
            "served_ids": list(self.served_ids),
            "aborted_ids": list(self.aborted_ids),
            "aborted_at": dict(self.aborted_at),
            "faults": {"failed": self.failed, "throttled": self.throttled, "hung": self.hung,
                       "cut": self.cut, "malformed": self.malformed, "stalled": self.stalled},
        }
