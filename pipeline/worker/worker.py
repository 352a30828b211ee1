"""The worker: consumes work queues and calls backends, one consumer per backend.

Shape (see the README's architecture section):

* For each backend the worker tries to take its **lease**, the exclusive queue
  ``<prefix>.lease.<backend>``. The broker lets one connection hold it and frees it when
  that connection dies, so whatever the number of worker replicas, exactly one serves a
  backend at a time; the others retry every ``lease_retry_s`` and take over within
  seconds of a crash (the broker redelivers the dead holder's unacked requests).
* The lease holder consumes the backend's pool queue with ``prefetch = max_concurrency``:
  the broker hands over a request only when a backend slot is free, in priority order at
  that moment, and balances a pool's backends by itself (competing consumers).
* Every worker also consumes the triage queue (dead letters and unknown models).
* The connection is supervised here rather than by aio-pika's RobustConnection: a lease
  must not be silently re-declared on reconnect (another worker may hold it by then),
  and in-flight calls of a lost connection are cancelled at once, since their requests
  are already being redelivered elsewhere and finishing them would break the cap.
* SIGTERM (:meth:`Worker.stop`): cancel the consumers, let in-flight requests finish
  within ``shutdown_grace_s``, then close the connection (freeing the leases).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import httpx
from aio_pika.abc import AbstractConnection

from pipeline.backends.breaker import BackendGate, BreakerPolicy, LatencyFloor
from pipeline.backends.http import Backend
from pipeline.broker.names import Names
from pipeline.dispatch.dispatcher import Dispatcher
from pipeline.errors import TopologyError
from pipeline.observe.log import get_logger
from pipeline.observe.metrics import Metrics
from pipeline.settings import BackendSettings, PoolSettings, Settings
from pipeline.settle.publisher import Publisher, ReplyGuard
from pipeline.worker.consumer import TrackedConsumer
from pipeline.worker.pause import is_paused
from pipeline.worker.triage import Triage

__all__ = ["Worker"]

log = get_logger("hutch.worker")

_AMQP_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, asyncio.TimeoutError)


class _BackendSlot:
    """One backend: its HTTP client, its health, its lease and (while leased) its consumer.

    It is the :class:`~pipeline.dispatch.dispatcher.BackendHealth` its requests report to. The
    consumer's prefetch follows the gate: the backend's ``max_concurrency`` while healthy,
    1 while a circuit probe is due, none at all while the circuit is open or a 429 asked
    for time, so no request waits on a backend that cannot serve it.
    """

    def __init__(self, worker: Worker, pool: PoolSettings, settings: BackendSettings,
                 backend: Backend) -> None:
        self.worker = worker
        self.pool = pool
        self.settings = settings
        self.backend = backend
        self.gate = BackendGate(BreakerPolicy(failure_threshold=pool.breaker_failures,
                                              cooldown_s=pool.breaker_cooldown_s))
        self.latency_floor = LatencyFloor()
        self.changed = asyncio.Event()
        self.consumer: TrackedConsumer | None = None
        self.held = False
        #: Set by the rebalancer: finish in-flight work, free the lease, stay away a while.
        self.releasing = False
        #: The pool is paused (see pipeline.worker.pause): consume nothing, hand requests back.
        self.paused = False
        self._state_metric = worker.metrics.backend_state.labels(settings.name)
        self._state_metric.set(self.gate.state_code)

    # -- BackendHealth --------------------------------------------------------------

    def available(self) -> bool:
        return not self.paused and self.gate.capacity(self.settings.max_concurrency) > 0

    def fastest_s(self) -> float:
        return self.latency_floor.seconds()

    def success(self, elapsed_s: float) -> None:
        self.latency_floor.observe(elapsed_s)
        self._report(self.gate.success)

    def failure(self) -> None:
        self._report(self.gate.failure)

    def throttled(self, retry_after_s: float | None) -> None:
        self._report(lambda: self.gate.throttled(retry_after_s))

    def _report(self, update: Callable[[], None]) -> None:
        before = self.gate.state
        update()
        after = self.gate.state
        self._state_metric.set(self.gate.state_code)
        if after != before:
            log.warning("backend.state", backend=self.settings.name, before=str(before),
                        after=str(after), available_in_s=round(self.gate.available_in(), 3))
            self.changed.set()

    # -- lease and consumer ---------------------------------------------------------

    async def run(self, connection: AbstractConnection, dispatcher: Dispatcher) -> None:
        """Take the lease (retrying), then serve until the channel or connection dies."""
        names = self.worker.names
        metrics = self.worker.metrics
        lease = names.lease_queue(self.settings.name)
        # Spread first attempts so replicas started together share the leases.
        await asyncio.sleep(random.uniform(0, self.worker.settings.lease_retry_s / 4))
        while True:
            if self.worker.at_fair_share():
                # Leave free leases to replicas that hold fewer backends.
                await asyncio.sleep(self.worker.settings.lease_retry_s)
                continue
            channel = await connection.channel(publisher_confirms=False)
            try:
                await channel.declare_queue(lease, exclusive=True, durable=False,
                                            auto_delete=True)
            except aiormq.exceptions.ChannelLockedResource:
                await asyncio.sleep(self.worker.settings.lease_retry_s
                                    * random.uniform(0.75, 1.25))
                continue
            consumer = TrackedConsumer(
                channel, names.work_queue(self.pool.name), self.settings.max_concurrency,
                lambda message: dispatcher.handle(message, self.backend, self))
            self.consumer = consumer
            self.held = True
            metrics.lease_held.labels(self.settings.name).set(1)
            log.info("lease.acquired", backend=self.settings.name, pool=self.pool.name,
                     prefetch=self.settings.max_concurrency)
            try:
                await self._serve(consumer)
                if self.releasing:
                    await self._release(connection, consumer, lease)
                    continue
                log.warning("consumer.channel_closed", backend=self.settings.name)
            except aiormq.exceptions.ChannelNotFoundEntity:
                log.error("work_queue.missing", queue=names.work_queue(self.pool.name),
                          hint="run `hutch topology apply`")
                await asyncio.sleep(5)
            finally:
                self.held = False
                self.consumer = None
                metrics.lease_held.labels(self.settings.name).set(0)
                metrics.capacity.labels(self.settings.name).set(0)
                await consumer.abort()
            # The lease stays ours while the connection lives; re-consume after a pause.
            await asyncio.sleep(self.worker.settings.lease_retry_s)

    async def _release(self, connection: AbstractConnection, consumer: TrackedConsumer,
                       lease: str) -> None:
        """Hand the backend to another worker: drain what this worker holds (so the cap
        still holds when the next holder starts), delete the lease, keep off a while."""
        await consumer.stop_consuming()
        await consumer.drain(self.worker.settings.shutdown_grace_s)
        await consumer.abort()
        channel = await connection.channel(publisher_confirms=False)
        await channel.queue_delete(lease)
        await channel.close()
        self.held = False
        self.worker.metrics.lease_held.labels(self.settings.name).set(0)
        log.info("lease.released", backend=self.settings.name, reason="rebalance")
        await asyncio.sleep(self.worker.settings.lease_retry_s * 5)
        self.releasing = False

    async def _serve(self, consumer: TrackedConsumer) -> None:
        """Keep the consumer's prefetch equal to what the gate allows, until the channel
        closes."""
        cap = self.settings.max_concurrency
        capacity = self.worker.metrics.capacity.labels(self.settings.name)
        while not consumer.closed.is_set() and not self.releasing:
            self.changed.clear()
            want = 0 if self.paused else self.gate.capacity(cap)
            current = consumer.prefetch if consumer.consuming else 0
            if want != current:
                if consumer.consuming:
                    await consumer.stop_consuming()
                    capacity.set(0)
                if want:
                    await consumer.wait_in_flight_at_most(cap - want)
                    await consumer.start(want)
                    capacity.set(want)
                log.info("consumer.prefetch", backend=self.settings.name, prefetch=want,
                         state=str(self.gate.state))
            # Wake on a state change, on the channel closing, or when an open circuit or
            # a throttle is due to end (the gate reads as half-open/closed by the clock).
            timeout = self.gate.available_in() if want == 0 and not self.paused else None
            waiters = {asyncio.ensure_future(self.changed.wait()),
                       asyncio.ensure_future(consumer.closed.wait())}
            try:
                await asyncio.wait(waiters, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()


class Worker:
    """Serves every backend of every pool in ``settings`` whose lease it can take."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None,
                 transport_factory: Callable[[BackendSettings], httpx.AsyncBaseTransport]
                 | None = None) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.metrics = metrics or Metrics()
        self.metrics.configure(settings)
        self._transport_factory = transport_factory
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._slots: list[_BackendSlot] = []
        self._triage: TrackedConsumer | None = None
        self._fair_share: tuple[int, float] = (0, float("-inf"))  # (share, measured at)
        self.name = f"hutch-worker {socket.gethostname()}:{os.getpid()}"

    def at_fair_share(self) -> bool:
        """True while this worker holds its share of the backends, by a recent count."""
        fair, measured_at = self._fair_share
        fresh = time.monotonic() - measured_at < self.settings.lease_retry_s * 12
        return fresh and len(self.held_backends()) >= fair

    def held_backends(self) -> list[str]:
        """Names of the backends whose lease this worker holds now."""
        return [slot.settings.name for slot in self._slots if slot.held]

    def stop(self) -> None:
        """Ask the worker to finish: safe from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        """Connect, serve, reconnect on loss; return after :meth:`stop` and a drain."""
        backends: list[Backend] = []
        for pool in self.settings.pools:
            for backend_settings in pool.backends:
                transport = (self._transport_factory(backend_settings)
                             if self._transport_factory else None)
                backend = Backend(backend_settings, transport)
                backends.append(backend)
                self._slots.append(_BackendSlot(self, pool, backend_settings, backend))
        delay = 0.5
        try:
            while not self._stopping.is_set():
                try:
                    connection = await aio_pika.connect(
                        self.settings.amqp_url, timeout=10,
                        heartbeat=self.settings.heartbeat_s,
                        client_properties={"connection_name": self.name})
                except _AMQP_ERRORS as exc:
                    log.warning("amqp.connect_failed", url=self.settings.redacted_amqp_url(),
                                error=repr(exc), retry_in_s=delay)
                    await self._sleep_unless_stopping(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.5
                await self._session(connection)
        finally:
            for backend in backends:
                await backend.aclose()
            log.info("worker.stopped")

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _check_topology(self, connection: AbstractConnection) -> None:
        """Fail fast, with the fix, when the topology was never applied."""
        required = [self.names.triage_queue, self.names.parked_queue]
        required += [self.names.work_queue(pool.name) for pool in self.settings.pools]
        for queue in required:
            channel = await connection.channel()
            try:
                await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise TopologyError(
                    f"queue {queue!r} does not exist in vhost {self.settings.vhost!r}: run "
                    "`hutch topology apply --config <file>` first") from None
            await channel.close()

    async def _session(self, connection: AbstractConnection) -> None:
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._check_topology(connection)
            publish_channel = await connection.channel(publisher_confirms=True,
                                                       on_return_raises=True)
            publisher = Publisher(publish_channel, self.names, self.metrics,
                                  ReplyGuard.from_settings(self.settings))
            triage = Triage(publisher, self.names)
            self._triage = TrackedConsumer(await connection.channel(), self.names.triage_queue,
                                           self.settings.triage_prefetch, triage.handle)
            await self._triage.start()
            await self._check_pauses(connection)  # before any consumer starts
            dispatchers = {pool.name: Dispatcher(self.settings, pool, publisher, self.metrics)
                           for pool in self.settings.pools}
            for slot in self._slots:
                tasks.append(asyncio.create_task(self._guard(
                    slot.settings.name,
                    functools.partial(slot.run, connection, dispatchers[slot.pool.name]))))
            tasks.append(asyncio.create_task(self._guard("rebalance",
                                                         lambda: self._rebalance(connection))))
            tasks.append(asyncio.create_task(self._guard("pauses",
                                                         lambda: self._watch_pauses(connection))))
            log.info("worker.ready", backends=len(self._slots), vhost=self.settings.vhost)
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
        except _AMQP_ERRORS as exc:
            log.warning("amqp.session_failed", error=repr(exc))
        finally:
            self.ready.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._triage is not None:
                await self._triage.abort()
                self._triage = None
            if not connection.is_closed:
                try:
                    await connection.close()
                except Exception:
                    pass
            if not self._stopping.is_set():
                await self._sleep_unless_stopping(0.5)

    def _consumers(self) -> list[TrackedConsumer]:
        consumers = [slot.consumer for slot in self._slots if slot.consumer is not None]
        return consumers + ([self._triage] if self._triage is not None else [])

    def _in_flight(self) -> int:
        return sum(consumer.in_flight for consumer in self._consumers())

    async def _drain(self) -> None:
        """Graceful stop: no new deliveries, finish what we hold, within the grace period."""
        consumers = self._consumers()
        log.info("worker.draining", in_flight=self._in_flight(),
                 grace_s=self.settings.shutdown_grace_s)
        await asyncio.gather(*(consumer.stop_consuming() for consumer in consumers))
        results = await asyncio.gather(
            *(consumer.drain(self.settings.shutdown_grace_s) for consumer in consumers))
        if not all(results):
            log.warning("worker.grace_expired", unfinished=self._in_flight(),
                        note="unfinished requests are redelivered by the broker")

    async def _watch_pauses(self, connection: AbstractConnection) -> None:
        """Follow the pause flags (queues named <prefix>.paused.<pool>)."""
        while True:
            await asyncio.sleep(self.settings.lease_retry_s * 2)
            await self._check_pauses(connection)

    async def _check_pauses(self, connection: AbstractConnection) -> None:
        for pool in self.settings.pools:
            channel = await connection.channel(publisher_confirms=False)
            paused = await is_paused(channel, self.names, pool.name)
            if not channel.is_closed:
                await channel.close()
            for slot in self._slots:
                if slot.pool.name == pool.name and slot.paused != paused:
                    slot.paused = paused
                    slot.changed.set()
                    log.warning("pool.paused" if paused else "pool.resumed",
                                pool=pool.name, backend=slot.settings.name)

    async def _rebalance(self, connection: AbstractConnection) -> None:
        """Spread leases over the replicas: each worker consumes the triage queue once, so
        its consumer count is the number of live workers; a worker holding more than its
        fair share of backends gives one up (new replicas then get work, not only
        failover duty)."""
        interval = self.settings.lease_retry_s * 5
        channel = await connection.channel(publisher_confirms=False)
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            queue = await channel.declare_queue(self.names.triage_queue, passive=True)
            workers = max(1, queue.declaration_result.consumer_count or 1)
            fair = -(-len(self._slots) // workers)  # ceiling
            self._fair_share = (fair, time.monotonic())
            held = [slot for slot in self._slots if slot.held and not slot.releasing]
            if len(held) > fair:
                slot = random.choice(held)
                log.info("lease.rebalance", backend=slot.settings.name, held=len(held),
                         fair_share=fair, workers=workers)
                slot.releasing = True
                slot.changed.set()

    @staticmethod
    async def _guard(name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Keep a backend's loop alive: log a failure and start it again after a pause."""
        while True:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except _AMQP_ERRORS as exc:
                log.warning("backend.loop_failed", backend=name, error=repr(exc))
            except Exception:
                log.error("backend.loop_crashed", exc_info=True, backend=name)
            await asyncio.sleep(1.0)
