"""``hutch bench scenario soak``: the two-minute soak of issue 21 against the real broker,
and the pure pieces its figures come from.

The soak asserts what does not depend on this machine's speed: every request has exactly
one terminal answer at the client (0 lost, 0 duplicated), worker-b was restarted both
ways, every process was sampled throughout, and nothing is left on the broker. Memory
growth is reported and only loosely bounded here (see the test); BENCHMARKS.md has the
real 30-minute run and its < 10% target.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from hutch_bench.cli import parse, run_scenario
from hutch_bench.scenarios.soak_figures import growth, outcomes, parse_duration, write_csv
from hutch_bench.scenarios.soak_traffic import SoakRecord
from tests.test_bench_scenarios import PNG, _leftovers

#: Growth a 2-minute run on a busy CI machine may show without it meaning a leak.
LOOSE_GROWTH = 0.50


@pytest.mark.slow
@pytest.mark.timeout(330)
async def test_two_minute_soak(amqp_url: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_AMQP_URL", amqp_url)
    out = io.StringIO()
    args = parse(["scenario", "soak", "--duration", "2m", "--restart-every", "25s",
                  "--sample-s", "2", "--json", str(tmp_path / "soak.json"),
                  "--csv", str(tmp_path / "soak.csv"), "--plot-dir", str(tmp_path / "plots")])
    report = await run_scenario(args, out=out)
    text = out.getvalue()
    print(text)  # the figures, in the CI log

    assert json.loads((tmp_path / "soak.json").read_text()) == report
    figures = report["outcomes"]
    # At 0.5x of ~32 req/s for 120 s: some 1,900 requests; a slow machine sends them all
    # anyway (open loop), so only a floor far below that.
    assert figures["requests"] > 500
    assert figures["lost"] == 0, figures["lost_examples"]
    assert figures["duplicated"] == 0, figures["duplicated_examples"]
    # A second final on the wire is documented after a kill -9 (the worker published the
    # answer and died before its ack: the request is redelivered and answered again); the
    # client drops it. So each one must be a request sent before a kill -9.
    assert "second finals dropped by the client" in text
    kills = [r["t_s"] for r in report["restarts"] if r["signal"] == "SIGKILL"]
    for kind, _, _, answers, sent_s, _ in figures["wire_duplicate_examples"]:
        assert kind not in ("http_whole", "http_stream") and answers >= 2
        assert any(sent_s <= t for t in kills), figures["wire_duplicate_examples"]
    assert report["missing_finals"] == 0
    left = figures["by_kind"].get("http_disconnect", {}).get("disconnected", 0)
    assert figures["answered_once"] + left + figures["wire_duplicates"] == figures["requests"]
    assert "unfinished" not in figures["by_outcome"]
    # Every kind of traffic ran, and the faults and cancels struck.
    assert set(figures["by_kind"]) == {"whole", "stream", "cancel", "disconnect",
                                       "http_whole", "http_stream", "http_disconnect"}
    assert figures["by_kind"]["cancel"].get("cancelled", 0) > 0
    assert report["backend_faults"]["failed"] > 0
    assert report["backend_faults"]["throttled"] > 0

    # Restarts at 25, 50, 75 and 100 s: SIGTERM and kill -9 in turn, each replaced.
    restarts = report["restarts"]
    assert [r["signal"] for r in restarts] == ["SIGTERM", "SIGKILL"] * 2
    assert [r["exit_code"] for r in restarts] == [0, -9] * 2
    assert len({r["new_pid"] for r in restarts}) == 4
    assert all(report["alive_at_end"].values())

    # Sampled every 2 s throughout: every process, the broker too.
    samples = report["soak_samples"]
    assert len(samples) >= 40
    assert max(s["t_s"] for s in samples) >= 118
    for sample in samples:
        assert sample["worker-a"]["rss_mib"] > 0 and sample["gateway"]["fds"] > 0
        assert sample["broker"]["mem_used_mib"] > 0
        assert sample["worker-a"]["amqp_connections"] >= 1
    assert {r["pid"] for r in (s["worker-a"] for s in samples)} == {
        samples[0]["worker-a"]["pid"]}
    rows = (tmp_path / "soak.csv").read_text().splitlines()
    assert len(rows) == len(samples) + 1 and "worker-a.rss_mib" in rows[0]
    assert (tmp_path / "plots" / "soak-resources.png").read_bytes().startswith(PNG)

    # Growth is reported for each process. Two minutes leave a 40 s warm-up and 20 s
    # windows; on a CI machine shared with other jobs an interpreter's allocator moves by
    # some percent over such a span without any leak, so only a loose bound here on the
    # worker and the gateway: the 10% target is the 30-minute run's (BENCHMARKS.md,
    # "Soak"). The broker's memory is the whole node's, which other vhosts, tests and
    # users share (one run here saw +41% from others' traffic in two minutes): it is
    # reported, not bounded.
    for name in ("worker-a rss_mib", "gateway rss_mib", "broker rss_mib",
                 "broker mem_used_mib", "broker our_queues_memory_mib"):
        assert f"  {name} " in text
    for name in ("worker-a rss_mib", "gateway rss_mib"):
        value = report["growth"][name]["growth"]
        assert value is not None and value < LOOSE_GROWTH, (name, report["growth"][name])
    assert report["growth"]["broker mem_used_mib"]["growth"] is not None
    assert _leftovers(amqp_url) == []


def test_durations_parse() -> None:
    assert parse_duration("30m") == 1800
    assert parse_duration("2m") == 120
    assert parse_duration("90s") == 90
    assert parse_duration("1h") == 3600
    assert parse_duration("45") == 45
    for bad in ("", "m", "-1m", "0", "ten"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _sample(t: float, rss: float) -> dict[str, object]:
    return {"t_s": t, "worker-a": {"rss_mib": rss, "fds": 10}}


def test_growth_compares_medians_after_warm_up() -> None:
    # 300 s: warm-up 100 s (ignored, even a spike), windows of 50 s.
    samples = [_sample(t, 500.0 if t < 100 else 100.0 + (t >= 250) * 20 + (t == 120) * 90)
               for t in range(0, 301, 2)]
    figures = growth(samples, 300)["worker-a rss_mib"]
    assert figures["first"] == 100 and figures["last"] == 120
    assert figures["growth"] == pytest.approx(0.20)
    assert figures["max"] == 500
    # A process restarted too late to fill a window has no growth, not a false one.
    late = growth(samples, 300, {"worker-a": 240})["worker-a rss_mib"]
    assert late["growth"] is None


def test_outcomes_count_lost_and_duplicated() -> None:
    records = [SoakRecord(0, "whole", 0, "ok", answers=1, delivered=1),
               SoakRecord(1, "whole", 0, "ok", answers=2, delivered=2),
               SoakRecord(5, "whole", 0, "ok", answers=2, delivered=1),
               SoakRecord(2, "cancel", 0, "cancelled", answers=0),
               SoakRecord(3, "http_disconnect", 0, "disconnected", answers=0),
               SoakRecord(4, "http_stream", 0, "lost", answers=0)]
    figures = outcomes(records)
    assert figures["lost"] == 2  # the cancel got no final; the HTTP stream no [DONE]
    assert figures["duplicated"] == 1  # the caller got two; the other's second was dropped
    assert figures["wire_duplicates"] == 2
    assert figures["answered_once"] == 1
    assert figures["by_kind"]["whole"] == {"ok": 3}


def test_samples_as_csv(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    write_csv([_sample(0, 10), {"t_s": 2, "broker": {"connections": 3, "ports": [1]}}], path)
    rows = path.read_text().splitlines()
    assert rows[0] == "t_s,broker.connections,worker-a.fds,worker-a.rss_mib"
    assert rows[1:] == ["0,,10,10", "2,3,,"]
    assert os.path.getsize(path) > 0
