"""The Prometheus alerting rules of deploy/prometheus/alerts.yml, checked with promtool.

* ``promtool check rules`` accepts them and ``promtool test rules`` passes their unit tests
  (deploy/prometheus/alerts.test.yml); ``promtool check config`` accepts
  deploy/prometheus.yml with the rule files where the compose stack mounts them. A missing
  promtool fails with how to install it: never a silent skip.
* Every metric a rule uses exists, with the labels the rule uses: the worker's registry,
  the RabbitMQ allow-list of tests/test_metrics.py (from a scrape job that provides it),
  ``up`` of a scrape job that exists.
* Every alert has a unit test that fires it and one where it stays silent, a severity, a
  summary, a description and a runbook entry in the docs, a heading of a page of
  docs/operations/ that its ``runbook_url`` links to (and the runbook no entry for an alert
  that does not exist).
* The queue regexes pick exactly the work (or pause) queues of deploy/hutch.toml's prefix.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.broker.names import Names
from pipeline.gateway.metrics import GatewayMetrics
from pipeline.observe.metrics import Metrics
from pipeline.settings import Settings, load_settings
from tests.test_compose import _rule_files
from tests.test_docs import resolve_runbook
from tests.test_metrics import (
    PROMETHEUS_BUILTINS,
    RABBITMQ_METRICS,
    TARGET_LABELS,
    _labels_of,
    parse_promql,
)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
OPERATIONS = ROOT / "docs" / "operations"
#: The oldest promtool the rules are written for: Debian bookworm's `prometheus` package.
MIN_PROMTOOL = (2, 42)
SEVERITIES = {"warning", "critical"}
INSTALL_HINT = (
    "promtool is not installed. It comes with Debian's `prometheus` package: "
    "`apt-get update && apt-get install -y --no-install-recommends prometheus` "
    "(.ci/run installs it when it is missing), or put the `promtool` binary of a Prometheus "
    "release (https://prometheus.io/download/) on the PATH")

#: label_replace(v, "dst", "replacement", "src", "regex"): the label it adds.
_LABEL_REPLACE = re.compile(r'label_replace\s*\(.*?,\s*"(\w+)"\s*,\s*"[^"]*"\s*,\s*"\w+"\s*,'
                            r'\s*"(?:[^"\\]|\\.)*"\s*\)', re.S)
_QUEUE_REGEX = re.compile(r'queue\s*=~\s*"((?:[^"\\]|\\.)*)"')
#: The regex label_replace applies to the queue label (its capture group: the pool).
_QUEUE_CAPTURE = re.compile(r'"queue"\s*,\s*"((?:[^"\\]|\\.)*)"')
_JOB = re.compile(r'\bjob\s*=\s*"([^"]*)"')


# -- helpers ---------------------------------------------------------------------------------


def _alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    rules = [rule for group in data["groups"] for rule in group["rules"]]
    assert rules and all("alert" in rule for rule in rules), "alerts.yml holds only alerts"
    return rules


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(INSTALL_HINT)
    return path


def _run(*args: str) -> str:
    """Run promtool; fail with its output unless it succeeds."""
    result = subprocess.run([_promtool(), *args], capture_output=True, text=True,
                            timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def _runbook() -> dict[str, str]:
    """Alert heading (`` `HutchX` ``) -> its text, from the pages of docs/operations/."""
    entries: dict[str, str] = {}
    for page in sorted(OPERATIONS.rglob("*.md")):
        parts = re.split(r"^#{2,4} (`Hutch\w+`)\s*$", page.read_text(), flags=re.M)
        for heading, body in zip(parts[1::2], parts[2::2], strict=True):
            assert heading not in entries, f"two runbook entries for {heading}"
            entries[heading] = re.split(r"^#{1,4} ", body, flags=re.M)[0].strip()
    return entries


def _deploy_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("HUTCH_"):
            monkeypatch.delenv(key)
    return load_settings(ROOT / "deploy" / "hutch.toml")


def _promql_unquote(value: str) -> str:
    """The regex a double-quoted PromQL string holds (only backslash escapes used here)."""
    return re.sub(r"\\(.)", r"\1", value)


# -- promtool --------------------------------------------------------------------------------


def test_promtool_is_recent_enough() -> None:
    output = _run("--version")
    match = re.search(r"version (\d+)\.(\d+)", output)
    assert match, f"cannot read promtool's version from: {output}"
    version = (int(match.group(1)), int(match.group(2)))
    assert version >= MIN_PROMTOOL, f"promtool {version} is older than {MIN_PROMTOOL}"


def test_promtool_checks_the_rules() -> None:
    output = _run("check", "rules", str(RULES))
    assert f"SUCCESS: {len(_alerts())} rules found" in output, output


def test_promtool_unit_tests_pass() -> None:
    output = _run("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in output, output


def test_promtool_checks_the_compose_prometheus_config(tmp_path: Path) -> None:
    """deploy/prometheus.yml as the compose Prometheus reads it: its rule files resolved
    through the container's bind mounts to the files of this repository."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    files = _rule_files(yaml.safe_load(COMPOSE.read_text())["services"])
    assert None not in files.values(), f"rule files not mounted into prometheus: {files}"
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump({**config, "rule_files": [str(f) for f in files.values()]}))
    output = _run("check", "config", str(copy))
    assert "SUCCESS" in output and str(RULES) in output, output


