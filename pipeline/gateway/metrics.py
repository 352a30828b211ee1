"""The gateway's metrics, on a registry of its own (served by ``--metrics-port``).

Labels are bounded: ``endpoint`` is one of the served paths' names, ``client`` an identity
from the configuration (``-`` when no key matched), ``status`` an HTTP status code,
``reason`` one of :data:`~pipeline.gateway.auth.AUTH_FAILURES`.

Series that alerts and ``rate()`` read are created at 0 before their first event (each
known client's answers, every failure reason), so the first event is a step ``rate()``
sees, not a series born holding 1.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.gateway.auth import AUTH_FAILURES
from pipeline.observe.metrics import MetricInfo

__all__ = ["ENDPOINTS", "STATUSES", "GatewayMetrics"]

#: The ``endpoint`` label's values.
ENDPOINTS = ("chat.completions", "completions", "embeddings", "models")
#: The statuses a known client's requests are answered with most (the error map's, and
#: 499 for a client gone), created at 0 for each client and endpoint.
STATUSES = ("200", "400", "404", "429", "499", "500", "502", "503", "504")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
            120, 300)


class GatewayMetrics:
    """Requests answered, their duration, those in flight, clients that went away, failed
    authentications and key reloads."""

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
        self.auth_failures = Counter(
            "hutch_gateway_auth_failures", "Requests refused 401, by reason: missing (no "
            "Authorization), malformed (not `Bearer <key>`, or not text), unknown_key.",
            ["reason"], registry=self.registry)
        self.key_reloads = Counter(
            "hutch_gateway_key_reloads", "Reloads of the API keys (keys_file changed, or "
            "SIGHUP), by result: ok, or error (the keys in force were kept).", ["result"],
            registry=self.registry)
        for family, kind in ((self.requests, "counter"), (self.duration, "histogram"),
                             (self.first_byte, "histogram"), (self.in_flight, "gauge"),
                             (self.disconnects, "counter"), (self.auth_failures, "counter"),
                             (self.key_reloads, "counter")):
            name = family._name + ("_total" if kind == "counter" else "")
            self.catalog.append(MetricInfo(name, kind, tuple(family._labelnames),
                                           family._documentation))
        for endpoint in ENDPOINTS:
            self.in_flight.labels(endpoint)
            self.disconnects.labels(endpoint)
        for endpoint in ENDPOINTS[:3]:  # the POST endpoints (/v1/models is not counted)
            self.requests.labels(endpoint, "-", "401")
        for reason in AUTH_FAILURES:
            self.auth_failures.labels(reason)
        for result in ("ok", "error"):
            self.key_reloads.labels(result)

    def known_clients(self, identities: list[str]) -> None:
        """Create each client's request series at 0 (at start, and after a key reload)."""
        for endpoint in ENDPOINTS[:3]:
            for identity in identities:
                for status in STATUSES:
                    self.requests.labels(endpoint, identity, status)

    def names(self) -> set[str]:
        """Every sample name exported (``_total``, ``_bucket``, ... included)."""
        return {name for info in self.catalog for name in info.sample_names()}
