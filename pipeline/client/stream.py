"""A streaming chat call: ``chat.completion.chunk`` objects as they come, then the whole.

    async with client.chat_stream(model="mock-small", messages=[...]) as stream:
        async for chunk in stream:
            print(chunk.choices[0].delta.content or "", end="")
        completion = await stream.completion()

Memory and fairness, with thousands of streams on one connection: the reply consumer
never waits for a reader. It acks each message at once and puts it into the stream's own
inbox, which holds at most ``max_buffered`` chunk messages. A reader that falls that far
behind loses the later chunk messages of that attempt (counted in ``dropped_chunks``),
and gets the rest of the answer in one piece from the final message, which is always
kept; no other stream waits for it, and the memory a stream holds stays bounded.

Leaving the ``async with`` block, breaking out of ``async for``, or cancelling the task
that reads, before the answer is complete, cancels the request on the broker too (in the
background; a failure is logged). A restarted attempt raises
:class:`StreamInterruptedError` with ``restarted=True``: iterate again to follow the new
attempt from its start, or ``await stream.completion()`` for its whole answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from pipeline import protocol as p
from pipeline.client.assembly import Assembly
from pipeline.client.replies import GRACE_S, Reply, ReplyMessage, header_str, is_chunk
from pipeline.errors import (
    DeadlineExceededError,
    RequestCancelledError,
    StreamInterruptedError,
)
from pipeline.models import ChatCompletion, ChatCompletionChunk, QueueStatus

__all__ = ["ChatStream", "StreamHost"]


class StreamHost(Protocol):
    """What a stream needs of its client."""

    async def start_stream(self, stream: ChatStream, body: Mapping[str, Any] | bytes, *,
                           model: str, priority: int, timeout_s: float,
                           headers: Mapping[str, Any] | None = None) -> str:
        """Register ``stream`` and publish its request; its correlation id."""

    def end_stream(self, correlation_id: str, *, cancel: str | None) -> None:
        """The stream is over; ``cancel``: cancel the request too (the reason)."""

    async def cancel(self, correlation_id: str) -> None:
        """Publish a cancel and wait for its confirm."""


class _Inbox:
    """The stream's messages, in arrival order; at most ``max_chunks`` chunk messages."""

    def __init__(self, max_chunks: int) -> None:
        self._messages: deque[ReplyMessage] = deque()
        self._max_chunks = max_chunks
        self._chunks = 0
        self._lagging: set[str] = set()
        self._wakeup = asyncio.Event()
        self.closed = False
        self.dropped = 0

    def put(self, message: ReplyMessage) -> None:
        if is_chunk(message):
            stream_id = header_str(message, p.H_STREAM_ID) or ""
            if stream_id in self._lagging or self._chunks >= self._max_chunks:
                self._lagging.add(stream_id)  # its final message fills in the rest
                self.dropped += 1
                return
            self._chunks += 1
        self._messages.append(message)
        self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    async def get(self, timeout_s: float) -> ReplyMessage:
        """The next message; TimeoutError after ``timeout_s``; CancelledError if closed."""
        async with asyncio.timeout(timeout_s):
            while not self._messages:
                if self.closed:
                    raise asyncio.CancelledError("the client was closed")
                self._wakeup.clear()
                await self._wakeup.wait()
        message = self._messages.popleft()
        self._chunks -= int(is_chunk(message))
        return message


