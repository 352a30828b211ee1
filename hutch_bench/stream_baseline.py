"""A minimal hand-written aio-pika streaming relay: the baseline of ``bench scenario
streaming``.

Issue 15 asks what Hutch's streaming path costs over the least a broker relay of a token
stream can do. That least is this: a client publishes a request; a worker consumes it,
POSTs it to the backend with ``"stream": true``, reads the server-sent events as they come
and publishes them to the caller's reply queue, coalesced as Hutch coalesces them (the
first chunk at once, then one message per window or per ``max_chunks``), and ends with one
final message holding the whole text and usage; then it acks. Nothing else: no
validation, deadlines, retries, cancels, leases, metrics or attempt numbering.

The I/O mirrors Hutch's own so that the comparison is about features: the same HTTP
client (httpx on Hutch's aiohttp transport), each event parsed to rebuild the answer,
chunk messages transient with a ``[chunk, ...]`` JSON array body, the final persistent,
every message ``mandatory`` with a confirm on one confirming channel, in order.

Run a worker as a process of its own (the parent waits for the ready line)::

    python -m hutch_bench.stream_baseline --amqp-url URL --queue NAME \\
        --backend-url http://127.0.0.1:8000/v1 --prefetch 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import PublishError

from hutch_bench.baseline import READY_LINE, BaselineClient, BaselineWorker, serve
from pipeline.errors import BackendError, DeadlineExceededError
from pipeline.runtime import eventloop

__all__ = ["READY_LINE", "Coalescer", "RelayClient", "RelayWorker", "main"]

#: Header of every reply: "chunk" or "final"; a final with an error has ``error`` too.
KIND_HEADER = "kind"


class Coalescer:
    """Hutch's coalescing, minimal: chunks go out at once up to the first token (so the
    time to first token is not delayed), later ones at most every ``window_s``, or as
    soon as ``max_chunks`` wait; ``send`` publishes a list."""

    def __init__(self, send: Callable[[list[str]], Awaitable[None]], *, window_s: float,
                 max_chunks: int) -> None:
        self._send = send
        self._window_s = window_s
        self._max_chunks = max_chunks
        self._waiting: list[str] = []
        self._last = -float("inf")
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self.messages = 0

    async def add(self, chunk: str, *, at_once: bool = False) -> None:
        self._waiting.append(chunk)
        due = self._last + self._window_s - time.monotonic()
        if at_once or due <= 0 or len(self._waiting) >= self._max_chunks:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_in(due))

    async def _flush_in(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._timer = None
        # A reply queue gone fails the next publish again (the final): nothing is lost.
        with contextlib.suppress(PublishError):
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if not self._waiting:
                return
            chunks, self._waiting = self._waiting, []
            self._last = time.monotonic()
            await self._send(chunks)
            self.messages += 1

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)


class RelayWorker(BaselineWorker):
    """The RPC baseline's worker (consume, prefetch, shutdown), relaying streams instead:
    ``window_s`` and ``max_chunks`` are Hutch's ``stream_window_ms`` and
    ``stream_max_chunks``."""

    def __init__(self, amqp_url: str, queue: str, backend_url: str, prefetch: int, *,
                 window_s: float = 0.025, max_chunks: int = 64,
                 timeout_s: float = 30.0) -> None:
        super().__init__(amqp_url, queue, backend_url, prefetch, timeout_s=timeout_s)
        self.window_s = window_s
        self.max_chunks = max_chunks

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """One stream, then its final message, then the ack; a failure ends it with an
        error final (never a retry)."""
        assert self._reply_channel is not None
        try:
            reply = _Reply(self._reply_channel, message)
            try:
                final = await self._relay(message, reply)
            except Exception as exc:  # the baseline reports every failure, never retries
                final = {"error": f"{type(exc).__name__}: {exc}"}
            await reply.send(json.dumps(final).encode(), "final")
        except PublishError:
            pass  # the reply queue is gone (its client left): nobody to answer
        finally:
            await message.ack()

    async def _relay(self, message: AbstractIncomingMessage, reply: _Reply
                     ) -> dict[str, Any]:
        """Read the backend's events into coalesced chunk messages; the final's body."""
        assert self._http is not None
        headers = {"x-request-id": message.correlation_id} if message.correlation_id else {}
        text: list[str] = []
        usage = None
        batch = Coalescer(lambda chunks: reply.send(
            ("[" + ",".join(chunks) + "]").encode(), "chunk"),
            window_s=self.window_s, max_chunks=self.max_chunks)
        try:
            async with self._http.stream("POST", "/chat/completions", content=message.body,
                                         headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    return {"error": f"backend answered HTTP {response.status_code}"}
                async for data in _events(response.aiter_lines()):
                    event = json.loads(data)
                    before = bool(text)
                    text.extend(c["delta"].get("content") or "" for c in event["choices"]
                                if c["delta"].get("content"))
                    usage = event.get("usage") or usage
                    await batch.add(data, at_once=not before)
            await batch.flush()
        finally:
            await batch.close()
        return {"content": "".join(text), "usage": usage, "messages": batch.messages}


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event up to ``[DONE]`` (one ``data:`` line each, as
    OpenAI-compatible servers send them)."""
    async for line in lines:
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return
            yield line[6:]


