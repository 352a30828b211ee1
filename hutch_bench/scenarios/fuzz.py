"""Scenario ``fuzz``: the property tests' long run (issue 21).

The same Hypothesis strategies and oracle as ``tests/test_properties.py``, at one live
worker for the whole run, with fresh seeds and no stop at the first problem: raw requests
across the whole wire contract and cancels of every shape, in batches, with valid
requests alongside. Reports how many inputs were sent, the crashes (the worker stopped),
the stalls (an answer that did not come within ``stall_s``) and every other answer that
was not the documented one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TextIO

from hutch_bench.scenarios.common import Target, format_targets, print_lines, targets_report

if TYPE_CHECKING:
    from hutch_bench.scenarios.fuzz_rig import WireRig

__all__ = ["FuzzOptions", "run"]


@dataclass(frozen=True)
class FuzzOptions:
    #: Raw requests to send (each batch also carries cancels and valid requests).
    examples: int = 100_000
    batch: int = 50
    seed: int = 21
    stall_s: float = 20.0
    #: Stop after this long, whatever was reached (the report says how far it got).
    max_minutes: float = 45.0
    progress: bool = False


def _drive(rig: WireRig, loop: asyncio.AbstractEventLoop, options: FuzzOptions,
           out: TextIO | None) -> int:
    """Hypothesis runs of 20 batches each, a fresh seed each, until enough inputs were
    sent or time is up; returns the runs made."""
    from hutch_bench.scenarios.fuzz_drive import check_examples  # needs hypothesis

    started = time.monotonic()
    runs = shown = 0
    while (rig.tally.cases < options.examples
           and time.monotonic() - started < options.max_minutes * 60):
        check_examples(rig, loop, examples=20, seed_value=options.seed + runs,
                       raise_on_problem=False)
        runs += 1
        if out is not None:
            for line in rig.tally.problems[shown:]:
                print(f"  problem: {line[:300]}", file=out, flush=True)
            shown = len(rig.tally.problems)
            elapsed = time.monotonic() - started
            print(f"  {rig.tally.cases:7d} inputs in {elapsed:6.0f}s "
                  f"({rig.tally.cases / elapsed:5.1f}/s), {len(rig.tally.problems)} problems",
                  file=out, flush=True)
    return runs


async def run(amqp_url: str, options: FuzzOptions, out: TextIO) -> dict[str, Any]:
    # Hypothesis is a test dependency: only this scenario needs it, so import it here.
    from hutch_bench.scenarios.fuzz_rig import wire_rig

    print(f"fuzz: {options.examples} raw requests in batches of {options.batch}, "
          f"seeds from {options.seed}", file=out, flush=True)
    async with wire_rig(amqp_url, f"fuzz{uuid.uuid4().hex[:6]}",
                        stall_s=options.stall_s) as rig:
        rig.min_cases = rig.max_cases = options.batch
        started = time.monotonic()
        runs = await asyncio.to_thread(_drive, rig, asyncio.get_running_loop(), options,
                                       out if options.progress else None)
        elapsed = time.monotonic() - started
        alive = not rig.worker_task.done()
    tally = rig.tally
    other = len(tally.problems) - tally.stalls
    targets = [
        Target("0 crashes", f"{tally.crashes} (worker {'running' if alive else 'stopped'})",
               tally.crashes == 0 and alive),
        Target("0 stalls", str(tally.stalls), tally.stalls == 0),
        Target("every input its documented answer", f"{other} other problems", other == 0),
        Target(f"{options.examples} inputs", str(tally.cases),
               tally.cases >= options.examples),
    ]
    print_lines([
        f"sent {tally.cases} raw requests ({tally.batches} batches, {runs} Hypothesis runs), "
        f"{tally.cancels} cancels, {tally.valid} valid requests alongside in {elapsed:.0f}s "
        f"({tally.cases / elapsed:.1f} requests/s)",
        "body kinds: " + ", ".join(f"{k}={n}" for k, n in sorted(tally.defects.items())),
        *[f"  problem: {line[:300]}" for line in tally.problems[:10]],
        *format_targets(targets)], out)
    return {"scenario": "fuzz", "options": asdict(options), "inputs": tally.cases,
            "batches": tally.batches, "cancels": tally.cancels, "valid": tally.valid,
            "crashes": tally.crashes, "stalls": tally.stalls, "problems": tally.problems[:50],
            "problem_count": len(tally.problems), "elapsed_s": round(elapsed, 1),
            "rate_per_s": round(tally.cases / elapsed, 1), "body_kinds": dict(tally.defects),
            "targets": targets_report(targets)}
