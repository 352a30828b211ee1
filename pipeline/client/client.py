"""The async client: publish chat requests, await their answer, whole or streamed.

A :class:`HutchClient` owns one connection, one confirming channel and one reply queue
(``<prefix>.reply.<client_id>``, durable with ``reply_queue_expires_s``; or exclusive with
``temporary_reply_queue``). Any number of calls run concurrently on it, each under its
correlation id. Its parts: :mod:`~pipeline.client.connection`, :mod:`~pipeline.client.router`,
:mod:`~pipeline.client.stream`, :mod:`~pipeline.client.assembly`, :mod:`~pipeline.client.cancel`.
Cancelling the task that awaits ``chat()``/``result()`` cancels the request on the broker
too; so does leaving a stream early (see :class:`ChatStream`).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import DeliveryError

from pipeline import protocol as p
from pipeline.broker.connection import tls_context
from pipeline.broker.names import Names
from pipeline.broker.tls import TLSFiles
from pipeline.client.cancel import BackgroundCancels, cancel_message
from pipeline.client.connection import ClientConnection, ReplyQueue
from pipeline.client.messages import (
    chat_body,
    default_client_id,
    request_headers,
    request_message,
)
from pipeline.client.replies import (
    GRACE_S,
    RawReply,
    Reply,
    ReplyMessage,
    completion_of,
    failure_of,
    header_str,
)
from pipeline.client.router import ReplyRouter
from pipeline.client.stream import ChatStream
from pipeline.errors import BrokerBlockedError, DeadlineExceededError, QueueFullError, TopologyError
from pipeline.models import ChatCompletion, ChatMessage, QueueStatus
from pipeline.settings import DEFAULT_AMQP_URL, Settings

__all__ = ["ChatStream", "HutchClient", "QueueStatus", "RawReply", "Reply"]

#: How long a cancel may take to publish (it waits for a connection, then its confirm).
_CANCEL_TIMEOUT_S = 10.0


def _cancelled_by_caller() -> bool:
    """Whether the current task is being cancelled (not: a future it awaits was)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class HutchClient:
    """Publishes requests to Hutch and matches replies to callers."""

    #: Chunk messages a stream holds for a slow reader; beyond, its final fills the rest.
    stream_buffer = 1000

    # The public constructor: every option after the URL keyword-only, each with a default.
    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, *,  # noqa: PLR0913
                 client_id: str | None = None,
                 prefix: str = "llm", reply_queue_expires_s: int = 3600,
                 default_timeout_s: float = 120.0, reply_prefetch: int = 1000,
                 temporary_reply_queue: bool = False,
                 tls: TLSFiles | ssl.SSLContext | None = None) -> None:
        """``tls``: for an ``amqps://`` URL, the CA bundle to trust and, for mutual TLS,
        the client certificate and key (:class:`TLSFiles`), or a ready ``SSLContext``;
        without it the system's trust store. A file it cannot read is a ConfigError."""
        self.amqp_url = amqp_url
        self._user = unquote(urlsplit(amqp_url).username or "guest")
        self.client_id = client_id or default_client_id(self._user)
        self.names = Names(prefix)
        self.reply_queue_name = self.names.reply_queue(self.client_id)
        self._default_timeout_s = default_timeout_s
        self._router = ReplyRouter()
        self._sent: dict[str, tuple[float, float]] = {}  # id -> (monotonic sent, deadline s)
        self._conn = ClientConnection(
            amqp_url, name=f"hutch-client {self.client_id}",
            reply_queue=ReplyQueue(self.reply_queue_name, reply_queue_expires_s * 1000,
                                   temporary=temporary_reply_queue),
            on_reply=self._on_reply, prefetch=reply_prefetch,
            required_exchange=self.names.requests_exchange)
        self._cancels = BackgroundCancels(self.cancel)
        self._cancel_checked = False
        self._closing = False
        self.use_tls(tls.context() if isinstance(tls, TLSFiles) else tls)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> HutchClient:
        kwargs.setdefault("reply_queue_expires_s", settings.reply_queue_expires_s)
        client = cls(settings.amqp_url, prefix=settings.prefix, **kwargs)
        client.use_tls(tls_context(settings))
        client._conn.use_cluster(settings.amqp_nodes(), settings.reply_queue_type)
        return client

    def use_tls(self, context: ssl.SSLContext | None) -> None:
        """The TLS context of an ``amqps://`` URL (before :meth:`connect`);
        :meth:`from_settings` passes the settings' one."""
        self._conn.tls = context

    @property
    def dropped_replies(self) -> int:
        """Replies that matched no waiting call (duplicates, late after a timeout)."""
        return self._router.dropped_replies

    @property
    def reconnects(self) -> int:
        """Connections made after the first one (the broker restarted, the network broke)."""
        return self._conn.reconnects

    def set_blocked_timeout(self, seconds: float) -> None:
        """How long a publish waits out a block of the broker (a resource alarm) before
        :class:`BrokerBlockedError` (default 5 s; 0: as soon as the broker blocks it)."""
        self._conn.blocked_timeout_s = seconds

    @property
    def blocked(self) -> bool:
        """The broker blocks this client's publishes now (a memory or disk alarm; RabbitMQ
        says so to a connection once it publishes during the alarm)."""
        return self._conn.blocked_state.blocked

    async def ready(self) -> bool:
        """Connected now, not blocked, and the exchange ``<prefix>.requests`` exists (for
        a readiness probe: a passive declare on a short-lived channel)."""
        if not self._conn.up or self.blocked:
            return False
        try:
            async with asyncio.timeout(5):
                await self._conn.check_exchange(self.names.requests_exchange)
        except (TopologyError, TimeoutError, ConnectionError, aiormq.exceptions.AMQPError):
            return False
        return True

    async def __aenter__(self) -> HutchClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, check the topology, declare the reply queue and consume it; then stay
        connected (reconnecting by itself). Raises :class:`TopologyError` at once if the
        exchange ``<prefix>.requests`` is missing (run ``hutch topology apply``)."""
        await self._conn.connect()

    async def close(self) -> None:
        """Publish the cancels still pending (a few seconds at most; none while the broker
        blocks publishing), then disconnect; calls still waiting get
        :class:`asyncio.CancelledError`."""
        await self._cancels.drain(0 if self.blocked else _CANCEL_TIMEOUT_S)  # none goes out
        self._closing = True
        self._router.close()
        self._sent.clear()
        await self._conn.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self._router.route(message)  # synchronous: no reader can hold the others back
        await message.ack()

    # -- plain requests ------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        timeout_s = self._default_timeout_s if timeout is None else timeout
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        return timeout_s

    def _request_message(self, payload: bytes, correlation_id: str, priority: int,
                         timeout_s: float, extra: Mapping[str, Any] | None = None
                         ) -> aio_pika.Message:
        return request_message(payload, correlation_id, reply_to=self.reply_queue_name,
                               user=self._user, priority=priority, timeout_s=timeout_s, extra=extra)

    async def _publish_request(self, message: aio_pika.Message, model: str,
                               timeout_s: float) -> None:
        """Publish within the deadline; the router already expects the answer. Any
        failure forgets it; a cancelled caller also cancels it (it may have gone out)."""
        correlation_id = message.correlation_id or ""
        try:
            async with asyncio.timeout(timeout_s):
                await self._conn.publish(message, exchange=self.names.requests_exchange,
                                         routing_key=model)
        except DeliveryError:
            self._forget(correlation_id)
            raise QueueFullError(
                f"the queue for model {model!r} is full: the broker refused the request",
                code=p.ErrorCode.QUEUE_FULL) from None
        except BrokerBlockedError as exc:  # the broker may still take it: then cancel it
            self._forget(correlation_id, cancel="the broker blocked its publish"
                         if exc.may_have_gone_out else None)
            raise
        except TimeoutError:
            self._forget(correlation_id, cancel="its publish timed out" if self.blocked else None)
            if self.blocked:
                raise self._conn.blocked_error(may_have_gone_out=True) from None
            raise DeadlineExceededError(
                f"could not publish within {timeout_s:.1f}s (no broker connection)",
                code=p.ErrorCode.DEADLINE_EXCEEDED) from None
        except BaseException as exc:
            self._forget(correlation_id,
                         cancel="the task publishing the request was cancelled"
                         if isinstance(exc, asyncio.CancelledError) and _cancelled_by_caller()
                         else None)
            raise

    async def submit(self, body: Mapping[str, Any] | bytes, *, model: str,  # noqa: PLR0913
                     priority: int = 0, timeout: float | None = None,
                     endpoint: p.Endpoint | None = None,
                     headers: Mapping[str, Any] | None = None,
                     status_after: float | None = None,
                     on_status: Callable[[QueueStatus], None] | None = None) -> str:
        """Publish one request and return its correlation id; :meth:`result` awaits it.

        Keep the id to claim the reply later, even from a new process: replies wait in the
        durable reply queue of this ``client_id`` while no client consumes it.
        ``timeout`` (seconds) is the request's deadline: it may wait in the queue that long
        (``expiration``) and the worker will not start it after that. Raises
        :class:`QueueFullError` at once if the broker refuses it. ``endpoint``: the
        OpenAI endpoint the body is for (default chat completions); ``headers``: more
        AMQP headers (``x-hutch-user``, which workers believe from trusted users only).
        ``status_after`` (s): queued longer than that (estimated), ``on_status`` is called
        once, before the answer, with its :class:`QueueStatus` (position, estimated start)."""
        if not self._conn.connected:
            raise RuntimeError("HutchClient is not connected: use `async with` or connect()")
        timeout_s = self._timeout(timeout)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        correlation_id = uuid.uuid4().hex
        message = self._request_message(payload, correlation_id, priority, timeout_s,
                                        request_headers(endpoint, headers, status_after))
        # Registered before publishing: the reply may arrive before publish() returns.
        self._router.expect(correlation_id)
        if on_status is not None:
            self._router.watch_status(correlation_id, on_status)
        self._sent[correlation_id] = (time.monotonic(), timeout_s)
        await self._publish_request(message, model, timeout_s)
        return correlation_id

    def _forget(self, correlation_id: str, *, cancel: str | None = None) -> None:
        """The caller has its one answer (or gave up): any later reply is a duplicate.
        ``cancel``: the caller gave up (the reason); cancel the request on the broker."""
        self._router.forget(correlation_id)
        self._sent.pop(correlation_id, None)
        if cancel is not None and not self._closing:
            self._cancels.submit(correlation_id, cancel)

    async def result(self, correlation_id: str, *, timeout: float | None = None) -> Reply:
        """Await the reply of a submitted request (from this process or an earlier one
        with the same ``client_id``). Error replies raise the :class:`RequestFailed`
        subclass of their code; no reply in time raises :class:`DeadlineExceededError`.
        Without ``timeout`` it waits until the request's deadline plus a grace period.
        Cancelling the task that awaits it cancels the request.
        """
        stream = self._router.stream(correlation_id)
        if stream is not None:  # a streaming request: its final answer
            return await stream.reply()
        started = self._sent.get(correlation_id, (time.monotonic(), 0.0))[0]
        reply = await self._final(correlation_id, timeout)
        return Reply(completion_of(reply), correlation_id, dict(reply.headers or {}),
                     time.monotonic() - started)

    async def result_raw(self, correlation_id: str, *, timeout: float | None = None
                         ) -> RawReply:
        """:meth:`result` for any endpoint: the reply's body as the backend sent it
        (a ``chat.completion``, ``text_completion`` or embeddings ``list``), unparsed."""
        started = self._sent.get(correlation_id, (time.monotonic(), 0.0))[0]
        reply = await self._final(correlation_id, timeout)
        if header_str(reply, p.H_OUTCOME) != "ok":
            raise failure_of(reply.body)
        return RawReply(reply.body, correlation_id, dict(reply.headers or {}),
                        time.monotonic() - started)

    async def _final(self, correlation_id: str, timeout: float | None) -> ReplyMessage:
        """The final message of a plain request (see :meth:`result`)."""
        started, deadline_s = self._sent.get(correlation_id, (time.monotonic(), None))
        if timeout is None:
            base = deadline_s if deadline_s is not None else self._default_timeout_s
            timeout = max(0.0, started + base + GRACE_S - time.monotonic())
        reply = self._router.claim_orphan(correlation_id)
        gave_up = None
        try:
            if reply is None:
                try:
                    async with asyncio.timeout(timeout):
                        reply = await self._router.expect(correlation_id)
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"no answer within {timeout:.1f}s",
                        code=p.ErrorCode.DEADLINE_EXCEEDED) from None
                except asyncio.CancelledError:
                    if _cancelled_by_caller():
                        gave_up = "the task awaiting the answer was cancelled"
                    raise
        finally:
            self._forget(correlation_id, cancel=gave_up)
        return reply

    async def request(self, body: Mapping[str, Any] | bytes, *, model: str, priority: int = 0,
                      timeout: float | None = None, status_after: float | None = None,
                      on_status: Callable[[QueueStatus], None] | None = None) -> Reply:
        """Send one request (an OpenAI chat body, or its JSON bytes) and await its reply:
        :meth:`submit` then :meth:`result`."""
        correlation_id = await self.submit(body, model=model, priority=priority, timeout=timeout,
                                           status_after=status_after, on_status=on_status)
        return await self.result(correlation_id)

    async def chat(self, *, model: str, messages: Sequence[Mapping[str, Any] | ChatMessage],
                   priority: int = 0, timeout: float | None = None,
                   status_after: float | None = None,
                   on_status: Callable[[QueueStatus], None] | None = None,
                   **params: Any) -> ChatCompletion:
        """An OpenAI-style chat completion through Hutch; extra ``params`` go to the backend."""
        reply = await self.request(chat_body(model, messages, params), model=model,
                                   priority=priority, timeout=timeout,
                                   status_after=status_after, on_status=on_status)
        return reply.completion

    # -- streams -------------------------------------------------------------------

    def chat_stream(self, *, model: str, messages: Sequence[Mapping[str, Any] | ChatMessage],
                    priority: int = 0, timeout: float | None = None,
                    idle_timeout: float | None = None, status_after: float | None = None,
                    **params: Any) -> ChatStream:
        """A streamed chat completion (``"stream": true``): use it as ``async with`` (or
        iterate it directly); see :class:`ChatStream`. ``timeout`` bounds the start (queue
        wait and first chunk), ``idle_timeout`` (default: ``timeout``) each later gap;
        ``status_after``: as for :meth:`submit` (``stream.queue_status``, ``.on_status``)."""
        body = chat_body(model, messages, {**params, "stream": True})
        return self.stream_body(body, model=model, priority=priority, timeout=timeout,
                                idle_timeout=idle_timeout, status_after=status_after)

    def stream_body(self, body: Mapping[str, Any] | bytes, *, model: str,
                    priority: int = 0, timeout: float | None = None,
                    idle_timeout: float | None = None,
                    headers: Mapping[str, Any] | None = None,
                    status_after: float | None = None) -> ChatStream:
        """:meth:`chat_stream` for a body as written (a mapping, or JSON bytes with
        ``"stream": true``); ``headers`` as for :meth:`submit`."""
        timeout_s = self._timeout(timeout)
        stream = ChatStream(self, body, model=model, priority=priority, timeout_s=timeout_s,
                            idle_timeout_s=self._timeout(idle_timeout or timeout_s),
                            max_buffered=self.stream_buffer)
        stream.request_headers = request_headers(None, headers, status_after)
        return stream

    async def start_stream(self, stream: ChatStream, body: Mapping[str, Any] | bytes, *,
                           model: str, priority: int, timeout_s: float,
                           headers: Mapping[str, Any] | None = None) -> str:
        """Register ``stream`` with the router and publish its request (for ChatStream)."""
        if not self._conn.connected:
            raise RuntimeError("HutchClient is not connected: use `async with` or connect()")
        correlation_id = uuid.uuid4().hex
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        message = self._request_message(payload, correlation_id, priority, timeout_s,
                                        request_headers(None, headers))
        stream.correlation_id = correlation_id
        self._router.expect_stream(correlation_id, stream)
        await self._publish_request(message, model, timeout_s)
        return correlation_id

    def end_stream(self, correlation_id: str, *, cancel: str | None) -> None:
        """A stream is over (for ChatStream); ``cancel``: it was left early (the reason)."""
        self._forget(correlation_id, cancel=cancel)

    # -- cancels -------------------------------------------------------------------

    async def cancel(self, correlation_id: str) -> None:
        """Cancel a request (of this client's user) on every worker, with a confirm: a
        queued request is answered ``cancelled`` when reached, one at a backend is
        aborted. Whoever still awaits it gets :class:`RequestCancelledError`. Raises
        :class:`TopologyError` if the cancel exchange is missing."""
        exchange = self.names.cancel_exchange
        try:
            async with asyncio.timeout(_CANCEL_TIMEOUT_S):
                if not self._cancel_checked:
                    await self._conn.check_exchange(exchange)
                    self._cancel_checked = True
                await self._conn.publish(cancel_message(correlation_id, self._user),
                                         exchange=exchange, routing_key="",
                                         blocked_timeout_s=_CANCEL_TIMEOUT_S)
        except TimeoutError:
            raise DeadlineExceededError(
                f"could not publish the cancel within {_CANCEL_TIMEOUT_S:.0f}s "
                "(no broker connection)", code=p.ErrorCode.DEADLINE_EXCEEDED) from None
