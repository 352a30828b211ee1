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

from hutch_bench.cli import parse, run_scenario, scenario_options
from hutch_bench.cluster_nodes import NODES_DIR
from hutch_bench.plots import plot_report
from hutch_bench.report import RequestRecord, latency_series
from hutch_bench.scenarios.cluster import answer_timeline, failover_times, layout
from hutch_bench.scenarios.common import utilisation
from hutch_bench.scenarios.overload import OverloadOptions
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


@pytest.mark.timeout(120)
async def test_streaming_scenario(amqp_url: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    report, text = await _run(amqp_url, tmp_path, monkeypatch, "streaming")
    for name in ("direct", "relay", "hutch"):
        light = report["light_load"][name]
        assert light["completed"] == light["streams"] == 10 and light["errors"] == {}
        assert 0 < light["ttft_ms"]["p50"] <= light["ttft_ms"]["p99"]
        rows = report["stream_sweep"][name]
        assert [r["concurrency"] for r in rows][:1] == [4]
        assert all(r["tokens"] == 20 * r["completed"] for r in rows if not r["errors"])
        brokered = name != "direct"
        assert all((r["messages_per_s"] is not None) == brokered for r in rows)
        assert all((r["worker_cpu_ms_per_1k_tokens"] or 1) > 0 for r in rows)
    # Chunk messages are coalesced: never more than one per token (plus the role chunk).
    for row in report["stream_sweep"]["hutch"]:
        assert 0 < row["messages_per_s"] <= row["tokens_per_s"] * 1.1 + 5
    assert set(report["added_ttft_ms"]) == {"p50", "p99"}
    for name in ("direct", "hutch"):
        cancel = report["cancel"][name]
        assert cancel["cancelled"] == cancel["seen_by_backend"] == 6
        assert 0 < cancel["latency_ms"]["p50"] < 5000
    assert len(report["targets"]) == 4
    assert (tmp_path / "plots" / "streaming-streams.png").read_bytes().startswith(PNG)
    assert "max sustained: hutch" in text and "cancel -> backend abort" in text


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
    streaming = scenario_options(parse(["scenario", "streaming", "--concurrency", "5,10"]))
    assert streaming.steps == [5, 10] and streaming.window_ms == 25


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


@pytest.mark.slow  # starts four RabbitMQ nodes of its own (about a minute)
@pytest.mark.timeout(420)
async def test_cluster_scenario(amqp_url: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    report, text = await _run(amqp_url, tmp_path, monkeypatch, "cluster")
    for name in ("classic", "quorum"):
        light = report["light_load"][name]
        assert light["answered"] == 20 and light["errors"] == 0
        (row,) = report["sweep"][name]
        assert row["offered_rps"] == 40 and row["answered"] == 40
        assert report["max_sustained_rps"][name] == row["achieved_rps"]
    best = report["max_sustained_rps"]
    assert report["quorum_to_classic"] == pytest.approx(best["quorum"] / best["classic"])
    failover = report["failover"]
    assert failover["answered"] == failover["sent"] > 0 and failover["errors"] == {}
    assert failover["new_leader"] != failover["killed_node"]
    assert 1.5 <= failover["killed_at_s"] < 2.5
    assert 0 < failover["next_answer_ms"] <= failover["longest_gap_ms"]
    assert failover["first_new_answer_ms"] >= failover["next_answer_ms"]
    assert failover["parked"] == 0 and max(failover["max_in_flight"]) <= 32
    assert [t["met"] for t in report["targets"]] == [True] * 4
    assert (tmp_path / "plots" / "cluster-throughput.png").read_bytes().startswith(PNG)
    assert (tmp_path / "plots" / "cluster-failover.png").read_bytes().startswith(PNG)
    assert "throughput quorum/classic" in text and "next answer" in text
    assert list(NODES_DIR.glob(f"hutch-b{os.getpid()}-*")) == []  # the nodes are gone


def test_cluster_layout_puts_worker_1_on_the_leader() -> None:
    workers, client = layout(leader=1, size=3, workers=2)
    assert workers == [[1, 0, 2], [0, 2, 1]] and client == [2, 1, 0]
    assert layout(0, 1, 2) == ([[0], [0]], [0])


def test_failover_times_from_the_kill() -> None:
    def record(index: int, sent: float, done: float | None) -> RequestRecord:
        r = RequestRecord(index, "normal", 5, "m", sent, sent_s=sent, done_s=done)
        r.latency_s = None if done is None else done - sent
        r.error = "deadline_exceeded" if done is None else None
        return r

    records = [record(0, 0.0, 0.1), record(1, 0.5, 1.2), record(2, 0.9, 3.0),
               record(3, 1.1, 2.5), record(4, 1.5, None), record(5, 2.0, 2.2)]
    times = failover_times(records, killed_s=1.0)
    assert times["next_answer_ms"] == pytest.approx(200)
    assert times["first_new_answer_ms"] == pytest.approx(1200)  # request 5, sent at 2.0
    assert times["longest_gap_ms"] == pytest.approx(1000)  # 1.2 -> 2.2
    timeline = answer_timeline(records, window_s=1.0)
    assert [p["answers_per_s"] for p in timeline] == [1.0, 1.0, 2.0, 1.0]
    assert timeline[2]["max_ms"] == pytest.approx(1400)
    assert failover_times(records[:1], 1.0)["next_answer_ms"] is None


@pytest.mark.timeout(150)
async def test_gateway_scenario_without_litellm(amqp_url: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM's proxy is not found (a PATH without it): the scenario says how to install
    it and measures the mock directly and the gateway (its smoke run: issue 12)."""
    monkeypatch.delenv("HUTCH_LITELLM_BIN", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    report, text = await _run(amqp_url, tmp_path, monkeypatch, "gateway")
    assert report["systems"] == ["direct", "gateway"]
    for name in ("direct", "gateway"):
        light = report["light_load"][name]
        assert light["answered"] == 20 and light["errors"] == 0
        assert 0 < light["latency_ms"]["p50"] <= light["latency_ms"]["p99"]
        (row,) = report["sweep"][name]
        assert row["offered_rps"] == 40 and row["answered"] == 40
    assert set(report["added_latency_ms"]["gateway"]) == {"p50", "p99"}
    assert report["gateway_to_litellm"] is None
    overload = report["overload"]
    assert overload["classes"]["high"]["sent"] > 0
    assert overload["backend"]["max_in_flight"] <= 8
    assert {t["name"]: t["met"] for t in report["targets"]}[
        "gateway throughput >= 3x LiteLLM's proxy"] is False
    assert "LiteLLM's proxy was not found" in text and "pip install" in text
    for plot in ("gateway-throughput.png", "gateway-latency.png"):
        assert (tmp_path / "plots" / plot).read_bytes().startswith(PNG)


def test_gateway_scenario_finds_litellm(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    from hutch_bench.scenarios.litellm import find_litellm
    from pipeline.errors import StackError

    fake = tmp_path / "litellm"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("HUTCH_LITELLM_BIN", raising=False)
    assert find_litellm() is None
    monkeypatch.setenv("HUTCH_LITELLM_BIN", str(fake))
    assert find_litellm() == str(fake)
    assert find_litellm(str(fake)) == str(fake)
    with pytest.raises(StackError, match="not an executable"):
        find_litellm(str(tmp_path / "nonesuch"))


@pytest.mark.timeout(420)
async def test_fairness_scenario(amqp_url: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every phase runs under both policies and yields its figures (twelve small stacks:
    the slowest smoke run); the shares themselves are tested in test_fairness.py."""
    report, text = await _run(amqp_url, tmp_path, monkeypatch, "fairness")
    figures = report["figures"]
    assert set(figures) == {"noisy", "weights", "saturate", "light", "kill", "short"}
    assert all(set(by_policy) == {"fair", "fifo"} for by_policy in figures.values())
    for policy in ("fair", "fifo"):
        noisy = figures["noisy"][policy]
        assert noisy["quiet_sent"] > 0 and noisy["lost"] == 0
        assert figures["light"][policy]["answered"] == figures["light"][policy]["sent"] > 0
        kill = figures["kill"][policy]
        assert kill["answered"] == kill["sent"] > 0 and kill["lost"] == 0
        short = figures["short"][policy]
        assert short["answered"] == short["sent"] == 300
        assert 0 < short["utilisation"] <= 1.0
        assert figures["weights"][policy]["chat_sent"] > 0
    series = report["service"]["noisy"]["fair"]
    assert set(series["tenants"]) == {"noisy", "quiet-a", "quiet-b", "late"}
    assert all(len(v) == len(series["t_s"]) for v in series["tenants"].values())
    assert len(report["targets"]) == 14
    assert (tmp_path / "plots" / "fairness-service.png").read_bytes().startswith(PNG)
    assert "(a) quiet tenants: queue wait p99" in text and "targets (fair policy):" in text


@pytest.mark.timeout(180)
async def test_capacity_scenario(amqp_url: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    report, text = await _run(amqp_url, tmp_path, monkeypatch, "capacity")
    assert [m["label"] for m in report["fixed"]] == ["fixed 4", "fixed 12"]
    assert all(m["sent"] > 0 and m["steady_rps"] > 0 for m in report["fixed"])
    # The adaptive run read its limit from the worker's /metrics, and it moved.
    limits = [value for _, value in report["adaptive"]["limits"]]
    assert limits and len(set(limits)) > 1 and max(limits) <= 64
    halving = report["halving"]
    assert halving["halved_to"] == 6 and halving["measured"]["limits"]
    assert halving["measured"]["errors"] == {}  # no deadline in reach: nothing may fail
    two = report["two_speeds"]
    assert two["both"]["steady_rps"] > 0 and min(two["served"]) > 0  # both backends served
    assert "targets:" in text and "two backends 2:1" in text
    waits = report["waits"]  # every request asked for its status; under overload, told
    assert set(waits) == {"waits, one tenant", "waits, tenants 6:3:1"}
    assert all(w["requests"] > 0 and w["told"] > 0 for w in waits.values())
    assert "wait estimates: median error" in text
