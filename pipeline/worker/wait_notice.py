"""Status messages for queued requests that asked for one (``x-hutch-status-after-ms``).

When every backend of a pool is saturated, a request a worker receives from the pool's
queue waits in its admission or is moved into its tenant's lane
(:mod:`pipeline.worker.admission`): that is where a flood passes through a worker. If that
request asked for a status message and its estimated start (:mod:`pipeline.capacity.wait`,
as if it joined its lane) is more than the threshold it gave after it was sent, its client
gets one ``status`` message on its reply queue *before* the request joins the waiting set
(so it always comes before anything of the answer), and a copy of it in a lane or a
retry tier says so (``x-hutch-status-sent``): a request is told at most once (unless a
worker hands it back unchanged to the pool's queue after telling it: a stopping worker, a
full lane). Requests that did
not ask, and requests that start at once, cost nothing here.

The pool's lane depths are read (passive declares) at most every :data:`LANE_READ_S`, and
only while requests that asked are being moved; this worker's own moves and takes correct
them in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from aio_pika.abc import AbstractChannel, AbstractConnection

from pipeline.capacity.backlog import BacklogMeter, ServiceRate
from pipeline.capacity.wait import LaneDepths, WaitEstimate, estimate_wait, requests_ahead
from pipeline.delivery import Delivery
from pipeline.dispatch.dispatcher import Dispatcher
from pipeline.models import QueueStatus
from pipeline.observe.log import get_logger
from pipeline.worker.backlog_watch import AMQP_READ_ERRORS, ready_counts

__all__ = ["LANE_READ_S", "WaitNotices", "status_body"]

log = get_logger("hutch.capacity")

#: How old a pool's lane depths may be before an estimate reads them again.
LANE_READ_S = 1.0


def status_body(pool: str, estimate: WaitEstimate) -> bytes:
    """The JSON body of a status message (see :class:`~pipeline.models.QueueStatus`)."""
    tokens = estimate.tokens_ahead
    start_in = estimate.start_in_s
    return QueueStatus(
        pool=pool, position=estimate.position,
        tokens_ahead=None if tokens is None else round(tokens),
        estimated_start_s=None if start_in is None else round(start_in, 3),
        estimated_start_at_ms=estimate.start_at_ms,
        estimated_at_ms=int(estimate.estimated_at * 1000),
    ).model_dump_json().encode()


class WaitNotices:
    """One worker's status messages: lane depths per pool, the pools' service rates."""

    def __init__(self, meter: BacklogMeter, share: Callable[[str], float],
                 connection: Callable[[], AbstractConnection | None], *,
                 max_age_s: float = LANE_READ_S) -> None:
        self._meter = meter
        self._share = share
        self._connection = connection
        self._max_age_s = max_age_s
        self._depths: dict[str, LaneDepths] = {}
        #: The starts from each lane (by its queue's name).
        self._lanes: dict[str, ServiceRate] = {}
        self._reads: dict[str, asyncio.Task[None]] = {}
        self._channel: AbstractChannel | None = None

    def took(self, delivery: Delivery) -> None:
        """A lane delivered ``delivery`` to this worker: one less ready there."""
        depths = self._depths.get(delivery.pool)
        if depths is not None and delivery.lane is not None:
            depths.took(delivery.lane)

    def started(self, delivery: Delivery) -> None:
        """``delivery`` takes a permit: a start from its lane, if it came from one (the
        lane's pace; bounded: a few lanes per pool, one minute each)."""
        if delivery.lane is not None:
            self._lanes.setdefault(delivery.lane, ServiceRate()).completed(None)

    async def before_wait(self, dispatcher: Dispatcher, delivery: Delivery,
                          waiting: Sequence[Delivery]) -> None:
        """``delivery`` must wait (its pool is saturated here): if it asked for a status
        and was not told yet, estimate its start and tell it when later than it asked.
        Awaited before it joins the waiting set, so the status goes out before anything
        of its answer can (``waiting``: what waits in this worker's admission)."""
        after_ms = delivery.status_after_ms
        if after_ms is None or delivery.status_sent or delivery.lane is not None:
            return  # not asked, told already, or estimated when it was moved to a lane
        estimate = await self.estimate(dispatcher, delivery, waiting)
        if estimate.later_than(after_ms, delivery.sent_at_ms):
            # Its lane copy, if it is moved, carries the mark: told at most once.
            delivery.status_sent = await dispatcher.queue_status(
                delivery, status_body(delivery.pool, estimate))

    async def set_aside(self, dispatcher: Dispatcher, delivery: Delivery, move: bool
                        ) -> None:
        """:meth:`Dispatcher.set_aside`; a move corrects the lane's depth (from when it
        starts: a move waiting for its confirm is ahead of the next request already)."""
        depths = self._depths.get(delivery.pool) if move else None
        lane = dispatcher.lanes.lane_for(delivery)
        if depths is not None:
            depths.moved(lane)
        if not await dispatcher.set_aside(delivery, move) and depths is not None:
            depths.took(lane)  # it went back to the pool's queue instead

    async def estimate(self, dispatcher: Dispatcher, delivery: Delivery,
                       waiting: Sequence[Delivery]) -> WaitEstimate:
        """The estimated start of ``delivery``, about to join its lane."""
        lanes = dispatcher.lanes
        scheduling = dispatcher.scheduler.scheduling
        sorts = scheduling.policy == "fair" and scheduling.lookahead > 0
        # A pool that does not sort has no lanes: only what waits here is ahead.
        depths = (await self._fresh(delivery.pool, lanes.queues()) if sorts
                  else LaneDepths())
        lane = lanes.lane_for(delivery)
        ahead = requests_ahead(delivery.band, lane, lanes.by_band(), depths,
                               (other.band for other in waiting))
        rate = self._meter.rates.get(delivery.pool) or ServiceRate()
        return estimate_wait(ahead, rate, self._share(delivery.pool),
                             in_lane=depths.depth(lane), lane=self._lanes.get(lane))

    async def _fresh(self, pool: str, lanes: list[str]) -> LaneDepths:
        """The pool's lane depths, read again if stale (one read at a time per pool)."""
        depths = self._depths.setdefault(pool, LaneDepths())
        if depths.stale(self._max_age_s):
            read = self._reads.get(pool)
            if read is None or read.done():
                read = self._reads[pool] = asyncio.ensure_future(self._read(depths, lanes))
            await asyncio.shield(read)
        return depths

    async def _read(self, depths: LaneDepths, lanes: list[str]) -> None:
        connection = self._connection()
        if connection is None:
            return
        try:
            if self._channel is None or self._channel.is_closed:
                self._channel = await connection.channel()
            depths.read(await ready_counts(self._channel, lanes))
        except AMQP_READ_ERRORS as exc:  # estimated from what was read before
            log.info("wait.lanes_unreadable", error=repr(exc))
            self._channel = None
