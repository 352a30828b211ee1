"""The parking lot, operated: list, replay and purge parked requests (``hutch dlq``).

Every terminal failure ends in ``<prefix>.parked`` with headers saying why (see
:meth:`pipeline.settle.publisher.Publisher.park`). This module is what an operator does with them:

* :func:`list_parked` **peeks**: it takes messages with ``basic.get`` and manual ack, reads
  them, and closes the channel without acking. The broker requeues them, and a classic
  queue puts requeued messages back at their original position, so looking never loses
  or reorders anything.
* :func:`replay` **moves** matching messages back to the request exchange with fresh
  attempts. The republish and the ack of the parked copy are one AMQP transaction on one
  channel, one transaction per message: an interrupted replay (Ctrl-C, kill -9, a lost
  connection) leaves every message either still parked or replayed, never both, never
  neither. Messages it does not replay stay unacked until the end and then return to
  their places. It examines at most the number of messages the queue held when it
  started, so a replayed request that fails again and is re-parked is not replayed a
  second time in the same run.
* :func:`purge` empties the parking lot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from pipeline import protocol as p
from pipeline.broker.connection import connect
from pipeline.broker.names import Names
from pipeline.errors import TopologyError
from pipeline.ops.reply_check import ReplyQueues
from pipeline.settings import Settings
from pipeline.settle.publisher import copy_message

__all__ = [
    "ParkedMessage",
    "ReplayResult",
    "list_parked",
    "parked_count",
    "purge",
    "replay",
    "replay_headers",
    "replay_routing_key",
]

#: Headers that describe a past failure or a past attempt. A replayed request starts
#: afresh without them: the worker counts attempts and retries anew, and the deadline
#: (already passed) no longer applies. ``x-death`` and the broker's ``x-first-death-*``
#: / ``x-last-death-*`` summaries go too, so a later dead-lettering is read on its own.
_DROPPED_ON_REPLAY = frozenset({
    p.H_REASON,
    p.H_ERROR_CODE,
    p.H_ERROR_TYPE,
    p.H_ERROR_MESSAGE,
    p.H_PARKED_AT,
    p.H_ORIGINAL_ROUTING_KEY,
    p.H_ATTEMPTS,
    p.H_POOL,
    p.H_BACKEND,
    p.H_QUEUE_WAIT_MS,
    p.H_BACKEND_MS,
    p.H_DEADLINE,
    p.H_TIMEOUT_MS,
    p.H_RETRIES,
    p.H_RETRY_TIER,
    "x-death",
})
_DROPPED_PREFIXES = ("x-first-death-", "x-last-death-")


@dataclass(frozen=True)
class ParkedMessage:
    """One parked request, as its headers and properties describe it.

    ``parked_at`` is the last failure; ``first_failed_at`` the first one (the same unless
    the request was replayed and failed again). ``routing_key`` is the model it was
    published for, the key a replay uses. ``size`` is the body's length in bytes.
    """

    correlation_id: str | None
    reason: str | None
    error_code: str | None
    error_type: str | None
    error_message: str | None
    attempts: int | None
    pool: str | None
    backend: str | None
    parked_at: str | None
    first_failed_at: str | None
    replayed: int
    routing_key: str | None
    reply_to: str | None
    priority: int
    size: int


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did: ``replayed`` went back to the request exchange; ``skipped``
    (another reason), ``unroutable`` (no model to route by) and ``no_reply_queue`` (the
    reply queue it names is gone: nobody would get the answer) are still parked."""

    replayed: int = 0
    skipped: int = 0
    unroutable: int = 0
    no_reply_queue: int = 0


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    return str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def replay_routing_key(headers: Mapping[str, Any]) -> str | None:
    """The model a parked request was published for, or None if nothing says.

    ``x-hutch-original-routing-key`` is set by every park; a message parked by something
    else may still carry the broker's ``x-death``, whose most recent entry lists the
    routing keys the message was published with.
    """
    original = _text(headers.get(p.H_ORIGINAL_ROUTING_KEY))
    if original:
        return original
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        keys = deaths[0].get("routing-keys")
        if isinstance(keys, list) and keys:
            key = _text(keys[0])
            if key:
                return key
    return None


def replay_headers(headers: Mapping[str, Any], now_ms: int | None = None) -> dict[str, Any]:
    """The headers a parked request is republished with: fresh attempts, history kept.

    The failure headers go (see ``_DROPPED_ON_REPLAY``); ``x-hutch-replayed`` counts the
    replays and ``x-hutch-first-failed-at`` keeps the first failure's time across them
    (taken from ``x-hutch-parked-at`` the first time). ``x-hutch-sent-at`` becomes the
    replay time, so the queue-wait metric measures this trip, not the time spent parked.
    """
    out = {key: value for key, value in headers.items()
           if key not in _DROPPED_ON_REPLAY and not key.startswith(_DROPPED_PREFIXES)}
    first = headers.get(p.H_FIRST_FAILED_AT) or headers.get(p.H_PARKED_AT)
    if first:
        out[p.H_FIRST_FAILED_AT] = _text(first)
    out[p.H_REPLAYED] = (_int(headers.get(p.H_REPLAYED)) or 0) + 1
    out[p.H_SENT_AT] = p.now_ms() if now_ms is None else now_ms
    return out


