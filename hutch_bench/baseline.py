"""A minimal hand-written aio-pika RPC, the baseline of the bench's "overhead" comparison.

Issue 5 asks what Hutch costs over the least a queue-backed call can do. That least is
this: a client publishes a request, a worker consumes it, makes the same HTTP call Hutch
makes, publishes the answer to ``reply_to`` and acks. Nothing else: no validation,
deadlines, retries, leases, circuit breakers, metrics or priority logic. Whatever Hutch
measures above this is the price of those features.

To keep the comparison about features and not about accidents of I/O, the AMQP and HTTP
I/O mirror Hutch's own: the same HTTP client (httpx on the aiohttp transport, same limits,
``x-request-id``), persistent JSON requests with priority and expiration published with
confirms, the work queue a durable classic priority queue, replies persistent and
``mandatory`` on a separate confirming channel, the delivery acked only after its reply
is confirmed. Where it differs (its reply queue, fewer headers) it is on purpose: see
:class:`BaselineClient` and :class:`BaselineWorker`.

Run a worker as a process of its own (the parent waits for the ready line)::

    python -m hutch_bench.baseline --amqp-url URL --queue NAME \\
        --backend-url http://127.0.0.1:8000/v1 --prefetch 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aio_pika
import httpx
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import DeliveryError, PublishError

from pipeline.backends.transport import AiohttpTransport
from pipeline.errors import (
    BackendError,
    DeadlineExceededError,
    QueueFullError,
    RequestFailed,
)
from pipeline.runtime import eventloop

__all__ = [
    "READY_LINE",
    "WORK_QUEUE_ARGUMENTS",
    "BaselineClient",
    "BaselineReply",
    "BaselineWorker",
    "main",
    "serve",
]

#: Printed on stdout once the worker consumes: a parent process waits for this line.
READY_LINE = "baseline worker ready"
#: Hutch's work queues are classic priority queues (pipeline.broker.topology); so is the baseline's.
WORK_QUEUE_ARGUMENTS: dict[str, Any] = {"x-max-priority": 9}
#: The reply header that marks a failed call; its value is the error text.
ERROR_HEADER = "error"
#: How long past a request's deadline ``result`` waits: the same grace as HutchClient's.
_GRACE_S = 2.0


@dataclass(frozen=True)
class BaselineReply:
    """A successful reply: the backend's body as it came. ``queue_wait_ms`` exists so the
    load generator can read it like a Hutch reply's; the baseline never measures it."""

    body: bytes
    queue_wait_ms: int | None = None


