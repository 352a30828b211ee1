"""What the mock backend is told to be: latency, slots, models, streaming pace, and the
faults it injects.

Validated at construction: a bad config would otherwise surface as a confusing hang in a
test or a benchmark.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeGuard

from pipeline.testing.mock.engine_config import EngineConfig

__all__ = ["FAULT_FIELDS", "RATE_FIELDS", "MockConfig"]

#: The fault settings of :class:`MockConfig`: what ``POST /faults`` and ``set_faults`` take.
FAULT_FIELDS = (
    "fail_rate",
    "fail_status",
    "fail_first",
    "throttle_rate",
    "retry_after_s",
    "hang_rate",
    "hang_s",
    "cut_rate",
    "malformed_rate",
    "stall_rate",
    "fault_after_tokens",
    "seed",
)

#: The fault rates: fractions of all chat requests, together at most 1.
RATE_FIELDS = ("fail_rate", "throttle_rate", "hang_rate", "cut_rate", "malformed_rate",
               "stall_rate")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_duration(value: object) -> bool:
    """A finite number of seconds or milliseconds, not negative."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return math.isfinite(value) and value >= 0


def _check_count(name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class MockConfig:
    """How the mock behaves: per-request latency, parallel slots, the models it knows, the
    pace of streamed replies, and the faults it injects (none by default).

    Rates are fractions of all chat requests (each in 0..1, together at most 1):
    ``throttle_rate`` are answered 429 at the door; of the rest, ``fail_rate`` and
    ``hang_rate`` (as fractions of the whole) fail with ``fail_status`` or hang for
    ``hang_s`` once they hold a slot. ``fail_first`` makes the first N requests that take
    a slot fail, before the rates apply. Invalid requests (400/404) are never faulted.
    The stream faults (``cut_rate``, ``malformed_rate``, ``stall_rate``) strike after
    ``fault_after_tokens`` tokens of a streamed reply; a request that is not streamed and
    draws one is served normally.
    """

    latency_ms: float = 50.0
    capacity: int = 4
    models: tuple[str, ...] = ("mock-small", "mock-large")
    #: Time to first token of a streamed reply (None: ``latency_ms``).
    ttft_ms: float | None = None
    #: Time between two tokens of a streamed reply.
    itl_ms: float = 0.0
    #: Each delay (``latency_ms`` of a whole answer, a stream's time to first token and
    #: inter-token latency) is scaled by a random factor in [1 - jitter, 1 + jitter].
    jitter: float = 0.0
    #: Tokens of a reply without ``max_tokens`` (None: the echo of the last message, cut
    #: at ``max_tokens``). When set, a request's ``max_tokens`` is its reply's length.
    reply_tokens: int | None = None
    #: How many served and aborted request ids ``/stats`` keeps (the most recent).
    ids_kept: int = 1000
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
    #: Fraction of streamed replies whose connection is closed mid-stream.
    cut_rate: float = 0.0
    #: Fraction of streamed replies with a ``data:`` line that is not JSON.
    malformed_rate: float = 0.0
    #: Fraction of streamed replies that stop for ``hang_s`` between two chunks.
    stall_rate: float = 0.0
    #: Tokens sent before a stream fault strikes (0: right after the response headers).
    fault_after_tokens: int = 1
    #: Seed of the random fault choices and of the jitter (None: unpredictable).
    seed: int | None = None
    #: Behave like a real server (KV budget, batch slowdown, internal queue, ``/metrics``
    #: under vLLM's names); None keeps the fixed ``capacity`` slots and ``latency_ms``.
    engine: EngineConfig | None = None

    def __post_init__(self) -> None:
        _check_count("capacity", self.capacity, 1)
        if not _is_duration(self.latency_ms):
            raise ValueError(f"latency_ms must be a finite number >= 0, got {self.latency_ms!r}")
        if not self.models or any(not isinstance(m, str) or not m for m in self.models):
            raise ValueError(
                f"models must be a non-empty tuple of non-empty names: {self.models!r}"
            )
        self._check_streaming()
        self._check_rates()
        self._check_faults()
        if self.engine is not None and not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine must be an EngineConfig or None, got {self.engine!r}")

    def _check_streaming(self) -> None:
        for name, ms in (("ttft_ms", self.ttft_ms), ("itl_ms", self.itl_ms)):
            if ms is not None and not _is_duration(ms):
                raise ValueError(f"{name} must be a finite number >= 0, got {ms!r}")
        if not _is_number(self.jitter) or not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be a number in 0..1, got {self.jitter!r}")
        if self.reply_tokens is not None:
            _check_count("reply_tokens", self.reply_tokens, 1)
        _check_count("ids_kept", self.ids_kept, 0)

    def _check_rates(self) -> None:
        rates = {name: getattr(self, name) for name in RATE_FIELDS}
        for name, rate in rates.items():
            if not _is_number(rate) or not 0 <= rate <= 1:  # NaN fails the comparison too
                raise ValueError(f"{name} must be a number in 0..1, got {rate!r}")
        if sum(rates.values()) > 1 + 1e-9:
            given = " + ".join(f"{name} {rate:g}" for name, rate in rates.items() if rate)
            raise ValueError(f"the fault rates must add up to at most 1, got {given}")

    def _check_faults(self) -> None:
        if not _is_int(self.fail_status) or not 400 <= self.fail_status <= 599:
            raise ValueError(
                f"fail_status must be an HTTP error status in 400..599, got {self.fail_status!r}"
            )
        _check_count("fail_first", self.fail_first, 0)
        _check_count("fault_after_tokens", self.fault_after_tokens, 0)
        for name, seconds in (("retry_after_s", self.retry_after_s), ("hang_s", self.hang_s)):
            if not _is_duration(seconds):
                raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")

    @property
    def first_token_ms(self) -> float:
        """Time to first token of a streamed reply: ``ttft_ms``, else ``latency_ms``."""
        return self.latency_ms if self.ttft_ms is None else self.ttft_ms

    def faults(self) -> dict[str, Any]:
        """The fault settings, as ``GET /faults`` returns them."""
        return {name: getattr(self, name) for name in FAULT_FIELDS}

    @property
    def has_faults(self) -> bool:
        """True if any fault is configured."""
        return bool(self.fail_first or any(getattr(self, name) for name in RATE_FIELDS))

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
