"""The ``fairness`` scenario's figures, its one table (fair against FIFO) and targets.

Every figure is computed for both policies from the phase runs (records and backend
samples), so the table's two columns are the same arithmetic on the same load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hutch_bench.report import percentile
from hutch_bench.scenarios.common import Target
from hutch_bench.scenarios.fairness_rows import rows_and_targets
from hutch_bench.scenarios.fairshare import Grid, longest_idle, service_curve, shares
from hutch_bench.scenarios.fairstack import BackendSample, PhaseRun
from hutch_bench.scenarios.tenantload import TenantRecord

if TYPE_CHECKING:
    from hutch_bench.scenarios.fairness import FairnessOptions

__all__ = ["Comparison", "compare", "phase_figures", "short_utilisation"]

Figures = dict[str, Any]
#: Errors that mean no answer reached the caller (the generator gave up or crashed).
_LOST = ("cancelled",)


def _p(values: Sequence[float | None], q: float = 99) -> float | None:
    shown = [v for v in values if v is not None]
    return percentile(shown, q) if shown else None


def _errors(records: Sequence[TenantRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            out[r.error] = out.get(r.error, 0) + 1
    return out


def _lost(records: Sequence[TenantRecord]) -> int:
    """Requests without an answer: never sent, given up on, or a client-side crash."""
    return sum(r.sent_s is None or r.done_s is None or r.error in _LOST
               or (r.error is not None and not r.error.islower()) for r in records)


def _noisy(run: PhaseRun, o: FairnessOptions) -> Figures:
    quiet = run.of("quiet-a") + run.of("quiet-b")
    grid = Grid.covering(run.elapsed_s)
    joined = shares(run.records, {"noisy": 1.0, "late": 1.0}, grid,
                    between=(o.join_at_s, o.noisy_s))
    first = (grid.first_at_or_after(o.join_at_s), grid.first_at_or_after(o.join_at_s + 3))
    got = {t: service_curve(run.of(t), grid) for t in ("noisy", "late")}
    early = {t: c[first[1]] - c[first[0]] for t, c in got.items()}
    after = [r for r in quiet if r.start_s is not None and r.start_s >= o.join_at_s]
    return {
        "quiet_wait_p99_ms": _p([r.queue_wait_ms for r in quiet if r.ok]),
        "quiet_ttft_p99_ms": _p([r.ttft_ms for r in quiet if r.ok]),
        "quiet_answered": sum(r.ok for r in quiet), "quiet_sent": len(quiet),
        "quiet_wait_p99_after_join_ms": _p([r.queue_wait_ms for r in after if r.ok]),
        "noisy_answered": sum(r.ok for r in run.of("noisy")),
        "noisy_sent": len(run.of("noisy")),
        "errors": _errors(run.records), "lost": _lost(run.records),
        "dropped_replies": run.dropped_replies,
        "utilisation": run.utilisation(1.0, o.noisy_s),
        "join_excess": early["late"] - early["noisy"],
        "join_share": early["late"] / max(1e-9, early["late"] + early["noisy"]),
        "noisy_longest_idle_s": longest_idle(run.of("noisy"), o.join_at_s, o.noisy_s),
        "joined": joined.figures(),
    }


def _weights(run: PhaseRun, o: FairnessOptions) -> Figures:
    fair = shares(run.records, {"gold": 2.0, "bronze": 1.0}, Grid.covering(run.elapsed_s))
    chat = [r for r in run.of("chat") if r.ok]
    window = fair.window_s
    return {"ratio": fair.ratio("gold", "bronze"),
            "window_length_s": None if window is None else window[1] - window[0],
            **fair.figures(),
            "chat_wait_p99_ms": _p([r.queue_wait_ms for r in chat]),
            "chat_ttft_p99_ms": _p([r.ttft_ms for r in chat]),
            "chat_answered": len(chat), "chat_sent": len(run.of("chat")),
            "errors": _errors(run.records)}


def _saturate(run: PhaseRun, o: FairnessOptions) -> Figures:
    done = [r for r in run.records if r.ok and r.done_s is not None
            and 1.0 <= r.done_s <= o.cost_s]
    return {"throughput_rps": len(done) / max(1e-9, o.cost_s - 1.0),
            "utilisation": run.utilisation(1.0, o.cost_s), "errors": _errors(run.records)}


def _light(run: PhaseRun, o: FairnessOptions) -> Figures:
    latencies = [r.latency_ms for r in run.records if r.ok]
    return {"latency_p50_ms": _p(latencies, 50), "latency_p99_ms": _p(latencies),
            "answered": len(latencies), "sent": len(run.records),
            "errors": _errors(run.records)}


def _kill(run: PhaseRun, o: FairnessOptions) -> Figures:
    pair = shares(run.records, {"one": 1.0, "two": 1.0}, Grid.covering(run.elapsed_s))
    return {"sent": len(run.records), "answered": sum(r.ok for r in run.records),
            "lost": _lost(run.records), "errors": _errors(run.records),
            "dropped_replies": run.dropped_replies, "backend_served": run.served,
            "ratio": pair.ratio("one", "two"), **pair.figures()}


def short_utilisation(samples: Sequence[BackendSample], total: int) -> float | None:
    """Utilisation while the backlog drains: from the sample where a tenth was served
    to the last one before nine tenths were (the ramps at both ends left out)."""
    begin = next((s for s in samples if s.served >= total // 10), None)
    end = next((s for s in reversed(samples) if s.served <= total * 9 // 10), None)
    if begin is None or end is None or end.elapsed_s <= begin.elapsed_s:
        return None
    span = end.elapsed_s - begin.elapsed_s
    return (end.busy_slot_s - begin.busy_slot_s) / (end.capacity * span)


def _short(run: PhaseRun, o: FairnessOptions) -> Figures:
    starts = [r.start_s for r in run.records if r.start_s is not None]
    ends = [r.done_s for r in run.records if r.ok and r.done_s is not None]
    return {"utilisation": short_utilisation(run.samples, len(run.records)),
            "answered": len(ends), "sent": len(run.records),
            "drain_s": max(ends) - min(starts) if starts and ends else None,
            "ideal_drain_s": len(run.records) * o.short_ms / 1000 / o.short_capacity,
            "errors": _errors(run.records)}


_PHASES: dict[str, Callable[[PhaseRun, FairnessOptions], Figures]] = {
    "noisy": _noisy, "weights": _weights, "saturate": _saturate, "light": _light,
    "kill": _kill, "short": _short}


def phase_figures(name: str, run: PhaseRun, options: FairnessOptions) -> Figures:
    """The phase's own figures, and what every phase reports: the generator's send lag
    (large: the machine running the bench was the bottleneck) and the workers' CPU."""
    answered = sum(r.ok for r in run.records)
    lags = [(r.sent_s - r.intended_s) * 1000 for r in run.records if r.sent_s is not None]
    cpu = run.worker_cpu_s
    return {**_PHASES[name](run, options), "elapsed_s": run.elapsed_s,
            "intake_max": max((s.intake for s in run.samples), default=None),
            "send_lag_p99_ms": _p(lags), "worker_cpu_s": cpu,
            "worker_cpu_ms_per_answer": None if cpu is None or not answered
            else cpu * 1000 / answered}