class BaselineWorker:
    """Consume ``queue``, POST each body to ``backend_url``, reply, ack.

    ``prefetch`` bounds the deliveries in flight, hence the concurrent backend calls, as
    Hutch's per-backend prefetch does. :meth:`stop` (safe from a signal handler) stops
    consuming and lets in-flight deliveries finish (up to ``grace_s``) before closing.
    Unlike Hutch's, a success reply carries no headers and the completion is not parsed.
    """

    def __init__(self, amqp_url: str, queue: str, backend_url: str, prefetch: int, *,
                 timeout_s: float = 30.0, grace_s: float = 10.0) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.amqp_url = amqp_url
        self.queue = queue
        self.backend_url = backend_url
        self.prefetch = prefetch
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        #: Set once the worker consumes.
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: httpx.AsyncClient | None = None
        self._reply_channel: AbstractChannel | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to finish; safe from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`; raises ``ConnectionError`` if the broker goes away
        (no reconnects: a benchmark run that lost its broker is void anyway)."""
        # Same client as pipeline.backends.http.Backend: transport, pool limits, timeout.
        limits = httpx.Limits(max_connections=self.prefetch,
                              max_keepalive_connections=self.prefetch)
        self._http = httpx.AsyncClient(
            base_url=self.backend_url,
            headers={"content-type": "application/json"},
            transport=AiohttpTransport(limits=limits),
            timeout=self.timeout_s,
        )
        try:
            connection = await aio_pika.connect(
                self.amqp_url, timeout=10,
                client_properties={"connection_name": f"baseline-worker {self.queue}"})
            try:
                await self._serve(connection)
            finally:
                await connection.close()
        finally:
            await self._http.aclose()
            self.ready.clear()

    async def _serve(self, connection: AbstractConnection) -> None:
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        # As Hutch's worker: replies on their own confirming channel, which turns a
        # mandatory reply to a vanished queue into PublishError; consume without confirms.
        self._reply_channel = await connection.channel(publisher_confirms=True,
                                                       on_return_raises=True)
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await channel.declare_queue(self.queue, durable=True,
                                            arguments=WORK_QUEUE_ARGUMENTS)
        tag = await queue.consume(self._on_message, no_ack=False)
        self.ready.set()
        waits = {asyncio.ensure_future(self._stopping.wait()),
                 asyncio.ensure_future(lost.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if lost.is_set():
            raise ConnectionError("baseline worker: the broker connection closed")
        await queue.cancel(tag)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.grace_s)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(message)
        finally:
            self._tasks.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """One call, one reply, one ack: an error becomes an error reply, never a retry."""
        assert self._http is not None and self._reply_channel is not None
        headers: dict[str, Any] = {}
        try:
            try:
                # Hutch passes the correlation id as x-request-id: same request bytes.
                request_headers = ({"x-request-id": message.correlation_id}
                                   if message.correlation_id else None)
                response = await self._http.post("/chat/completions", content=message.body,
                                                 headers=request_headers)
            except Exception as exc:  # the baseline reports every failure, it never retries
                error = f"backend unreachable: {type(exc).__name__}: {exc}"
                body, headers = error.encode(), {ERROR_HEADER: error[:500]}
            else:
                body = response.content
                if response.status_code != 200:
                    error = f"backend answered HTTP {response.status_code}"
                    headers = {ERROR_HEADER: error}
            if message.reply_to:
                reply = aio_pika.Message(
                    body,
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                    headers=headers,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    priority=message.priority,
                )
                try:
                    await self._reply_channel.default_exchange.publish(
                        reply, routing_key=message.reply_to, mandatory=True)
                except PublishError:
                    pass  # the reply queue is gone (its client left): nobody to answer
        finally:
            await message.ack()


class BaselineClient:
    """Publish requests to ``queue`` and match replies by correlation id.

    The call shape is HutchClient's (``submit`` then ``result``) so that
    :func:`hutch_bench.loadgen.run_load` drives either. One connection, one confirming
    channel, and a server-named exclusive reply queue consumed without acks (the broker
    drops it with the connection). Hutch's reply queue is durable and acked, so that
    replies survive a client restart: a cost this baseline does not pay.
    """

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.amqp_url = amqp_url
        self.queue = queue
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._reply_to = ""
        # correlation id -> (reply future, monotonic time by which result() gives up)
        self._pending: dict[str, tuple[asyncio.Future[AbstractIncomingMessage], float]] = {}

    async def __aenter__(self) -> Self:
        connection = await aio_pika.connect(
            self.amqp_url, timeout=10,
            client_properties={"connection_name": f"baseline-client {self.queue}"})
        try:
            channel = await connection.channel()  # publisher confirms: aio-pika's default
            # Declared here too (idempotent): a request published before the worker's
            # declare would otherwise be dropped unroutable.
            await channel.declare_queue(self.queue, durable=True,
                                        arguments=WORK_QUEUE_ARGUMENTS)
            replies = await channel.declare_queue(exclusive=True, auto_delete=True)
            await replies.consume(self._on_reply, no_ack=True)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._exchange = channel.default_exchange
        self._reply_to = replies.name
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for future, _ in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = None
        self._exchange = None

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        entry = self._pending.get(message.correlation_id or "")
        if entry is not None and not entry[0].done():
            entry[0].set_result(message)

    async def submit(self, body: Mapping[str, Any] | bytes, *, model: str, priority: int = 0,
                     timeout: float = 60.0) -> str:
        """Publish one request (persistent, confirmed) and return its correlation id.

        ``model`` is accepted for HutchClient's call shape and ignored: there is one queue.
        ``timeout`` is the message's expiration and, plus a grace, how long ``result``
        waits. A nacked publish raises :class:`QueueFullError`, as in Hutch.
        """
        if self._exchange is None:
            raise RuntimeError("BaselineClient is not connected: use `async with`")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        correlation_id = uuid.uuid4().hex
        message = aio_pika.Message(
            payload,
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=self._reply_to,
            priority=priority,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=timeout,
        )
        # Registered before publishing: the reply may arrive before publish() returns.
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = (future, time.monotonic() + timeout + _GRACE_S)
        try:
            await self._exchange.publish(message, routing_key=self.queue)
        except DeliveryError:
            del self._pending[correlation_id]
            raise QueueFullError(f"the broker refused the request to {self.queue!r}",
                                 code=QueueFullError.code) from None
        except BaseException:
            del self._pending[correlation_id]
            raise
        return correlation_id

    async def result(self, correlation_id: str) -> BaselineReply:
        """Await a submitted request's reply, until its deadline plus a grace period.

        Raises :class:`DeadlineExceededError` when none comes and :class:`BackendError`
        for an error reply, each with its ``code`` (the load generator records it).
        """
        entry = self._pending.get(correlation_id)
        if entry is None:
            raise RequestFailed(f"unknown correlation id {correlation_id!r}")
        future, give_up_at = entry
        try:
            async with asyncio.timeout(max(0.0, give_up_at - time.monotonic())):
                message = await future
        except TimeoutError:
            raise DeadlineExceededError(f"no reply to {correlation_id} in time",
                                        code=DeadlineExceededError.code) from None
        finally:
            self._pending.pop(correlation_id, None)
        error = (message.headers or {}).get(ERROR_HEADER)
        if error is not None:
            text = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
            raise BackendError(text, code=BackendError.code)
        return BaselineReply(message.body)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hutch_bench.baseline",
        description="Run the bench's baseline RPC worker until SIGTERM/SIGINT.")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--backend-url", required=True,
                        help="OpenAI-style base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="HTTP timeout per backend call, seconds (default 30)")
    parser.add_argument("--loop", choices=eventloop.LOOPS, default="asyncio",
                        help="event loop, as `hutch worker --loop` (default asyncio)")
    return parser


async def _serve(args: argparse.Namespace) -> int:
    return await serve(BaselineWorker(args.amqp_url, args.queue, args.backend_url,
                                      args.prefetch, timeout_s=args.timeout))


async def serve(worker: BaselineWorker) -> int:
    """Run ``worker`` until SIGTERM/SIGINT, printing :data:`READY_LINE` once it consumes
    (also the streaming relay's, :mod:`hutch_bench.stream_baseline`)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    task = asyncio.create_task(worker.run())
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if worker.ready.is_set():
        print(READY_LINE, flush=True)
    else:
        ready.cancel()
    try:
        await task
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        print(f"baseline worker failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hutch_bench.baseline``; 0 after a clean stop."""
    args = _parser().parse_args(argv)
    if args.prefetch < 1:
        print("--prefetch must be at least 1", file=sys.stderr)
        return 2
    return eventloop.run(_serve(args), args.loop)  # as the worker's: compare code, not loops


if __name__ == "__main__":
    raise SystemExit(main())
