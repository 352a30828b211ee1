"""The fairness scenario's arithmetic (no broker): service as it happens, backlogged
windows, Jain's index, the largest gap, and the short-request utilisation window."""

from __future__ import annotations

import pytest

from hutch_bench.scenarios.fairness import FairnessOptions, phases
from hutch_bench.scenarios.fairness_report import short_utilisation
from hutch_bench.scenarios.fairshare import (
    Grid,
    backlogged,
    jain,
    longest_idle,
    service_curve,
    shares,
)
from hutch_bench.scenarios.fairstack import BackendSample, utilisation_between
from hutch_bench.scenarios.tenantload import TenantLoad, TenantRecord, prompt_text


def served(tenant: str, sent: float, start: float, done: float, prompt: int = 10,
           completion: int = 5) -> TenantRecord:
    return TenantRecord(tenant, sent, prompt, completion, 0, sent_s=sent, start_s=start,
                        done_s=done)


def test_service_counts_the_prompt_at_start_and_the_answer_as_it_streams() -> None:
    grid = Grid(0.0, 0.5, 6)  # 0, 0.5, ..., 2.5
    curve = service_curve([served("a", 0.0, 1.0, 2.0)], grid)
    # cost 10 + 2 x 5 = 20: nothing before 1.0, the prompt at 1.0, half the answer at 1.5
    assert curve == pytest.approx([0, 0, 10, 15, 20, 20])
    failed = TenantRecord("a", 0.0, 10, 5, 0, sent_s=0.0, done_s=1.0, error="x")
    assert service_curve([failed], grid) == [0.0] * 6


def test_a_tenant_is_backlogged_while_a_request_waits() -> None:
    grid = Grid(0.0, 0.5, 6)
    records = [served("a", 0.0, 1.0, 2.0),
               TenantRecord("a", 1.5, 1, 1, 0, sent_s=1.5, done_s=2.0, error="expired")]
    assert backlogged(records, grid) == [True, True, False, True, False, False]


def test_jain_and_longest_idle() -> None:
    assert jain([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain([1.0, 0.0]) == pytest.approx(0.5)
    assert jain([]) is None
    records = [served("a", 0, s, s + 0.1) for s in (1.0, 1.5, 4.0)]
    assert longest_idle(records, 0.0, 5.0) == pytest.approx(2.5)


def test_shares_between_backlogged_tenants_normalise_by_weight() -> None:
    # Both backlogged from 0 to 10 s (a request each waiting throughout); gold is served
    # two requests for each of bronze's: equal service per unit of weight.
    records = [served("gold", 0.0, 10.0, 10.5), served("bronze", 0.0, 10.0, 10.5)]
    for i in range(10):
        records.append(served("gold", 0.0, i, i + 0.25))
        records.append(served("gold", 0.0, i + 0.5, i + 0.75))
        records.append(served("bronze", 0.0, i, i + 0.5))
    got = shares(records, {"gold": 2.0, "bronze": 1.0}, Grid.covering(11.0))
    assert got.window_s is not None and got.window_s[1] - got.window_s[0] >= 9.5
    assert got.ratio("gold", "bronze") == pytest.approx(2.0, rel=0.06)
    assert got.jain == pytest.approx(1.0, abs=0.01)
    assert got.bound == 40  # 2 x the largest request's cost (10 + 2 x 5)
    assert 0 < got.max_gap <= got.bound
    nobody = shares(records, {"gold": 2.0, "nobody": 1.0}, Grid.covering(11.0))
    assert nobody.window_s is None and nobody.jain is None


def test_utilisation_windows() -> None:
    samples = [BackendSample(t, busy_slot_s=4 * t * 0.9, elapsed_s=t, served=int(100 * t),
                             capacity=4) for t in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert utilisation_between(samples, 1.0, 3.0) == pytest.approx(0.9)
    assert utilisation_between(samples[:1], 0.0, 1.0) is None
    assert short_utilisation(samples, 400) == pytest.approx(0.9)  # from 1 s to 3 s
    assert short_utilisation(samples, 10_000) is None


def test_loads_and_phases() -> None:
    load = TenantLoad("a", rate=50, start_s=1.0, stop_s=3.0, burst=5)
    times = load.times(10.0, seed=1)
    assert times[:5] == [1.0] * 5 and all(1.0 < t < 3.0 for t in times[5:])
    assert 60 <= len(times) - 5 <= 140 and times == load.times(10.0, seed=1)
    assert len(prompt_text(7, 64).encode()) // 4 == 64 - 1  # the scheduler's estimate
    assert len(prompt_text(7, 64).split()) == 64  # what the mock counts
    options = FairnessOptions()
    assert options.service_ms == pytest.approx(350.0)
    assert [p.name for p in phases(options)] == [
        "noisy", "weights", "saturate", "light", "kill", "short"]
