"""What a worker session runs for its deliveries, wired once per connection.

One confirming publisher, the settler on top of it, the delivery hooks (metrics and
logging first, then any the caller adds), the triage handler and one dispatcher per pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel

from pipeline.broker.names import Names
from pipeline.dispatch.cancels import CancelRegistry
from pipeline.dispatch.dispatcher import Dispatcher
from pipeline.observe.hooks import DeliveryHook, Hooks, LoggingHook
from pipeline.observe.metrics import Metrics
from pipeline.observe.metrics_hook import MetricsHook
from pipeline.scheduling.meter import TenantMeter
from pipeline.scheduling.policy import PoolScheduler
from pipeline.scheduling.tenants import TenantBook
from pipeline.settings import Settings
from pipeline.settle.guard import ReplyGuard
from pipeline.settle.publisher import Publisher
from pipeline.settle.settler import Settler
from pipeline.worker.triage import PoolStatus, Triage

__all__ = ["Handlers"]


@dataclass(frozen=True)
class Handlers:
    """The triage handler and the dispatcher of each pool, sharing one settler."""

    triage: Triage
    dispatchers: dict[str, Dispatcher]

    @staticmethod
    def schedulers(settings: Settings) -> dict[str, PoolScheduler]:
        """One scheduler per pool: its tenants' counters outlive a reconnect."""
        book = TenantBook(settings.tenants)
        return {pool.name: PoolScheduler(pool.name, pool.scheduling, book)
                for pool in settings.pools}

    @classmethod
    def build(cls, settings: Settings, channel: AbstractChannel, metrics: Metrics,
              cancels: CancelRegistry, extra_hooks: Sequence[DeliveryHook] = (), *,
              pool_status: PoolStatus | None = None,
              schedulers: dict[str, PoolScheduler] | None = None) -> Handlers:
        """``channel`` must have publisher confirms and ``on_return_raises`` on."""
        names = Names(settings.prefix)
        guard = ReplyGuard.from_settings(settings)
        schedulers = schedulers or cls.schedulers(settings)
        hooks = Hooks(MetricsHook(metrics), LoggingHook(), TenantMeter(schedulers, metrics),
                      *extra_hooks)
        settler = Settler(Publisher(channel), names, hooks, worker_user=guard.worker_user,
                          stream_window_s=settings.stream_window_ms / 1000,
                          stream_max_chunks=settings.stream_max_chunks)
        return cls(
            triage=Triage(settler, guard, names, pool_status),
            dispatchers={pool.name: Dispatcher(settings, pool, settler, guard, hooks, cancels,
                                               schedulers[pool.name])
                         for pool in settings.pools},
        )
