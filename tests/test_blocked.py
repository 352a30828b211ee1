"""BlockedState and the client's bounded publish, without a broker (the broker's side is
tests/test_alarms.py, on a node of the tests' own)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any, cast

import aiormq
import pytest
from aio_pika.abc import AbstractConnection

from pipeline.broker.blocked import BlockedState
from pipeline.client.connection import ClientConnection, ReplyQueue
from pipeline.errors import BrokerBlockedError, RequestFailed, error_for_code

_NAMES = ("_Connection__handle_connection_blocked", "_Connection__handle_connection_unblocked")


class RawConnection:
    """aiormq's two handlers, as the frame reader calls them."""

    async def _Connection__handle_connection_blocked(self, frame: Any) -> None: ...

    async def _Connection__handle_connection_unblocked(self, frame: Any) -> None: ...

    async def block(self, reason: str = "low on memory") -> None:
        await getattr(self, _NAMES[0])(SimpleNamespace(reason=reason))

    async def unblock(self) -> None:
        await getattr(self, _NAMES[1])(SimpleNamespace())


def connection(raw: RawConnection) -> AbstractConnection:
    return cast(AbstractConnection, SimpleNamespace(transport=SimpleNamespace(connection=raw)))


def test_aiormq_still_has_the_handlers_that_are_wrapped() -> None:
    for name in _NAMES:
        assert hasattr(aiormq.Connection, name), f"aiormq renamed {name}: see blocked.py"


async def test_the_state_follows_the_notifications_of_the_attached_connection() -> None:
    changes: list[bool] = []
    state = BlockedState(changes.append)
    first, second = RawConnection(), RawConnection()
    state.attach(connection(first))
    await first.block()
    assert state.blocked and state.reason == "low on memory"
    await asyncio.wait_for(state.wait_blocked_for(0), 5)
    assert not await state.wait_unblocked(0.01)
    await first.unblock()
    assert not state.blocked and await state.wait_unblocked(0)
    await first.block()
    state.attach(connection(second))  # a reconnect starts unblocked
    assert not state.blocked
    await first.block()  # the old connection is not followed any more
    assert not state.blocked
    await second.block("low on disk")
    state.lost()
    assert not state.blocked
    assert changes == [True, False, True, False, True, False]


def test_a_connection_without_the_handlers_is_not_followed() -> None:
    state = BlockedState()
    state.attach(connection(cast(RawConnection, object())))
    assert not state.blocked


def test_aiormqs_free_text_block_notices_are_filtered() -> None:
    record = logging.LogRecord("aiormq.connection", logging.WARNING, __file__, 1,
                               "Connection %r was blocked by: %r", ("c", "x"), None)
    assert not logging.getLogger("aiormq.connection").filter(record)


def client_connection() -> ClientConnection:
    async def on_reply(message: Any) -> None: ...

    return ClientConnection("amqp://guest:guest@127.0.0.1:9/", name="t",
                            reply_queue=ReplyQueue("r", 1000), on_reply=on_reply,
                            prefetch=1, required_exchange="llm.requests")


async def test_a_publish_blocked_past_the_bound_is_abandoned() -> None:
    conn, raw = client_connection(), RawConnection()
    conn.blocked_state.attach(connection(raw))
    confirm: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    publishing = asyncio.create_task(conn._unless_blocked(confirm, 0.05))
    await asyncio.sleep(0)
    await raw.block()
    with pytest.raises(BrokerBlockedError) as blocked:
        await asyncio.wait_for(publishing, 5)
    assert blocked.value.may_have_gone_out and confirm.cancelled()
    assert "low on memory" in blocked.value.message


async def test_a_publish_confirmed_within_the_bound_succeeds() -> None:
    conn, raw = client_connection(), RawConnection()
    conn.blocked_state.attach(connection(raw))
    confirm: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    publishing = asyncio.create_task(conn._unless_blocked(confirm, 5))
    await raw.block()
    await asyncio.sleep(0.01)
    await raw.unblock()
    confirm.set_result(None)
    await asyncio.wait_for(publishing, 5)


def test_broker_blocked_is_a_request_failure_of_its_own_code() -> None:
    assert error_for_code("broker_blocked") is BrokerBlockedError
    assert issubclass(BrokerBlockedError, RequestFailed)
