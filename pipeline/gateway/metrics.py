"""The gateway's metrics, on a registry of its own (served by ``--metrics-port``).

Labels are bounded: ``endpoint`` is one of the served paths' names, ``client`` an identity
from the configuration (``-`` when no key matched), ``status`` an HTTP status code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.observe.metrics import MetricInfo

__all__ = ["ENDPOINTS", "GatewayMetrics"]

#: The ``endpoint`` label's values.
ENDPOINTS = ("chat.completions", "completions", "embeddings", "models")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
            120, 300)


class GatewayMetrics:
    """Requests answered, their duration, those in flight, clients that went away."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        #: Every family, in the order the README lists them.
        self.catalog: list[MetricInfo] = []
        self.requests = Counter(
            "hutch_gateway_requests", "HTTP requests answered, by endpoint, client identity "
            "and HTTP status.", ["endpoint", "client", "status"], registry=self.registry)
        self.duration = Histogram(
            "hutch_gateway_request_seconds", "Time from an HTTP request's arrival to the end "
            "of its answer (a stream: its last event), by endpoint and stream (true/false).",
            ["endpoint", "stream"], buckets=_BUCKETS, registry=self.registry)
        self.first_byte = Histogram(
            "hutch_gateway_time_to_first_byte_seconds", "Time from an HTTP request's "
            "arrival to its response's first byte (a stream: its first event).",
            ["endpoint", "stream"], buckets=_BUCKETS, registry=self.registry)
        self.in_flight = Gauge(
            "hutch_gateway_in_flight", "HTTP requests being answered now, by endpoint.",
            ["endpoint"], registry=self.registry)
        self.disconnects = Counter(
            "hutch_gateway_disconnects", "Clients that went away before their answer: "
            "each request was cancelled on the broker (queued or at a backend).",
            ["endpoint"], registry=self.registry)
        self.broker_blocked = Gauge(
            "hutch_broker_blocked", "1 while the broker blocks this process's publishes (a "
            "memory or disk alarm), else 0.", [], registry=self.registry)
        for family, kind in ((self.requests, "counter"), (self.duration, "histogram"),
                             (self.first_byte, "histogram"), (self.in_flight, "gauge"),
                             (self.disconnects, "counter"), (self.broker_blocked, "gauge")):
            name = family._name + ("_total" if kind == "counter" else "")
            self.catalog.append(MetricInfo(name, kind, tuple(family._labelnames),
                                           family._documentation))
        for endpoint in ENDPOINTS:
            self.in_flight.labels(endpoint)
            self.disconnects.labels(endpoint)

    def names(self) -> set[str]:
        """Every sample name exported (``_total``, ``_bucket``, ... included)."""
        return {name for info in self.catalog for name in info.sample_names()}
