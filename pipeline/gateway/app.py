"""The gateway's HTTP handlers: an OpenAI call in, a Hutch request on the queue, the answer
back as JSON or server-sent events.

Each HTTP request is one task holding one call of the replica's :class:`HutchClient`
(its reply queue is the replica's own). A client that goes away makes aiohttp cancel that
task (``handler_cancellation``), and cancelling a task that awaits an answer or reads a
stream cancels the request on the broker: queued, it is answered ``cancelled`` and never
reaches a backend; at a backend, the call is aborted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from pipeline import protocol as p
from pipeline.client.client import HutchClient
from pipeline.errors import RequestFailed
from pipeline.gateway.calls import Call, CallReader, refusal
from pipeline.gateway.events import StreamEvents
from pipeline.gateway.metrics import GatewayMetrics
from pipeline.gateway.responses import (
    DONE,
    error_response,
    reply_headers,
    sse_chunk,
    sse_error,
)
from pipeline.models import ChatCompletionChunk

__all__ = ["GONE", "Gateway"]

#: Set on a stream's response whose client went away mid-stream.
GONE = "hutch_client_gone"

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Timing:
    """When one HTTP request arrived; its first byte is observed once."""

    def __init__(self, metrics: GatewayMetrics, endpoint: str, stream: bool) -> None:
        self.started = time.monotonic()
        self._first = metrics.first_byte.labels(endpoint, "true" if stream else "false")
        self._sent = False

    def first_byte(self) -> None:
        if not self._sent:
            self._sent = True
            self._first.observe(time.monotonic() - self.started)


class Gateway:
    """The handlers of one replica, over its client, call reader and metrics."""

    def __init__(self, client: HutchClient, reader: CallReader, metrics: GatewayMetrics, *,
                 models: list[str], retry_after_s: int) -> None:
        self._client = client
        self._reader = reader
        self._metrics = metrics
        self._models = models
        self._retry_after_s = retry_after_s

    def routes(self, app: web.Application) -> None:
        """Add the gateway's routes to ``app``."""
        for path, endpoint in (("/v1/chat/completions", p.Endpoint.CHAT),
                               ("/v1/completions", p.Endpoint.COMPLETIONS),
                               ("/v1/embeddings", p.Endpoint.EMBEDDINGS)):
            app.router.add_post(path, self._handler(endpoint))
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)

    def _handler(self, endpoint: p.Endpoint
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._openai(request, endpoint)
        return handle

    async def _openai(self, request: web.Request, endpoint: p.Endpoint
                      ) -> web.StreamResponse:
        label, identity, status = endpoint.value, "-", 500
        timing = _Timing(self._metrics, label, False)
        in_flight = self._metrics.in_flight.labels(label)
        in_flight.inc()
        stream = False
        try:
            call = await self._reader.read(request, endpoint)
            identity, stream = call.client.identity, call.stream
            timing = _Timing(self._metrics, label, stream) if stream else timing
            response = await (self._stream(request, call, timing) if stream
                              else self._plain(call))
            status = response.status
            if response.get(GONE):
                self._metrics.disconnects.labels(label).inc()
                status = 499
        except RequestFailed as exc:
            response = error_response(exc, correlation_id=None,
                                      retry_after_s=self._retry_after_s)
            status = response.status
        except asyncio.CancelledError:
            self._metrics.disconnects.labels(label).inc()
            status = 499  # nginx's "client closed request"
            raise
        finally:
            in_flight.dec()
            timing.first_byte()
            self._metrics.requests.labels(label, identity, str(status)).inc()
            self._metrics.duration.labels(label, "true" if stream else "false").observe(
                time.monotonic() - timing.started)
        return response

    def _identity_headers(self, call: Call) -> dict[str, str]:
        return {p.H_USER: call.client.identity}

    async def _plain(self, call: Call) -> web.StreamResponse:
        correlation_id = await self._client.submit(
            call.body, model=call.model, priority=call.priority, timeout=call.timeout_s,
            endpoint=call.endpoint, headers=self._identity_headers(call))
        try:
            reply = await self._client.result_raw(correlation_id)
        except RequestFailed as exc:
            return error_response(exc, correlation_id=correlation_id,
                                  retry_after_s=self._retry_after_s)
        return web.Response(body=reply.body, content_type="application/json",
                            headers=reply_headers(correlation_id, reply.headers))

    async def _stream(self, request: web.Request, call: Call, timing: _Timing
                      ) -> web.StreamResponse:
        """Server-sent events; errors before the first chunk are plain HTTP errors, unless
        a queue status opened the response before it (:mod:`.events`)."""
        stream = self._client.stream_body(call.body, model=call.model,
                                          priority=call.priority, timeout=call.timeout_s,
                                          headers=self._identity_headers(call),
                                          status_after=call.status_after_s)
        events = StreamEvents(request, lambda: {**_SSE_HEADERS, **reply_headers(
            stream.correlation_id or "", stream.headers)}, timing.first_byte)
        stream.on_status = events.queued
        try:
            async with stream:  # leaving it before the end cancels the request
                chunks = aiter(stream)
                try:
                    first = await anext(chunks, None)
                except RequestFailed as exc:
                    await events.settled()
                    if events.response is not None:
                        return await events.fail(exc)
                    return error_response(exc, correlation_id=stream.correlation_id or "",
                                          retry_after_s=self._retry_after_s)
                response = await events.open()
                await self._relay(response, first, chunks)
        finally:
            events.close()
        return response

    @staticmethod
    async def _relay(response: web.StreamResponse, first: ChatCompletionChunk | None,
                     chunks: AsyncIterator[ChatCompletionChunk]) -> None:
        """Write the chunks as events, then ``[DONE]`` (or the error that ended it). A
        client gone mid-stream is marked (``response[GONE]``); leaving the stream's block
        then cancels the request."""
        try:
            if first is not None:
                await response.write(sse_chunk(first))
                async for chunk in chunks:
                    await response.write(sse_chunk(chunk))
            await response.write(DONE)
        except RequestFailed as exc:
            await response.write(sse_error(exc))
        except ConnectionResetError:
            response[GONE] = True
            return
        await response.write_eof()

    async def _list_models(self, request: web.Request) -> web.Response:
        try:
            self._reader.client(request)
        except RequestFailed as exc:
            return error_response(exc, correlation_id=None, retry_after_s=0)
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "hutch"}
                for model in self._models]
        return web.json_response({"object": "list", "data": data})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if await self._client.ready():
            return web.json_response({"status": "ready"})
        why = ("the broker blocks publishing (a memory or disk alarm)" if self._client.blocked
               else "no broker connection, or the topology is missing (run `hutch topology "
               "apply`)")
        error = refusal(503, f"not ready: {why}", code="not_ready", type="api_error")
        return error_response(error, correlation_id=None, retry_after_s=0)

