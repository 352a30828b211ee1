"""The async client: publish chat requests, await their one reply.

A :class:`HutchClient` owns one connection, one confirming channel and one durable reply
queue (``<prefix>.reply.<client_id>``, removed by the broker after ``reply_queue_expires_s``
without a consumer). Any number of :meth:`HutchClient.chat` calls run concurrently on it:
each registers a future under its correlation id and the reply consumer resolves it;
nothing serialises the calls. The first reply for a correlation id wins; a duplicate or a
late reply (after a timeout) finds no future and is dropped, so a caller sees exactly one
result.

    async with HutchClient("amqp://guest:guest@127.0.0.1/") as client:
        completion = await client.chat(model="mock-small",
                                       messages=[{"role": "user", "content": "hi"}],
                                       priority=5, timeout=30)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import DeliveryError
from pydantic import ValidationError

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.errors import (
    DeadlineExceededError,
    QueueFullError,
    RequestFailed,
    error_for_code,
)
from pipeline.models import ChatCompletion, ChatMessage, ErrorReply
from pipeline.observe.log import get_logger
from pipeline.settings import DEFAULT_AMQP_URL, Settings

__all__ = ["HutchClient", "Reply"]

log = get_logger("hutch.client")

#: How long past its deadline the client waits for the worker's authoritative answer.
_GRACE_S = 2.0
#: Replies kept for result() when no call waits for them (sent before a reconnect).
_MAX_ORPHANS = 10_000
#: Correlation ids recently answered, so a later duplicate is told from an orphan.
_MAX_RESOLVED = 100_000


@dataclass(frozen=True)
class Reply:
    """A successful reply: the completion and what the worker reported about it."""

    completion: ChatCompletion
    correlation_id: str = ""
    headers: Mapping[str, Any] = field(default_factory=dict)
    latency_s: float = 0.0

    @property
    def queue_wait_ms(self) -> int | None:
        value = self.headers.get(p.H_QUEUE_WAIT_MS)
        return int(value) if value is not None else None

    @property
    def backend(self) -> str | None:
        value = self.headers.get(p.H_BACKEND)
        return str(value) if value is not None else None


def _default_client_id(user: str) -> str:
    """``<user>.<host>-<pid>-<random>``: under a per-client user (see ``hutch client
    add``) the reply queue must be named after the user, and this stays unique."""
    host = socket.gethostname().replace(".", "-")
    return f"{user}.{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _failure_from(message: AbstractIncomingMessage) -> RequestFailed:
    try:
        detail = ErrorReply.model_validate_json(message.body).error
    except ValidationError:
        return RequestFailed(f"unreadable error reply: {message.body[:200]!r}")
    extra = detail.model_extra or {}
    status = extra.get("status")
    return error_for_code(detail.code)(
        detail.message, code=detail.code, type=detail.type,
        status=status if isinstance(status, int) else None)


class HutchClient:
    """Publishes requests to Hutch and matches replies to callers."""

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, *, client_id: str | None = None,
                 prefix: str = "llm", reply_queue_expires_s: int = 3600,
                 default_timeout_s: float = 120.0, reply_prefetch: int = 1000) -> None:
        self.amqp_url = amqp_url
        self._user = unquote(urlsplit(amqp_url).username or "guest")
        self.client_id = client_id or _default_client_id(self._user)
        self.names = Names(prefix)
        self.reply_queue_name = self.names.reply_queue(self.client_id)
        self._reply_queue_expires_ms = reply_queue_expires_s * 1000
        self._default_timeout_s = default_timeout_s
        self._reply_prefetch = reply_prefetch
        self._pending: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self._sent: dict[str, tuple[float, float]] = {}  # id -> (monotonic sent, deadline s)
        self._orphans: OrderedDict[str, AbstractIncomingMessage] = OrderedDict()
        self._resolved: OrderedDict[str, None] = OrderedDict()
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        #: Replies that matched no waiting call (duplicates, late after a timeout).
        self.dropped_replies = 0
        #: Connections made after the first one (the broker restarted or the network broke).
        self.reconnects = 0

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> HutchClient:
        kwargs.setdefault("reply_queue_expires_s", settings.reply_queue_expires_s)
        return cls(settings.amqp_url, prefix=settings.prefix, **kwargs)

    async def __aenter__(self) -> HutchClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, declare the reply queue and consume it; then stay connected.

        The first connection's errors are raised (a wrong URL should fail loudly). After
        that a supervisor reconnects by itself, with backoff, and re-consumes the reply
        queue: the connection is supervised here rather than by aio-pika's
        RobustConnection, whose channel restore can fail and leave a channel closed for
        good (seen on 3.10 with stop_app/start_app).
        """
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _open(self) -> None:
        connection = await aio_pika.connect(
            self.amqp_url, timeout=10,
            client_properties={"connection_name": f"hutch-client {self.client_id}"})
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self._reply_prefetch)
            # Replies published while this client was away wait in its durable queue.
            reply_queue = await channel.declare_queue(
                self.reply_queue_name, durable=True,
                arguments={"x-queue-type": "classic",
                           "x-expires": self._reply_queue_expires_ms})
            await reply_queue.consume(self._on_reply)
            self._exchange = await channel.get_exchange(self.names.requests_exchange,
                                                        ensure=False)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._ready.set()

    async def _supervise(self) -> None:
        delay = 0.2
        while not self._closing:
            connection = self._connection
            if connection is not None:
                # Only ever wait on the connection _open just made: a dead one's is_closed
                # is not reliable, and its close callbacks have already run.
                lost = asyncio.Event()
                connection.close_callbacks.add(lambda *_, event=lost: event.set())
                if not connection.is_closed:
                    await lost.wait()
                self._connection = None
                self._ready.clear()
                if self._closing:
                    return
                log.warning("amqp.connection_lost", client_id=self.client_id,
                            pending=len(self._pending))
            try:
                await self._open()
            except Exception as exc:  # whatever the broker does while booting: try again
                log.warning("amqp.reconnect_failed", error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            self.reconnects += 1
            log.info("amqp.reconnected", client_id=self.client_id)

    async def close(self) -> None:
        self._closing = True
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        self._sent.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = None
        self._ready.clear()

    async def _publish(self, message: aio_pika.Message, model: str) -> None:
        """Publish with confirms; across a lost connection, wait for the next one and try
        again until the request's deadline. A retry may duplicate a request whose confirm
        was lost: the worker answers both, and the client keeps the first answer."""
        while True:
            await self._ready.wait()
            assert self._exchange is not None
            try:
                await self._exchange.publish(message, routing_key=model, mandatory=False)
                return
            except DeliveryError:
                raise
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError,
                    ConnectionError) as exc:
                log.warning("publish.retry", correlation_id=message.correlation_id,
                            error=repr(exc))
                if self._connection is not None and not self._connection.is_closed:
                    # The channel died but the connection lives: start over on a new one.
                    await self._connection.close()
                await asyncio.sleep(0.05)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        # Left in _pending: result() takes it out (the reply may come before result()).
        future = self._pending.get(correlation_id)
        if future is not None and not future.done():
            future.set_result(message)
        elif future is not None or correlation_id in self._resolved:
            self.dropped_replies += 1  # a duplicate, or late after the caller gave up
            log.debug("reply.dropped", correlation_id=correlation_id)
        else:
            # Nobody here waits for it: a request sent before a restart with this
            # client_id. Keep it (bounded) for result() to claim.
            self._orphans[correlation_id] = message
            if len(self._orphans) > _MAX_ORPHANS:
                self._orphans.popitem(last=False)
                self.dropped_replies += 1
        await message.ack()

    def _remember(self, correlation_id: str) -> None:
        self._resolved[correlation_id] = None
        if len(self._resolved) > _MAX_RESOLVED:
            self._resolved.popitem(last=False)

    async def submit(self, body: Mapping[str, Any] | bytes, *, model: str, priority: int = 0,
                     timeout: float | None = None) -> str:
        """Publish one request and return its correlation id; :meth:`result` awaits it.

        Keep the id to claim the reply later, even from a new process: replies wait in the
        durable reply queue of this ``client_id`` while no client consumes it.
        ``timeout`` (seconds) is the request's deadline: it may wait in the queue that long
        (``expiration``) and the worker will not start it after that. Raises
        :class:`QueueFullError` at once if the broker refuses it.
        """
        if self._supervisor is None:
            raise RuntimeError("HutchClient is not connected: use `async with` or connect()")
        if not 0 <= priority <= 255:
            raise ValueError(f"priority must be in 0..255, got {priority}")
        timeout_s = self._default_timeout_s if timeout is None else timeout
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        correlation_id = uuid.uuid4().hex
        sent_ms = p.now_ms()
        message = aio_pika.Message(
            payload,
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=self.reply_queue_name,
            priority=priority,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=timeout_s,
            timestamp=time.time(),
            user_id=self._user,
            headers={p.H_SENT_AT: sent_ms, p.H_DEADLINE: sent_ms + int(timeout_s * 1000)},
        )
        # Registered before publishing: the reply may arrive before publish() returns.
        self._pending[correlation_id] = asyncio.get_running_loop().create_future()
        self._sent[correlation_id] = (time.monotonic(), timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                await self._publish(message, model)
        except DeliveryError:
            self._forget(correlation_id)
            raise QueueFullError(
                f"the queue for model {model!r} is full: the broker refused the request",
                code=p.ErrorCode.QUEUE_FULL) from None
        except TimeoutError:
            self._forget(correlation_id)
            raise DeadlineExceededError(
                f"could not publish within {timeout_s:.1f}s (no broker connection)",
                code=p.ErrorCode.DEADLINE_EXCEEDED) from None
        except BaseException:
            self._forget(correlation_id)
            raise
        return correlation_id

    def _forget(self, correlation_id: str) -> None:
        """The caller has its one answer (or gave up): any later reply is a duplicate."""
        self._pending.pop(correlation_id, None)
        self._sent.pop(correlation_id, None)
        self._remember(correlation_id)

    async def result(self, correlation_id: str, *, timeout: float | None = None) -> Reply:
        """Await the reply of a submitted request (from this process or an earlier one
        with the same ``client_id``). Error replies raise the :class:`RequestFailed`
        subclass of their code; no reply in time raises :class:`DeadlineExceededError`.
        Without ``timeout`` it waits until the request's deadline plus a grace period.
        """
        started, deadline_s = self._sent.get(correlation_id, (time.monotonic(), None))
        if timeout is None:
            base = deadline_s if deadline_s is not None else self._default_timeout_s
            timeout = max(0.0, started + base + _GRACE_S - time.monotonic())
        reply = self._orphans.pop(correlation_id, None)
        try:
            if reply is None:
                future = self._pending.get(correlation_id)
                if future is None:
                    future = asyncio.get_running_loop().create_future()
                    self._pending[correlation_id] = future
                try:
                    async with asyncio.timeout(timeout):
                        reply = await future
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"no answer within {timeout:.1f}s",
                        code=p.ErrorCode.DEADLINE_EXCEEDED) from None
        finally:
            self._forget(correlation_id)
        latency = time.monotonic() - started
        headers = dict(reply.headers or {})
        if headers.get(p.H_OUTCOME) == "ok":
            try:
                completion = ChatCompletion.model_validate_json(reply.body)
            except ValidationError as exc:
                raise RequestFailed(f"unreadable completion in reply: {exc}") from None
            return Reply(completion, correlation_id, headers, latency)
        raise _failure_from(reply)

    async def request(self, body: Mapping[str, Any] | bytes, *, model: str, priority: int = 0,
                      timeout: float | None = None) -> Reply:
        """Send one request (an OpenAI chat body, or its JSON bytes) and await its reply:
        :meth:`submit` then :meth:`result`."""
        correlation_id = await self.submit(body, model=model, priority=priority,
                                           timeout=timeout)
        return await self.result(correlation_id)

    async def chat(self, *, model: str, messages: Sequence[Mapping[str, Any] | ChatMessage],
                   priority: int = 0, timeout: float | None = None,
                   **params: Any) -> ChatCompletion:
        """An OpenAI-style chat completion through Hutch; extra ``params`` go to the backend."""
        body: dict[str, Any] = {
            "model": model,
            "messages": [m.model_dump(exclude_none=True) if isinstance(m, ChatMessage)
                         else dict(m) for m in messages],
            **params,
        }
        reply = await self.request(body, model=model, priority=priority, timeout=timeout)
        return reply.completion
