"""The tenant meter: charges each tenant for the service it actually got, and counts it.

A delivery hook (:mod:`pipeline.observe.hooks`): the scheduler charged the prompt estimate
when it started the request; when the request settles, the charge is trued up to its real
cost (``usage``; without one, estimated from the answer's size), and a request that
failed, was cancelled before any output or handed back is refunded, so a tenant is never
charged for service it did not get (its output streamed before a failure stays charged).
The per-tenant metrics are kept here too, and :func:`sample` exports the schedulers' state
(backlog, counters, Jain's index) on the worker's metrics.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from pipeline.delivery import Delivery
from pipeline.observe.hooks import DeliveryHook, Settlement
from pipeline.observe.metrics import Metrics
from pipeline.outcome import Completed, Outcome
from pipeline.scheduling.policy import PoolScheduler, prompt_tokens

__all__ = ["TenantMeter", "completion_estimate", "sample", "sample_every"]


def completion_estimate(delivery: Delivery, body: bytes) -> int:
    """Completion tokens of an answer without ``usage``: a stream's chunks (about one a
    token), else its text at about four characters a token, never the JSON around it."""
    if delivery.stream is not None:
        return delivery.stream.chunks
    try:
        answer = json.loads(body)
        choices = answer.get("choices") or [{}]
        text = choices[0].get("message", {}).get("content") or choices[0].get("text") or ""
    except (ValueError, AttributeError, TypeError, IndexError):
        return len(body) // 4
    return len(text) // 4 if isinstance(text, str) else len(body) // 4


class TenantMeter(DeliveryHook):
    """Trues up or refunds each settled delivery's charge in its pool's scheduler."""

    def __init__(self, schedulers: Mapping[str, PoolScheduler], metrics: Metrics) -> None:
        self._schedulers = schedulers
        self._m = metrics

    def _labels(self, delivery: Delivery) -> tuple[str, str]:
        return self._m.pool_label(delivery.pool), self._m.tenant_label(delivery.tenant)

    def received(self, delivery: Delivery) -> None:
        if delivery.backend is not None and delivery.queue_wait_ms is not None:
            self._m.child(self._m.tenant_queue_wait, *self._labels(delivery)).observe(
                delivery.queue_wait_ms / 1000)

    def set_aside(self, delivery: Delivery, moved: bool) -> None:
        if moved:
            self._m.child(self._m.tenant_sorted, *self._labels(delivery)).inc()

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        if settlement.label is not None and delivery.backend is not None:
            self._m.child(self._m.tenant_requests, *self._labels(delivery),
                          settlement.label).inc()
        scheduler = self._schedulers.get(delivery.pool)
        if scheduler is None:
            return
        scheduler.ended(delivery)
        if delivery.charged == 0 and not isinstance(outcome, Completed):
            return
        weights = scheduler.scheduling
        if isinstance(outcome, Completed):
            usage = outcome.usage
            prompt = usage.prompt_tokens if usage else prompt_tokens(delivery)
            completion = (usage.completion_tokens if usage
                          else completion_estimate(delivery, outcome.body))
            scheduler.quota.record(delivery.tenant, prompt + completion)
            for kind, count in (("prompt", prompt), ("completion", completion)):
                self._m.child(self._m.tenant_tokens, *self._labels(delivery), kind).inc(count)
        elif delivery.stream is not None and delivery.stream.chunks:
            prompt, completion = prompt_tokens(delivery), delivery.stream.chunks
        else:
            prompt = completion = 0
        cost = weights.prompt_weight * prompt + weights.completion_weight * completion
        scheduler.charge(delivery, cost - delivery.charged)


def sample(schedulers: Mapping[str, PoolScheduler], metrics: Metrics,
           shown: dict[str, set[str]]) -> None:
    """Export each pool's backlog and counters per tenant and its fairness index; a tenant
    shown before and no longer waiting is set to 0 (``shown`` remembers, per pool)."""
    for pool, scheduler in schedulers.items():
        pool_label = metrics.pool_label(pool)
        waiting: dict[str, int] = {}
        for tenant, count in scheduler.waiting.items():
            label = metrics.tenant_label(tenant)
            waiting[label] = waiting.get(label, 0) + count
        for label in shown.get(pool, set()) - set(waiting):
            metrics.child(metrics.tenant_waiting, pool_label, label).set(0)
        for tenant in scheduler.waiting:
            metrics.child(metrics.tenant_virtual_tokens, pool_label,
                          metrics.tenant_label(tenant)).set(scheduler.vtc.counter(tenant))
        for label, count in waiting.items():
            metrics.child(metrics.tenant_waiting, pool_label, label).set(count)
        shown[pool] = set(waiting)
        index = scheduler.fairness()
        if index is not None:
            metrics.child(metrics.fairness, pool_label).set(index)


async def sample_every(schedulers: Mapping[str, PoolScheduler], metrics: Metrics,
                       interval_s: float = 2.0) -> None:
    """:func:`sample` every ``interval_s`` until cancelled."""
    shown: dict[str, set[str]] = {}
    while True:
        sample(schedulers, metrics, shown)
        await asyncio.sleep(interval_s)
