"""Who goes next at a backend: the ordering policies of its admission's waiting set.

:class:`PoolScheduler` is one pool's scheduling state in a worker: its tenants' virtual
token counters (:mod:`pipeline.scheduling.vtc`), their quota use, and how many requests
each tenant has waiting at the pool's backends here. Each backend's admission
(:mod:`pipeline.worker.admission`) orders its waiting requests with a policy made by it:

* :class:`FairPolicy`: the highest band first (strict); inside it, tenants within their
  quota before those over it ("overflow"); then the tenant with the lowest weighted
  virtual token counter; inside a tenant, the highest priority, then the earliest sent.
* :class:`FifoPolicy`: priority, then arrival (what the broker alone would do).

Both also name the request they would serve last, which a saturated backend moves into its
tenant's lane (:mod:`pipeline.worker.lanes`). Waiting sets are small (a backend's lookahead
plus its lanes' heads), so a linear scan beats keeping an index up to date.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Protocol

from pipeline.delivery import Delivery
from pipeline.scheduling.settings import PoolScheduling
from pipeline.scheduling.tenants import QuotaMeter, TenantBook
from pipeline.scheduling.vtc import VirtualTokenCounter

__all__ = ["FairPolicy", "FifoPolicy", "PoolScheduler", "WaitingPolicy", "prompt_tokens"]

_FORGET_EVERY = 256
#: A tenant without waiting requests for less than this is not "returning": its next
#: request arriving (the next head of its lane, a round trip away) keeps its counter.
_RETURN_AFTER_S = 1.0


def prompt_tokens(delivery: Delivery) -> int:
    """The prompt's size in tokens, estimated from the body before any backend saw it
    (about four bytes a token; ``usage`` trues it up at the end)."""
    return max(1, len(delivery.message.body) // 4)


class WaitingPolicy(Protocol):
    """A backend's waiting requests, in the order they will start."""

    def __len__(self) -> int: ...
    def push(self, delivery: Delivery) -> None: ...
    def pop(self) -> Delivery | None: ...
    def remove(self, delivery: Delivery) -> bool: ...
    def last_movable(self) -> Delivery | None: ...
    def entries(self) -> list[Delivery]: ...