# -- the rules -------------------------------------------------------------------------------


def test_rules_use_only_metrics_and_labels_that_exist() -> None:
    metrics = Metrics()
    exported = metrics.names() | GatewayMetrics().names()
    for rule in _alerts():
        expr = rule["expr"]
        query = parse_promql(expr)
        for name in query.names:
            known = (name in exported if name.startswith("hutch_")
                     else name in RABBITMQ_METRICS or name in PROMETHEUS_BUILTINS)
            assert known, f"{rule['alert']}: nobody exports {name}"
        for name, labels in query.matchers.items():
            assert labels <= _labels_of(name, metrics) | TARGET_LABELS, (rule["alert"], name)
        available = TARGET_LABELS | set(_LABEL_REPLACE.findall(expr))
        for name in query.names:
            available |= _labels_of(name, metrics)
        assert query.grouping <= available, (rule["alert"], query.grouping - available)


def test_rules_query_rabbitmq_and_up_from_the_scrape_jobs() -> None:
    jobs = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    for rule in _alerts():
        query = parse_promql(rule["expr"])
        for name in query.names & set(RABBITMQ_METRICS):
            path, family, _labels = RABBITMQ_METRICS[name]
            assert any(job.get("metrics_path", "/metrics") == path
                       and (family is None or family in job.get("params", {}).get("family", []))
                       for job in jobs), f"{rule['alert']}: no scrape job provides {name}"
        for job in _JOB.findall(rule["expr"]):
            assert job in {j["job_name"] for j in jobs}, f"{rule['alert']}: no job {job}"


def test_queue_regexes_pick_the_pools_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _deploy_settings(monkeypatch)
    names = Names(settings.prefix)
    pools = [pool.name for pool in settings.pools]
    kinds = {"work": [names.work_queue(pool) for pool in pools],
             "paused": [names.pause_queue(pool) for pool in pools]}
    others = [names.triage_queue, names.parked_queue, names.workers_queue,
              names.retry_queue(1000), names.reply_queue("app"), names.lease_queue("b1"),
              names.cancel_queue("w1")]
    regexes = {_promql_unquote(regex) for rule in _alerts()
               for pattern in (_QUEUE_REGEX, _QUEUE_CAPTURE)
               for regex in pattern.findall(rule["expr"])}
    assert regexes, "no rule selects queues"
    for regex in regexes:
        matching = [kind for kind, queues in kinds.items()
                    if all(re.fullmatch(regex, queue) for queue in queues)]
        assert len(matching) == 1, f"{regex!r} must match all work or all pause queues"
        other = [q for kind, queues in kinds.items() if kind != matching[0] for q in queues]
        assert not [q for q in others + other if re.fullmatch(regex, q)], regex
        for pool, queue in zip(pools, kinds[matching[0]], strict=True):
            found = re.fullmatch(regex, queue)
            assert found is not None and (not found.groups() or found.group(1) == pool), regex


def test_every_alert_is_labelled_and_described() -> None:
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in _alerts():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        page, anchor = resolve_runbook(annotations["runbook_url"])
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert f"`{rule['alert']}`" in _runbook(), f"{page.name} is not its runbook entry"


def test_every_alert_has_tests_that_fire_it_and_keep_it_silent() -> None:
    data = yaml.safe_load(RULE_TESTS.read_text())
    assert data["rule_files"] == [RULES.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for group in data["tests"]:
        for case in group.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {rule["alert"] for rule in _alerts()}
    assert fired == alerts, f"no test fires {alerts - fired}; unknown: {fired - alerts}"
    assert silent == alerts, f"no test keeps {alerts - silent} silent; unknown: {silent - alerts}"


def test_the_docs_have_a_runbook_entry_per_alert() -> None:
    runbook = _runbook()
    alerts = {f"`{rule['alert']}`": rule for rule in _alerts()}
    assert set(runbook) == set(alerts), (
        f"missing runbook entries: {set(alerts) - set(runbook)}; "
        f"entries for no alert: {set(runbook) - set(alerts)}")
    for heading, body in runbook.items():
        assert "What to do" in " ".join(body.split()) and len(body) > 200, (
            f"{heading}: say what it means and what to do")
        assert alerts[heading]["labels"]["severity"] in body, f"{heading}: give its severity"
