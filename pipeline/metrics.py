"""Prometheus metrics, in one place.

Each worker process exports these on ``--metrics-port``. Labels are bounded sets (pool,
backend, outcome, priority): never a request id, a model name typed by a client, or
anything secret.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The worker's metrics, on a registry of its own (tests run several workers)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hutch_requests", "Requests finished, by pool and outcome "
            "(ok, or the error code of the reply).", ["pool", "outcome"], registry=r)
        self.queue_wait = Histogram(
            "hutch_queue_wait_seconds", "Time from publish to delivery to a worker.",
            ["pool", "priority"], buckets=_LATENCY_BUCKETS, registry=r)
        self.backend_latency = Histogram(
            "hutch_backend_latency_seconds", "Duration of successful backend calls.",
            ["backend"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "hutch_backend_in_flight", "Requests this worker has at the backend now.",
            ["backend"], registry=r)
        self.capacity = Gauge(
            "hutch_backend_capacity", "The backend's max_concurrency while this worker holds "
            "its lease, else 0.", ["backend"], registry=r)
        self.lease_held = Gauge(
            "hutch_backend_lease_held", "1 while this worker holds the backend's lease.",
            ["backend"], registry=r)
        self.backend_errors = Counter(
            "hutch_backend_errors", "Failed backend calls (each attempt), by kind.",
            ["backend", "kind"], registry=r)
        self.retries = Counter(
            "hutch_retries", "Requests sent to a delayed retry tier, by pool and tier (ms).",
            ["pool", "tier"], registry=r)
        self.backend_state = Gauge(
            "hutch_backend_state", "Backend availability as this worker sees it: 0 closed "
            "(serving), 1 half-open (probing), 2 open (circuit broken), 3 throttled (429).",
            ["backend"], registry=r)
        self.parked = Counter(
            "hutch_parked", "Messages moved to the parking lot, by reason.", ["reason"],
            registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` over HTTP (a daemon thread; it dies with the process)."""
        start_http_server(port, addr=addr, registry=self.registry)
