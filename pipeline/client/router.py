"""Matching reply messages to the calls that wait for them, by correlation id.

One reply consumer serves every call of a client. :meth:`ReplyRouter.route` is
synchronous (it never awaits), so the consumer acks each message at once and one slow
reader can never hold back the others: a final resolves its call's future; the messages
of a streaming call go to that stream's own bounded inbox (see
:class:`pipeline.client.stream.ChatStream`); a status message (asked for with
``status_after``) goes to the call's status callback, or is dropped, and never to a
future or an inbox: it is not an answer. The first final for a correlation id wins; a
duplicate or a late final (after the caller gave up) is dropped, so a caller sees exactly
one answer. A final nobody waits for (a request sent before a restart under this
``client_id``) is kept, bounded, for ``result()`` to claim.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from pipeline.client.replies import Reply, ReplyMessage, is_chunk, is_status, queue_status_of
from pipeline.models import QueueStatus
from pipeline.observe.log import get_logger

__all__ = ["ReplyRouter", "StreamSink"]

log = get_logger("hutch.client")

#: Finals kept for result() when no call waits for them (sent before a reconnect).
MAX_ORPHANS = 10_000
#: Correlation ids recently answered, so a later duplicate is told from an orphan.
MAX_RESOLVED = 100_000


class StreamSink(Protocol):
    """A streaming call's side of the router."""

    def put(self, message: ReplyMessage) -> None:
        """Take one message of the stream now (never blocks)."""

    def close(self) -> None:
        """The client is closing: wake the reader."""

    async def reply(self) -> Reply:
        """The final answer (for ``result()`` on a streaming request)."""

    def queued(self, status: QueueStatus) -> None:
        """The request's status message arrived (never blocks)."""


class ReplyRouter:
    """Futures of plain calls, inboxes of streams, orphans, and the answered ids."""

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[ReplyMessage]] = {}
        self._streams: dict[str, StreamSink] = {}
        self._on_status: dict[str, Callable[[QueueStatus], None]] = {}
        self._orphans: OrderedDict[str, ReplyMessage] = OrderedDict()
        self._resolved: OrderedDict[str, None] = OrderedDict()
        #: Finals that matched no waiting call (duplicates, late after a timeout).
        self.dropped_replies = 0
        #: Chunk messages of requests nobody streams (any more).
        self.dropped_chunks = 0

    @property
    def pending(self) -> int:
        return len(self._futures) + len(self._streams)

    def expect(self, correlation_id: str) -> asyncio.Future[ReplyMessage]:
        """The future of this id's final (registered before publishing: the reply may
        arrive before the publish is confirmed)."""
        future = self._futures.get(correlation_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._futures[correlation_id] = future
        return future

    def expect_stream(self, correlation_id: str, sink: StreamSink) -> None:
        self._streams[correlation_id] = sink

    def watch_status(self, correlation_id: str, callback: Callable[[QueueStatus], None]
                     ) -> None:
        """Call ``callback`` with the status message of a plain call, if one comes."""
        self._on_status[correlation_id] = callback

    def stream(self, correlation_id: str) -> StreamSink | None:
        return self._streams.get(correlation_id)

    def claim_orphan(self, correlation_id: str) -> ReplyMessage | None:
        return self._orphans.pop(correlation_id, None)

    def forget(self, correlation_id: str) -> None:
        """The caller has its one answer (or gave up): any later message is a duplicate."""
        self._futures.pop(correlation_id, None)
        self._streams.pop(correlation_id, None)
        self._on_status.pop(correlation_id, None)
        self._resolved[correlation_id] = None
        if len(self._resolved) > MAX_RESOLVED:
            self._resolved.popitem(last=False)

    def close(self) -> None:
        """Wake every waiter: plain calls get CancelledError, streams their close()."""
        for future in self._futures.values():
            if not future.done():
                future.cancel()
        for sink in self._streams.values():
            sink.close()
        self._futures.clear()
        self._streams.clear()
        self._on_status.clear()

    def route(self, message: ReplyMessage) -> None:
        """Hand one message to whoever waits for it (synchronously)."""
        correlation_id = message.correlation_id or ""
        if is_status(message):
            self._queued(correlation_id, message)
            return
        sink = self._streams.get(correlation_id)
        if sink is not None:
            sink.put(message)
            return
        if is_chunk(message):
            self.dropped_chunks += 1  # nobody streams it: a result() waits for its final
            return
        # Left in _futures: result() takes it out (the reply may come before result()).
        future = self._futures.get(correlation_id)
        if future is not None and not future.done():
            future.set_result(message)
        elif future is not None or correlation_id in self._resolved:
            self.dropped_replies += 1  # a duplicate, or late after the caller gave up
            log.debug("reply.dropped", correlation_id=correlation_id)
        else:
            # Nobody here waits for it: a request sent before a restart with this
            # client_id. Keep it (bounded) for result() to claim.
            self._orphans[correlation_id] = message
            if len(self._orphans) > MAX_ORPHANS:
                self._orphans.popitem(last=False)
                self.dropped_replies += 1

    def _queued(self, correlation_id: str, message: ReplyMessage) -> None:
        """A status message: to whoever watches that call (a callback's error is logged,
        never raised into the reply consumer); else dropped."""
        status = queue_status_of(message)
        sink = self._streams.get(correlation_id)
        callback = sink.queued if sink is not None else self._on_status.get(correlation_id)
        if status is None or callback is None:
            return
        try:
            callback(status)
        except Exception:
            log.warning("reply.status_callback_failed", exc_info=True,
                        correlation_id=correlation_id)
