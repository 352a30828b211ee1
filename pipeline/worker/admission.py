"""A backend's admission: which delivered request starts next, and when.

Between the consumer and the dispatcher. The consumer holds a few requests beyond the
backend's free slots (its lookahead); each arrives here parsed (tenant, band, priority
known) and waits for a permit. ``limit`` permits exist: the backend's current limit (its
health's, later an adaptive one); lowering it stops granting, it never aborts what runs.
When a permit frees, the policy (:mod:`pipeline.scheduling.policy`) picks the waiting
request that goes next, at once, without a broker round trip.

Every waiting request ends in one :class:`Verdict`: ``START`` (it holds a permit now),
``HAND_BACK`` (the backend stopped serving, the worker drains or hands its lease over:
requeue it for any backend of the pool) or ``MOVE`` (the backend is saturated and this is
the request its policy would serve last: sort it into its tenant's lane, so the pool's
queue behind it keeps flowing). The task that holds the delivery carries the verdict out;
this object does no I/O.
"""

from __future__ import annotations

import asyncio
import enum

from pipeline.delivery import Delivery
from pipeline.scheduling.policy import FifoPolicy, WaitingPolicy

__all__ = ["Admission", "Verdict"]


class Verdict(enum.Enum):
    START = "start"
    HAND_BACK = "hand_back"
    MOVE = "move"


class Admission:
    """Permits and the waiting set of one backend."""

    def __init__(self, backend: str, limit: int, policy: WaitingPolicy | None = None, *,
                 lookahead: int = 0, sorts: bool = False) -> None:
        self.backend = backend
        self._limit = limit
        self._policy: WaitingPolicy = policy if policy is not None else FifoPolicy()
        #: Requests that may wait here while every permit is taken; beyond them the one
        #: served last is moved to its lane (when ``sorts``).
        self.lookahead = lookahead
        self._sorts = sorts
        self._in_use = 0
        self._futures: dict[int, asyncio.Future[Verdict]] = {}

    @property
    def prefetch_extra(self) -> int:
        """What the consumer takes beyond the permits: the lookahead, and as many again
        while sorting, so that requests beyond the window arrive (and are moved out) while
        the window stays full."""
        return self.lookahead * 2 if self._sorts else self.lookahead

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._policy)

    def waiting_requests(self) -> list[Delivery]:
        return self._policy.entries()

    def set_limit(self, limit: int) -> None:
        """The backend may now run ``limit`` requests at once (a raise starts waiters)."""
        self._limit = max(0, limit)
        self._grant()

    async def acquire(self, delivery: Delivery) -> Verdict:
        """Wait for a permit (or another verdict). A START must be :meth:`release`d."""
        if self._in_use < self._limit and not len(self._policy):
            self._in_use += 1  # the fast path: nothing waits, a permit is free
            return Verdict.START
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._futures[id(delivery)] = future
        self._policy.push(delivery)
        self._grant()
        self._sort()
        try:
            return await future
        except asyncio.CancelledError:
            if self._policy.remove(delivery):
                self._futures.pop(id(delivery), None)
            elif future.done() and not future.cancelled() and future.result() is Verdict.START:
                self.release()
            raise

    def release(self) -> None:
        """A started request ended: its permit goes to whoever the policy picks."""
        self._in_use -= 1
        self._grant()

    def hand_back(self) -> int:
        """Every waiting request goes back to the broker (stop, drain, lease moved)."""
        handed = 0
        while (delivery := self._next()) is not None:
            self._resolve(delivery, Verdict.HAND_BACK)
            handed += 1
        return handed

    def _next(self) -> Delivery | None:
        entries = self._policy.entries()
        if not entries:
            return None
        self._policy.remove(entries[0])
        return entries[0]

    def _grant(self) -> None:
        while self._in_use < self._limit and len(self._policy):
            delivery = self._policy.pop()
            if delivery is None:
                break
            self._in_use += 1
            self._resolve(delivery, Verdict.START)

    def _sort(self) -> None:
        """Saturated: move what would be served last out of the window (to its lane)."""
        if not self._sorts or self._in_use < self._limit:
            return
        while len(self._policy) > self.lookahead:
            last = self._policy.last_movable()
            if last is None:
                return
            self._policy.remove(last)
            self._resolve(last, Verdict.MOVE)

    def _resolve(self, delivery: Delivery, verdict: Verdict) -> None:
        future = self._futures.pop(id(delivery), None)
        if future is not None and not future.done():
            future.set_result(verdict)
