"""What an injected fault does to a request: answer 429 or a server error, cut or stall a
stream, write a malformed event, or hang; each counted. Kept apart from the server so the
server reads as the request's path and this as the ways it is broken on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from aiohttp import web

from pipeline.testing.mock.chat import error_response, retry_after_header
from pipeline.testing.mock.config import MockConfig
from pipeline.testing.mock.faults import Fault
from pipeline.testing.mock.stats import Counters
from pipeline.testing.mock.stream import MALFORMED_EVENT, StrikeFault

__all__ = ["FaultActs", "drop_connection"]


def drop_connection(request: web.Request) -> None:
    """Close a request's connection; aiohttp then cancels its handler."""
    if request.transport is not None:
        request.transport.close()


class FaultActs:
    """The fault answers of one mock; ``config`` is read at each act (faults change)."""

    def __init__(self, counters: Counters, config: Callable[[], MockConfig]) -> None:
        self._counters = counters
        self._config = config
        # Requests hanging now (a fault): a stop drops their connections at once.
        self._hanging: dict[int, web.Request] = {}
        self._stopping = False
        # Requests (by id) answered with an injected fault, until the middleware saw them.
        self._faulted: set[int] = set()

    def answered(self, request: web.Request) -> bool:
        """Whether ``request`` got an injected fault's answer (asked once, by the
        middleware: its error is not counted as a bad request)."""
        faulted = id(request) in self._faulted
        self._faulted.discard(id(request))
        return faulted

    @contextlib.contextmanager
    def stopping(self) -> Iterator[None]:
        """The server stops: hanging requests lose their connection now, and so does any
        that starts hanging meanwhile."""
        self._stopping = True
        try:
            for request in list(self._hanging.values()):
                drop_connection(request)
            yield
        finally:
            self._stopping = False

    def striker(self, request: web.Request, fault: Fault) -> StrikeFault | None:
        """What a stream fault does when it is due (None: no stream fault)."""
        counters = self._counters

        async def cut(response: web.StreamResponse) -> bool:
            counters.cut += 1
            drop_connection(request)
            return False

        async def malformed(response: web.StreamResponse) -> bool:
            counters.malformed += 1
            await response.write(MALFORMED_EVENT)
            return True

        async def stall(response: web.StreamResponse) -> bool:
            counters.stalled += 1
            await self.hold(request)
            return True

        return {Fault.CUT: cut, Fault.MALFORMED: malformed, Fault.STALL: stall}.get(fault)

    def throttled(self, request: web.Request) -> web.Response:
        self._faulted.add(id(request))
        self._counters.throttled += 1
        retry_after = self._config().retry_after_s
        return error_response(
            429, "rate_limit_exceeded",
            f"mock backend: injected throttling; retry after {retry_after:g}s",
            type_="requests", headers={"Retry-After": retry_after_header(retry_after)},
        )

    def failed(self, request: web.Request) -> web.Response:
        self._faulted.add(id(request))
        self._counters.failed += 1
        status = self._config().fail_status
        return error_response(
            status, "mock_fault", f"mock backend: injected failure (HTTP {status})",
            type_="server_error" if status >= 500 else "invalid_request_error",
        )


    async def hold(self, request: web.Request) -> None:
        """Hang for ``hang_s`` (a fault); ``stop()`` drops the connection meanwhile."""
        key = id(request)
        self._hanging[key] = request
        if self._stopping:  # got its slot during stop(): drop it like the rest
            drop_connection(request)
        try:
            await asyncio.sleep(self._config().hang_s)
        finally:
            self._hanging.pop(key, None)