class PoolScheduler:
    """One pool's tenants as this worker sees them; makes its backends' policies."""

    def __init__(self, pool: str, scheduling: PoolScheduling, book: TenantBook,
                 quota: QuotaMeter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.scheduling = scheduling
        self.book = book
        self.quota = quota or QuotaMeter(book)
        self.vtc = VirtualTokenCounter()
        #: Requests waiting per tenant at this pool's backends in this worker.
        self.waiting: dict[str, int] = {}
        #: Requests running per tenant (by id): a stream's output is charged as it flows.
        self._running: dict[str, dict[int, Delivery]] = {}
        #: When each tenant last had nothing waiting here (a lift needs a real absence).
        self._idle_since: dict[str, float] = {}
        self._clock = clock
        self._picks = 0
        #: Jain's index: weighted service per tenant backlogged in the current window.
        self._window_start = clock()
        self._window: dict[str, float] = {}
        self._last_index: float | None = None

    def policy(self) -> WaitingPolicy:
        """The waiting set of one more backend of the pool."""
        if self.scheduling.policy == "fifo":
            return FifoPolicy()
        return FairPolicy(self)

    def classify(self, delivery: Delivery) -> None:
        """Set the delivery's tenant, served priority and band (once, when it arrives)."""
        delivery.tenant = self.book.tenant_of(delivery.client)
        delivery.served_priority = self.book.served_priority(delivery.tenant,
                                                             delivery.priority)
        delivery.band = self.scheduling.band_of(delivery.served_priority)

    def over_quota(self, tenant: str) -> bool:
        return self.quota.over(tenant)

    def rejects(self, delivery: Delivery) -> bool:
        """Whether the delivery must be refused: its tenant is over a hard quota."""
        settings = self.book.settings(delivery.tenant)
        return settings.over_quota == "reject" and self.quota.over(delivery.tenant)

    def arrived(self, tenant: str) -> None:
        """One more request of ``tenant`` waits; lift it if it was not backlogged."""
        count = self.waiting.get(tenant, 0)
        self._window.setdefault(tenant, 0.0)
        if count == 0:
            idle_since = self._idle_since.pop(tenant, None)
            if idle_since is None or self._clock() - idle_since >= _RETURN_AFTER_S:
                others = [self.vtc.counter(t) for t in self.waiting]
                self.vtc.lift(tenant, min(others) if others else None)
        self.waiting[tenant] = count + 1

    def left(self, tenant: str) -> None:
        count = self.waiting.get(tenant, 0) - 1
        if count > 0:
            self.waiting[tenant] = count
        else:
            self.waiting.pop(tenant, None)
            self._idle_since[tenant] = self._clock()

    def counter(self, tenant: str) -> float:
        """The tenant's counter with the output its running streams sent so far (charged
        for good, from ``usage``, when they end)."""
        running = self._running.get(tenant)
        if not running:
            return self.vtc.counter(tenant)
        chunks = sum(d.stream.chunks for d in running.values() if d.stream is not None)
        weight = self.book.settings(tenant).weight
        return self.vtc.counter(tenant) + self.scheduling.completion_weight * chunks / weight

    def started(self, delivery: Delivery) -> None:
        """``delivery`` was picked to start: virtual time moves, its prompt is charged."""
        self.vtc.picked(delivery.tenant)
        self._running.setdefault(delivery.tenant, {})[id(delivery)] = delivery
        self.charge(delivery, self.scheduling.prompt_weight * prompt_tokens(delivery))
        self._picks += 1
        if self._picks % _FORGET_EVERY == 0:
            self.vtc.forget_idle(set(self.waiting))
            horizon = self._clock() - _RETURN_AFTER_S
            self._idle_since = {t: s for t, s in self._idle_since.items() if s > horizon}

    def ended(self, delivery: Delivery) -> None:
        """``delivery`` settled (its charge is trued up by the caller)."""
        running = self._running.get(delivery.tenant)
        if running is not None and running.pop(id(delivery), None) is not None \
                and not running:
            del self._running[delivery.tenant]

    def charge(self, delivery: Delivery, cost: float) -> None:
        """Charge (or, negative, refund) ``cost`` weighted tokens for ``delivery``."""
        if cost:
            weight = self.book.settings(delivery.tenant).weight
            self.vtc.charge(delivery.tenant, cost, weight)
            delivery.charged += cost
            if delivery.tenant in self._window:
                self._window[delivery.tenant] += cost / weight

    def fairness(self, window_s: float = 60.0) -> float | None:
        """Jain's index of the weighted service of the tenants that had requests waiting
        in the last full window (None before one has passed with two such tenants)."""
        if self._clock() - self._window_start >= window_s:
            shares = [max(0.0, x) for x in self._window.values()]
            total, squares = sum(shares), sum(x * x for x in shares)
            self._last_index = (total * total / (len(shares) * squares)
                                if len(shares) >= 2 and squares > 0 else None)
            self._window = {tenant: 0.0 for tenant in self.waiting}
            self._window_start = self._clock()
        return self._last_index


class _Ordered:
    """A waiting set ordered by a key; the scheduler hears of arrivals and departures."""

    def __init__(self, scheduler: PoolScheduler | None = None) -> None:
        self._entries: list[Delivery] = []
        self._scheduler = scheduler
        self._seq = itertools.count()
        self._order: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Delivery]:
        return list(self._entries)

    def key(self, delivery: Delivery) -> tuple[float, ...]:
        raise NotImplementedError

    def _arrival(self, delivery: Delivery) -> tuple[float, int]:
        sent = delivery.sent_at_ms
        return (float("inf") if sent is None else sent, self._order[id(delivery)])

    def push(self, delivery: Delivery) -> None:
        self._order[id(delivery)] = next(self._seq)
        self._entries.append(delivery)
        if self._scheduler is not None:
            self._scheduler.arrived(delivery.tenant)

    def remove(self, delivery: Delivery) -> bool:
        for i, entry in enumerate(self._entries):
            if entry is delivery:
                del self._entries[i]
                del self._order[id(delivery)]
                if self._scheduler is not None:
                    self._scheduler.left(delivery.tenant)
                return True
        return False

    def pop(self) -> Delivery | None:
        if not self._entries:
            return None
        best = min(self._entries, key=self.key)
        self.remove(best)
        if self._scheduler is not None:
            self._scheduler.started(best)
        return best

    def last_movable(self) -> Delivery | None:
        movable = [entry for entry in self._entries if entry.lane is None]
        return max(movable, key=self.key) if movable else None


class FifoPolicy(_Ordered):
    """Priority, then arrival: the broker's own order."""

    def key(self, delivery: Delivery) -> tuple[float, ...]:
        return (-delivery.priority, *self._arrival(delivery))


class FairPolicy(_Ordered):
    """Band, quota standing, weighted virtual tokens, then priority and arrival."""

    def __init__(self, scheduler: PoolScheduler) -> None:
        super().__init__(scheduler)
        self._pool = scheduler

    def key(self, delivery: Delivery) -> tuple[float, ...]:
        pool = self._pool
        return (-delivery.band, 1 if pool.over_quota(delivery.tenant) else 0,
                pool.counter(delivery.tenant), -delivery.served_priority,
                *self._arrival(delivery))