class _Reply:
    """Publishes one request's replies: mandatory, confirmed, numbered, in order."""

    def __init__(self, channel: AbstractChannel, request: AbstractIncomingMessage) -> None:
        self._exchange = channel.default_exchange
        self._request = request
        self._seq = 0

    async def send(self, body: bytes, kind: str) -> None:
        request = self._request
        if not request.reply_to:
            return
        await self._exchange.publish(aio_pika.Message(
            body, content_type="application/json", correlation_id=request.correlation_id,
            headers={KIND_HEADER: kind, "seq": self._seq},
            delivery_mode=(aio_pika.DeliveryMode.PERSISTENT if kind == "final"
                           else aio_pika.DeliveryMode.NOT_PERSISTENT),
            priority=request.priority), routing_key=request.reply_to, mandatory=True)
        self._seq += 1


class RelayClient(BaselineClient):
    """The RPC baseline's client (connection, confirmed publishes, exclusive reply
    queue), reading streams: :meth:`stream` yields each chunk message's chunks."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        super().__init__(amqp_url, queue)
        self._inboxes: dict[str, asyncio.Queue[AbstractIncomingMessage]] = {}
        #: Chunk messages received (for the broker's message rate).
        self.chunk_messages = 0

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        inbox = self._inboxes.get(message.correlation_id or "")
        if inbox is not None:
            inbox.put_nowait(message)

    async def stream(self, body: Mapping[str, Any], *, timeout: float = 60.0
                     ) -> AsyncIterator[list[dict[str, Any]]]:
        """Publish ``body`` (``"stream": true`` added) and yield the chunks of each chunk
        message as it arrives. Raises :class:`BackendError` for an error final and
        :class:`DeadlineExceededError` after ``timeout`` without a message."""
        if self._exchange is None:
            raise RuntimeError("RelayClient is not connected: use `async with`")
        correlation_id = uuid.uuid4().hex
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._inboxes[correlation_id] = inbox
        try:
            await self._exchange.publish(aio_pika.Message(
                json.dumps({**body, "stream": True}).encode(),
                content_type="application/json", correlation_id=correlation_id,
                reply_to=self._reply_to, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                expiration=timeout), routing_key=self.queue)
            while True:
                try:
                    message = await asyncio.wait_for(inbox.get(), timeout)
                except TimeoutError:
                    raise DeadlineExceededError(f"no message within {timeout:g}s",
                                                code=DeadlineExceededError.code) from None
                if (message.headers or {}).get(KIND_HEADER) != "chunk":
                    final = json.loads(message.body)
                    if "error" in final:
                        raise BackendError(str(final["error"]), code=BackendError.code)
                    return
                self.chunk_messages += 1
                yield json.loads(message.body)
        finally:
            del self._inboxes[correlation_id]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hutch_bench.stream_baseline",
        description="Run the streaming bench's relay worker until SIGTERM/SIGINT.")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--backend-url", required=True,
                        help="OpenAI-style base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--window-ms", type=float, default=25.0,
                        help="coalescing window, as Hutch's stream_window_ms (default 25)")
    parser.add_argument("--max-chunks", type=int, default=64,
                        help="chunks per message at most, as stream_max_chunks (default 64)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="HTTP timeout per read from the backend, seconds (default 30)")
    parser.add_argument("--loop", choices=eventloop.LOOPS, default="asyncio")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hutch_bench.stream_baseline``; 0 after a clean stop."""
    args = _parser().parse_args(argv)
    if args.prefetch < 1 or args.max_chunks < 1:
        _parser().error("--prefetch and --max-chunks must be at least 1")
    worker = RelayWorker(args.amqp_url, args.queue, args.backend_url, args.prefetch,
                         window_s=args.window_ms / 1000, max_chunks=args.max_chunks,
                         timeout_s=args.timeout)
    return eventloop.run(serve(worker), args.loop)

if __name__ == "__main__":
    raise SystemExit(main())
