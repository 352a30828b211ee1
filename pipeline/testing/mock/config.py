"""What the mock backend is told to be: latency, slots, models, and the faults it injects.

Validated at construction: a bad config would otherwise surface as a confusing hang in a
test or a benchmark.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["FAULT_FIELDS", "MockConfig"]

#: The fault settings of :class:`MockConfig`: what ``POST /faults`` and ``set_faults`` take.
FAULT_FIELDS = (
    "fail_rate",
    "fail_status",
    "fail_first",
    "throttle_rate",
    "retry_after_s",
    "hang_rate",
    "hang_s",
    "seed",
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_duration(value: object) -> bool:
    """A finite number of seconds or milliseconds, not negative."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return math.isfinite(value) and value >= 0


@dataclass(frozen=True, slots=True)
class MockConfig:
    """How the mock behaves: per-request latency, parallel slots, the models it knows, and
    the faults it injects (none by default).

    Rates are fractions of all chat requests (each in 0..1, together at most 1):
    ``throttle_rate`` are answered 429 at the door; of the rest, ``fail_rate`` and
    ``hang_rate`` (as fractions of the whole) fail with ``fail_status`` or hang for
    ``hang_s`` once they hold a slot. ``fail_first`` makes the first N requests that take
    a slot fail, before the rates apply. Invalid requests (400/404) are never faulted.
    """

    latency_ms: float = 50.0
    capacity: int = 4
    models: tuple[str, ...] = ("mock-small", "mock-large")
    #: Fraction of requests answered with ``fail_status`` (and an OpenAI error body).
    fail_rate: float = 0.0
    fail_status: int = 500
    #: The first N requests that take a slot fail with ``fail_status`` (deterministic).
    fail_first: int = 0
    #: Fraction of requests answered 429 with ``Retry-After: <retry_after_s>``, no slot taken.
    throttle_rate: float = 0.0
    retry_after_s: float = 1.0
    #: Fraction of requests that hold their slot for ``hang_s`` before answering.
    hang_rate: float = 0.0
    hang_s: float = 3600.0
    #: Seed of the random fault choices (None: unpredictable).
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.capacity):
            raise ValueError(f"capacity must be an integer >= 1, got {self.capacity!r}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if not _is_duration(self.latency_ms):
            raise ValueError(f"latency_ms must be a finite number >= 0, got {self.latency_ms!r}")
        if not self.models or any(not isinstance(m, str) or not m for m in self.models):
            raise ValueError(
                f"models must be a non-empty tuple of non-empty names: {self.models!r}"
            )
        self._check_rates()
        self._check_faults()

    def _check_rates(self) -> None:
        rates = {"fail_rate": self.fail_rate, "throttle_rate": self.throttle_rate,
                 "hang_rate": self.hang_rate}
        for name, rate in rates.items():
            if not _is_number(rate) or not 0 <= rate <= 1:  # NaN fails the comparison too
                raise ValueError(f"{name} must be a number in 0..1, got {rate!r}")
        if sum(rates.values()) > 1 + 1e-9:
            raise ValueError(
                "fail_rate + throttle_rate + hang_rate must be at most 1, got "
                f"{self.fail_rate:g} + {self.throttle_rate:g} + {self.hang_rate:g}"
            )

    def _check_faults(self) -> None:
        if not _is_int(self.fail_status) or not 400 <= self.fail_status <= 599:
            raise ValueError(
                f"fail_status must be an HTTP error status in 400..599, got {self.fail_status!r}"
            )
        if not _is_int(self.fail_first) or self.fail_first < 0:
            raise ValueError(f"fail_first must be an integer >= 0, got {self.fail_first!r}")
        for name, seconds in (("retry_after_s", self.retry_after_s), ("hang_s", self.hang_s)):
            if not _is_duration(seconds):
                raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")

    def faults(self) -> dict[str, Any]:
        """The fault settings, as ``GET /faults`` returns them."""
        return {name: getattr(self, name) for name in FAULT_FIELDS}

    @property
    def has_faults(self) -> bool:
        """True if any fault is configured."""
        return bool(self.fail_rate or self.fail_first or self.throttle_rate or self.hang_rate)

    def with_faults(self, **fields: Any) -> MockConfig:
        """A copy whose faults are exactly ``fields`` (the others back to their defaults)."""
        unknown = sorted(set(fields) - set(FAULT_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown fault field(s) {', '.join(unknown)}; known: {', '.join(FAULT_FIELDS)}"
            )
        return dataclasses.replace(self, **{**_FAULT_DEFAULTS, **fields})


#: Default value of every fault field (no faults).
_FAULT_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(MockConfig) if f.name in FAULT_FIELDS
}
