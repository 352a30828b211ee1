"""The worker's backends: one slot each, their lease loops, and what a reload does to them.

A :class:`Slot` is one backend as the worker drives it: its HTTP client and its lease
holder (:mod:`pipeline.worker.lease`). :class:`Slots` keeps them by pool, runs each
one's lease loop in the worker's session, and makes the changes a config reload decides
(:mod:`pipeline.worker.reload`):

* **swap** a backend's HTTP client (a new URL or cap): requests that start later use the
  new one, those running finish on the old one, which closes after its last request;
* **add** a slot, competing for its lease at once;
* **retire** a slot: it takes no new lease, hands its lease over like a rebalance (no new
  deliveries, what runs finishes within the grace period, the lease queue is deleted),
  and goes once nothing runs on it, its client closed.

The delivery handlers read the slots by pool and the pools' dispatchers per delivery, so
changing them in place changes what the next delivery meets, never one in flight.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from pipeline.backends.http import Backend
from pipeline.dispatch import decide
from pipeline.dispatch.dispatcher import Dispatcher
from pipeline.observe.log import get_logger
from pipeline.worker.admission import Verdict
from pipeline.worker.consumer import Handler
from pipeline.worker.lease import LeaseHolder

__all__ = ["AMQP_ERRORS", "Slot", "Slots", "guard"]

log = get_logger("hutch.worker")

#: What a lost connection or channel raises.
AMQP_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, asyncio.TimeoutError)


async def guard(name: str, work: Callable[[], Awaitable[None]]) -> None:
    """Keep a backend's loop alive: log a failure and start it again after a pause."""
    while True:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except AMQP_ERRORS as exc:
            log.warning("backend.loop_failed", backend=name, error=repr(exc))
        except Exception:
            log.error("backend.loop_crashed", exc_info=True, backend=name)
        await asyncio.sleep(1.0)


@dataclass
class Slot:
    """One backend as the worker drives it: its HTTP client and its lease holder. A
    reload may swap ``http`` (a new URL or cap): requests started later use the new one."""

    http: Backend
    holder: LeaseHolder
    #: Requests in flight per HTTP client: a client swapped out closes once it has none.
    calls: Counter[Backend] = field(default_factory=Counter)

    def handler(self, dispatchers: Mapping[str, Dispatcher], pool: Mapping[str, Slot]
                ) -> Handler:
        """Deliveries of the pool's queue (and lanes) consumed for this backend: parsed
        once, admitted in the policy's order by the pool's admission, and dispatched to
        whichever backend of the pool (``pool``, by name) it grants a permit of. Both
        mappings are read per delivery: a reload changes them in place."""
        admission = self.holder.intake.admission

        async def handle(message: AbstractIncomingMessage) -> None:
            dispatcher = dispatchers[self.holder.pool]
            delivery = dispatcher.parse(message, self.holder.name)
            health = self.holder.health
            if decide.before_attempt(delivery, 1, available=True,
                                     fastest_s=health.fastest_s()) is not None:
                # Out of time already (or less left than the backend's fastest answer):
                # answered now, never a backend call, and without taking a permit a live
                # request could use (under overload, expired requests would otherwise
                # hold the backend's permits while their answers are confirmed).
                await dispatcher.handle(delivery, self.http, health)
                return
            if not any(admission.limit(name) for name in pool):
                # No backend of the pool may start anything here now (its circuit opened,
                # its lease is being handed over): a delivery the broker sent before the
                # consumer's cancel took effect goes back at once. Waiting for a permit
                # that no one grants, it stayed unacked here, so it could not expire in
                # the queue, and its client got no answer at all.
                await dispatcher.set_aside(delivery, move=False)
                return
            grant = await admission.acquire(delivery)
            if grant.verdict is Verdict.MOVE and delivery.deadline_passed():
                # Out of time already: answered now (refused or deadline_exceeded, never a
                # backend call), not moved to expire in a lane with a vaguer answer.
                await dispatcher.handle(delivery, self.http, self.holder.health)
                return
            if grant.verdict is not Verdict.START or grant.backend is None:
                await dispatcher.set_aside(delivery, move=grant.verdict is Verdict.MOVE)
                return
            slot = pool[grant.backend]
            delivery.backend = grant.backend
            http = slot.http  # this request's client, whatever a reload swaps in meanwhile
            slot.calls[http] += 1
            try:
                await dispatcher.handle(delivery, http, slot.holder.health)
            finally:
                admission.release(grant.backend)
                slot.calls[http] -= 1
        return handle


async def _poll_until(done: Callable[[], bool], timeout_s: float, step_s: float = 0.1
                      ) -> bool:
    """Wait for ``done`` (state other tasks change without signalling) or the timeout."""
    for _ in range(max(1, int(timeout_s / step_s))):
        if done():
            return True
        await asyncio.sleep(step_s)
    return done()


