"""The client's one connection: its reply queue, a confirming channel, reconnects.

The first connection's errors are raised (a wrong URL should fail loudly), and so is a
missing topology: the exchange ``<prefix>.requests`` is checked (passively) before
anything is published, because a publish to a missing exchange closes the channel and
would otherwise look like a lost connection, retried until the deadline. After that a
supervisor reconnects by itself, with backoff, and re-consumes the reply queue: the
connection is supervised here rather than by aio-pika's RobustConnection, whose channel
restore can fail and leave a channel closed for good (seen on 3.10 with
stop_app/start_app). Retry logs are structured and rate-limited (one line per event and
interval, with how many were suppressed).

A resource alarm of the broker blocks the connection (``connection.blocked``): a publish
then waits at most ``blocked_timeout_s`` for the alarm to clear and fails with
:class:`BrokerBlockedError` instead of hanging (see :mod:`pipeline.broker.blocked`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import DeliveryError

from pipeline.broker.blocked import BlockedState
from pipeline.broker.connection import connect_urls
from pipeline.errors import BrokerBlockedError, TopologyError
from pipeline.observe.log import EventLogger, get_logger

__all__ = ["ClientConnection", "ReplyQueue", "ThrottledLog", "missing_exchange"]

log = get_logger("hutch.client")

#: Failures of a publish that a new connection may cure (a 404 is not one: see above).
_RETRYABLE = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError,
              ConnectionError)


class ThrottledLog:
    """Warnings at most once per ``interval_s`` per event, counting the ones left out."""

    def __init__(self, logger: EventLogger, interval_s: float = 5.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -float("inf")) < self._interval_s:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        suppressed = self._suppressed.pop(event, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self._log.warning(event, **fields)


def missing_exchange(name: str, amqp_url: str) -> TopologyError:
    """The error for a topology that was never applied in this vhost."""
    vhost = unquote(urlsplit(amqp_url).path[1:]) or "/"
    return TopologyError(
        f"exchange {name!r} does not exist in vhost {vhost!r}: the topology is missing; "
        "run `hutch topology apply --config <your config>` first")


@dataclass(frozen=True)
class ReplyQueue:
    """How the reply queue is declared: durable with ``x-expires`` (replies wait for a
    reconnect), or ``temporary``: exclusive and auto-delete, gone when the client is."""

    name: str
    expires_ms: int
    temporary: bool = False
    #: ``quorum``: replicated over a cluster, so replies survive a node's loss.
    queue_type: str = "classic"

    async def declare(self, channel: AbstractChannel) -> aio_pika.abc.AbstractQueue:
        if self.temporary:
            return await channel.declare_queue(
                self.name, durable=False, exclusive=True, auto_delete=True,
                arguments={"x-queue-type": "classic"})
        return await channel.declare_queue(
            self.name, durable=True,
            arguments={"x-queue-type": self.queue_type, "x-expires": self.expires_ms})


OnReply = Callable[[AbstractIncomingMessage], Awaitable[None]]


class ClientConnection:
    """One supervised connection: a confirming channel and a consumer of the replies."""

    def __init__(self, amqp_url: str, *, name: str, reply_queue: ReplyQueue,
                 on_reply: OnReply, prefetch: int, required_exchange: str) -> None:
        self.amqp_url = amqp_url
        #: The TLS context of an amqps:// URL (set before connect()).
        self.tls: ssl.SSLContext | None = None
        #: Every node of the cluster, tried in turn from the one after the last reached.
        self.nodes = [amqp_url]
        self._node = -1
        self._name = name
        self._reply_queue = reply_queue
        self._on_reply = on_reply
        self._prefetch = prefetch
        self._required = required_exchange
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._ready = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._throttled = ThrottledLog(log)
        #: Connections made after the first one (the broker restarted or the network broke).
        self.reconnects = 0
        #: Whether the broker blocks this connection now (a memory or disk alarm).
        self.blocked_state = BlockedState()
        #: How long a publish waits for a block to end before :class:`BrokerBlockedError`.
        self.blocked_timeout_s = 5.0

    def use_cluster(self, nodes: list[str], reply_queue_type: str) -> None:
        """Connect to any of ``nodes``; declare a durable reply queue of that type."""
        self.nodes = list(nodes)
        if not self._reply_queue.temporary:
            self._reply_queue = replace(self._reply_queue, queue_type=reply_queue_type)

    @property
    def connected(self) -> bool:
        return self._supervisor is not None

    @property
    def up(self) -> bool:
        """A connection is open now (False while reconnecting)."""
        return self._ready.is_set()

    async def connect(self) -> None:
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _open(self) -> None:
        connection, self._node = await connect_urls(self.nodes, name=self._name, tls=self.tls,
                                                    start=self._node + 1)
        try:
            await self._check_exchange(connection, self._required)
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await self._reply_queue.declare(channel)
            await queue.consume(self._on_reply)
        except BaseException:
            await connection.close()
            raise
        self.blocked_state.attach(connection)
        self._connection, self._channel, self._exchanges = connection, channel, {}
        self._ready.set()

    async def _check_exchange(self, connection: AbstractConnection, name: str) -> None:
        """Raise :class:`TopologyError` if exchange ``name`` does not exist (a passive
        declare, on a channel of its own: the broker closes the channel it fails on)."""
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise missing_exchange(name, self.amqp_url) from None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def check_exchange(self, name: str) -> None:
        """Raise :class:`TopologyError` now if exchange ``name`` does not exist."""
        await self._ready.wait()
        assert self._connection is not None
        await self._check_exchange(self._connection, name)

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
                self._connection = self._channel = None
                self._ready.clear()
                self.blocked_state.lost()
                if self._closing:
                    return
                self._throttled.warning("amqp.connection_lost", connection=self._name)
            try:
                await self._open()
            except Exception as exc:  # whatever the broker does while booting: try again
                self._throttled.warning("amqp.reconnect_failed", connection=self._name,
                                        error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            self.reconnects += 1
            log.info("amqp.reconnected", connection=self._name)

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = self._channel = None
        self._ready.clear()

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            assert self._channel is not None
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, message: aio_pika.Message, *, exchange: str, routing_key: str,
                      blocked_timeout_s: float | None = None) -> None:
        """Publish with confirms; across a lost connection, wait for the next one and try
        again (the caller bounds it with its deadline). A retry may duplicate a message
        whose confirm was lost: the worker answers both, the client keeps the first
        answer. A nack raises :class:`DeliveryError`; a missing exchange
        :class:`TopologyError` at once; a block of the broker that lasts
        ``blocked_timeout_s`` (default: this connection's) :class:`BrokerBlockedError`."""
        bound = self.blocked_timeout_s if blocked_timeout_s is None else blocked_timeout_s
        while True:
            await self._ready.wait()
            if not await self.blocked_state.wait_unblocked(bound):
                raise self.blocked_error(may_have_gone_out=False)
            try:
                target = await self._exchange(exchange)
                await self._unless_blocked(
                    target.publish(message, routing_key=routing_key, mandatory=False), bound)
                return
            except DeliveryError:
                raise
            except aiormq.exceptions.ChannelNotFoundEntity:
                await self._restart_channel()
                raise missing_exchange(exchange, self.amqp_url) from None
            except _RETRYABLE as exc:
                self._throttled.warning("publish.retry", exchange=exchange,
                                        correlation_id=message.correlation_id,
                                        error=repr(exc))
                await self._restart_channel()
                await asyncio.sleep(0.05)

    def blocked_error(self, *, may_have_gone_out: bool) -> BrokerBlockedError:
        state = self.blocked_state
        return BrokerBlockedError(
            f"the broker blocks publishing ({state.reason or 'a resource alarm'}) for "
            f"{state.blocked_for_s():.1f}s: the request was not accepted; try again once the "
            "alarm has cleared", may_have_gone_out=may_have_gone_out)

    async def _unless_blocked(self, publish: Awaitable[Any], bound_s: float) -> None:
        """Await ``publish`` (its confirm), unless a block that began meanwhile lasts
        ``bound_s``: then it is abandoned and :class:`BrokerBlockedError` raised (the
        broker may still take the message once the alarm clears). A timeout that only a
        block arms: nothing more per publish than entering it."""
        timeout = asyncio.timeout(None)
        try:
            async with timeout:
                with self.blocked_state.bounding(timeout, bound_s):
                    await publish
        except TimeoutError:
            if timeout.expired():
                raise self.blocked_error(may_have_gone_out=True) from None
            raise

    async def _restart_channel(self) -> None:
        """The channel died but the connection lives: start over on a new one."""
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
