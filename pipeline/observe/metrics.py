"""Prometheus metrics, in one place.

Each worker process exports these on ``--metrics-port``. Labels are bounded sets: pools,
backends and models come from the configuration (:meth:`Metrics.configure`), priorities
are clamped to ``0..max_priority``, outcomes and reasons are the wire contract's codes.
A pool or model the configuration does not name (a client typed it, or forged a header)
is counted as ``-`` or ``unknown``: never a request id, a client-typed name, or anything
secret. The helper methods do this normalising, so call sites stay one line each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.models import Usage
from pipeline.observe.clocks import SkewWindow
from pipeline.observe.known_labels import known_series
from pipeline.observe.probes import Check, serve_with_probes
from pipeline.settings import Settings

__all__ = [
    "MAX_TENANT_LABELS",
    "NO_POOL",
    "OTHER_TENANT",
    "UNKNOWN_MODEL",
    "MetricInfo",
    "Metrics",
    "MetricsServer",
]

_M = TypeVar("_M", Counter, Gauge, Histogram)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

#: The ``pool`` label of what belongs to no configured pool (unknown models, forged headers).
NO_POOL = "-"
#: The ``model`` label of a model the configuration does not name.
UNKNOWN_MODEL = "unknown"
#: Tenants beyond the configured ones that get a label of their own; the rest: ``other``.
MAX_TENANT_LABELS = 100
OTHER_TENANT = "other"
#: Highest priority label before :meth:`Metrics.configure` (AMQP's own maximum).
_AMQP_MAX_PRIORITY = 255


@dataclass(frozen=True)
class MetricInfo:
    """One exported metric family: what the README documents and the dashboard may query."""

    name: str  # as exported: counters with their _total suffix
    type: str  # counter, gauge or histogram
    labels: tuple[str, ...]
    help: str

    def sample_names(self) -> set[str]:
        """The sample names Prometheus sees (histograms: _bucket, _sum, _count)."""
        if self.type == "histogram":
            return {self.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        return {self.name}


@dataclass
class MetricsServer:
    """The HTTP server of :meth:`Metrics.serve`: its port (useful with port 0) and a stop."""

    port: int
    _shutdown: Callable[[], None]
    _thread: threading.Thread

    def close(self) -> None:
        self._shutdown()
        self._thread.join(timeout=5)


class Metrics:
    """The worker's metrics, on a registry of its own (tests run several workers)."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 settings: Settings | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._pools: set[str] = set()
        self._models: set[str] = set()
        self._tenants: set[str] = set()
        self._max_tenant_labels = MAX_TENANT_LABELS
        self._max_priority = _AMQP_MAX_PRIORITY
        self._configured = False
        #: Labelled children by (family, label values): ``labels()`` takes a lock and
        #: builds tuples on every call, and the hot path asks for the same few each time.
        self._children: dict[tuple[int | str, ...], Any] = {}
        #: Every family, in the order the README lists them.
        self.catalog: list[MetricInfo] = []
        counter, histogram = self._counter, self._histogram
        # -- requests ----------------------------------------------------------------------
        self.requests = counter(
            "hutch_requests", "Requests finished, by pool and outcome "
            "(ok, or the error code of the reply).", ["pool", "outcome"])
        self.request_outcomes = counter(
            "hutch_request_outcomes", "Requests finished, by pool, model, priority and "
            "outcome (model 'unknown' if the configuration does not name it).",
            ["pool", "model", "priority", "outcome"])
        self.queue_wait = histogram(
            "hutch_queue_wait_seconds", "Time from publish to delivery to a worker.",
            ["pool", "priority"])
        self.end_to_end = histogram(
            "hutch_end_to_end_seconds", "Time from publish to the request's reply (or other "
            "final outcome) being published, retries included.",
            ["pool", "priority"])
        self.tokens_used = counter(
            "hutch_tokens", "Tokens of successful completions, from their usage, by pool, "
            "model and kind (prompt, completion).", ["pool", "model", "kind"])
        self._backend_families()
        self._stream_families()
        self._tenant_families()
        self._broker_families()
        self.config_reloads = counter("hutch_config_reloads", "Config reloads (SIGHUP or "
                                      "a file watch) by result.", ["result"])
        for result in ("applied", "unchanged", "invalid", "refused", "failed"):  # at 0
            self.config_reloads.labels(result)
        if settings is not None:
            self.configure(settings)

    def _backend_families(self) -> None:
        """The per-backend and retry families (split out of __init__ for length)."""
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        # -- backends ----------------------------------------------------------------------
        self.backend_latency = histogram(
            "hutch_backend_latency_seconds", "Duration of successful backend calls.",
            ["backend"])
        self.in_flight = gauge(
            "hutch_backend_in_flight", "Requests this worker has at the backend now.",
            ["backend"])
        self.capacity = gauge(
            "hutch_backend_capacity", "The backend's current limit (max_concurrency, or the "
            "adaptive limit) while this worker holds its lease and it serves, else 0.",
            ["backend"])
        self.lease_held = gauge(
            "hutch_backend_lease_held", "1 while this worker holds the backend's lease.",
            ["backend"])
        self.backend_errors = counter(
            "hutch_backend_errors", "Failed backend calls (each attempt), by kind.",
            ["backend", "kind"])
        self.backend_state = gauge(
            "hutch_backend_state", "Backend availability as this worker sees it: 0 closed "
            "(serving), 1 half-open (probing), 2 open (circuit broken), 3 throttled (429).",
            ["backend"])
        # -- retries and the parking lot -----------------------------------------------------
        self.retries = counter(
            "hutch_retries", "Requests sent to a delayed retry tier, by pool and tier (ms).",
            ["pool", "tier"])
        self.retries_by_reason = counter(
            "hutch_retries_by_reason", "Retries by pool, stage (in_process: another attempt "
            "on the same slot; tier: a trip through a retry tier) and reason.",
            ["pool", "stage", "reason"])
        self.parked = counter(
            "hutch_parked", "Messages moved to the parking lot, by reason.", ["reason"])

    def _stream_families(self) -> None:
        """Streaming and cancellation."""
        self.time_to_first_token = self._histogram(
            "hutch_time_to_first_token_seconds", "Time from publish to a stream's first "
            "chunk message going out, by pool and priority.", ["pool", "priority"])
        self.streams_in_flight = self._gauge(
            "hutch_streams_in_flight", "Streams this worker is relaying now.", ["pool"])
        self.stream_chunks = self._counter(
            "hutch_stream_chunks", "chat.completion.chunk objects relayed (about one per "
            "token).", ["pool"])
        self.stream_messages = self._counter(
            "hutch_stream_messages", "Chunk messages published (chunks coalesced per "
            "window).", ["pool"])
        self.cancels = self._counter(
            "hutch_cancels", "Requests cancelled, by stage: queued (never reached a "
            "backend), in_flight (the call was aborted), client_gone (its reply queue "
            "vanished mid-stream).", ["pool", "stage"])

    def _tenant_families(self) -> None:
        """Tenants and the fair scheduler (:mod:`pipeline.scheduling`). ``tenant`` is
        bounded: configured tenants, then the first :data:`MAX_TENANT_LABELS` others seen,
        then ``other``."""
        pt = ["pool", "tenant"]
        self.tenant_requests = self._counter(
            "hutch_tenant_requests", "Requests finished, by pool, tenant and outcome.",
            [*pt, "outcome"])
        self.tenant_tokens = self._counter(
            "hutch_tenant_tokens", "Tokens served (prompt, completion), by pool and tenant.",
            [*pt, "kind"])
        self.tenant_queue_wait = self._histogram(
            "hutch_tenant_queue_wait_seconds", "Time from publish to the start of service, "
            "by pool and tenant.", pt)
        self.tenant_waiting = self._gauge(
            "hutch_tenant_waiting", "Requests of the tenant waiting for a permit at this "
            "worker's backends of the pool (its visible backlog; the rest is in the lanes).",
            pt)
        self.tenant_virtual_tokens = self._gauge(
            "hutch_tenant_virtual_tokens", "The tenant's virtual token counter (weighted "
            "service) in this worker's scheduler of the pool.", pt)
        self.tenant_sorted = self._counter(
            "hutch_tenant_sorted", "Requests a saturated backend moved into the tenant's "
            "lane.", pt)
        self.fairness = self._gauge(
            "hutch_fairness_index", "Jain's index of the weighted service of the tenants "
            "backlogged in the last minute (1: perfectly fair; 1/n: one tenant got all).",
            ["pool"])
        self.backlog_requests = self._gauge(
            "hutch_pool_backlog_requests", "Requests ready in the pool's queue and lanes, as "
            "a worker holding one of its backends reads them.", ["pool"])
        self.backlog_tokens = self._gauge(
            "hutch_pool_backlog_tokens", "The pool's ready requests x the mean tokens of "
            "those served in the last minute: the backlog in tokens.", ["pool"])
        self.drain_seconds = self._gauge(
            "hutch_pool_drain_seconds", "Estimated seconds to serve the pool's backlog at its "
            "service rate of the last minute (the estimated wait of a new request).", ["pool"])

    def tenant_label(self, tenant: str) -> str:
        """A bounded label: configured tenants, the first others seen, then ``other``."""
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < self._max_tenant_labels:
            self._tenants.add(tenant)
            return tenant
        return OTHER_TENANT

    def _broker_families(self) -> None:
        """The broker's resource alarms and the clients' clocks, as this worker sees them."""
        self.broker_blocked = self._gauge(
            "hutch_broker_blocked", "1 while the broker blocks this process's publishes (a "
            "memory or disk alarm), else 0.", [])
        #: The smallest (worker clock - x-hutch-sent-at) of the last minute (see clocks.py).
        self.skew_window = SkewWindow()
        self.clock_skew = self._gauge(
            "hutch_clock_skew_seconds", "This worker's clock minus x-hutch-sent-at, the "
            "smallest of the last minute's first deliveries: negative, a client's clock is "
            "ahead; positive, behind (or every request waited that long).", [])
        self.clock_skew.set_function(self.skew_window.value)

    def _record(self, name: str, kind: str, help_text: str, labels: list[str]) -> None:
        exported = name + "_total" if kind == "counter" else name
        self.catalog.append(MetricInfo(exported, kind, tuple(labels), help_text))

    def _counter(self, name: str, help_text: str, labels: list[str]) -> Counter:
        self._record(name, "counter", help_text, labels)
        return Counter(name, help_text, labels, registry=self.registry)

    def _gauge(self, name: str, help_text: str, labels: list[str]) -> Gauge:
        self._record(name, "gauge", help_text, labels)
        return Gauge(name, help_text, labels, registry=self.registry)

    def _histogram(self, name: str, help_text: str, labels: list[str]) -> Histogram:
        self._record(name, "histogram", help_text, labels)
        return Histogram(name, help_text, labels, buckets=_LATENCY_BUCKETS,
                         registry=self.registry)

    # -- configuration and labels -------------------------------------------------------------

    def configure(self, settings: Settings) -> None:
        """Learn the pools, models and backends that may appear as labels, and start every
        backend's gauges and every known counter series at 0 (:mod:`.known_labels`) so
        dashboards, ``hutch status`` and ``rate()`` see all of them from the start.
        Calling it again (another worker on the same registry) adds to what it knows."""
        self._pools.update(pool.name for pool in settings.pools)
        self._max_tenant_labels = MAX_TENANT_LABELS + len(settings.tenants)
        self._tenants.update(settings.tenants)
        self._models.update(model for pool in settings.pools for model in pool.models)
        first = not self._configured
        self._configured = True
        self._max_priority = (settings.max_priority if first
                              else max(self._max_priority, settings.max_priority))
        for pool in settings.pools:
            for backend in pool.backends:
                for gauge in (self.in_flight, self.capacity, self.lease_held):
                    gauge.labels(backend.name)
        for name, label_sets in known_series(settings, NO_POOL).items():
            for labels in label_sets:  # at 0: rate() sees each first event
                self.child(getattr(self, name), *labels)

    def child(self, family: _M, *labels: str) -> _M:
        """``family.labels(*labels)``, looked up once (families are never cleared)."""
        key: tuple[int | str, ...] = (id(family), *labels)
        found: _M | None = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found

    def pool_label(self, pool: str | None) -> str:
        return pool if pool in self._pools else NO_POOL

    def model_label(self, model: str | None) -> str:
        return model if model in self._models else UNKNOWN_MODEL

    def priority_label(self, priority: int | None) -> str:
        """The AMQP priority as the queue sees it: 0..max_priority (higher counts as max)."""
        return str(max(0, min(priority or 0, self._max_priority)))

    # -- one-line helpers for the call sites -----------------------------------------------------

    def queue_waited(self, pool: str, priority: int | None, seconds: float) -> None:
        """A delivery arrived ``seconds`` after its request was published."""
        self.child(self.queue_wait, self.pool_label(pool), self.priority_label(priority)
                   ).observe(max(0.0, seconds))

    def request_done(self, pool: str, model: str | None, priority: int | None, outcome: str,
                     e2e_s: float | None = None) -> None:
        """A request reached its one final outcome (``ok``, or the reply's error code)."""
        pool_label = self.pool_label(pool)
        priority_label = self.priority_label(priority)
        self.child(self.requests, pool_label, outcome).inc()
        self.child(self.request_outcomes, pool_label, self.model_label(model), priority_label,
                   outcome).inc()
        if e2e_s is not None:
            self.child(self.end_to_end, pool_label, priority_label).observe(max(0.0, e2e_s))

    def tokens(self, pool: str, model: str | None, usage: Usage | None) -> None:
        """Count a completion's prompt and completion tokens (nothing if it has no usage)."""
        if usage is None:
            return
        pool_label, model_label = self.pool_label(pool), self.model_label(model)
        for kind, count in (("prompt", usage.prompt_tokens),
                            ("completion", usage.completion_tokens)):
            if count > 0:
                self.child(self.tokens_used, pool_label, model_label, kind).inc(count)

    # -- export ------------------------------------------------------------------------------

    def names(self) -> set[str]:
        """Every sample name this worker exports (``_total``, ``_bucket``, ... included)."""
        return {name for info in self.catalog for name in info.sample_names()}

    def serve(self, port: int, addr: str = "0.0.0.0", *, live: Check | None = None,
              ready: Check | None = None) -> MetricsServer:
        """Expose ``/metrics`` over HTTP (a daemon thread; it dies with the process), and
        ``/healthz``/``/readyz`` when given their checks (:mod:`pipeline.observe.probes`).
        Port 0 picks a free port: the returned server says which."""
        server, thread = serve_with_probes(self.registry, port, addr, live=live, ready=ready)

        def shutdown() -> None:
            server.shutdown()
            server.server_close()

        return MetricsServer(int(server.server_port), shutdown, thread)
