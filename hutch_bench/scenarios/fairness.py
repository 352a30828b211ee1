"""Scenario ``fairness``: Hutch's fair scheduler against FIFO-within-priority (issue 18).

Every phase runs twice on the same load (same seeds), once with the pool's
``scheduling.policy = "fair"`` and once with ``"fifo"``, each on a stack of its own; one
table compares them. The backend is the mock, streaming its answers at a jittered pace
(40 ms to the first token, then 10 ms a token: ~350 ms for an ordinary request of 32
tokens; constant times would move the slots in lock step), so service time follows the
answer's length; a long prompt costs tokens but no time (the mock has no prefill).

- ``noisy`` (a, b): tenant ``noisy`` sends 4x its third of the backend with 1,024-word
  prompts, ``quiet-a`` and ``quiet-b`` half their third each; ``late`` joins at
  ``join_at_s`` with 3x its third. Queue wait and time to first token of the quiet tenants,
  service per tenant over time (the plot), whether the joiner bursts or the others starve.
- ``weights`` (c, d): ``gold`` (weight 2) and ``bronze`` (weight 1) each send 0.75x the
  backend in the batch band, ``chat`` 10% in the interactive band: the token-service
  ratio while both are backlogged, Jain's index, the largest service gap against VTC's
  bound, and the interactive tenant's wait while batch floods.
- ``saturate`` and ``light`` (e): one tenant alone at 1.5x (throughput, utilisation), and
  5% of a short-request backend (added latency when nothing is saturated).
- ``kill`` (f): two workers, the one serving SIGKILLed mid-run: every request answered
  once, the two backlogged tenants' shares.
- ``short``: issue 18's short requests: a backlog of thousands on 8 slots x 20 ms
  (jittered, not streamed): the backend's utilisation while it drains.

Service is counted in VTC's weighted tokens (prompt x 1 + answer x 2, the pool's
defaults), from the records: a request's prompt when it starts (send time plus the
worker's ``x-hutch-queue-wait-ms``), its answer spread over its service.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from hutch_bench.scenarios.common import format_targets, print_lines, targets_report
from hutch_bench.scenarios.fairness_report import Comparison, compare
from hutch_bench.scenarios.fairstack import Phase, PhaseRun, run_phase
from hutch_bench.scenarios.tenantload import TenantLoad

__all__ = ["FairnessOptions", "phases", "run"]

POLICIES = ("fair", "fifo")


@dataclass(frozen=True)
class FairnessOptions:
    capacity: int = 4
    ttft_ms: float = 40.0
    itl_ms: float = 10.0
    tokens: int = 32
    prompt_words: int = 64
    long_prompt_words: int = 1024
    jitter: float = 0.5
    noisy_s: float = 30.0
    join_at_s: float = 12.0
    weights_s: float = 60.0
    cost_s: float = 20.0
    kill_s: float = 20.0
    short_capacity: int = 8
    short_ms: float = 20.0
    short_backlog: int = 2000
    timeout_s: float = 15.0
    seed: int = 1
    progress: bool = False

    @property
    def service_ms(self) -> float:
        """An ordinary request's mean service time (first token, then the others)."""
        return self.ttft_ms + (self.tokens - 1) * self.itl_ms

    @property
    def capacity_rps(self) -> float:
        return self.capacity * 1000 / self.service_ms

    def mock(self) -> tuple[str, ...]:
        return ("--ttft-ms", f"{self.ttft_ms:g}", "--itl-ms", f"{self.itl_ms:g}",
                "--jitter", f"{self.jitter:g}", "--reply-tokens", str(self.tokens),
                "--seed", str(self.seed))


def _load(options: FairnessOptions, tenant: str, share: float, **kw: Any) -> TenantLoad:
    """``tenant`` sending ``share`` x the backend's capacity of ordinary requests."""
    return TenantLoad(tenant, rate=share * options.capacity_rps,
                      prompt_words=kw.pop("prompt_words", options.prompt_words),
                      max_tokens=options.tokens, **kw)


