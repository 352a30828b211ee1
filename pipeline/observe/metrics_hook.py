"""The delivery hook that keeps the request, backend, stream and retry metrics.

It turns each delivery event (:class:`~pipeline.observe.hooks.DeliveryHook`) into updates
of the metrics :class:`~pipeline.observe.metrics.Metrics` defines: the catalog is there,
how events fill it is here.
"""

from __future__ import annotations

import time

from pipeline import protocol as p
from pipeline.delivery import Delivery
from pipeline.errors import BackendCallError
from pipeline.observe.hooks import DeliveryHook, Settlement
from pipeline.observe.metrics import Metrics
from pipeline.outcome import Cancelled, Completed, Outcome, RetryLater

__all__ = ["MetricsHook"]


class MetricsHook(DeliveryHook):
    """The delivery hook that keeps the request, backend and retry metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def received(self, delivery: Delivery) -> None:
        if delivery.backend is None:
            return  # triage: no backend slot, no queue wait of a work queue
        m = self._m
        m.child(m.in_flight, delivery.backend).inc()
        if delivery.queue_wait_ms is not None:
            m.queue_waited(delivery.pool, delivery.priority, delivery.queue_wait_ms / 1000)
        if delivery.sent_at_ms is not None and delivery.prior_attempts == delivery.retries == 0:
            m.skew_window.observe((p.now_ms() - delivery.sent_at_ms) / 1000)

    def call_ended(self, delivery: Delivery, kind: str, elapsed_s: float,
                   error: BackendCallError | None) -> None:
        m, backend = self._m, delivery.backend or ""
        if kind == "ok":
            m.child(m.backend_latency, backend).observe(elapsed_s)
        elif kind != "deadline":
            m.child(m.backend_errors, backend, kind).inc()

    def first_chunk(self, delivery: Delivery) -> None:
        m = self._m
        pool = m.pool_label(delivery.pool)
        m.child(m.streams_in_flight, pool).inc()
        since = delivery.seconds_since_sent()
        if since is None:
            since = time.monotonic() - delivery.received_at
        m.child(m.time_to_first_token, pool, m.priority_label(delivery.priority)
                ).observe(since)

    def retrying(self, delivery: Delivery, error: BackendCallError) -> None:
        m = self._m
        m.child(m.retries_by_reason, m.pool_label(delivery.pool), "in_process",
                error.reason).inc()

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        m = self._m
        if delivery.backend is not None:
            m.child(m.in_flight, delivery.backend).dec()
        if delivery.stream is not None:
            pool = m.pool_label(delivery.pool)
            m.child(m.streams_in_flight, pool).dec()
            m.child(m.stream_chunks, pool).inc(delivery.stream.chunks)
            m.child(m.stream_messages, pool).inc(delivery.stream.messages)
        if isinstance(outcome, Cancelled):
            m.child(m.cancels, m.pool_label(delivery.pool), outcome.stage).inc()
        if isinstance(outcome, Completed):
            m.tokens(delivery.pool, delivery.model, outcome.usage)
        elif isinstance(outcome, RetryLater):
            pool_label = m.pool_label(delivery.pool)
            m.child(m.retries, pool_label, str(outcome.delay_ms)).inc()
            m.child(m.retries_by_reason, pool_label, "tier", outcome.reason).inc()
        if settlement.label is not None:
            m.request_done(delivery.pool, delivery.model, delivery.priority, settlement.label,
                           delivery.seconds_since_sent())
        if settlement.parked is not None:
            m.child(m.parked, str(settlement.parked)).inc()
