"""The worker's metrics, the docs page that documents them, and the Grafana dashboard.

* Every metric the dashboard queries must exist: a ``hutch_*`` name in the worker's
  registry (histogram ``_bucket``/``_sum``/``_count`` and counter ``_total`` names
  included), a ``rabbitmq_*`` name in the small allow-list below (each with the scrape job
  of deploy/prometheus.yml that provides it), or Prometheus' own ``up``. Labels used in
  selectors and ``by (...)`` must be labels of those metrics.
* The dashboard shows every worker metric, and the metrics page's table lists each one
  with its type and labels.
* Every rate window is ``$__rate_interval``; the queue panels match only their queues
  (work queues: no cancel queue, no parking lot), whatever the prefix.
* The label helpers keep label sets bounded; the retry reasons follow the backend's errors.
* Known label combinations are exported at 0 before any request (so ``rate()`` sees each
  first event), and the circuit state gauge is read from the gate when scraped.
* With the worker wired up, a real run fills the metrics (the last test).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest

from pipeline import protocol as p
from pipeline.backends.breaker import BackendGate, BreakerPolicy
from pipeline.backends.http import Backend
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.delivery import StreamProgress
from pipeline.errors import (
    BackendCallError,
    RetryableError,
    ThrottledError,
    UnknownModelError,
)
from pipeline.gateway.metrics import GatewayMetrics
from pipeline.models import Usage
from pipeline.observe.hooks import Settlement
from pipeline.observe.known_labels import CALL_KINDS, CANCEL_STAGES, RETRY_REASONS
from pipeline.observe.metrics import NO_POOL, UNKNOWN_MODEL, Metrics
from pipeline.observe.metrics_hook import MetricsHook
from pipeline.outcome import Cancelled, Failed, Failure, RetryLater
from pipeline.settings import BackendSettings, load_settings
from pipeline.worker.health import BackendHealthReporter
from tests.conftest import SettingsFactory, running_worker
from tests.fakes import delivery as fake_delivery

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "hutch.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
METRICS_PAGE = ROOT / "docs" / "reference" / "metrics.md"

#: The RabbitMQ metrics the dashboard may query: name -> (endpoint of the rabbitmq_prometheus
#: plugin on :15692, the ``family`` parameter /metrics/detailed needs for it, its labels).
#: Names as documented by the plugin (deps/rabbitmq_prometheus/metrics.md and
#: metrics-detailed.md in rabbitmq-server, 3.10 onwards): /metrics is aggregated unless
#: prometheus.return_per_object_metrics is set, so per-queue numbers come from
#: /metrics/detailed, whose names carry the rabbitmq_detailed_ prefix. Keep it small: add a
#: name here only with the scrape job that provides it.
RABBITMQ_METRICS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "rabbitmq_connections": ("/metrics", None, ()),
    "rabbitmq_global_messages_received_total": ("/metrics", None, ("protocol",)),
    "rabbitmq_global_messages_dead_lettered_expired_total": (
        "/metrics", None, ("queue_type", "dead_letter_strategy")),
    "rabbitmq_global_messages_dead_lettered_maxlen_total": (
        "/metrics", None, ("queue_type", "dead_letter_strategy")),
    "rabbitmq_detailed_queue_messages_ready": (
        "/metrics/detailed", "queue_coarse_metrics", ("vhost", "queue")),
    "rabbitmq_detailed_queue_messages_unacked": (
        "/metrics/detailed", "queue_coarse_metrics", ("vhost", "queue")),
    "rabbitmq_detailed_queue_consumers": (
        "/metrics/detailed", "queue_consumer_count", ("vhost", "queue")),
}
#: Prometheus' own series, and the labels it adds to every scraped one.
PROMETHEUS_BUILTINS: dict[str, tuple[str, ...]] = {"up": ()}
TARGET_LABELS = {"job", "instance"}


# -- a small PromQL reader -------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "and", "or", "unless", "inf", "nan"}


@dataclass
class Query:
    expr: str
    names: set[str] = field(default_factory=set)
    #: Labels matched in a selector, by metric name.
    matchers: dict[str, set[str]] = field(default_factory=dict)
    #: Labels of by/without/on/ignoring/group_left/group_right clauses.
    grouping: set[str] = field(default_factory=set)


def parse_promql(expr: str) -> Query:
    """The metric names and labels of a PromQL expression (enough for dashboards: no
    subqueries, no ``__name__`` selectors)."""
    query = Query(expr)
    text = _STRING.sub('""', expr)
    text = _RANGE.sub("", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables

    def grouping(match: re.Match[str]) -> str:
        query.grouping |= {label.strip() for label in match.group(2).split(",") if label.strip()}
        return " "

    text = _GROUPING.sub(grouping, text)

    def selector(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name, f"a selector without a metric name: {expr}"
        query.matchers.setdefault(name, set()).update(_MATCHER.findall(match.group(2)))
        return f" {name} "

    text = _SELECTOR.sub(selector, text)
    query.names = {name for name in _IDENT.findall(text) if name not in _KEYWORDS}
    return query


def test_parse_promql() -> None:
    query = parse_promql(
        'histogram_quantile(0.95, sum by (le, priority) (rate(hutch_queue_wait_seconds_bucket'
        '{pool=~"chat|x", priority!="0"}[$__rate_interval]))) / on (pool) group_left '
        'sum without (instance) (hutch_requests_total) > bool 0 or vector(1)')
    assert query.names == {"hutch_queue_wait_seconds_bucket", "hutch_requests_total"}
    assert query.matchers == {"hutch_queue_wait_seconds_bucket": {"pool", "priority"}}
    assert query.grouping == {"le", "priority", "pool", "instance"}
    assert parse_promql('sum(up{job="x"})').names == {"up"}


# -- the dashboard ---------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])  # collapsed rows keep theirs inside
    return panels


def _queries(dashboard: dict[str, Any]) -> list[Query]:
    exprs = [target["expr"] for panel in _panels(dashboard)
             for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and query:
            exprs.append(query["query"] if isinstance(query, dict) else str(query))
    assert exprs, "the dashboard has no queries"
    return [parse_promql(expr) for expr in exprs]


def _labels_of(name: str, metrics: Metrics) -> set[str]:
    """The labels a sample name carries (histogram buckets also ``le``)."""
    for info in [*metrics.catalog, *GatewayMetrics().catalog]:  # the gateway's panels too
        if name in info.sample_names():
            return set(info.labels) | ({"le"} if name.endswith("_bucket") else set())
    if name in RABBITMQ_METRICS:
        return set(RABBITMQ_METRICS[name][2])
    return set(PROMETHEUS_BUILTINS[name])


def test_dashboard_queries_only_metrics_that_exist() -> None:
    exported = Metrics().names() | GatewayMetrics().names()
    unknown = []
    for query in _queries(_dashboard()):
        for name in query.names:
            if name.startswith("hutch_"):
                ok = name in exported
            elif name.startswith("rabbitmq_"):
                ok = name in RABBITMQ_METRICS
            else:
                ok = name in PROMETHEUS_BUILTINS
            if not ok:
                unknown.append((name, query.expr))
    assert not unknown, f"the dashboard queries metrics nobody exports: {unknown}"


def test_dashboard_uses_only_labels_its_metrics_have() -> None:
    metrics = Metrics()
    for query in _queries(_dashboard()):
        for name, labels in query.matchers.items():
            assert labels <= _labels_of(name, metrics) | TARGET_LABELS, (name, query.expr)
        available = set(TARGET_LABELS)
        for name in query.names:
            available |= _labels_of(name, metrics)
        assert query.grouping <= available, (query.grouping - available, query.expr)


def test_dashboard_shows_every_worker_metric() -> None:
    queried = {name for query in _queries(_dashboard()) for name in query.names}
    missing = [info.name for info in Metrics().catalog if not info.sample_names() & queried]
    assert not missing, f"no dashboard panel shows {missing}"


def test_dashboard_answers_the_operators_questions() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "hutch" and dashboard["title"]
    by_title = {panel["title"]: panel for panel in _panels(dashboard)}
    exprs = {title: " ".join(t["expr"] for t in panel.get("targets", []))
             for title, panel in by_title.items()}

    def panel_with(*needles: str) -> str:
        for title, expr in exprs.items():
            if all(needle in expr for needle in needles):
                return title
        raise AssertionError(f"no panel queries {needles}")

    panel_with("hutch_requests_total", "by (outcome)")  # throughput by outcome
    for quantile in ("0.5", "0.95", "0.99"):  # queue wait percentiles by priority
        panel_with(f"histogram_quantile({quantile}", "by (le, priority)",
                   "hutch_queue_wait_seconds_bucket")
    panel_with("histogram_quantile(0.95", "by (le, priority)", "hutch_end_to_end_seconds_bucket")
    in_flight = panel_with("hutch_backend_in_flight")  # in flight against capacity
    assert "hutch_backend_capacity" in exprs[in_flight]
    assert by_title[panel_with("hutch_backend_state")]["type"] == "state-timeline"
    panel_with("hutch_retries_by_reason_total", "reason")
    panel_with("hutch_parked_total", "by (reason)")
    panel_with("hutch_tokens_total", "model")
    panel_with("rabbitmq_detailed_queue_messages_ready", "by (queue)")  # queue depth
    panel_with("rabbitmq_detailed_queue_consumers")


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = _dashboard()
    cells: dict[tuple[int, int], str] = {}
    ids = set()
    for panel in _panels(dashboard):
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        targets = panel.get("targets", [])
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        if panel["type"] != "row":
            assert targets and panel["datasource"]["uid"] == "prometheus", panel["title"]


def test_rabbitmq_metrics_come_from_a_scrape_job() -> None:
    jobs = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    rabbit = [job for job in jobs
              if any(str(target).endswith(":15692") for static in job.get("static_configs", [])
                     for target in static["targets"])]
    used = {name for query in _queries(_dashboard()) for name in query.names
            if name.startswith("rabbitmq_")}
    for name in used:
        path, family, _labels = RABBITMQ_METRICS[name]
        assert any(job.get("metrics_path", "/metrics") == path
                   and (family is None or family in job.get("params", {}).get("family", []))
                   for job in rabbit), f"no scrape job of {PROMETHEUS.name} provides {name}"
        assert name.startswith("rabbitmq_detailed_") == (path == "/metrics/detailed"), name


def test_every_rate_window_is_the_rate_interval() -> None:
    """One window everywhere: ``$__rate_interval`` follows the zoom and the scrape
    interval. A fixed 5m window still showed 25.8 chunks/s a minute after traffic stopped,
    beside 1m panels that had dropped to 0."""
    windows = {window for query in _queries(_dashboard())
               for window in re.findall(r"\[([^\]]*)\]", query.expr)}
    assert windows == {"$__rate_interval"}, windows


def _prefix(dashboard: dict[str, Any]) -> str:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["prefix"]["type"] == "textbox", "the queue prefix is a variable"
    return str(variables["prefix"]["query"])


def _queue_regexes(expr: str, prefix: str) -> list[str]:
    """The ``queue=~`` regexes of an expression, as Prometheus applies them (anchored)."""
    found = re.findall(r'queue=~"((?:[^"\\]|\\.)*)"', expr)
    return [re.sub(r"\\(.)", r"\1", regex).replace("$prefix", prefix) for regex in found]


@pytest.mark.parametrize("prefix", ["default", "team.llm"])
def test_queue_panels_show_only_their_queues(prefix: str) -> None:
    """The work-queue panels match every pool's work queue and nothing else: no worker's
    cancel queue, no parking lot, no reply queue (whatever its client id), on one axis."""
    dashboard = _dashboard()
    prefix = _prefix(dashboard) if prefix == "default" else prefix
    names = Names(prefix)
    pools = ["chat", "code.v2"]
    kinds = {
        "work": [names.work_queue(pool) for pool in pools],
        "triage": [names.triage_queue],
        "parked": [names.parked_queue],
        "retry": [names.retry_queue(1000), names.retry_queue(30000)],
        "other": [names.workers_queue, names.reply_queue("app"), names.lease_queue("b1"),
                  names.reply_queue("guest.host-1.work.x"), names.cancel_queue("w1"),
                  names.cancel_queue("host.work.1"), names.pause_queue("chat")],
    }
    expected = {
        ("Work queue depth (ready)", "A"): {"work"},
        ("Unacked and consumers per work queue", "A"): {"work"},
        ("Unacked and consumers per work queue", "B"): {"work", "triage"},
        ("Parking lot, triage and retry tiers (ready)", "A"): {"parked", "triage", "retry"},
    }
    targets = {(panel["title"], target["refId"]): target["expr"]
               for panel in _panels(dashboard) for target in panel.get("targets", [])
               if "queue=~" in target["expr"]}
    assert set(targets) == set(expected), set(targets) ^ set(expected)
    for key, expr in targets.items():
        (regex,) = _queue_regexes(expr, prefix)
        for kind, queues in kinds.items():
            matched = [bool(re.fullmatch(regex, queue)) for queue in queues]
            assert all(matched) if kind in expected[key] else not any(matched), (key, kind)


# -- the docs ----------------------------------------------------------------------------------


def test_docs_document_every_metric_with_its_type_and_labels() -> None:
    section = METRICS_PAGE.read_text()
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`hutch_"):
            labels = tuple(sorted(re.findall(r"`([a-z_]+)`", cells[2])))
            rows[cells[0].strip("`")] = (cells[1], labels)
    expected = {info.name: (info.type, tuple(sorted(info.labels)))
                for info in Metrics().catalog}
    gateway_only = GatewayMetrics().names() - Metrics().names()  # documented in docs/ too
    assert {name: row for name, row in rows.items() if name not in gateway_only} == expected


# -- labels, helpers, retry reasons -------------------------------------------------------------


def _settings() -> Any:
    return load_settings(max_priority=5, pools=[
        {"name": "chat", "models": ["small", "large"],
         "backends": [{"name": "b1", "url": "http://127.0.0.1:9/v1", "max_concurrency": 2}]},
        {"name": "code", "models": ["coder"],
         "backends": [{"name": "b2", "url": "http://127.0.0.1:9/v1", "max_concurrency": 1}]}])


def test_labels_are_bounded_by_the_configuration() -> None:
    metrics = Metrics()
    assert (metrics.pool_label("chat"), metrics.model_label("small")) == (NO_POOL, UNKNOWN_MODEL)
    assert metrics.priority_label(300) == "255"
    metrics.configure(_settings())
    assert metrics.pool_label("chat") == "chat" and metrics.pool_label("x" * 50) == NO_POOL
    assert metrics.model_label("coder") == "coder"
    assert metrics.model_label("gpt-typed-by-a-client") == UNKNOWN_MODEL
    assert metrics.model_label(None) == UNKNOWN_MODEL
    assert [metrics.priority_label(v) for v in (None, -3, 0, 5, 9, 255)] == [
        "0", "0", "0", "5", "5", "5"]
    # Every backend's gauges exist from the start, at 0.
    sample = metrics.registry.get_sample_value
    for backend in ("b1", "b2"):
        for name in ("hutch_backend_in_flight", "hutch_backend_capacity",
                     "hutch_backend_lease_held"):
            assert sample(name, {"backend": backend}) == 0


def test_request_done_and_the_settled_hook() -> None:
    metrics = Metrics(settings=_settings())
    hook = MetricsHook(metrics)
    sample = metrics.registry.get_sample_value
    metrics.request_done("chat", "small", 3, "ok", 0.2)
    metrics.request_done("chat", "forged", 99, "ok")
    assert sample("hutch_requests_total", {"pool": "chat", "outcome": "ok"}) == 2
    assert sample("hutch_request_outcomes_total", {
        "pool": "chat", "model": "small", "priority": "3", "outcome": "ok"}) == 1
    assert sample("hutch_request_outcomes_total", {
        "pool": "chat", "model": UNKNOWN_MODEL, "priority": "5", "outcome": "ok"}) == 1
    assert sample("hutch_end_to_end_seconds_count", {"pool": "chat", "priority": "3"}) == 1
    assert sample("hutch_end_to_end_seconds_sum", {"pool": "chat", "priority": "3"}) == 0.2

    sent = p.now_ms() - 1500
    late = fake_delivery(routing_key="large", priority=1, headers={p.H_SENT_AT: sent})
    assert 1.4 < (late.seconds_since_sent() or 0) < 5
    hook.received(late)
    assert sample("hutch_backend_in_flight", {"backend": "b1"}) == 1
    assert sample("hutch_queue_wait_seconds_count", {"pool": "chat", "priority": "1"}) == 1
    failure = Failure(p.ParkReason.DEADLINE_EXCEEDED, p.ErrorCode.DEADLINE_EXCEEDED, "late")
    hook.settled(late, Failed(failure),
                 Settlement("deadline_exceeded", p.ParkReason.DEADLINE_EXCEEDED, "late"))
    assert sample("hutch_backend_in_flight", {"backend": "b1"}) == 0
    assert sample("hutch_request_outcomes_total", {
        "pool": "chat", "model": "large", "priority": "1",
        "outcome": "deadline_exceeded"}) == 1
    assert sample("hutch_parked_total", {"reason": "deadline_exceeded"}) == 1
    assert 1.4 < (sample("hutch_end_to_end_seconds_sum", {"pool": "chat", "priority": "1"})
                  or 0) < 5
    # The AMQP timestamp stands in for x-hutch-sent-at; neither: no e2e observation.
    stamped = fake_delivery(timestamp=datetime.fromtimestamp(sent / 1000, UTC))
    assert 1.4 < (stamped.seconds_since_sent() or 0) < 5
    assert fake_delivery().seconds_since_sent() is None
    typed = fake_delivery(pool="-", routing_key="what-the-client-typed", priority=None)
    hook.settled(typed, Failed(failure), Settlement("unknown_model"))
    assert sample("hutch_request_outcomes_total", {
        "pool": NO_POOL, "model": UNKNOWN_MODEL, "priority": "0",
        "outcome": "unknown_model"}) == 1
    assert sample("hutch_end_to_end_seconds_count", {"pool": NO_POOL, "priority": "0"}) is None

    metrics.queue_waited("code", 2, 0.05)
    assert sample("hutch_queue_wait_seconds_count", {"pool": "code", "priority": "2"}) == 1


def test_tokens() -> None:
    metrics = Metrics(settings=_settings())
    sample = metrics.registry.get_sample_value
    metrics.tokens("chat", "small", Usage(prompt_tokens=10, completion_tokens=4, total_tokens=14))
    metrics.tokens("chat", "small", Usage(prompt_tokens=1, completion_tokens=0))
    metrics.tokens("chat", "small", None)
    assert sample("hutch_tokens_total", {"pool": "chat", "model": "small", "kind": "prompt"}) == 11
    assert sample("hutch_tokens_total",
                  {"pool": "chat", "model": "small", "kind": "completion"}) == 4


async def _backend_error(handler: Any) -> BaseException:
    settings = BackendSettings(name="b", url="http://backend/v1", max_concurrency=1,
                               timeout_s=5)
    backend = Backend(settings, httpx.MockTransport(handler))
    try:
        await backend.chat(b'{"model": "m", "messages": []}')
    except BackendCallError as exc:
        return exc
    finally:
        await backend.aclose()
    raise AssertionError("the call did not fail")


async def test_retry_reasons_follow_the_backends_errors() -> None:
    def raises(exc: Exception) -> Any:
        def handler(request: httpx.Request) -> httpx.Response:
            raise exc
        return handler

    def status(code: int, body: bytes = b"{}") -> Any:
        return lambda request: httpx.Response(code, content=body)

    cases = {
        "timeout": raises(httpx.ReadTimeout("slow")),
        "unreachable": raises(httpx.ConnectError("refused")),
        "http_503": status(503),
        "http_408": status(408),
        "invalid_completion": status(200, b'{"not": "a completion"}'),
        "throttled": status(429),
        "other": status(400),
    }
    for reason, handler in cases.items():
        error = await _backend_error(handler)
        assert error.reason == reason, (reason, error)


def test_in_process_and_tier_retries_are_counted_by_reason() -> None:
    metrics = Metrics(settings=_settings())
    hook = MetricsHook(metrics)
    sample = metrics.registry.get_sample_value
    d = fake_delivery()
    for _ in range(2):
        hook.retrying(d, RetryableError("backend b answered HTTP 502", status=502))
    assert sample("hutch_retries_by_reason_total",
                  {"pool": "chat", "stage": "in_process", "reason": "http_502"}) == 2
    hook.settled(d, RetryLater(1000, "slow", "timeout"), Settlement())
    assert sample("hutch_retries_total", {"pool": "chat", "tier": "1000"}) == 1
    assert sample("hutch_retries_by_reason_total",
                  {"pool": "chat", "stage": "tier", "reason": "timeout"}) == 1
    assert sample("hutch_requests_total", {"pool": "chat", "outcome": "ok"}) == 0


def test_backend_calls_are_counted_by_kind_and_deadline_cuts_are_not_errors() -> None:
    metrics = Metrics(settings=_settings())
    hook = MetricsHook(metrics)
    sample = metrics.registry.get_sample_value
    d = fake_delivery()
    hook.call_ended(d, "ok", 0.1, None)
    hook.call_ended(d, "throttled", 0.1, ThrottledError("429"))
    hook.call_ended(d, "deadline", 0.1, RetryableError("cut"))
    assert sample("hutch_backend_latency_seconds_count", {"backend": "b1"}) == 1
    assert sample("hutch_backend_errors_total", {"backend": "b1", "kind": "throttled"}) == 1
    assert sample("hutch_backend_errors_total", {"backend": "b1", "kind": "retryable"}) == 0


async def test_serve_exports_every_metric_over_http() -> None:
    metrics = Metrics(settings=_settings())
    metrics.request_done("chat", "small", 1, "ok", 0.1)
    metrics.tokens("chat", "small", Usage(prompt_tokens=1, completion_tokens=1))
    MetricsHook(metrics).settled(fake_delivery(), RetryLater(1000, "x", "http_500"),
                                 Settlement())
    metrics.queue_waited("chat", 1, 0.1)
    metrics.backend_latency.labels("b1").observe(0.1)
    metrics.backend_errors.labels("b1", "retryable").inc()
    metrics.backend_state.labels("b1").set(0)
    metrics.parked.labels("invalid_json").inc()
    streamed = fake_delivery()
    streamed.stream = StreamProgress("s1", messages=2, chunks=9, content_chars=30)
    MetricsHook(metrics).first_chunk(streamed)
    MetricsHook(metrics).settled(streamed, Cancelled("in_flight"), Settlement("cancelled"))
    for family in (metrics.tenant_requests, metrics.tenant_tokens):
        family.labels("chat", "alice", "ok").inc()
    metrics.tenant_queue_wait.labels("chat", "alice").observe(0.1)
    for gauge in (metrics.tenant_waiting, metrics.tenant_virtual_tokens):
        gauge.labels("chat", "alice").set(1)
    metrics.tenant_sorted.labels("chat", "alice").inc()
    metrics.fairness.labels("chat").set(1)
    for gauge in (metrics.backlog_requests, metrics.backlog_tokens, metrics.drain_seconds):
        gauge.labels("chat").set(1)
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{server.port}/metrics")).text
    finally:
        server.close()
    served = set(re.findall(r"^([a-z_:]+)[{ ]", text, re.M))
    assert Metrics().names() <= served, Metrics().names() - served


# -- series that exist before their first event, a gauge read when scraped ---------------------


def test_known_series_are_exported_at_zero_before_any_request() -> None:
    """A counter series born at its first event already holds it: rate() and increase()
    never see that step (8 undeliverable replies in one burst read as 0). Every label
    combination known from the configuration is exported at 0 from the start."""
    metrics = Metrics(settings=_settings())
    text = generate_latest(metrics.registry).decode()
    zero = {
        "hutch_requests_total": [{"pool": "chat", "outcome": "undeliverable"},
                                 {"pool": "code", "outcome": "ok"},
                                 {"pool": NO_POOL, "outcome": "unknown_model"}],
        "hutch_parked_total": [{"reason": str(reason)} for reason in p.ParkReason],
        "hutch_retries_by_reason_total": [
            {"pool": pool, "stage": stage, "reason": reason} for pool in ("chat", "code")
            for stage in ("in_process", "tier") for reason in RETRY_REASONS],
        "hutch_retries_total": [{"pool": "chat", "tier": "1000"},
                                {"pool": "code", "tier": "30000"}],
        "hutch_cancels_total": [{"pool": "chat", "stage": stage} for stage in CANCEL_STAGES],
        "hutch_backend_errors_total": [{"backend": b, "kind": kind} for b in ("b1", "b2")
                                       for kind in CALL_KINDS],
        "hutch_tokens_total": [{"pool": "code", "model": "coder", "kind": "completion"}],
        "hutch_stream_chunks_total": [{"pool": "chat"}],
        "hutch_stream_messages_total": [{"pool": "code"}],
        "hutch_backend_latency_seconds_count": [{"backend": "b2"}],
    }
    for name, label_sets in zero.items():
        for labels in label_sets:
            assert metrics.registry.get_sample_value(name, labels) == 0, (name, labels)
            line = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            assert line + "} 0.0" in text, f"not exported: {line}}}"
    for reason in ("unreachable", "timeout", "throttled", "http_503", "other"):
        assert reason in RETRY_REASONS


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_idle_circuit_reads_half_open_when_its_cooldown_ends() -> None:
    """After faults clear, an idle pool's circuit showed ``open`` until a request came
    (~40 s), so HutchBackendCircuitOpen would fire for a healthy backend: the gauge is
    read from the gate when scraped."""
    metrics, clock = Metrics(settings=_settings()), _Clock()
    gate = BackendGate(BreakerPolicy(failure_threshold=2, cooldown_s=10), clock=clock)
    health = BackendHealthReporter("b1", 2, gate, metrics.backend_state.labels("b1"))

    def state() -> float | None:
        return metrics.registry.get_sample_value("hutch_backend_state", {"backend": "b1"})

    assert state() == 0
    health.failure()
    health.failure()
    assert state() == 2
    clock.now += 10.5  # the cooldown ends; no request arrives
    assert state() == 1
    health.success(0.1)  # the probe
    assert state() == 0
    health.throttled(5.0)
    assert state() == 3
    clock.now += 6
    assert state() == 0


# -- a real run: the worker fills them ------------------------------------------------------------


class ScriptedBackend:
    """Fails the calls whose numbers are in ``fail`` with a 503, answers the others."""

    def __init__(self, fail: set[int]) -> None:
        self.fail = fail
        self.calls = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls in self.fail:
            return httpx.Response(503, json={"error": {"message": "scripted"}})
        return httpx.Response(200, json={
            "id": f"c{self.calls}", "object": "chat.completion", "model": "mock-small",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})


async def test_a_worker_fills_the_metrics(make_settings: SettingsFactory) -> None:
    """Needs the call sites of pipeline.observe.metrics in dispatch, replies and worker."""
    backend = ScriptedBackend(fail={1, 3, 4})
    settings = make_settings([("b1", "http://127.0.0.1:9/v1", 1)], pool={
        "attempts_per_delivery": 2, "retry_delays_ms": [200], "max_attempts": 5})
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    user = [{"role": "user", "content": "hi"}]
    await apply_topology(settings)
    async with running_worker(settings, metrics=metrics,
                              transport_factory=lambda _: httpx.MockTransport(backend.handler)
                              ), HutchClient.from_settings(settings) as client:
        # Call 1 fails (503), call 2 answers: one in-process retry.
        await client.chat(model="mock-small", messages=user, priority=7, timeout=30)
        # Calls 3 and 4 fail: a trip through the 200 ms tier; call 5 answers.
        await client.chat(model="mock-large", messages=user, priority=200, timeout=30)
        with pytest.raises(UnknownModelError):
            await client.chat(model="typed-by-a-client", messages=user, timeout=30)
        await asyncio.sleep(0.2)
    chat = {"pool": "chat"}
    assert sample("hutch_requests_total", {**chat, "outcome": "ok"}) == 2
    assert sample("hutch_request_outcomes_total",
                  {**chat, "model": "mock-small", "priority": "7", "outcome": "ok"}) == 1
    assert sample("hutch_request_outcomes_total",  # 200 counts as the queue's max, 9
                  {**chat, "model": "mock-large", "priority": "9", "outcome": "ok"}) == 1
    assert sample("hutch_request_outcomes_total", {
        "pool": NO_POOL, "model": UNKNOWN_MODEL, "priority": "0",
        "outcome": "unknown_model"}) == 1
    assert sample("hutch_end_to_end_seconds_count", {**chat, "priority": "7"}) == 1
    assert (sample("hutch_end_to_end_seconds_sum", {**chat, "priority": "9"}) or 0) >= 0.2
    assert sample("hutch_queue_wait_seconds_count", {**chat, "priority": "9"}) == 2
    assert sample("hutch_tokens_total", {**chat, "model": "mock-small", "kind": "prompt"}) == 5
    assert sample("hutch_tokens_total",
                  {**chat, "model": "mock-large", "kind": "completion"}) == 2
    assert sample("hutch_retries_by_reason_total",
                  {**chat, "stage": "in_process", "reason": "http_503"}) == 2
    assert sample("hutch_retries_by_reason_total",
                  {**chat, "stage": "tier", "reason": "http_503"}) == 1
    assert sample("hutch_retries_total", {**chat, "tier": "200"}) == 1
    assert sample("hutch_parked_total", {"reason": "unknown_model"}) == 1
    assert backend.calls == 5
