"""How fairly a backend was shared: service curves, backlogged windows, Jain's index and
the largest service gap, from a tenant load's records (pure arithmetic, no broker).

Service is counted as it happens, as the scheduler's virtual token counter charges it: a
request's prompt when it starts, its answer's tokens spread evenly from its start to its
end (the mock streams them at a steady pace). A tenant is *backlogged* while one of its
requests has been sent and has not started. Fairness is only defined between tenants
that are backlogged together (VTC's premise): the figures are taken over the longest
stretch in which every tenant of interest was.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hutch_bench.scenarios.tenantload import TenantRecord

__all__ = ["Grid", "Shares", "jain", "longest_idle", "shares"]


@dataclass(frozen=True)
class Grid:
    """Sample times ``start + i x step`` for ``i < count``."""

    start: float
    step: float
    count: int

    @classmethod
    def covering(cls, end_s: float, step: float = 0.05) -> Grid:
        return cls(0.0, step, max(1, math.ceil(end_s / step) + 1))

    def t(self, i: int) -> float:
        return self.start + i * self.step

    def first_at_or_after(self, t: float) -> int:
        return max(0, min(self.count, math.ceil((t - self.start) / self.step - 1e-9)))


def service_curve(records: Sequence[TenantRecord], grid: Grid, prompt_weight: float = 1.0,
                  completion_weight: float = 2.0) -> list[float]:
    """Cumulative weighted tokens served to ``records`` at each grid time."""
    after = [0.0] * (grid.count + 1)  # difference array of whole costs, from the end on
    partial = [0.0] * grid.count
    for r in records:
        if not r.ok or r.start_s is None or r.done_s is None:
            continue
        start, done = r.start_s, max(r.done_s, r.start_s + 1e-6)
        prompt = prompt_weight * r.prompt
        answer = completion_weight * r.completion
        i1 = grid.first_at_or_after(done)
        for i in range(grid.first_at_or_after(start), i1):
            partial[i] += prompt + answer * (grid.t(i) - start) / (done - start)
        after[i1] += prompt + answer
    out, total = [], 0.0
    for i in range(grid.count):
        total += after[i]
        out.append(total + partial[i])
    return out


def backlogged(records: Sequence[TenantRecord], grid: Grid) -> list[bool]:
    """Whether one of ``records`` waits (sent, not started) at each grid time."""
    diff = [0] * (grid.count + 1)
    for r in records:
        if r.sent_s is None:
            continue
        until = r.start_s if r.start_s is not None else r.done_s
        if until is None:
            continue
        diff[grid.first_at_or_after(r.sent_s)] += 1
        diff[grid.first_at_or_after(until)] -= 1
    out, level = [], 0
    for i in range(grid.count):
        level += diff[i]
        out.append(level > 0)
    return out


def jain(values: Sequence[float]) -> float | None:
    """Jain's fairness index: 1 when all are equal, 1/n when one gets everything."""
    square = sum(v * v for v in values)
    return None if not values or square == 0 else sum(values) ** 2 / (len(values) * square)


def longest_idle(records: Sequence[TenantRecord], from_s: float, to_s: float) -> float:
    """The longest stretch in [from_s, to_s] in which none of ``records`` started."""
    starts = sorted(r.start_s for r in records if r.start_s is not None
                    and from_s <= r.start_s <= to_s)
    edges = [from_s, *starts, to_s]
    return max(b - a for a, b in itertools.pairwise(edges))


@dataclass
class Shares:
    """Fairness between backlogged tenants over the window both/all were backlogged."""

    window_s: tuple[float, float] | None
    #: Weighted tokens each tenant got in the window (not divided by its weight).
    service: dict[str, float]
    #: Service divided by weight: what VTC equalises.
    normalised: dict[str, float]
    jain: float | None
    #: The largest difference in normalised service between two tenants over any
    #: interval inside the window (VTC bounds it by about 2x the largest request's cost).
    max_gap: float
    bound: float

    def ratio(self, a: str, b: str) -> float | None:
        return self.service[a] / self.service[b] if self.service.get(b) else None

    def figures(self) -> dict[str, object]:
        window = None if self.window_s is None else list(self.window_s)  # as JSON has it
        return {"window_s": window, "service": self.service,
                "normalised": self.normalised, "jain": self.jain,
                "max_gap": self.max_gap, "bound": self.bound}


def _window(flags: Sequence[Sequence[bool]], lo: int, hi: int) -> tuple[int, int] | None:
    """The longest run of grid indices in [lo, hi) where every flag list is True."""
    best: tuple[int, int] | None = None
    run_start: int | None = None
    for i in range(lo, hi + 1):
        if i < hi and all(f[i] for f in flags):
            run_start = i if run_start is None else run_start
        elif run_start is not None:
            if best is None or i - 1 - run_start > best[1] - best[0]:
                best = (run_start, i - 1)
            run_start = None
    return best


def shares(records: Sequence[TenantRecord], weights: Mapping[str, float], grid: Grid, *,
           between: tuple[float, float] | None = None, prompt_weight: float = 1.0,
           completion_weight: float = 2.0) -> Shares:
    """Fairness among the tenants of ``weights`` while all of them were backlogged
    (inside ``between`` when given)."""
    tenants = list(weights)
    mine = {t: [r for r in records if r.tenant == t] for t in tenants}
    curves = {t: service_curve(mine[t], grid, prompt_weight, completion_weight)
              for t in tenants}
    lo, hi = (0, grid.count) if between is None else (
        grid.first_at_or_after(between[0]), grid.first_at_or_after(between[1]))
    found = _window([backlogged(mine[t], grid) for t in tenants], lo, hi)
    costs = [r.cost(prompt_weight, completion_weight) for t in tenants for r in mine[t]]
    bound = 2 * max(costs, default=0.0)
    if found is None:
        return Shares(None, {}, {}, None, 0.0, bound)
    a, b = found
    service = {t: curves[t][b] - curves[t][a] for t in tenants}
    normalised = {t: service[t] / weights[t] for t in tenants}
    gap = 0.0
    for x, y in itertools.combinations(tenants, 2):
        diffs = [(curves[x][i] - curves[x][a]) / weights[x]
                 - (curves[y][i] - curves[y][a]) / weights[y] for i in range(a, b + 1)]
        gap = max(gap, max(diffs) - min(diffs))
    return Shares((grid.t(a), grid.t(b)), service, normalised,
                  jain(list(normalised.values())), gap, bound)