class Slots:
    """Every backend slot of a worker, by pool; their loops in the current session."""

    def __init__(self, grace_s: float) -> None:
        self._grace_s = grace_s
        self.all: list[Slot] = []
        self.by_pool: dict[str, dict[str, Slot]] = {}
        #: Each pool's dispatcher this session (rebuilt by a reload).
        self.dispatchers: dict[str, Dispatcher] = {}
        #: Backends being retired: they take no lease any more.
        self.retiring: set[str] = set()
        self._connection: AbstractConnection | None = None
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._chores: set[asyncio.Task[None]] = set()

    @property
    def connection(self) -> AbstractConnection | None:
        """The session's connection; None between sessions."""
        return self._connection

    def named(self, backend: str) -> Slot:
        return next(slot for slot in self.all if slot.holder.name == backend)

    def install(self, slot: Slot) -> None:
        """Add ``slot``; its loop runs if a session is live."""
        self.all.append(slot)
        self.by_pool.setdefault(slot.holder.pool, {})[slot.holder.name] = slot
        self._start(slot)

    def begin(self, connection: AbstractConnection) -> None:
        """A session starts: every slot's lease loop on ``connection``."""
        self._connection = connection
        for slot in self.all:
            self._start(slot)

    def end(self) -> list[asyncio.Task[None]]:
        """The session ends: its loops, for the worker to cancel."""
        loops = list(self._loops.values())
        self._connection, self._loops = None, {}
        return loops

    def _start(self, slot: Slot) -> None:
        if self._connection is None:
            return
        holder = slot.holder
        self._loops[holder.name] = asyncio.create_task(guard(
            holder.name, functools.partial(
                holder.run, self._connection,
                slot.handler(self.dispatchers, self.by_pool[holder.pool]))))

    def pool_status(self, pool: str) -> str | None:
        """A sentence when no backend of ``pool`` that this worker holds can take work
        (for the answer of a request that expired waiting), else None."""
        held = [slot.holder for slot in self.all
                if slot.holder.pool == pool and slot.holder.lease.held]
        out = [holder for holder in held if not holder.health.available()]
        if not held or len(out) < len(held):
            return None
        states = ", ".join(
            f"{holder.name} {'paused' if holder.health.paused else holder.health.gate.state}"
            for holder in out)
        return f"no backend of pool {pool!r} was serving ({states})"

    def held_share(self, pool: str) -> float:
        """The fraction of ``pool``'s backends whose lease this worker holds."""
        holders = [slot.holder for slot in self.all if slot.holder.pool == pool]
        return sum(h.lease.held for h in holders) / len(holders) if holders else 0.0

    def queues(self) -> dict[str, list[str]]:
        """Each pool's work queue and lanes: where its ready requests are."""
        return {slot.holder.pool: [slot.holder.intake.work_queue, *slot.holder.intake.lanes]
                for slot in self.all}

    def swap(self, backend: str, http: Backend, max_concurrency: int) -> None:
        """``http`` for requests that start from now on; a new cap goes to the backend's
        capacity controller (its admission's permits and its prefetch follow)."""
        slot = self.named(backend)
        old, slot.http = slot.http, http
        health = slot.holder.health
        if health.max_concurrency != max_concurrency:
            health.max_concurrency = max_concurrency
            health.changed.set()
        self.chore(self._close_when_idle(slot, old))

    def retire(self, backend: str) -> asyncio.Task[None]:
        """Stop serving ``backend`` (see the module's docstring); the task doing it."""
        self.retiring.add(backend)
        return self.chore(self._retire(self.named(backend)))

    def chore(self, work: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``work`` in the background, cancelled by :meth:`close`."""
        task = asyncio.ensure_future(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)
        return task

    async def close(self) -> None:
        """The worker stops: background work cancelled, every client closed."""
        for chore in self._chores:
            chore.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)
        for slot in self.all:
            await slot.http.aclose()

    async def _retire(self, slot: Slot) -> None:
        holder = slot.holder
        if holder.lease.held:
            holder.lease.release()  # drain, then delete the lease queue
            await _poll_until(lambda: not holder.lease.held, self._grace_s + 10)
        loop = self._loops.pop(holder.name, None)
        if loop is not None:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            await self._drop_lease_queue(holder.lease.queue)
        await self._close_when_idle(slot, slot.http)
        self.all.remove(slot)
        self.by_pool[holder.pool].pop(holder.name, None)
        self.retiring.discard(holder.name)
        log.info("backend.retired", backend=holder.name, pool=holder.pool)

    async def _drop_lease_queue(self, queue: str) -> None:
        """A lease taken just as its loop was cancelled would stay this connection's, and
        nobody could serve the backend: delete it (refused, harmlessly, if another
        worker's connection holds it)."""
        if self._connection is None:
            return
        try:
            channel = await self._connection.channel(publisher_confirms=False)
            await channel.queue_delete(queue)
            await channel.close()
        except AMQP_ERRORS:
            pass

    async def _close_when_idle(self, slot: Slot, http: Backend) -> None:
        """Close ``http`` once no request runs on it (they end by the grace period)."""
        await _poll_until(lambda: slot.calls[http] <= 0, self._grace_s + 60)
        slot.calls.pop(http, None)
        await http.aclose()
