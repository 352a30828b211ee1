"""The worker: consumes work queues and calls backends, one consumer per backend.

Shape (see the README's architecture section):

* For each backend the worker tries to take its **lease**, the exclusive queue
  ``<prefix>.lease.<backend>`` (:mod:`pipeline.worker.lease`): exactly one replica serves a
  backend at a time, and another takes over within seconds of a crash.
* The lease holder consumes the backend's pool queue with ``prefetch = max_concurrency``
  (:mod:`pipeline.worker.capacity` keeps it equal to what the backend's health and the
  pool's pause allow, :mod:`pipeline.worker.health`): the broker hands over a request only
  when a backend slot is free, in priority order at that moment.
* Every worker consumes the presence queue ``<prefix>.workers`` once, and
  ``<prefix>.workers.<pool>`` once per pool it serves (:mod:`pipeline.worker.presence`):
  a pool's consumer count is the number of live workers serving it, from which each
  worker's fair share of that pool's leases follows (whatever pools the others serve).
* Before a session, :mod:`pipeline.worker.startup` waits for queues whose node is down.
* Pause states are read every ``2 x lease_retry_s`` (:mod:`pipeline.worker.pause`); a read
  that cannot tell keeps the last known state. The triage queue is consumed by all.
* The connection is supervised here rather than by aio-pika's RobustConnection: a lease
  must not be silently re-declared on reconnect (another worker may hold it by then),
  and in-flight calls of a lost connection are cancelled at once, since their requests
  are already being redelivered elsewhere and finishing them would break the cap.
* SIGHUP reloads the configuration in place (:mod:`pipeline.worker.reload`); backends
  found by DNS come and go the same way (:mod:`pipeline.worker.discovery`).
* SIGTERM (:meth:`Worker.stop`): cancel the consumers, let in-flight requests finish
  within ``shutdown_grace_s``, then close the connection (freeing the leases).

The worker drives its parts by commands (``pause()``/``resume()`` on a backend's health,
``release()`` on its lease); none of them reaches back into the worker.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import socket
import uuid
from collections.abc import Callable, Sequence

import httpx
from aio_pika.abc import AbstractChannel, AbstractConnection

from pipeline.backends.breaker import BackendGate, BreakerPolicy
from pipeline.backends.http import Backend
from pipeline.backends.probe import probe_backends
from pipeline.broker.blocked import BlockedState
from pipeline.broker.connection import Reconnect
from pipeline.broker.names import Names
from pipeline.capacity.backlog import BacklogMeter
from pipeline.dispatch.cancels import CancelRegistry
from pipeline.observe.hooks import DeliveryHook
from pipeline.observe.log import get_logger
from pipeline.observe.metrics import Metrics
from pipeline.scheduling.lanes import LaneMap
from pipeline.scheduling.meter import sample_every
from pipeline.settings import BackendSettings, PoolSettings, Settings
from pipeline.worker.admission import Admission
from pipeline.worker.backlog_watch import watch_backlog
from pipeline.worker.cancels import CancelSubscription
from pipeline.worker.cap_claims import CapAgreement
from pipeline.worker.consumer import TrackedConsumer
from pipeline.worker.discovery import Discovery, Resolver, resolve
from pipeline.worker.handlers import Handlers
from pipeline.worker.health import BackendHealthReporter
from pipeline.worker.lease import Intake, Lease, LeaseHolder, LeaseTiming
from pipeline.worker.limits import concurrency_limit
from pipeline.worker.pause import PauseFollower
from pipeline.worker.presence import PoolPresence, Presence
from pipeline.worker.reload_stamp import ConfigStamp
from pipeline.worker.signals import watch_saturation
from pipeline.worker.slots import AMQP_ERRORS, Slot, Slots, guard
from pipeline.worker.startup import await_topology

__all__ = ["Worker"]

log = get_logger("hutch.worker")

class Worker:
    """Serves every backend of every pool in ``settings`` whose lease it can take."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None,
                 transport_factory: Callable[[BackendSettings], httpx.AsyncBaseTransport]
                 | None = None, hooks: Sequence[DeliveryHook] = (),
                 resolver: Resolver = resolve) -> None:
        self.settings = settings
        #: Each pool's service rate and tokens per request: its backlog estimates.
        self.backlog = BacklogMeter([pool.name for pool in settings.pools])
        #: Delivery hooks beyond metrics and logging (tracing, a tenant meter, ...).
        self._hooks = (*hooks, self.backlog)
        self.names = Names(settings.prefix)
        self.metrics = metrics or Metrics()
        self.metrics.configure(settings)
        #: The broker's resource alarms: replies wait them out unacked (nothing is lost).
        self.blocked = BlockedState(lambda on: self.metrics.broker_blocked.set(int(on)))
        self._transport_factory = transport_factory
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        #: Every backend's slot, by pool, and their loops in the session (a reload's too).
        self.slots = Slots(settings.shutdown_grace_s, self.backlog)
        self._publish_channel: AbstractChannel | None = None
        self._dispatch = settings  # what the dispatchers serve (a reload: see commit)
        self._admissions: dict[str, Admission] = {}
        self._triage: TrackedConsumer | None = None
        self._presence = Presence(self.names.workers_queue)
        self._pool_presence = PoolPresence(
            self.names, {pool.name: len(pool.backends) for pool in settings.pools},
            fresh_for_s=settings.lease_retry_s * 12)
        self._pauses = PauseFollower(self.names, [pool.name for pool in settings.pools])
        self.name = f"hutch-worker {socket.gethostname()}:{os.getpid()}"
        #: Cancels outlive a reconnect: one registry per worker, fed by one subscription
        #: (an exclusive queue of this worker's) per connection.
        self._cancels = CancelRegistry(
            ttl_s=settings.cancel_ttl_s, max_ids=settings.cancel_max_ids,
            privileged=frozenset({settings.amqp_user, *settings.trusted_users}))
        self._cancel_queue_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        #: Each pool's tenants and their counters: soft state that outlives a reconnect.
        self.schedulers = Handlers.schedulers(settings)
        #: What this worker's configuration is (generation, hash, caps): in its presence
        #: consumer's arguments, for ``hutch status`` and the other workers.
        self.stamp = ConfigStamp.of(settings)
        #: Other workers' caps for the backends this one holds: the stricter one holds.
        self.claims = CapAgreement(self.name, settings.lease_retry_s * 5)
        #: Backends whose replicas DNS names (``discover = "dns"``).
        self.discovery = Discovery(settings, resolver)

    def held_backends(self) -> list[str]:
        """Names of the backends whose lease this worker holds now."""
        return [slot.holder.name for slot in self.slots.all if slot.holder.lease.held]

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: connected and serving (safe from another thread: flags only)."""
        if self._stopping.is_set():
            return False, "draining"
        if not self.ready.is_set():
            return False, "connecting to the broker"
        return True, f"serving; {len(self.held_backends())} backend lease(s) held"

    def stop(self) -> None:
        """Ask the worker to finish: safe from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        """Connect, serve, reconnect on loss; return after :meth:`stop` and a drain."""
        self._admissions = {pool.name: self._admission(pool) for pool in self.settings.pools}
        for pool in self.settings.pools:
            for backend in self.discovery.static(pool):
                self.slots.install(self._slot(pool, backend))
        # A wrong backend url is logged now, not on the first request (not through injected
        # transports: tests and benchmarks script and count every call).
        changes = (self.add_backend, self.slots.retire, self._pool_presence.resize)
        await self.discovery.refresh(*changes)  # the replicas found now, then every while
        probe = asyncio.gather(self.discovery.run(*changes), probe_backends(
            [] if self._transport_factory else [slot.http for slot in self.slots.all]))
        # Backoff and a rate-limited log while the broker is unreachable; a refused vhost,
        # credentials or certificate is raised: retrying cannot cure it.
        reconnect = Reconnect(self.settings, name=self.name, heartbeat_s=self.settings.heartbeat_s)
        try:
            while (connection := await reconnect.connect(self._stopping)) is not None:
                await self._session(connection)
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await self.slots.close()
            log.info("worker.stopped")

    def _slot(self, pool: PoolSettings, settings: BackendSettings) -> Slot:
        """A backend's HTTP client, health and lease, each given only what it needs."""
        transport = self._transport_factory(settings) if self._transport_factory else None
        gate = BackendGate(BreakerPolicy(failure_threshold=pool.breaker_failures,
                                         cooldown_s=pool.breaker_cooldown_s))
        admission = self._admissions[pool.name]
        health = BackendHealthReporter(settings.name, settings.max_concurrency, gate,
                                       self.metrics.backend_state.labels(settings.name),
                                       per_model_throttle=settings.throttle_scope == "model",
                                       limit=concurrency_limit(settings),
                                       in_flight=functools.partial(admission.in_use,
                                                                   settings.name))
        timing = LeaseTiming(self.settings.lease_retry_s, self.settings.shutdown_grace_s)
        lease = Lease(self.names.lease_queue(settings.name), settings.name, timing,
                      self.metrics.lease_held.labels(settings.name))
        scheduling = pool.scheduling
        sorts = scheduling.policy == "fair" and scheduling.lookahead > 0
        lanes = LaneMap(self.names, pool.name, scheduling).queues() if sorts else []
        intake = Intake(self.names.work_queue(pool.name), admission, lanes)
        holder = LeaseHolder(lease, health, pool.name, intake,
                             self.metrics.capacity.labels(settings.name),
                             may_take=functools.partial(self._may_take_more, pool.name,
                                                        settings.name),
                             draining=self._stopping)
        slot = Slot(Backend(settings, transport), holder)
        if settings.concurrency == "adaptive" and settings.metrics_url is not None:
            holder.watch = functools.partial(watch_saturation, health, lambda: slot.http.metrics)
        return slot

    # -- what a reload changes (pipeline.worker.reload decides, checks and logs) ----------

    def add_pool(self, pool: PoolSettings, settings: Settings) -> None:
        """Serve a new pool (of ``settings``): its admission, scheduler, presence and
        pause state; its backends come with :meth:`add_backend`."""
        self.schedulers[pool.name] = Handlers.schedulers(settings)[pool.name]
        self._admissions[pool.name] = self._admission(pool)
        self._pool_presence.add(pool.name, len(pool.backends))
        self._pauses.follow(pool.name)

    def commit(self, settings: Settings, stamp: ConfigStamp,
               dispatch: Settings | None = None) -> None:
        """``settings`` is the configuration from now on: this session's dispatchers are
        rebuilt from it or ``dispatch`` (requests in flight keep theirs), shares resized."""
        self.settings, self.stamp, self._dispatch = settings, stamp, dispatch or settings
        self.metrics.configure(settings)
        for pool in settings.pools:
            self._pool_presence.resize(pool.name, len(pool.backends))
        if self._publish_channel is not None:
            self._build_handlers(self._publish_channel)

    async def announce(self) -> None:
        """Show the current :attr:`stamp` in the presence queue (consume again with it),
        then join the presence and read the pause state of pools added meanwhile."""
        if (connection := self.slots.connection) is not None:
            await self._presence.rejoin(connection, self.stamp.arguments())
            await self._pool_presence.join(connection)
            await self._check_pauses(connection)

    def add_backend(self, pool: PoolSettings, backend: BackendSettings) -> None:
        """A new backend: its slot, competing for its lease at once."""
        self.slots.install(self._slot(pool, backend))

    def swap_backend(self, backend: BackendSettings) -> None:
        """New settings for a served backend: see :meth:`Slots.swap`."""
        transport = self._transport_factory(backend) if self._transport_factory else None
        self.slots.swap(backend.name, Backend(backend, transport), backend.max_concurrency)

    def leave_pool(self, pool: str) -> asyncio.Task[None]:
        """Stop being counted as a worker of ``pool`` (after its backends retired)."""
        self._pauses.unfollow(pool)
        return self.slots.chore(self._pool_presence.remove(pool))

    def _admission(self, pool: PoolSettings) -> Admission:
        """The pool's admission in this worker: its backends' permits, one waiting set."""
        scheduling = pool.scheduling
        return Admission(self.schedulers[pool.name].policy(), lookahead=scheduling.lookahead,
                         sorts=scheduling.policy == "fair" and scheduling.lookahead > 0)

    def _holders(self, pool: str) -> list[LeaseHolder]:
        return [slot.holder for slot in self.slots.all if slot.holder.pool == pool]

    def _may_take_more(self, pool: str, backend: str) -> bool:
        """False while this worker holds its share of ``pool`` (leave its free leases to
        the pool's other workers), or once a reload removed ``backend``."""
        if backend in self.slots.retiring:
            return False
        held = sum(1 for holder in self._holders(pool) if holder.lease.held)
        return not self._pool_presence.reached(pool, held)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _handlers(self, connection: AbstractConnection) -> Handlers:
        """This session's delivery handlers, on one confirming publisher."""
        self.blocked.attach(connection)
        publish_channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
        self._publish_channel = publish_channel
        return self._build_handlers(publish_channel)

    def _build_handlers(self, publish_channel: AbstractChannel) -> Handlers:
        handlers = Handlers.build(self._dispatch, publish_channel, self.metrics,
                                  self._cancels, self._hooks, pool_status=self.slots.pool_status,
                                  schedulers=self.schedulers)
        self.slots.dispatchers.update(handlers.dispatchers)
        return handlers

    async def _start(self, connection: AbstractConnection) -> list[asyncio.Task[None]]:
        """Join, consume the triage queue, follow pauses, then compete for the leases."""
        await await_topology(connection, self.settings, self._stopping)
        handlers = await self._handlers(connection)
        self._triage = TrackedConsumer(await connection.channel(), self.names.triage_queue,
                                       self.settings.triage_prefetch, handlers.triage.handle)
        await self._triage.start()
        await self._presence.join(connection, self.stamp.arguments())
        await self._pool_presence.join(connection)
        await CancelSubscription(self.names, self._cancel_queue_id, self._cancels).start(
            connection)
        await self._check_pauses(connection)  # before any consumer starts
        for _ in range(2):  # a state that cannot be read yet: a few tries, then running
            if not self._pauses.unknown():
                break
            await asyncio.sleep(self.settings.lease_retry_s)
            await self._check_pauses(connection)
        self.slots.begin(connection)
        tasks = [asyncio.create_task(guard("rebalance",
                                                 lambda: self._rebalance(connection)))]
        tasks.append(asyncio.create_task(guard("pauses",
                                                     lambda: self._watch_pauses(connection))))
        tasks.append(asyncio.create_task(guard("tenants", functools.partial(
            sample_every, self.schedulers, self.metrics))))
        tasks.append(asyncio.create_task(guard("backlog", functools.partial(
            watch_backlog, connection, self.slots.queues, self.backlog,
            self.slots.held_share, self.metrics))))
        tasks.append(asyncio.create_task(guard("claims", functools.partial(
            self.claims.run, connection, self.slots))))
        return tasks

    async def _session(self, connection: AbstractConnection) -> None:
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        tasks: list[asyncio.Task[None]] = []
        try:
            tasks = await self._start(connection)
            log.info("worker.ready", backends=len(self.slots.all), vhost=self.settings.vhost)
            self.ready.set()
            stop_wait = asyncio.create_task(self._stopping.wait())
            lost_wait = asyncio.create_task(lost.wait())
            await asyncio.wait({stop_wait, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            lost_wait.cancel()
            if self._stopping.is_set() and not lost.is_set():
                await self._drain()
            else:
                log.warning("amqp.connection_lost", in_flight_cancelled=self._in_flight())
        except AMQP_ERRORS as exc:
            log.warning("amqp.session_failed", error=repr(exc))
        finally:
            await self._end_session(connection, tasks)

    async def _end_session(self, connection: AbstractConnection,
                           tasks: list[asyncio.Task[None]]) -> None:
        """Cancel the session's loops and consumers, close the connection."""
        self.ready.clear()
        tasks = [*tasks, *self.slots.end()]
        self._publish_channel = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._triage is not None:
            await self._triage.abort()
            self._triage = None
        await self._presence.leave()
        await self._pool_presence.leave()
        if not connection.is_closed:
            try:
                await connection.close()
            except Exception:
                pass
        if not self._stopping.is_set():
            await self._sleep_unless_stopping(0.5)

    def _consumers(self) -> list[TrackedConsumer]:
        consumers = [slot.holder.consumer for slot in self.slots.all
                     if slot.holder.consumer is not None]
        return consumers + ([self._triage] if self._triage is not None else [])

    def _in_flight(self) -> int:
        return sum(consumer.in_flight for consumer in self._consumers())

    async def _drain(self) -> None:
        """Graceful stop: no new deliveries, finish what we hold, within the grace period."""
        consumers = self._consumers()
        log.info("worker.draining", in_flight=self._in_flight(),
                 grace_s=self.settings.shutdown_grace_s)
        await asyncio.gather(*(consumer.stop_consuming() for consumer in consumers))
        for admission in self._admissions.values():  # what waits goes back to the broker
            admission.hand_back()
        results = await asyncio.gather(
            *(consumer.drain(self.settings.shutdown_grace_s) for consumer in consumers))
        if not all(results):
            log.warning("worker.grace_expired", unfinished=self._in_flight(),
                        note="unfinished requests are redelivered by the broker")

    async def _watch_pauses(self, connection: AbstractConnection) -> None:
        """Follow the pools' pause states (``<prefix>.pause.<pool>``)."""
        while True:
            await asyncio.sleep(self.settings.lease_retry_s * 2)
            await self._check_pauses(connection)

    async def _check_pauses(self, connection: AbstractConnection) -> None:
        await self._pauses.apply(connection, [slot.holder for slot in list(self.slots.all)])

    async def _rebalance(self, connection: AbstractConnection) -> None:
        """Spread each pool's leases over the workers serving it: a worker holding more
        than its fair share of a pool's backends (by the pool's presence count) gives
        one up, which only a worker serving that pool competes for, so new replicas get
        work, not only failover duty, and no backend is left without a taker."""
        interval = self.settings.lease_retry_s * 5
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            for pool, (workers, fair) in (await self._pool_presence.refresh(connection)
                                          ).items():
                held = [holder for holder in self._holders(pool)
                        if holder.lease.held and not holder.lease.releasing]
                if len(held) > fair:
                    holder = random.choice(held)
                    log.info("lease.rebalance", backend=holder.name, pool=pool,
                             held=len(held), fair_share=fair, workers=workers)
                    holder.lease.release()