def _streamed(options: FairnessOptions, name: str, duration_s: float,
              loads: tuple[TenantLoad, ...], **kw: Any) -> Phase:
    return Phase(name, loads, duration_s, options.capacity, options.mock(),
                 timeout_s=kw.pop("timeout_s", options.timeout_s), seed=options.seed, **kw)


def _short(options: FairnessOptions, name: str, load: TenantLoad, duration_s: float,
           timeout_s: float) -> Phase:
    mock = ("--jitter", f"{options.jitter:g}", "--seed", str(options.seed))
    return Phase(name, (load,), duration_s, options.short_capacity, mock,
                 latency_ms=options.short_ms, stream=False, timeout_s=timeout_s,
                 seed=options.seed)


def phases(options: FairnessOptions) -> list[Phase]:
    """The scenario's phases, in the order they run."""
    o, third = options, 1 / 3
    short_rps = o.short_capacity * 1000 / o.short_ms
    drain_s = o.short_backlog / short_rps
    return [
        _streamed(o, "noisy", o.noisy_s, (
            _load(o, "noisy", 4 * third, prompt_words=o.long_prompt_words),
            _load(o, "quiet-a", third / 2), _load(o, "quiet-b", third / 2),
            _load(o, "late", 3 * third, start_s=o.join_at_s))),
        _streamed(o, "weights", o.weights_s, (
            _load(o, "gold", 0.75), _load(o, "bronze", 0.75),
            _load(o, "chat", 0.1, priority=7)),
            tenants=(("gold", 2.0), ("bronze", 1.0)),
            bands=(("batch", 0), ("interactive", 5))),
        _streamed(o, "saturate", o.cost_s, (_load(o, "solo", 1.5),)),
        _short(o, "light", TenantLoad("light", rate=0.05 * short_rps, prompt_words=16,
                                      max_tokens=8), o.cost_s, o.timeout_s),
        _streamed(o, "kill", o.kill_s, (_load(o, "one", 0.6), _load(o, "two", 0.6)),
                  workers=2, kill_at_s=o.kill_s / 2, timeout_s=max(60.0, 4 * o.kill_s)),
        _short(o, "short", TenantLoad("backlog", burst=o.short_backlog, prompt_words=16,
                                      max_tokens=8), 0.5, 30 + 4 * drain_s),
    ]


async def run(amqp_url: str, options: FairnessOptions, out: TextIO) -> dict[str, Any]:
    print(f"fairness: one backend of {options.capacity} slots x ~{options.service_ms:g} ms "
          f"(streamed, jitter {options.jitter:g}), and {options.short_capacity} slots x "
          f"{options.short_ms:g} ms for short requests; each phase under "
          f"{' and '.join(POLICIES)}", file=out)
    runs: dict[str, dict[str, PhaseRun]] = {}
    for phase in phases(options):
        runs[phase.name] = {}
        for policy in POLICIES:
            began = time.monotonic()
            runs[phase.name][policy] = await run_phase(amqp_url, phase, policy)
            if options.progress:
                print(f"  {phase.name} / {policy}: {time.monotonic() - began:.1f} s",
                      file=out, flush=True)
    comparison: Comparison = compare(runs, options)
    report: dict[str, Any] = {
        "scenario": "fairness",
        "title": f"Fair scheduler vs FIFO: {options.capacity} slots x "
                 f"~{options.service_ms:g} ms",
        "config": {**asdict(options), "service_ms": options.service_ms,
                   "capacity_rps": options.capacity_rps},
        "figures": comparison.figures,
        "service": comparison.service,
    }
    targets = comparison.targets
    report["targets"] = targets_report(targets)
    print_lines(comparison.table(), out)
    print_lines(["targets (fair policy):", *format_targets(targets)], out)
    return report
