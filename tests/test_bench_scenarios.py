"""``hutch bench scenario NAME``: a quick run of each scenario against the real broker
(processes, topology, figures, plots, cleanup), and the pure pieces they are built from.

Smoke runs: they check that every figure is produced and consistent and that nothing is
left behind, not how fast this machine is (BENCHMARKS.md has the real runs).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest

from pipeline.bench.cli import parse, run_scenario, scenario_options
from pipeline.bench.plots import plot_report
from pipeline.bench.report import RequestRecord, latency_series
from pipeline.bench.scenarios.common import utilisation
from pipeline.bench.scenarios.overload import OverloadOptions
from pipeline.settings import load_settings

PNG = b"\x89PNG\r\n\x1a\n"


def _leftovers(amqp_url: str) -> list[str]:
    """Queues and exchanges a scenario made (they all start with hutch-bench-)."""
    base, user, password = load_settings(amqp_url=amqp_url).management_api()
    vhost = quote(urlsplit(amqp_url).path.lstrip("/") or "/", safe="")
    with httpx.Client(auth=(user, password), timeout=10) as http:
        names = [q["name"] for kind in ("queues", "exchanges")
                 for q in http.get(f"{base}/api/{kind}/{vhost}").raise_for_status().json()]
        names += [p["name"] for p in http.get(f"{base}/api/policies/{vhost}").json()]
    return [n for n in names if n.startswith("hutch-bench-")]


async def _run(amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               name: str, *extra: str) -> tuple[dict[str, Any], str]:
    monkeypatch.setenv("HUTCH_AMQP_URL", amqp_url)
    out = io.StringIO()
    args = parse(["scenario", name, "--quick", "--json", str(tmp_path / "run.json"),
                  "--plot-dir", str(tmp_path / "plots"), *extra])
    report = await run_scenario(args, out=out)
    assert json.loads((tmp_path / "run.json").read_text()) == report
    assert report["quick"] is True and report["machine"]["cpus"] == os.cpu_count()
    assert all({"name", "measured", "met"} <= set(t) for t in report["targets"])
    assert _leftovers(amqp_url) == []
    return report, out.getvalue()


@pytest.mark.timeout(60)
async def test_overload_scenario(amqp_url: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    report, text = await _run(amqp_url, tmp_path, monkeypatch, "overload")
    high, low = report["classes"]["high"], report["classes"]["low"]
    assert high["sent"] > 0 and low["sent"] > 5 * high["sent"]
    assert high["answered"] == high["sent"]  # the backlog is low priority
    assert report["total"]["sent"] == pytest.approx(240 * 3, rel=0.15)  # Poisson arrivals
    backend = report["backend"]
    assert 1 <= backend["max_in_flight"] <= 8 and 0 < backend["utilisation"] <= 1.0
    assert backend["served"] >= report["total"]["answered"]
    assert {p["t_s"] for p in report["series"]["high"]} <= {0.0, 1.0, 2.0}
    assert sum(p["answered"] + p["errors"] for p in report["series"]["low"]) == low["sent"]
    assert (tmp_path / "plots" / "overload-latency.png").read_bytes().startswith(PNG)
    assert "targets:" in text and "high-priority p99" in text


@pytest.mark.timeout(60)
async def test_globalcap_scenario(amqp_url: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    report, _ = await _run(amqp_url, tmp_path, monkeypatch, "globalcap")
    assert report["processes_alive_at_end"] == 4  # 3 workers and the mock, none crashed
    assert report["total"]["answered"] == report["total"]["sent"] > 0
    assert 1 <= report["backend"]["max_in_flight"] <= 8
    assert report["backend"]["served"] == report["total"]["answered"]
    assert 0 < report["backend"]["utilisation"] <= 1.0


@pytest.mark.timeout(60)
async def test_backlog_scenario(amqp_url: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    report, text = await _run(amqp_url, tmp_path, monkeypatch, "backlog")
    assert report["answered"] == 300 and report["errors"] == {}
    assert report["drain_rps"] > 0 and report["publish_rps"] > 0
    rss = report["worker_rss_mib"]
    assert 20 < rss["peak"] == max(rss["high_water_mark"], rss["max_sampled"])
    assert report["samples"] and report["samples"][0]["queue_depth"] <= 300
    assert "drained 300 of 300" in text
    assert (tmp_path / "plots" / "backlog-drain.png").read_bytes().startswith(PNG)


@pytest.mark.timeout(90)
async def test_overhead_scenario(amqp_url: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    report, text = await _run(amqp_url, tmp_path, monkeypatch, "overhead")
    for name in ("direct", "baseline", "hutch"):
        light = report["light_load"][name]
        assert light["answered"] == 20 and light["errors"] == 0
        assert 0 < light["latency_ms"]["p50"] <= light["latency_ms"]["p99"]
        (row,) = report["sweep"][name]
        assert row["offered_rps"] == 40 and row["answered"] == 40
        assert report["max_sustained_rps"][name] == row["achieved_rps"]
    assert report["hutch_to_baseline"] == pytest.approx(
        report["max_sustained_rps"]["hutch"] / report["max_sustained_rps"]["baseline"])
    assert set(report["added_latency_ms"]) == {"p50", "p99"}
    assert (tmp_path / "plots" / "overhead-throughput.png").read_bytes().startswith(PNG)
    assert "max sustained throughput" in text


def test_options_come_from_defaults_quick_and_flags() -> None:
    assert scenario_options(parse(["scenario", "overload"])) == OverloadOptions()
    quick = scenario_options(parse(["scenario", "overload", "--quick", "--factor", "2"]))
    assert quick == OverloadOptions(duration_s=3, timeout_s=5, factor=2.0)
    rates = scenario_options(parse(["scenario", "overhead", "--rates", "10,20.5"])).rates
    assert rates == (10.0, 20.5)
    with pytest.raises(SystemExit):
        parse(["scenario", "overload", "--capacity", "0"])
    with pytest.raises(SystemExit):
        parse(["scenario", "nonesuch"])


def test_latency_series_groups_by_send_time() -> None:
    records = [RequestRecord(i, "high" if i % 2 else "low", 0, "m", i * 0.5) for i in range(6)]
    for r in records:
        r.sent_s = r.intended_s
        r.latency_s = 0.1 * (r.index + 1)
    records[4].error, records[4].latency_s = "deadline_exceeded", None
    series = latency_series(records, ["high", "low"], window_s=1.0)
    assert [(p["t_s"], p["answered"], p["errors"]) for p in series["low"]] == [
        (0.0, 1, 0), (1.0, 1, 0), (2.0, 0, 1)]
    assert series["low"][2]["p50"] is None
    assert [p["p99"] for p in series["high"]] == pytest.approx([200.0, 400.0, 600.0])


def test_utilisation_is_busy_over_available_slot_seconds() -> None:
    before = {"elapsed_s": 1.0, "busy_slot_s": 2.0, "capacity": 8}
    after = {"elapsed_s": 3.0, "busy_slot_s": 17.2, "capacity": 8}
    assert utilisation(before, after) == pytest.approx(0.95)
    assert utilisation(after, after) == 0.0


def test_plots_are_drawn_from_a_saved_report(tmp_path: Path) -> None:
    report = {"scenario": "x", "series": {"high": [
        {"t_s": 0.0, "p50": 100.0, "p95": 120.0, "p99": 130.0},
        {"t_s": 1.0, "p50": None, "p95": None, "p99": None}]},
        "sweep": {"hutch": [{"offered_rps": 100, "achieved_rps": 99.0}],
                  "direct": [{"offered_rps": 100, "achieved_rps": 100.0,
                              "latency_ms": {"p50": 1.0, "p99": 2.0}}]}}
    written = plot_report(report, tmp_path)
    assert [p.name for p in written] == ["x-latency.png", "x-throughput.png"]
    assert all(p.read_bytes().startswith(PNG) for p in written)
    assert plot_report({"scenario": "y"}, tmp_path) == []
