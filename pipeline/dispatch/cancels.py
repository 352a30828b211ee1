"""Cancellation: tombstones for queued requests, an abort for requests at a backend.

A queued request cannot be taken out of the middle of a RabbitMQ queue, so a cancel is a
tombstone: the client publishes it (empty body, the request's ``correlation_id``, its own
``user_id``, which the broker checks) to the fanout exchange ``<prefix>.cancel``; every
worker receives it on an exclusive queue of its own and remembers the id for
``cancel_ttl_s`` (at most ``cancel_max_ids`` ids, oldest forgotten first). A delivery whose
id was cancelled is answered ``cancelled`` and never reaches a backend; a request at a
backend of this worker is aborted at once: its task is cancelled, which closes the HTTP
connection (the backend stops generating) and frees the slot.

Only the request's owner may cancel it: the cancel's ``user_id`` must be the request's
client (as the broker validated it), or the worker's own user, or a trusted user (an
operator's ``hutch cancel``). A cancel without ``user_id`` is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from pipeline.delivery import Delivery

__all__ = ["CANCEL_MESSAGE", "CancelRegistry"]

#: The message a cancelled handler task carries, to tell it from a worker shutting down.
CANCEL_MESSAGE = "hutch: request cancelled"


class CancelRegistry:
    """Cancelled ids (bounded, time-limited) and the deliveries at a backend now."""

    def __init__(self, *, ttl_s: float, max_ids: int, privileged: frozenset[str]) -> None:
        self._ttl_s = ttl_s
        self._max_ids = max_ids
        #: Users who may cancel any request: the worker's own and the trusted ones.
        self._privileged = privileged
        self._cancelled: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: Per correlation id, every delivery of it at a backend now and its task: two
        #: deliveries may share an id (a duplicate publish, a redelivery racing the first).
        self._in_flight: dict[str, dict[int, tuple[Delivery, asyncio.Task[object]]]] = {}

    def _allowed(self, user: str, delivery: Delivery) -> bool:
        return user in self._privileged or (delivery.client is not None
                                            and user == delivery.client)

    def cancel(self, correlation_id: str, user: str) -> bool:
        """Record a cancel; abort every delivery of the request at a backend here.
        True if one was aborted."""
        now = time.monotonic()
        self._cancelled[correlation_id] = (user, now + self._ttl_s)
        self._cancelled.move_to_end(correlation_id)
        while len(self._cancelled) > self._max_ids:
            self._cancelled.popitem(last=False)
        aborted = False
        for delivery, task in list(self._in_flight.get(correlation_id, {}).values()):
            if self._allowed(user, delivery) and not delivery.cancel_requested:
                delivery.cancel_requested = True
                task.cancel(CANCEL_MESSAGE)
                aborted = True
        return aborted

    def is_cancelled(self, delivery: Delivery) -> bool:
        """Whether a valid cancel for this (queued) delivery was received."""
        cid = delivery.correlation_id
        entry = self._cancelled.get(cid) if cid else None
        if entry is None:
            return False
        user, expires_at = entry
        if expires_at < time.monotonic():
            del self._cancelled[cid]  # type: ignore[arg-type]
            return False
        return self._allowed(user, delivery)

    def in_flight(self, correlation_id: str) -> bool:
        """Whether that request is at a backend of this worker now."""
        return correlation_id in self._in_flight

    @contextlib.asynccontextmanager
    async def at_backend(self, delivery: Delivery) -> AsyncIterator[None]:
        """While inside, a valid cancel cancels the current task (the backend call): the
        caller catches :class:`asyncio.CancelledError` and checks
        ``delivery.cancel_requested``."""
        cid = delivery.correlation_id
        task = asyncio.current_task()
        if not cid or task is None:
            yield
            return
        entries = self._in_flight.setdefault(cid, {})
        entries[id(delivery)] = (delivery, task)
        try:
            yield
        finally:
            entries.pop(id(delivery), None)
            if not entries and self._in_flight.get(cid) is entries:
                del self._in_flight[cid]
