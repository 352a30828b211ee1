"""The tenant meter: charges each tenant for the service it actually got.

A delivery hook (:mod:`pipeline.observe.hooks`): the scheduler charged the prompt estimate
when it started the request; when the request settles, the charge is trued up to its real
cost (``usage``; without one, estimated from the answer's size), and a request that
failed, was cancelled before any output or handed back is refunded, so a tenant is never
charged for service it did not get (its output streamed before a failure stays charged).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.delivery import Delivery
from pipeline.observe.hooks import DeliveryHook, Settlement
from pipeline.outcome import Completed, Outcome
from pipeline.scheduling.policy import PoolScheduler, prompt_tokens

__all__ = ["TenantMeter"]


class TenantMeter(DeliveryHook):
    """Trues up or refunds each settled delivery's charge in its pool's scheduler."""

    def __init__(self, schedulers: Mapping[str, PoolScheduler]) -> None:
        self._schedulers = schedulers

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        scheduler = self._schedulers.get(delivery.pool)
        if scheduler is None or (delivery.charged == 0 and not isinstance(outcome, Completed)):
            return
        weights = scheduler.scheduling
        if isinstance(outcome, Completed):
            usage = outcome.usage
            prompt = usage.prompt_tokens if usage else prompt_tokens(delivery)
            completion = usage.completion_tokens if usage else len(outcome.body) // 4
            scheduler.quota.record(delivery.tenant, prompt + completion)
        elif delivery.stream is not None and delivery.stream.chunks:
            prompt, completion = prompt_tokens(delivery), delivery.stream.chunks
        else:
            prompt = completion = 0
        cost = weights.prompt_weight * prompt + weights.completion_weight * completion
        scheduler.charge(delivery, cost - delivery.charged)
