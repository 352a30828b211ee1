"""A consumer that knows its in-flight deliveries.

aio-pika runs each delivery's callback as its own task. The worker must be able to stop
taking new deliveries while letting those tasks finish (SIGTERM), and to cancel them at
once when their channel is gone (their acks can no longer land and the broker has already
requeued them: finishing them would only overload the backend). This class does both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

__all__ = ["Handler", "TrackedConsumer"]

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class TrackedConsumer:
    """Consume ``queue_name`` on ``channel`` with ``prefetch``, tracking handler tasks.

    ``lanes``: more queues consumed beside it (a pool's lanes), each with a prefetch of
    ``lane_prefetch``: their heads wait at the backend's admission with the rest.
    ``arguments``: the consumer's arguments on ``queue_name`` (the management API shows
    them: a worker's presence carries its configuration's stamp this way)."""

    def __init__(self, channel: AbstractChannel, queue_name: str, prefetch: int,
                 handler: Handler, *, lanes: Sequence[str] = (), lane_prefetch: int = 1,
                 arguments: Mapping[str, Any] | None = None) -> None:
        self._channel = channel
        self._queue_name = queue_name
        self.prefetch = prefetch
        self._handler = handler
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._lane_names = tuple(lanes)
        self._lane_prefetch = lane_prefetch
        self._arguments = dict(arguments) if arguments else None
        self._lanes: list[AbstractQueue] = []
        self._lane_tags: list[tuple[AbstractQueue, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def consuming(self) -> bool:
        return self._tag is not None

    async def start(self, prefetch: int | None = None, lane_prefetch: int | None = None
                    ) -> None:
        """Set the prefetch (and the lanes'), then consume. To resize, :meth:`stop_consuming`
        and start again: on RabbitMQ 3.10 a live prefetch change has no effect on a
        consumer."""
        if prefetch is not None:
            self.prefetch = prefetch
        if lane_prefetch is not None:
            self._lane_prefetch = lane_prefetch
        if self._queue is None:
            self._channel.close_callbacks.add(lambda *_: self.closed.set())
            self._queue = await self._channel.declare_queue(self._queue_name, passive=True)
            self._lanes = [await self._channel.declare_queue(name, passive=True)
                           for name in self._lane_names]
        await self._channel.set_qos(prefetch_count=self.prefetch)
        if self._arguments:  # only then: test doubles of a queue need not take them
            self._tag = await self._queue.consume(self._on_message, no_ack=False,
                                                  arguments=self._arguments)
        else:
            self._tag = await self._queue.consume(self._on_message, no_ack=False)
        if self._lanes:
            await self._channel.set_qos(prefetch_count=self._lane_prefetch)
            self._lane_tags = [(lane, await lane.consume(self._on_message, no_ack=False))
                               for lane in self._lanes]

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handler(message)
        finally:
            self._tasks.discard(task)

    async def stop_consuming(self) -> None:
        """basic.cancel: no new deliveries; those already received keep running."""
        if self._queue is not None and self._tag is not None and not self._channel.is_closed:
            tags = [(self._queue, self._tag), *self._lane_tags]
            self._tag, self._lane_tags = None, []
            for queue, tag in tags:
                try:
                    await queue.cancel(tag)
                except Exception:  # the channel died meanwhile: nothing left to cancel
                    return

    async def drain(self, timeout_s: float) -> bool:
        """Wait for in-flight handlers; True if all finished within ``timeout_s``."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return not pending

    async def abort(self) -> None:
        """Cancel in-flight handlers and close the channel (unacked work is requeued)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        if not self._channel.is_closed:
            try:
                await self._channel.close()
            except Exception:
                pass
