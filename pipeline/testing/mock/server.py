"""The mock backend's HTTP server: an OpenAI-compatible endpoint with a hard slot cap.

Requests wait FIFO for one of ``capacity`` slots and hold it for the latency (a streamed
reply: until its last event), like a busy inference server; faults are decided by
:mod:`~pipeline.testing.mock.faults`, streams written by :mod:`~pipeline.testing.mock.stream`,
and everything counted by :mod:`~pipeline.testing.mock.stats`. A client that goes away
(its connection closed) frees its slot at once and is counted as ``aborted``.

With ``MockConfig.engine`` set, chat requests go through the realistic
:class:`~pipeline.testing.mock.engine.Engine` instead of the slots (KV budget, batch
slowdown, internal queue, preemption), ``GET /metrics`` serves vLLM's metrics and
``POST /admin/capacity`` changes the capacity at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from pipeline.testing.mock.admin import add_admin_routes
from pipeline.testing.mock.chat import (
    ChatRequest,
    RequestError,
    completion,
    error_response,
    parse_chat_request,
    reply_for,
)
from pipeline.testing.mock.config import MockConfig
from pipeline.testing.mock.endpoints import PATHS
from pipeline.testing.mock.endpoints import handler as endpoint_handler
from pipeline.testing.mock.engine import Engine, Sequence, SequencePacer, TooLongError
from pipeline.testing.mock.engine_metrics import EngineMetrics
from pipeline.testing.mock.fault_acts import FaultActs
from pipeline.testing.mock.faults import Fault, FaultDice
from pipeline.testing.mock.stats import Counters
from pipeline.testing.mock.stream import (
    Pace,
    Pacer,
    StreamBody,
    sse_headers,
    write_stream,
)

__all__ = ["MockBackend"]

# Waiting/sleeping handlers are cancelled on shutdown; a short drain keeps SIGTERM prompt.
_SHUTDOWN_TIMEOUT_S = 2.0

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MockBackend:
    """An in-process mock backend; use ``async with`` or ``start()``/``stop()``.

    ``stop()`` then ``start()`` restarts it on the same port (its counters and faults are
    kept): while it is stopped, callers get "connection refused", like a crashed backend.
    """

    def __init__(self, config: MockConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._slots = asyncio.Semaphore(config.capacity)
        # Never reset: completion ids stay unique across stats resets.
        self._next_id = 0
        self._dice = FaultDice(config)
        self._pacer = Pacer(config)
        self._counters = Counters(config.ids_kept)
        #: What injected faults do (answer 429/5xx, cut, stall, hang), with their counts.
        self._acts = FaultActs(self._counters, lambda: self.config)
        self._engine = (None if config.engine is None
                        else Engine(config.engine, EngineMetrics(config.models[0])))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; with port 0 the OS picks a free port (see ``port``).

        After ``stop()``, ``start()`` binds the port of the first start again, so the
        URL callers were given stays valid (a backend restart).
        """
        if self._runner is not None:
            raise RuntimeError("mock backend already started")
        # Created here so the semaphore belongs to the loop that serves the requests.
        self._slots = asyncio.Semaphore(self.config.capacity)
        runner = web.AppRunner(
            self._build_app(),
            access_log=None,
            # Like real servers, abandon work for clients that went away.
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            port = self._port if self._port is not None else self._requested_port
            site = web.TCPSite(runner, self.host, port)
            await site.start()
            # With a hostname that resolves to several addresses and port 0, each socket
            # may get a different port; the first one is reported. Prefer literal IPs.
            self._port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving; safe to call twice or before ``start()``.

        Requests in service get a short grace period; hanging ones (a fault) lose their
        connection at once, as when a stuck server is killed. The port is kept for a
        later ``start()``; until then connections to it are refused.
        """
        runner, self._runner = self._runner, None
        if runner is None:
            return
        with self._acts.stopping():
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._runner is not None

    @property
    def port(self) -> int:
        """The port actually bound (known after the first ``start()``, kept after stop)."""
        if self._port is None:
            raise RuntimeError("mock backend is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, ending in ``/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    # -- faults and stats ------------------------------------------------------------------

    def set_faults(self, **fields: Any) -> dict[str, Any]:
        """Replace the faults with ``fields`` (names in ``FAULT_FIELDS``); no fields clears
        them all. Returns the faults now in force. Raises ValueError on bad input, leaving
        the current faults unchanged.

        Takes effect for the next decisions: a request that waits for a slot is judged by
        the faults in force when it gets one; a request already hanging keeps hanging.
        """
        self.config = self.config.with_faults(**fields)
        self._dice = FaultDice(self.config)
        self._pacer = Pacer(self.config)
        return self.config.faults()

    def faults(self) -> dict[str, Any]:
        """The faults in force, same JSON as ``GET /faults``."""
        return self.config.faults()

    def set_capacity(self, **fields: Any) -> dict[str, Any]:
        """Change the realistic engine's capacity (names in ``CAPACITY_FIELDS``; the others
        kept) and return it. Raises ValueError on bad input or without an engine.

        Running requests keep running; waiting ones are admitted at once if they now fit.
        """
        engine = self._engine
        if engine is None or self.config.engine is None:
            raise ValueError("the mock runs without the realistic engine (start it with "
                             "--realistic, or MockConfig(engine=EngineConfig(...)))")
        config = self.config.engine.with_capacity(**fields)
        self.config = dataclasses.replace(self.config, engine=config)
        engine.reconfigure(config)
        return config.capacity()

    @property
    def engine(self) -> Engine | None:
        """The realistic engine, if the mock runs one."""
        return self._engine

    def stats(self) -> dict[str, Any]:
        """Counters and peaks, same JSON as ``GET /stats``.

        ``busy_slot_s`` (slot-seconds spent serving) and ``elapsed_s`` (seconds since start
        or reset) give utilisation between two reads: delta busy / (capacity x delta
        elapsed). ``served_ids`` and ``aborted_ids`` hold the last ``ids_kept`` ids."""
        config = self.config
        stats = {**self._counters.snapshot(), "capacity": config.capacity,
                 "latency_ms": config.latency_ms, "ttft_ms": config.first_token_ms,
                 "itl_ms": config.itl_ms, "ids_kept": config.ids_kept,
                 "models": list(config.models)}
        if self._engine is not None:
            engine = self._engine
            stats["engine"] = {**engine.config.capacity(), "running": len(engine.running),
                               "waiting": len(engine.waiting), "kv_used": engine.kv_used,
                               "preemptions": engine.preemptions}
        return stats

    def reset_stats(self) -> None:
        """Zero counters between runs; config, faults and requests currently open are kept."""
        self._counters.reset()

    # -- HTTP ------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        @web.middleware
        async def openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
            # Router errors (unknown path, wrong method) get the OpenAI shape and are counted.
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                code = "not_found" if exc.status == 404 else "invalid_request"
                response = error_response(exc.status, code, exc.reason)
            # Injected faults have counters of their own: "errors" are bad requests.
            faulted = self._acts.answered(request)
            if 400 <= response.status < 500 and not faulted:
                self._counters.errors += 1
            return response

        app = web.Application(middlewares=[openai_errors])
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        for path in PATHS:  # /v1/completions, /v1/embeddings
            app.router.add_post(path, endpoint_handler(self))
        app.router.add_get("/v1/models", self._handle_models)
        add_admin_routes(app, self)
        return app

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        try:
            chat = parse_chat_request(await request.json(), self.config.models)
        except ValueError:
            return error_response(400, "invalid_request", "request body is not valid JSON")
        except RequestError as exc:
            return error_response(exc.status, exc.code, exc.message)
        seq = None
        if self._engine is not None:
            reply = reply_for(chat, self.config.reply_tokens)
            try:
                seq = self._engine.sequence(reply.prompt_tokens, len(reply.tokens))
            except TooLongError as exc:
                return error_response(400, "context_length_exceeded", str(exc))
        if self._dice.throttle_now():
            return self._acts.throttled(request)
        request_id = request.headers.get("X-Request-Id")
        try:
            async with self._slot(seq) as fault:
                pace = self._pace(seq)
                if fault is Fault.FAIL:
                    await self._first_wait(chat, pace)
                    return self._acts.failed(request)
                if fault is Fault.HANG:
                    self._counters.hung += 1
                    await self._acts.hold(request)
                if chat.stream:
                    return await self._stream(request, chat, fault, pace)
                if fault is not Fault.HANG:
                    await self._whole_wait(pace)
        except asyncio.CancelledError:
            self._counters.abort(request_id)
            raise
        return self._complete(chat, request_id)

    def _completion_id(self) -> str:
        return self.next_id("chatcmpl-mock")

    def next_id(self, kind: str) -> str:
        """A fresh answer id, ``<kind>-<n>``."""
        self._next_id += 1
        return f"{kind}-{self._next_id}"

    def _complete(self, chat: ChatRequest, request_id: str | None) -> web.Response:
        response = completion(chat, reply_for(chat, self.config.reply_tokens),
                              self._completion_id())
        self._counters.serve(request_id)
        headers = {} if request_id is None else {"X-Request-Id": request_id}
        return web.json_response(response, headers=headers)

    def _pace(self, seq: Sequence | None) -> Pace:
        """What paces a request's tokens: the fixed pace, or the engine for ``seq``."""
        if seq is None or self._engine is None:
            return self._pacer
        pacer = self._pacer
        return SequencePacer(self._engine, seq,
                             lambda: pacer.seconds(self.config.first_token_ms),
                             lambda seconds: pacer.seconds(seconds * 1000.0))

    async def _whole_wait(self, pace: Pace) -> None:
        """How long a whole answer takes: the latency, or every token through the engine."""
        if isinstance(pace, SequencePacer):
            await pace.whole()
        else:
            await asyncio.sleep(self._pacer.seconds(self.config.latency_ms))

    async def _first_wait(self, chat: ChatRequest, pace: Pace) -> None:
        """How long a failure takes: the latency, or a stream's time to first token."""
        if chat.stream or isinstance(pace, SequencePacer):
            await pace.pause(0)
        else:
            await asyncio.sleep(self._pacer.seconds(self.config.latency_ms))

    async def _stream(
        self, request: web.Request, chat: ChatRequest, fault: Fault, pace: Pace
    ) -> web.StreamResponse:
        """Stream the reply in the caller's slot; a client gone mid-stream is counted."""
        request_id = request.headers.get("X-Request-Id")
        body = StreamBody(chat, reply_for(chat, self.config.reply_tokens), self._completion_id())
        response = web.StreamResponse(headers=sse_headers(request_id))
        try:
            await response.prepare(request)
            done = await write_stream(response, body, pace,
                                      self.config.fault_after_tokens,
                                      self._acts.striker(request, fault))
        except ConnectionResetError:
            self._counters.abort(request_id)
            return response
        if done and fault is not Fault.MALFORMED:
            self._counters.serve(request_id, streamed=True)
        return response

    @contextlib.asynccontextmanager
    async def _slot(self, seq: Sequence | None = None) -> AsyncIterator[Fault]:
        """Wait FIFO for a slot (with ``seq``: for the engine to run it) and hold it for the
        block; counters survive cancellation. Yields the fault decided once admitted."""
        engine = self._engine if seq is not None else None
        self._counters.start_waiting()
        try:
            if engine is not None and seq is not None:
                try:
                    await engine.admit(seq)
                except BaseException:
                    engine.finish(seq)
                    raise
            else:
                await self._slots.acquire()
        finally:
            self._counters.stop_waiting()
        try:
            self._counters.enter_service()
            try:
                yield self._dice.in_slot()
            finally:
                self._counters.leave_service()
        finally:
            if engine is not None and seq is not None:
                engine.finish(seq)
            else:
                self._slots.release()

    async def _handle_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "hutch-mock"} for m in self.config.models]
        return web.json_response({"object": "list", "data": data})
