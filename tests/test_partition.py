"""A network partition on a three-node cluster of the test's own: nothing lost, nothing
answered twice, and RabbitMQ really saw the partition (issue 21).

``hutch bench scenario partition --quick`` on RabbitMQ nodes the scenario starts itself
(hutch_bench/cluster_nodes.py; never the suite's broker): a quorum pool whose backend's
lease is held by a worker on the node that gets cut off, another worker and the client on
the majority side, a backlog; the partition (Erlang distribution cut both ways,
hutch_bench/scenarios/partition_net.py) under ``pause_minority``, then under ``ignore``.
The figures (peak concurrency, how long above the cap) are the benchmark's: here only
outcomes are checked. About two minutes.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from hutch_bench.cli import parse, run_scenario
from hutch_bench.cluster_nodes import NODES_DIR
from hutch_bench.scenarios.partition import PartitionOptions
from hutch_bench.scenarios.partition_watch import Phase, Sample, phase_figures
from pipeline.errors import ConfigError


def _case(report: dict[str, Any], mode: str) -> dict[str, Any]:
    (case,) = [c for c in report["cases"] if c["mode"] == mode]
    found: dict[str, Any] = case
    return found


def _answered_once(case: dict[str, Any]) -> None:
    """Every request got its one answer. A second answer can reach the client (the old
    lease holder's, for a request the backend served twice after its redelivery): the
    client drops it, so the caller sees one; a duplicate of any other origin fails."""
    assert case["sent"] > 0
    assert case["answered"] == case["sent"], case["errors"]
    assert case["errors"] == {}
    assert case["duplicate_replies_dropped"] <= case["served_twice"]


@pytest.mark.slow  # three RabbitMQ nodes of its own, two partitions
@pytest.mark.timeout(360)
async def test_partition_pause_minority_and_ignore(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")  # not used
    out = io.StringIO()
    args = parse(["scenario", "partition", "--quick", "--json", str(tmp_path / "run.json")])
    report = await run_scenario(args, out=out)
    assert json.loads((tmp_path / "run.json").read_text()) == report
    assert [(c["queue_type"], c["mode"]) for c in report["cases"]] == [
        ("quorum", "pause_minority"), ("quorum", "ignore")]
    cap = report["config"]["cap"]

    paused = _case(report, "pause_minority")
    _answered_once(paused)
    fault = paused["fault"]
    # The isolated node's RabbitMQ stopped (paused) in the partition and ran again after.
    assert fault["partitioned_s"] < fault["paused_seen_s"] < fault["healed_s"]
    assert fault["resumed_s"] > fault["healed_s"]
    # The majority side granted the lease again: worker B took it during the partition.
    assert paused["leases_taken"]["worker_b_on_majority"] >= 1
    # Once healed, the returning worker waits for the lease: the cap holds.
    (healed,) = [p for p in paused["phases"] if p["phase"] == "healed"]
    assert healed["max_sampled"] <= cap

    ignored = _case(report, "ignore")
    _answered_once(ignored)
    fault = ignored["fault"]
    # Nobody paused; after the heal each side records the partition with the other.
    assert fault["paused_seen_s"] is None
    nodes = report_nodes(out.getvalue())
    assert fault["partitions"]["majority"] == [nodes[2]]
    assert sorted(fault["partitions"]["minority"]) == sorted(nodes[:2])
    assert ignored["leases_taken"]["worker_b_on_majority"] >= 1
    assert fault["repaired_s"] > fault["repair_started_s"] > fault["healed_s"]

    assert [t["met"] for t in report["targets"]] == [True] * 4
    assert list(NODES_DIR.glob(f"hutch-b{os.getpid()}-*")) == []  # the nodes are gone


def report_nodes(text: str) -> list[str]:
    """The cluster's node names, from the scenario's "nodes up" line."""
    line = next(line for line in text.splitlines() if "nodes up:" in line)
    return [name.strip() for name in line.split(",")[1:]]


def test_phase_figures_time_above_the_cap() -> None:
    samples = [Sample(t / 10, n) for t, n in enumerate([2, 2, 4, 4, 3, 1, 2, 2])]
    before, during = phase_figures(samples, [Phase("before", 0, 0.2), Phase("p", 0.2, 1)],
                                   cap=2)
    assert before == {"phase": "before", "from_s": 0, "to_s": 0.2, "max_sampled": 2,
                      "over_cap_s": 0, "below_cap_s": 0, "first_over_cap_s": None,
                      "last_over_cap_s": None}
    assert during["max_sampled"] == 4
    assert during["over_cap_s"] == pytest.approx(0.3)  # 0.2-0.5 s: 4, 4, 3
    assert during["below_cap_s"] == pytest.approx(0.1)  # 0.5-0.6 s: 1
    assert (during["first_over_cap_s"], during["last_over_cap_s"]) == (0.2, 0.4)


def test_partition_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="--modes"):
        PartitionOptions(modes="pause_majority")
    with pytest.raises(ConfigError, match="--queue-types"):
        PartitionOptions(queue_types="")
    assert PartitionOptions(modes="ignore, autoheal").mode_list == ["ignore", "autoheal"]
