"""``hutch bench``: schedules, priority mixes and percentiles as pure functions, and one
short open-loop run against the real broker with an embedded mock and worker."""

from __future__ import annotations

import io
import itertools
import json
import statistics
from pathlib import Path

import pytest

from hutch_bench.cli import parse, run_bench
from hutch_bench.loadgen import PriorityClass, assign_classes, parse_priority_mix, schedule
from hutch_bench.report import percentile
from pipeline.errors import ConfigError


def test_constant_schedule_is_evenly_spaced() -> None:
    times = schedule(50, 2, arrival="constant")
    assert len(times) == 100
    assert times[0] == 0
    assert all(b - a == pytest.approx(0.02) for a, b in itertools.pairwise(times))
    assert times[-1] < 2


def test_poisson_schedule_has_the_mean_rate_and_repeats_with_its_seed() -> None:
    times = schedule(200, 50, arrival="poisson", seed=7)
    assert len(times) == pytest.approx(200 * 50, rel=0.03)  # sd of the count ~1%
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.mean(gaps) == pytest.approx(1 / 200, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 200, rel=0.05)  # exponential: sd=mean
    assert times == sorted(times) and 0 < times[0] and times[-1] < 50
    assert schedule(200, 50, arrival="poisson", seed=7) == times
    assert schedule(200, 50, arrival="poisson", seed=8) != times


@pytest.mark.parametrize(("rate", "duration", "arrival", "message"), [
    (0, 1, "constant", "rate"), (10, -1, "constant", "duration"),
    (10, 1, "bursty", "arrival"),
])
def test_schedule_rejects_bad_arguments(rate: float, duration: float, arrival: str,
                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        schedule(rate, duration, arrival=arrival)


def test_priority_mix_named_and_explicit_classes() -> None:
    assert parse_priority_mix("high=0.1,low=0.9") == [
        PriorityClass("high", 9, 0.1), PriorityClass("low", 0, 0.9)]
    assert parse_priority_mix(" urgent:9=0.1 , bulk:0=0.6, medium=0.3") == [
        PriorityClass("urgent", 9, 0.1), PriorityClass("bulk", 0, 0.6),
        PriorityClass("medium", 5, 0.3)]
    assert parse_priority_mix("low=1") == [PriorityClass("low", 0, 1.0)]


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty entry"),
    ("high=0.1,,low=0.9", "empty entry"),
    ("high", "'high': expected NAME=SHARE"),
    ("urgent=1", "unknown class 'urgent' without a priority"),
    ("urgent:x=1", "priority 'x' is not an integer"),
    ("urgent:300=1", "priority 300 is not in 0..255"),
    ("high=abc,low=0.9", "share 'abc' is not a number"),
    ("high=0,low=1", "'high=0': share must be positive"),
    ("high=0.5,high=0.5", "class 'high' given twice"),
    ("high=0.2,low=0.9", "shares add up to 1.1, not 1"),
])
def test_priority_mix_errors_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_priority_mix(text)


def test_assign_classes_gives_exact_shares_in_seeded_order() -> None:
    classes = parse_priority_mix("high=0.1,medium=0.25,low=0.65")
    assigned = assign_classes(101, classes, seed=3)
    counts = {c.name: sum(1 for a in assigned if a is c) for c in classes}
    assert counts == {"high": 10, "medium": 25, "low": 66}
    assert assign_classes(101, classes, seed=3) == assigned
    assert assigned[:20] != sorted(assigned[:20], key=lambda c: c.name)  # interleaved


def test_percentile_is_exact_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.0
    assert percentile([1.0, 2.0], 51) == 2.0
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="must be in"):
        percentile([1.0], 0)


@pytest.mark.timeout(30)
async def test_embedded_bench_answers_everything(amqp_url: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_AMQP_URL", amqp_url)
    out_file = tmp_path / "bench.json"
    args = parse(["--embedded", "--rate", "50", "--duration", "2", "--arrival", "constant",
                  "--mock-capacity", "8", "--mock-latency-ms", "10", "--connections", "2",
                  "--models", "mock-small,mock-large", "--priority-mix", "high=0.2,low=0.8",
                  "--timeout", "20", "--no-progress", "--json", str(out_file)])
    out = io.StringIO()
    report = await run_bench(args, out=out)

    total, classes = report["total"], report["classes"]
    assert total["sent"] == total["answered"] == 100
    assert total["errors"] == {} and total["error_count"] == 0
    assert classes["high"]["sent"] == 20 and classes["low"]["sent"] == 80
    assert sum(c["answered"] for c in classes.values()) == total["answered"]
    for figures in (*classes.values(), total):
        assert figures["throughput_rps"] > 0
        for key in ("p50", "p95", "p99", "max"):
            assert figures["latency_ms"][key] > 0
            assert figures["queue_wait_ms"][key] is not None
        assert figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"] \
            <= figures["latency_ms"]["max"]
    assert json.loads(out_file.read_text()) == report
    assert report["config"]["rate"] == 50 and report["config"]["connections"] == 2
    table = out.getvalue()
    assert "high" in table and "low" in table and "all" in table