def _parked_message(message: AbstractIncomingMessage) -> ParkedMessage:
    headers = message.headers or {}
    parked_at = _text(headers.get(p.H_PARKED_AT))
    return ParkedMessage(
        correlation_id=message.correlation_id,
        reason=_text(headers.get(p.H_REASON)),
        error_code=_text(headers.get(p.H_ERROR_CODE)),
        error_type=_text(headers.get(p.H_ERROR_TYPE)),
        error_message=_text(headers.get(p.H_ERROR_MESSAGE)),
        attempts=_int(headers.get(p.H_ATTEMPTS)),
        pool=_text(headers.get(p.H_POOL)),
        backend=_text(headers.get(p.H_BACKEND)),
        parked_at=parked_at,
        first_failed_at=_text(headers.get(p.H_FIRST_FAILED_AT)) or parked_at,
        replayed=_int(headers.get(p.H_REPLAYED)) or 0,
        routing_key=replay_routing_key(headers),
        reply_to=message.reply_to,
        priority=message.priority or 0,
        size=len(message.body),
    )


async def _connect(settings: Settings) -> AbstractConnection:
    return await connect(settings, name="hutch dlq")


async def _parked_queue(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    """The parking lot, declared passively: a missing one is a topology error, not a
    silently created empty queue."""
    name = Names(settings.prefix).parked_queue
    try:
        return await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise TopologyError(
            f"queue {name!r} does not exist in vhost {settings.vhost!r}: run "
            "`hutch topology apply --config <file>` first") from None


async def _requests_exchange(channel: AbstractChannel, settings: Settings) -> AbstractExchange:
    name = Names(settings.prefix).requests_exchange
    try:
        return await channel.get_exchange(name, ensure=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise TopologyError(
            f"exchange {name!r} does not exist in vhost {settings.vhost!r}: run "
            "`hutch topology apply --config <file>` first") from None


async def parked_count(settings: Settings) -> int:
    """How many messages wait in the parking lot (not counting any held unacked)."""
    async with await _connect(settings) as connection:
        channel = await connection.channel(publisher_confirms=False)
        queue = await _parked_queue(channel, settings)
        return queue.declaration_result.message_count or 0


async def list_parked(settings: Settings, limit: int | None = None) -> list[ParkedMessage]:
    """The parked messages, oldest first, at most ``limit``; none is consumed or moved.

    Each is taken with ``basic.get`` (manual ack) and never acked; closing the channel
    hands them all back to the broker, which requeues them where they were.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    async with await _connect(settings) as connection:
        channel = await connection.channel(publisher_confirms=False)
        queue = await _parked_queue(channel, settings)
        # At most what is there now: messages parked while we look wait for the next look.
        budget = queue.declaration_result.message_count or 0
        if limit is not None:
            budget = min(budget, limit)
        parked: list[ParkedMessage] = []
        try:
            for _ in range(budget):
                message = await queue.get(no_ack=False, fail=False, timeout=None)
                if message is None:
                    break
                parked.append(_parked_message(message))
        finally:
            await channel.close()  # requeues everything we took, in place
        return parked


def _replay_message(message: AbstractIncomingMessage, user: str) -> aio_pika.Message:
    """The parked message as a fresh request: same body and identity, no expiration.

    ``user_id`` is the replaying operator's (the broker checks it against the connection);
    the client's validated user travels in ``x-hutch-user``, which workers honour from
    users listed in ``trusted_users``. No ``expiration``: a new chance, with no deadline.
    """
    return copy_message(message, replay_headers(message.headers or {}), user_id=user)


async def replay(settings: Settings, reason: str | None = None,
                 limit: int | None = None, *, force: bool = False) -> ReplayResult:
    """Send parked requests (all, or those with ``reason``) back to the request exchange.

    At most ``limit`` are replayed, oldest first. Each goes back under the model it was
    published for (see :func:`replay_routing_key`); one with none is counted as
    unroutable and stays parked. One whose reply queue no longer exists stays parked too
    (counted in ``no_reply_queue``) unless ``force``. Republish and ack commit together in
    one transaction, so an interruption at any point neither duplicates nor drops a message.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    replayed = skipped = unroutable = gone = 0
    async with await _connect(settings) as connection:
        replies = ReplyQueues(connection)
        # Transactions and publisher confirms exclude each other on a channel.
        channel = await connection.channel(publisher_confirms=False)
        exchange = await _requests_exchange(channel, settings)
        queue = await _parked_queue(channel, settings)
        budget = queue.declaration_result.message_count or 0
        try:
            for _ in range(budget):
                if limit is not None and replayed >= limit:
                    break
                # timeout=None: with a timeout aio-pika uses asyncio.wait_for, which on
                # Python 3.11 swallows a cancellation that arrives as the reply does, and
                # an interrupted replay would go on to the end.
                message = await queue.get(no_ack=False, fail=False, timeout=None)
                if message is None:
                    break
                headers = message.headers or {}
                if reason is not None and _text(headers.get(p.H_REASON)) != reason:
                    skipped += 1  # held unacked: back in its place when the channel closes
                    continue
                routing_key = replay_routing_key(headers)
                if routing_key is None:
                    unroutable += 1
                    continue
                if not force and message.reply_to and not await replies.exists(
                        message.reply_to):
                    gone += 1
                    continue
                async with channel.transaction():
                    # mandatory=False: an unknown model goes to the alternate exchange and
                    # is answered and re-parked like any other.
                    await exchange.publish(_replay_message(message, settings.amqp_user),
                                           routing_key=routing_key, mandatory=False)
                    await message.ack()
                replayed += 1
        finally:
            if not channel.is_closed:
                await channel.close()  # the skipped and unroutable go back, in place
    return ReplayResult(replayed=replayed, skipped=skipped, unroutable=unroutable,
                        no_reply_queue=gone)


async def purge(settings: Settings) -> int:
    """Delete every message waiting in the parking lot; returns how many were deleted.

    Messages another connection holds unacked at that moment (a concurrent ``list`` or
    ``replay``) are not waiting, so they survive.
    """
    async with await _connect(settings) as connection:
        channel = await connection.channel(publisher_confirms=False)
        queue = await _parked_queue(channel, settings)
        result = await queue.purge()
        return int(result.message_count or 0)
