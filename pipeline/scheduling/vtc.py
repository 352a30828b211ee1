"""The Virtual Token Counter (VTC; Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024): one counter per tenant of the service it received, in weighted tokens.

The scheduler serves the backlogged tenant with the lowest counter. A tenant is charged as
it is served (prompt tokens when a request starts, the true cost from ``usage`` when it
ends, a refund for what a failure or a cancel did not use), divided by its weight. When a
tenant becomes backlogged again its counter is lifted to the lowest counter among the
backlogged tenants (or, with none, to the last one served): idle time is not banked as
credit. With that, the service two backlogged tenants receive differs by at most about
twice the largest single request's cost (the paper's bound, per scheduler).

Counters are soft state: a worker that restarts starts every tenant at the same level,
which the lift makes fair at once. Memory is bounded: a tenant with nothing waiting whose
counter is at or below the lift level carries no information and is forgotten.
"""

from __future__ import annotations

__all__ = ["VirtualTokenCounter"]


class VirtualTokenCounter:
    """Per-tenant counters of weighted service; see the module docstring."""

    def __init__(self, max_tenants: int = 100_000) -> None:
        self._counters: dict[str, float] = {}
        #: The counter of the tenant picked last: where a returning tenant starts when no
        #: one is backlogged (virtual time, never decreasing).
        self._level = 0.0
        self._max_tenants = max_tenants

    def __len__(self) -> int:
        return len(self._counters)

    @property
    def level(self) -> float:
        return self._level

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, self._level)

    def lift(self, tenant: str, backlogged_min: float | None) -> None:
        """``tenant`` has work waiting again: no credit for the time it had none."""
        floor = self._level if backlogged_min is None else backlogged_min
        if self._counters.get(tenant, float("-inf")) < floor:
            self._counters[tenant] = floor

    def picked(self, tenant: str) -> None:
        """``tenant``'s request was chosen: virtual time moves to its counter."""
        self._level = max(self._level, self.counter(tenant))

    def charge(self, tenant: str, cost: float, weight: float) -> None:
        """Add ``cost`` weighted tokens (negative: a refund) to ``tenant``'s counter."""
        self._counters[tenant] = self.counter(tenant) + cost / weight

    def forget_idle(self, backlogged: set[str]) -> None:
        """Drop tenants with nothing waiting whose counter says nothing beyond the level;
        when still over ``max_tenants``, the idle ones with the lowest counters."""
        for tenant in [t for t, c in self._counters.items()
                       if c <= self._level and t not in backlogged]:
            del self._counters[tenant]
        excess = len(self._counters) - self._max_tenants
        if excess > 0:
            idle = sorted((c, t) for t, c in self._counters.items() if t not in backlogged)
            for _, tenant in idle[:excess]:
                del self._counters[tenant]
