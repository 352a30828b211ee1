"""What the mock counts: requests served and faulted, peaks of concurrency, busy time.

A benchmark proves a cap held by reading ``max_concurrency`` (requests ever in service
at once) and ``max_in_flight`` (in service plus waiting for a slot), and computes the
backend's utilisation from ``busy_slot_s`` over ``elapsed_s``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

__all__ = ["Counters"]

_SERVED_IDS_KEPT = 10_000


class Counters:
    """The mock's counters and gauges; ``reset`` zeroes the counters, not the gauges."""

    def __init__(self) -> None:
        self.in_service = 0
        self.waiting = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters; peaks restart from what is open now so they stay truthful."""
        self.served = 0
        self.errors = 0
        self.disconnected = 0
        self.failed = 0
        self.throttled = 0
        self.hung = 0
        self.max_concurrency = self.in_service
        self.max_in_flight = self.in_service + self.waiting
        self.served_ids: deque[str] = deque(maxlen=_SERVED_IDS_KEPT)
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

    def snapshot(self) -> dict[str, Any]:
        """The counters as ``GET /stats`` shows them (without the configuration)."""
        self._account_busy()
        return {
            "served": self.served,
            "errors": self.errors,
            "disconnected": self.disconnected,
            "in_service": self.in_service,
            "waiting": self.waiting,
            "max_concurrency": self.max_concurrency,
            "max_in_flight": self.max_in_flight,
            "busy_slot_s": round(self._busy_slot_s, 6),
            "elapsed_s": round(self._busy_mark - self._since, 6),
            "served_ids": list(self.served_ids),
            "faults": {"failed": self.failed, "throttled": self.throttled, "hung": self.hung},
        }
