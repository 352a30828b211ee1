"""Workers whose configs disagree about a backend: found, logged, and the stricter cap holds.

Only a backend's lease holder serves it, with the cap of its own configuration. During a
rolling change (one worker reloaded, another not yet) two workers may disagree about a
backend's ``max_concurrency`` or ``url``. So every worker that has a backend in its
configuration but does not hold its lease publishes a **claim** into the backend's lease
queue every few seconds (through the default exchange, with a short expiration): its
name, cap and URL hash. A claim for a lease nobody holds is dropped by the broker (there is
no queue to route to). The holder reads the claims (``basic.get``: the lease queue is its
own) and serves with the lowest of its cap and the fresh claims' caps; a claim whose cap
or URL differs from its own is logged once per change (``backend.config_disagreement``).
``hutch status`` shows the same disagreement from the workers' presence
(:mod:`pipeline.ops.worker_configs`).

:class:`ClaimBook` is the pure part (tested with a fake clock); :class:`CapAgreement`
publishes and reads on the worker's connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from pipeline.observe.log import get_logger
from pipeline.worker.config_diff import url_hash
from pipeline.worker.slots import Slot, Slots

__all__ = ["CapAgreement", "Claim", "ClaimBook"]

log = get_logger("hutch.worker")


@dataclass(frozen=True)
class Claim:
    """What another worker's configuration says about a backend."""

    worker: str
    cap: int
    url: str  # hash


class ClaimBook:
    """The fresh claims about each backend this worker holds."""

    def __init__(self, fresh_for_s: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._fresh_for_s = fresh_for_s
        self._clock = clock
        self._claims: dict[str, dict[str, tuple[Claim, float]]] = {}
        self._reported: dict[str, frozenset[Claim]] = {}

    def record(self, backend: str, claim: Claim) -> None:
        self._claims.setdefault(backend, {})[claim.worker] = (claim, self._clock())

    def fresh(self, backend: str) -> list[Claim]:
        now = self._clock()
        return [claim for claim, at in self._claims.get(backend, {}).values()
                if now - at < self._fresh_for_s]

    def cap(self, backend: str, own: int) -> int:
        """The cap to serve ``backend`` with: the lowest of ``own`` and the claims'."""
        return min([own, *(claim.cap for claim in self.fresh(backend))])

    def new_disagreement(self, backend: str, cap: int, url: str) -> list[Claim] | None:
        """The claims that differ from (``cap``, ``url``) if that set changed since last
        asked (to log once per change), else None."""
        differing = frozenset(c for c in self.fresh(backend) if (c.cap, c.url) != (cap, url))
        if differing == self._reported.get(backend, frozenset()):
            return None
        self._reported[backend] = differing
        return sorted(differing, key=lambda claim: claim.worker)


class CapAgreement:
    """Publishes this worker's claims and applies the claims others make (see above)."""

    def __init__(self, worker: str, interval_s: float) -> None:
        self._worker = worker
        self._interval_s = interval_s
        self.book = ClaimBook(fresh_for_s=interval_s * 3)

    async def run(self, connection: AbstractConnection, slots: Slots) -> None:
        """Every interval: claim what this worker does not hold, read what it holds."""
        channel = await connection.channel(publisher_confirms=False)
        try:
            while True:
                for slot in list(slots.all):
                    if slot.holder.name in slots.retiring:
                        continue
                    if channel.is_closed:
                        channel = await connection.channel(publisher_confirms=False)
                    if slot.holder.lease.held:
                        await self._read(channel, slot)
                    else:
                        await self._claim(channel, slot)
                await asyncio.sleep(self._interval_s)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _claim(self, channel: AbstractChannel, slot: Slot) -> None:
        settings = slot.http.settings
        body = json.dumps({"worker": self._worker, "cap": settings.max_concurrency,
                           "url": url_hash(settings.url)}).encode()
        message = aio_pika.Message(body, content_type="application/json",
                                   expiration=self._interval_s * 3)
        # Not mandatory: a lease queue nobody holds yet is no error (nothing to tell).
        await channel.default_exchange.publish(message, routing_key=slot.holder.lease.queue,
                                               mandatory=False)

    async def _read(self, channel: AbstractChannel, slot: Slot) -> None:
        holder = slot.holder
        try:
            queue = await channel.declare_queue(holder.lease.queue, passive=True)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                try:
                    data = json.loads(message.body)
                    self.book.record(holder.name, Claim(str(data["worker"]),
                                                        int(data["cap"]), str(data["url"])))
                except (ValueError, KeyError, TypeError):
                    continue
        except aiormq.exceptions.ChannelClosed:
            return  # the lease went meanwhile (or this user may not read it): next round
        self._apply(slot)

    def _apply(self, slot: Slot) -> None:
        settings = slot.http.settings
        health, name = slot.holder.health, slot.holder.name
        differing = self.book.new_disagreement(name, settings.max_concurrency,
                                               url_hash(settings.url))
        if differing:
            log.warning("backend.config_disagreement", backend=name,
                        own={"cap": settings.max_concurrency, "url": url_hash(settings.url)},
                        others=[{"worker": c.worker, "cap": c.cap, "url": c.url}
                                for c in differing])
        elif differing is not None:
            log.info("backend.config_agreement", backend=name, cap=settings.max_concurrency)
        cap = self.book.cap(name, settings.max_concurrency)
        if health.max_concurrency != cap:
            log.warning("backend.cap_held", backend=name, cap=cap,
                        configured=settings.max_concurrency,
                        note="the stricter cap of the workers that serve it")
            health.max_concurrency = cap
            health.changed.set()