def service_series(run: PhaseRun, step_s: float = 0.5) -> dict[str, Any]:
    """Cumulative weighted tokens per tenant every ``step_s`` (the plot's data)."""
    grid = Grid(0.0, step_s, int(run.elapsed_s / step_s) + 2)
    tenants = sorted({r.tenant for r in run.records})
    return {"t_s": [round(grid.t(i), 3) for i in range(grid.count)],
            "tenants": {t: [round(v) for v in service_curve(run.of(t), grid)]
                        for t in tenants}}


@dataclass
class Comparison:
    """Both policies' figures per phase, the table's rows and the targets."""

    figures: dict[str, dict[str, Figures]]
    service: dict[str, dict[str, Any]]
    rows: list[tuple[str, str, str, str]]
    targets: list[Target]

    def table(self) -> list[str]:
        header = ("", "fair", "fifo", "target")
        widths = [max(len(row[i]) for row in (header, *self.rows)) for i in range(4)]
        lines = ["  ".join(c.rjust(w) if i in (1, 2) else c.ljust(w)
                           for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in (header, *self.rows)]
        lines.insert(1, "-" * len(lines[0]))
        return [line.rstrip() for line in lines]


def compare(runs: dict[str, dict[str, PhaseRun]], options: FairnessOptions) -> Comparison:
    figures = {name: {policy: phase_figures(name, run, options)
                      for policy, run in by_policy.items()}
               for name, by_policy in runs.items()}
    service: dict[str, dict[str, Any]] = {
        name: {policy: service_series(run) for policy, run in runs[name].items()}
        for name in ("noisy", "weights") if name in runs}
    rows, targets = rows_and_targets(figures, options)
    return Comparison(figures, service, rows, targets)