class ChatStream:
    """One streamed chat request (see the module's docstring). Made by
    ``HutchClient.chat_stream``; published when its block is entered or iterated."""

    def __init__(self, host: StreamHost, body: Mapping[str, Any] | bytes, *, model: str,
                 priority: int, timeout_s: float, idle_timeout_s: float,
                 max_buffered: int) -> None:
        self._host = host
        self._body = body
        #: More AMQP headers for the request (set before it is published).
        self.request_headers: Mapping[str, Any] | None = None
        self._model, self._priority, self._timeout_s = model, priority, timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._inbox = _Inbox(max_buffered)
        self._assembly = Assembly(max_held=max_buffered)
        self._final_headers: Mapping[str, Any] = {}
        #: The headers of the last message received (which backend, attempts, ...).
        self.headers: Mapping[str, Any] = {}
        self._start: asyncio.Task[str] | None = None
        self._started_at = 0.0
        self._got_any = False
        self._ended = False
        #: The request's correlation id, once published.
        self.correlation_id: str | None = None
        #: Its status message, if it asked for one (``status_after``) and waited long
        #: enough to get it; ``on_status`` is called with it when it arrives (from the
        #: reply consumer: it must not block). Never a chunk: iteration does not see it.
        self.queue_status: QueueStatus | None = None
        self.on_status: Callable[[QueueStatus], None] | None = None

    @property
    def dropped_chunks(self) -> int:
        """Chunk messages not shown (repeats, a stale attempt, a reader too far behind)."""
        return self._inbox.dropped + self._assembly.dropped

    async def start(self) -> str:
        """Publish the request (once); its correlation id."""
        if self._start is None:
            self._started_at = time.monotonic()
            # ``headers`` only when set: a host may not take them (the protocol's default).
            extra = {} if self.request_headers is None else {"headers": self.request_headers}
            self._start = asyncio.ensure_future(self._host.start_stream(
                self, self._body, model=self._model, priority=self._priority,
                timeout_s=self._timeout_s, **extra))
        # Not shielded: cancelling the caller cancels the publish (the host then cancels
        # the request, in case it went out).
        self.correlation_id = await self._start
        return self.correlation_id

    async def __aenter__(self) -> ChatStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._abandon("the caller left the stream's block before its end")

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        await self.start()
        try:
            while (chunk := await self._next()) is not None:
                yield chunk
        except GeneratorExit:
            self._abandon("the caller stopped iterating before the stream's end")
            raise

    async def _next(self) -> ChatCompletionChunk | None:
        """The next chunk to show; None after the last; raises the answer's error."""
        while True:
            chunk = self._assembly.take()
            if chunk is not None:
                return chunk
            if self._assembly.done:
                self._end()
                if self._assembly.error is not None:
                    raise self._assembly.error
                return None
            self._feed(await self._receive())

    def _feed(self, message: ReplyMessage) -> None:
        self.headers = message.headers or {}
        if not is_chunk(message):
            self._final_headers = dict(message.headers or {})
        self._assembly.feed(message)

    async def _receive(self) -> ReplyMessage:
        """The next message, within the start bound (deadline + grace) for the first and
        ``idle_timeout_s`` for each later one; giving up cancels the request."""
        if self._got_any:
            wait_s = self._idle_timeout_s
        else:
            wait_s = self._started_at + self._timeout_s + GRACE_S - time.monotonic()
        try:
            message = await self._inbox.get(max(0.0, wait_s))
        except TimeoutError:
            self._abandon("no message from the stream in time")
            what = "the next chunk" if self._got_any else "an answer"
            raise DeadlineExceededError(f"no {what} within {wait_s:.1f}s",
                                        code=str(p.ErrorCode.DEADLINE_EXCEEDED)) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._abandon("the task reading the stream was cancelled")
            raise
        self._got_any = True
        return message

    async def reply(self) -> Reply:
        """The whole answer with the final message's headers, once it arrived (chunks
        not yet shown are skipped; a restart is no error here). Raises its error."""
        await self.start()
        while not self._assembly.done:
            try:
                self._feed(await self._receive())
            except StreamInterruptedError as exc:
                if not exc.restarted:
                    raise
        while self._assembly.take() is not None:
            pass
        self._end()
        if self._assembly.error is not None:
            raise self._assembly.error
        assert self._assembly.completion is not None and self.correlation_id is not None
        return Reply(self._assembly.completion, self.correlation_id, self._final_headers,
                     time.monotonic() - self._started_at)

    async def completion(self) -> ChatCompletion:
        """The whole ``chat.completion`` (the final message's, which is complete)."""
        return (await self.reply()).completion

    async def cancel(self) -> None:
        """Cancel the request on the broker (confirmed); the stream then ends with
        :class:`RequestCancelledError` unless it finished first."""
        await self._host.cancel(await self.start())

    # -- the router's side ---------------------------------------------------------

    def put(self, message: ReplyMessage) -> None:
        self._inbox.put(message)

    def close(self) -> None:
        self._inbox.close()

    def queued(self, status: QueueStatus) -> None:
        self.queue_status = status
        if self.on_status is not None:
            self.on_status(status)

    def _end(self) -> None:
        if not self._ended and self.correlation_id is not None:
            self._ended = True
            self._host.end_stream(self.correlation_id, cancel=None)

    def _abandon(self, reason: str) -> None:
        """Stop before the end: cancel the request; a later read raises cancelled."""
        if self._ended or self._assembly.done or self.correlation_id is None:
            self._end()
            return
        self._ended = True
        self._host.end_stream(self.correlation_id, cancel=reason)
        self._assembly.error = RequestCancelledError(
            f"the stream was cancelled by this client: {reason}",
            code=str(p.ErrorCode.CANCELLED), type="invalid_request_error")
        self._inbox.close()

