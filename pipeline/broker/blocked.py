"""Whether the broker blocks a connection now: its resource alarms, seen by Hutch.

When RabbitMQ raises a memory or disk alarm it stops reading from every connection that
publishes, after telling it so with ``connection.blocked`` (and ``connection.unblocked``
once the alarm clears). A publish on a blocked connection is not refused: its confirm just
never comes while the alarm lasts. aiormq notes the state but neither exposes it nor calls
anyone back, so :class:`BlockedState` follows the notifications of one connection after
another (a reconnect starts unblocked): publishers bound their wait with it, the gateway
answers 503 at once, readiness probes say not ready, and a gauge shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aio_pika.abc import AbstractConnection

from pipeline.observe.log import get_logger

__all__ = ["BlockedState"]

log = get_logger("hutch.broker")

#: aiormq's handlers of the two notifications (name-mangled private methods, looked up on
#: the instance for every frame: wrapping them there is how a caller hears of them).
_ON_BLOCKED = "_Connection__handle_connection_blocked"
_ON_UNBLOCKED = "_Connection__handle_connection_unblocked"

OnChange = Callable[[bool], None]


def _not_aiormq_block_notice(record: logging.LogRecord) -> bool:
    """aiormq warns of each block and unblock in a free-text line; Hutch logs them as
    structured events (``broker.blocked``, ``broker.unblocked``) instead."""
    message = str(record.msg)
    return not message.endswith((" was blocked by: %r", " was unblocked"))


logging.getLogger("aiormq.connection").addFilter(_not_aiormq_block_notice)


class BlockedState:
    """Blocked or not, since when and why, for the connection last :meth:`attach`-ed."""

    def __init__(self, on_change: OnChange | None = None) -> None:
        self._unblocked = asyncio.Event()
        self._unblocked.set()
        self._blocked = asyncio.Event()
        self._on_change = on_change
        #: Timeouts of publishes in progress and their bounds (see :meth:`bounding`).
        self._bounded: dict[asyncio.Timeout, float] = {}
        self._generation = 0
        #: The broker's reason (``low on memory``, ``low on disk``) while blocked.
        self.reason: str | None = None
        #: ``time.monotonic()`` when the block began, None while not blocked.
        self.since: float | None = None

    @property
    def blocked(self) -> bool:
        return not self._unblocked.is_set()

    def blocked_for_s(self) -> float:
        """Seconds this block has lasted (0 while not blocked)."""
        return 0.0 if self.since is None else time.monotonic() - self.since

    def attach(self, connection: AbstractConnection) -> None:
        """Follow ``connection`` from now on (a new connection starts unblocked)."""
        self._generation += 1
        self._set(False, None)
        transport = getattr(connection, "transport", None)
        raw = getattr(transport, "connection", None)
        if raw is None or not all(hasattr(raw, name) for name in (_ON_BLOCKED, _ON_UNBLOCKED)):
            log.warning("broker.blocked_unobservable", connection=type(raw).__name__)
            return
        generation = self._generation
        self._wrap(raw, _ON_BLOCKED, generation, blocked=True)
        self._wrap(raw, _ON_UNBLOCKED, generation, blocked=False)

    def _wrap(self, raw: Any, name: str, generation: int, *, blocked: bool) -> None:
        original: Callable[[Any], Awaitable[None]] = getattr(raw, name)

        async def handler(frame: Any) -> None:
            await original(frame)
            if generation == self._generation:  # not a connection replaced since
                reason = getattr(frame, "reason", None) if blocked else None
                self._set(blocked, str(reason) if reason is not None else None)

        setattr(raw, name, handler)

    def _set(self, blocked: bool, reason: str | None) -> None:
        if blocked == self.blocked:
            return
        if blocked:
            self.since, self.reason = time.monotonic(), reason
            self._unblocked.clear()
            self._blocked.set()
            for timeout, bound_s in self._bounded.items():
                timeout.reschedule(asyncio.get_running_loop().time() + bound_s)
            log.warning("broker.blocked", reason=reason)
        else:
            log.info("broker.unblocked", blocked_s=round(self.blocked_for_s(), 3))
            self.since = self.reason = None
            self._blocked.clear()
            self._unblocked.set()
            for timeout in self._bounded:
                timeout.reschedule(None)
        if self._on_change is not None:
            self._on_change(blocked)

    def lost(self) -> None:
        """The connection is gone: not blocked any more (the next one starts unblocked)."""
        self._generation += 1
        self._set(False, None)

    @contextlib.contextmanager
    def bounding(self, timeout: asyncio.Timeout, bound_s: float) -> Iterator[None]:
        """While inside, ``timeout`` (entered, unarmed) expires once a block has lasted
        ``bound_s``, and is disarmed again if the block ends first."""
        if self.blocked:
            timeout.reschedule(asyncio.get_running_loop().time() + bound_s
                               - self.blocked_for_s())
        self._bounded[timeout] = bound_s
        try:
            yield
        finally:
            del self._bounded[timeout]

    async def wait_unblocked(self, timeout_s: float) -> bool:
        """Wait until not blocked, at most ``timeout_s``; True if unblocked by then."""
        if not self.blocked:
            return True
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._unblocked.wait()
        except TimeoutError:
            return False
        return True

    async def wait_blocked_for(self, seconds: float) -> None:
        """Return once one block has lasted ``seconds`` (0: as soon as one begins)."""
        while True:
            await self._blocked.wait()
            if not await self.wait_unblocked(seconds - self.blocked_for_s()):
                return
