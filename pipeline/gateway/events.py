"""A streaming call's server-sent events response, opened early by a queue status.

Without a status, the response opens with the stream's first chunk, so an error before it
is a plain HTTP error (429, 504, ...). A stream that asked for its status
(``x-hutch-status-after``) and is told it waits opens the response at once and gets the
status as an SSE comment line (:func:`~pipeline.gateway.responses.sse_queued`, skipped by
OpenAI's SDKs); an error before its first chunk is then an SSE error event, as one after
it always is. The status arrives from the client's reply consumer, which must not wait:
it is written by a task of its own, under the lock every write of the response takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

from aiohttp import web

from pipeline.errors import RequestFailed
from pipeline.gateway.responses import sse_error, sse_queued
from pipeline.models import QueueStatus

__all__ = ["StreamEvents"]


class StreamEvents:
    """One stream's SSE response: ``headers()`` gives its headers when it opens."""

    def __init__(self, request: web.Request, headers: Callable[[], Mapping[str, Any]],
                 opened: Callable[[], None]) -> None:
        self._request = request
        self._headers = headers
        self._opened = opened
        self._lock = asyncio.Lock()
        self._writes: set[asyncio.Task[None]] = set()
        #: The response, once open (None: nothing was sent yet).
        self.response: web.StreamResponse | None = None

    def queued(self, status: QueueStatus) -> None:
        """The stream's status arrived: open the response and say so (in the background)."""
        task = asyncio.ensure_future(self._comment(status))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _comment(self, status: QueueStatus) -> None:
        async with self._lock:
            response = await self._open()
            with suppress(ConnectionResetError):  # the next write finds it gone
                await response.write(sse_queued(status))

    async def _open(self) -> web.StreamResponse:
        if self.response is None:
            response = web.StreamResponse(headers=dict(self._headers()))
            await response.prepare(self._request)
            self.response = response
            self._opened()
        return self.response

    async def open(self) -> web.StreamResponse:
        """The response, opened now if no status opened it."""
        await self.settled()
        async with self._lock:
            return await self._open()

    async def settled(self) -> None:
        """Wait for status writes under way (so :attr:`response` says whether it is open)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def fail(self, error: RequestFailed) -> web.StreamResponse:
        """End an open response with ``error`` as its event."""
        response = await self.open()
        with suppress(ConnectionResetError):
            await response.write(sse_error(error))
            await response.write_eof()
        return response

    def close(self) -> None:
        """The call is over: a status write not started yet is dropped."""
        for task in self._writes:
            task.cancel()
