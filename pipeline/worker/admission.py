"""A pool's admission in one worker: which delivered request starts next, where, and when.

Between the consumers and the dispatcher. Each leased backend's consumer holds a few
requests beyond the backend's free slots (its lookahead); each arrives here parsed
(tenant, band, priority known) and waits for a permit of *any* of the pool's backends in
this worker: each backend has ``limit`` permits, its current limit (its health's, later
an adaptive one); lowering it stops granting, it never aborts what runs. When a permit
frees, the policy (:mod:`pipeline.scheduling.policy`) picks the waiting request that goes
next and it starts on that backend at once, without a broker round trip; a request held
here is never kept from a free slot of its pool in this worker.

Every waiting request ends in one :class:`Verdict`: ``START`` (it holds a permit of the
backend :meth:`Admission.acquire` names), ``HAND_BACK`` (no backend here can serve it, or
the consumer that delivered it is going away: requeue it for any backend of the pool) or
``MOVE`` (every backend is saturated and this is the request the policy would serve last:
sort it into its tenant's lane, so the pool's queue behind it keeps flowing). The task
that holds the delivery carries the verdict out; this object does no I/O.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from pipeline.delivery import Delivery
from pipeline.scheduling.policy import FifoPolicy, WaitingPolicy

__all__ = ["SORT_CREDITS", "Admission", "Grant", "Verdict"]

#: While sorting, each consumer takes this many more deliveries than its permits and its
#: lookahead: the moves to the lanes in flight at once (each waits for its confirm), so a
#: flood drains out of the pool's queue at the broker's pace, not one confirm at a time.
SORT_CREDITS = 32


class Verdict(enum.Enum):
    START = "start"
    HAND_BACK = "hand_back"
    MOVE = "move"


@dataclass(frozen=True, slots=True)
class Grant:
    """What became of a waiting request: its verdict and, to start, the backend."""

    verdict: Verdict
    backend: str | None = None


@dataclass
class _Permits:
    limit: int = 0
    in_use: int = 0

    @property
    def free(self) -> int:
        return self.limit - self.in_use


class Admission:
    """Permits per backend and the waiting set of one pool in this worker."""

    def __init__(self, policy: WaitingPolicy | None = None, *, lookahead: int = 0,
                 sorts: bool = False) -> None:
        self._policy: WaitingPolicy = policy if policy is not None else FifoPolicy()
        #: Requests each serving backend lets wait here while every permit is taken;
        #: beyond them the one served last is moved to its lane (when ``sorts``).
        self.lookahead = lookahead
        self._sorts = sorts
        self._permits: dict[str, _Permits] = {}
        self._futures: dict[int, asyncio.Future[Grant]] = {}
        #: Set when a backend's last running request ends (see :meth:`drained`).
        self._idle: dict[str, asyncio.Event] = {}

    @property
    def prefetch_extra(self) -> int:
        """What a backend's consumer takes beyond its permits: the lookahead, and while
        sorting :data:`SORT_CREDITS` more, so that requests beyond the window arrive (and
        are moved out) while the window stays full."""
        return self.lookahead + SORT_CREDITS if self._sorts else self.lookahead

    def limit(self, backend: str) -> int:
        return self._permits.setdefault(backend, _Permits()).limit

    def in_use(self, backend: str | None = None) -> int:
        if backend is not None:
            return self._permits.setdefault(backend, _Permits()).in_use
        return sum(p.in_use for p in self._permits.values())

    @property
    def waiting(self) -> int:
        return len(self._policy)

    def waiting_requests(self) -> list[Delivery]:
        return self._policy.entries()

    @property
    def serving(self) -> bool:
        """Some backend of the pool may start requests here (a limit above 0)."""
        return any(p.limit for p in self._permits.values())

    def must_wait(self) -> bool:
        """A request arriving now would wait for a permit: others wait, or none is free
        (False while nothing serves: it goes back, see :meth:`acquire`)."""
        return self.serving and (bool(len(self._policy)) or self._free_backend(None) is None)

    def set_limit(self, backend: str, limit: int) -> None:
        """``backend`` may now run ``limit`` requests at once (a raise starts waiters;
        when no backend of the pool may run any, whatever waits goes back)."""
        self._permits.setdefault(backend, _Permits()).limit = max(0, limit)
        self._grant()
        if not self.serving:
            self.hand_back()

    async def acquire(self, delivery: Delivery) -> Grant:
        """Wait for a permit (or another verdict). A START must be :meth:`release`d."""
        if not self.serving:
            # No backend of the pool may start anything here (a circuit just opened, a
            # lease is being handed over): a delivery the broker sent before the
            # consumer's cancel took effect goes back at once. Kept waiting for a permit
            # nobody grants, it would stay unacked here, never expire in the queue, and
            # its client would get no answer at all.
            return Grant(Verdict.HAND_BACK)
        if not len(self._policy):
            backend = self._free_backend(delivery.backend)
            if backend is not None:  # the fast path: nothing waits, a permit is free
                self._permits[backend].in_use += 1
                return Grant(Verdict.START, backend)
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._futures[id(delivery)] = future
        self._policy.push(delivery)
        self._grant()
        self._sort()
        try:
            return await future
        except asyncio.CancelledError:
            if self._policy.remove(delivery):
                self._futures.pop(id(delivery), None)
            elif future.done() and not future.cancelled():
                grant = future.result()
                if grant.verdict is Verdict.START and grant.backend is not None:
                    self.release(grant.backend)
            raise

    def release(self, backend: str) -> None:
        """A request started on ``backend`` ended: the permit goes to whoever the policy
        picks."""
        self._permits[backend].in_use -= 1
        if not self._permits[backend].in_use and backend in self._idle:
            self._idle[backend].set()
        self._grant()

    async def drained(self, backend: str, timeout_s: float) -> bool:
        """Wait until no request runs on ``backend``'s permits (its lease is handed over:
        a request another backend's consumer delivered may run on them); False if some
        still do after ``timeout_s``."""
        if not self.in_use(backend):
            return True
        event = self._idle.setdefault(backend, asyncio.Event())
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass
        return not self.in_use(backend)

    def hand_back(self, source: str | None = None) -> int:
        """Waiting requests go back to the broker: all of them, or those ``source``'s
        consumer delivered (its channel is about to close: they must be settled on it)."""
        handed = 0
        for delivery in self._policy.entries():
            if source is None or delivery.backend == source:
                self._policy.remove(delivery)
                self._resolve(delivery, Grant(Verdict.HAND_BACK))
                handed += 1
        return handed

    def _free_backend(self, preferred: str | None) -> str | None:
        """A backend with a free permit: ``preferred`` if it has one, else the freest."""
        own = self._permits.get(preferred or "")
        if own is not None and own.free > 0:
            return preferred
        best = max(self._permits.items(), key=lambda item: item[1].free, default=None)
        return best[0] if best is not None and best[1].free > 0 else None

    def _grant(self) -> None:
        while len(self._policy):
            backend = self._free_backend(None)
            if backend is None:
                return
            delivery = self._policy.pop()
            if delivery is None:
                return
            # A permit counts only once a waiter has it: one whose task is being cancelled
            # (its future already is) would never release it.
            if self._resolve(delivery, Grant(Verdict.START, backend)):
                self._permits[backend].in_use += 1

    def _sort(self) -> None:
        """Saturated: move what would be served last out of the window (to its lane)."""
        if not self._sorts or self._free_backend(None) is not None:
            return
        serving = sum(1 for p in self._permits.values() if p.limit > 0)
        while self._policy.movable() > self.lookahead * max(1, serving):
            last = self._policy.last_movable()
            if last is None:
                return
            self._policy.remove(last)
            self._resolve(last, Grant(Verdict.MOVE))

    def _resolve(self, delivery: Delivery, grant: Grant) -> bool:
        """Give ``delivery``'s waiter its verdict; False if nobody waits for it any more
        (its task was cancelled and has not yet taken it out of the policy)."""
        future = self._futures.pop(id(delivery), None)
        if future is None or future.done():
            return False
        future.set_result(grant)
        return True
