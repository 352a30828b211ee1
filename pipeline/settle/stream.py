"""The reply sink of a stream: chunk messages, coalesced, numbered, in order.

The broker's cost is per message, not per byte, so one message per token would drown it
at a few dozen concurrent streams. The sink publishes the first chunk at once (time to
first token is not delayed), then at most one message per ``window_s``, or sooner when
``max_chunks`` chunks wait. Chunk messages are transient (no disk write per chunk): the
final message, published by the settler, is persistent and carries the whole answer.

Every chunk message goes out ``mandatory`` with a confirm on the worker's one confirming
channel, so it reaches the client in order, and a reply queue that is gone (the client
left for good) comes back at once: :class:`ReplyQueueGone`, and the stream is aborted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from pipeline import protocol as p
from pipeline.delivery import Delivery, StreamProgress
from pipeline.settle.publisher import Publisher, reply_properties

__all__ = ["ReplyQueueGone", "StreamSink"]


class ReplyQueueGone(Exception):
    """A chunk came back unroutable: the client's reply queue no longer exists."""


class StreamSink:
    """Publishes one delivery's chunks to its reply queue."""

    def __init__(self, publisher: Publisher, delivery: Delivery, *, window_s: float,
                 max_chunks: int) -> None:
        self._publisher = publisher
        self._delivery = delivery
        self._window_s = window_s
        self._max_chunks = max_chunks
        self._waiting: list[str] = []
        self._last_flush = -float("inf")
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        #: An error of a timed flush, raised by the next add() or flush().
        self._failed: BaseException | None = None
        #: Whether a chunk with generated output went out (time to first token).
        self._content_sent = False

    @property
    def started(self) -> bool:
        """Whether any chunk was published (retrying would splice two answers)."""
        return self._delivery.stream is not None

    async def add(self, raw_chunk: str, *, content: bool = True) -> None:
        """Queue one ``chat.completion.chunk`` (its JSON text, as the backend sent it).
        ``content``: whether it carries generated output. Until the first one that does
        has gone out, every chunk goes out at once (servers send a role-only chunk first:
        the first token must not wait a window behind it)."""
        self._raise_failure()
        self._waiting.append(raw_chunk)
        urgent = not self._content_sent
        self._content_sent = self._content_sent or content
        due = self._last_flush + self._window_s - time.monotonic()
        if urgent or due <= 0 or len(self._waiting) >= self._max_chunks:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_in(due))

    async def flush(self) -> None:
        """Publish what waits now (before the final message, in particular)."""
        self._raise_failure()
        async with self._lock:
            if not self._waiting:
                return
            chunks, self._waiting = self._waiting, []
            # Counted from now: a chunk added while this one is being confirmed waits for
            # the window instead of following it at once in a message of its own.
            self._last_flush = time.monotonic()
            await self._publish(chunks)

    async def close(self) -> None:
        """Stop the timer (the stream ended one way or another)."""
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed

    async def _flush_in(self, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
            self._timer = None
            await self.flush()
        except Exception as exc:  # kept: raised by the next add() or flush()
            # Whatever it is (a lost channel, a queue gone, a bug), it belongs to the
            # stream: nobody awaits this task, so an error left in it would only be logged
            # as never retrieved while the stream carried on.
            self._failed = exc

    async def _publish(self, chunks: list[str]) -> None:
        delivery = self._delivery
        progress = delivery.stream
        if progress is None:
            progress = delivery.stream = StreamProgress(uuid.uuid4().hex)
        # Only what a client needs to order chunks and tell attempts apart: every header
        # is encoded per message, and at stream rates the header table is a good part of
        # the worker's cost (the final message carries the reply's usual headers).
        headers: dict[str, Any] = {p.H_KIND: p.KIND_CHUNK, p.H_STREAM_ID: progress.stream_id,
                                   p.H_SEQ: progress.messages}
        properties = reply_properties(delivery.correlation_id, delivery.priority, headers,
                                      persistent=False)
        body = ("[" + ",".join(chunks) + "]").encode()
        assert delivery.reply_to is not None
        if not await self._publisher.publish(body, properties, routing_key=delivery.reply_to):
            raise ReplyQueueGone(delivery.reply_to)
        progress.messages += 1
        progress.chunks += len(chunks)
