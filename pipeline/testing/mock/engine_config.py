"""What the mock's realistic engine is told: a KV budget, a batch limit, a per-token pace
that slows down as the batch grows, and whether it preempts.

Kept apart from :class:`~pipeline.testing.mock.config.MockConfig` so the default mock stays
as it was: the engine is on only when a config carries one (``MockConfig.engine``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["CAPACITY_FIELDS", "EngineConfig"]

#: What ``POST /admin/capacity`` and ``MockBackend.set_capacity`` may change at run time.
CAPACITY_FIELDS = ("kv_tokens", "max_running", "tpot_ms", "batch_slowdown")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """A continuous-batching server in miniature (vLLM's scheduler, simplified).

    Running requests hold ``prompt + generated`` tokens of a ``kv_tokens`` budget; at most
    ``max_running`` run at once; each output token of a request takes
    ``tpot_ms * (1 + batch_slowdown * (running - 1))`` (a lone request gets ``tpot_ms``).
    Without ``preempt`` a request is admitted only when its whole length (prompt plus
    reply) fits, so the budget is never overrun; with ``preempt`` it is admitted when its
    prompt fits and, when the budget runs out mid-generation, the newest running request
    is paused back to the head of the waiting queue and recomputed later (vLLM's recompute
    preemption).
    """

    kv_tokens: int = 4096
    max_running: int = 64
    tpot_ms: float = 20.0
    batch_slowdown: float = 0.05
    preempt: bool = False

    def __post_init__(self) -> None:
        _positive_int("kv_tokens", self.kv_tokens)
        _positive_int("max_running", self.max_running)
        _non_negative("tpot_ms", self.tpot_ms)
        _non_negative("batch_slowdown", self.batch_slowdown)
        if not isinstance(self.preempt, bool):
            raise ValueError(f"preempt must be true or false, got {self.preempt!r}")

    def tpot_s(self, running: int) -> float:
        """Seconds per output token with ``running`` requests in the batch."""
        return self.tpot_ms * (1 + self.batch_slowdown * max(0, running - 1)) / 1000.0

    def capacity(self) -> dict[str, Any]:
        """The run-time capacity, as ``GET /admin/capacity`` returns it."""
        return {name: getattr(self, name) for name in (*CAPACITY_FIELDS, "preempt")}

    def with_capacity(self, **fields: Any) -> EngineConfig:
        """A copy with ``fields`` (names in :data:`CAPACITY_FIELDS`) changed; the others kept."""
        unknown = sorted(set(fields) - set(CAPACITY_FIELDS))
        if unknown:
            raise ValueError(f"unknown capacity field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(CAPACITY_FIELDS)}")
        return dataclasses.replace(self, **fields)
