"""Read each pool's ready requests every few seconds and export the backlog estimates.

Only a worker that holds at least one backend of a pool reads it (a passive declare of
the pool's queue and lanes: no management API needed); the figures it exports are
:class:`~pipeline.capacity.backlog.BacklogEstimate`'s. A queue that cannot be read (its
node is down, the topology is missing) skips that round, on a fresh channel next time.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from pipeline.capacity.backlog import BacklogEstimate, BacklogMeter
from pipeline.observe.log import get_logger
from pipeline.observe.metrics import Metrics

__all__ = ["AMQP_READ_ERRORS", "BACKLOG_INTERVAL_S", "ready_counts", "watch_backlog"]

log = get_logger("hutch.capacity")

#: How often a pool's backlog is read.
BACKLOG_INTERVAL_S = 5.0

AMQP_READ_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, asyncio.TimeoutError)


async def ready_counts(channel: AbstractChannel, queues: Sequence[str]) -> dict[str, int]:
    """Each queue's ready messages (a passive declare each)."""
    counts: dict[str, int] = {}
    for name in queues:
        declared = await channel.declare_queue(name, passive=True)
        counts[name] = declared.declaration_result.message_count or 0
    return counts


def _export(metrics: Metrics, pool: str, estimate: BacklogEstimate) -> None:
    label = metrics.pool_label(pool)
    metrics.child(metrics.backlog_requests, label).set(estimate.requests)
    metrics.child(metrics.backlog_tokens, label).set(
        math.nan if estimate.tokens is None else estimate.tokens)
    metrics.child(metrics.drain_seconds, label).set(
        math.nan if estimate.drain_s is None else estimate.drain_s)


async def watch_backlog(connection: AbstractConnection,
                        queues: Callable[[], Mapping[str, Sequence[str]]],
                        meter: BacklogMeter, share: Callable[[str], float],
                        metrics: Metrics, *, interval_s: float = BACKLOG_INTERVAL_S) -> None:
    """Until cancelled: every ``interval_s``, for each pool (``queues()``: its queue and
    lanes, read each round: a reload may add pools) of which this worker holds a
    ``share`` of the backends, export the estimate."""
    channel: AbstractChannel | None = None
    while True:
        await asyncio.sleep(interval_s)
        for pool, names in queues().items():
            held = share(pool)
            if held <= 0 or pool not in meter.rates:
                continue
            try:
                if channel is None or channel.is_closed:
                    channel = await connection.channel()
                ready = sum((await ready_counts(channel, names)).values())
            except AMQP_READ_ERRORS as exc:
                log.info("backlog.unreadable", pool=pool, error=repr(exc))
                channel = None
                continue
            _export(metrics, pool, BacklogEstimate.of(ready, meter.rates[pool], held))
