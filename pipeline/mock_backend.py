"""A mock OpenAI-compatible LLM backend with a hard concurrency cap.

Hutch's demo, tests and benchmarks need a backend that behaves like a real one where it
matters to a request queue (fixed capacity, fixed latency, OpenAI request/response shapes)
while being deterministic and observable: ``GET /stats`` shows how many requests were ever
open at once, so a benchmark can prove that callers never exceeded a backend cap.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = [
    "MockBackend",
    "MockConfig",
    "add_arguments",
    "run_from_args",
    "serve",
]

_SERVED_IDS_KEPT = 10_000
_REPLY_PREFIX = "mock reply to: "
_ECHO_CHARS = 200
# Waiting/sleeping handlers are cancelled on shutdown; a short drain keeps SIGTERM prompt.
_SHUTDOWN_TIMEOUT_S = 2.0

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class MockConfig:
    """How the mock behaves: per-request latency, parallel slots, and the models it knows."""

    latency_ms: float = 50.0
    capacity: int = 4
    models: tuple[str, ...] = ("mock-small", "mock-large")

    def __post_init__(self) -> None:
        # Fail at construction: a bad config would otherwise surface as a confusing hang.
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int):
            raise ValueError(f"capacity must be an integer >= 1, got {self.capacity!r}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if not math.isfinite(self.latency_ms) or self.latency_ms < 0:
            raise ValueError(f"latency_ms must be a finite number >= 0, got {self.latency_ms}")
        if not self.models or any(not isinstance(m, str) or not m for m in self.models):
            raise ValueError(
                f"models must be a non-empty tuple of non-empty names: {self.models!r}"
            )


class _RequestError(Exception):
    """A client error to answer in the OpenAI error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    model: str
    texts: tuple[str, ...]
    max_tokens: int | None


def _content_text(content: Any, index: int) -> str:
    """Flatten a message's content (string, list of parts, or null) to plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise _RequestError(
                    400, "invalid_request", f"messages[{index}].content parts must be objects"
                )
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _RequestError(
                        400, "invalid_request", f"messages[{index}] text part needs a string 'text'"
                    )
                texts.append(text)
        return " ".join(texts)
    raise _RequestError(
        400, "invalid_request", f"messages[{index}].content must be a string or a list of parts"
    )


def _parse_chat_request(body: Any, models: tuple[str, ...]) -> _ChatRequest:
    if not isinstance(body, dict):
        raise _RequestError(400, "invalid_request", "request body must be a JSON object")
    if body.get("stream") is True:
        raise _RequestError(400, "invalid_request", "streaming is not supported by the mock")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _RequestError(400, "invalid_request", "'model' is required and must be a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RequestError(400, "invalid_request", "'messages' must be a non-empty list")
    texts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RequestError(400, "invalid_request", f"messages[{i}] must be an object")
        texts.append(_content_text(message.get("content"), i))
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _RequestError(400, "invalid_request", "'max_tokens' must be a positive integer")
    if model not in models:
        raise _RequestError(404, "model_not_found", f"model {model!r} does not exist")
    return _ChatRequest(model=model, texts=tuple(texts), max_tokens=max_tokens)


def _error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"type": "invalid_request_error", "code": code, "message": message}},
        status=status,
    )


class MockBackend:
    """An in-process mock backend; use ``async with`` or ``start()``/``stop()``."""

    def __init__(self, config: MockConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._slots = asyncio.Semaphore(config.capacity)
        # Never reset: completion ids stay unique across stats resets.
        self._next_id = 0
        self._waiting = 0
        self._in_service = 0
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._served = 0
        self._errors = 0
        self._disconnected = 0
        # Peaks restart from what is open now so they stay truthful mid-run.
        self._max_concurrency = self._in_service
        self._max_in_flight = self._in_service + self._waiting
        self._served_ids: deque[str] = deque(maxlen=_SERVED_IDS_KEPT)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; with port 0 the OS picks a free port (see ``port``)."""
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
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
            # With a hostname that resolves to several addresses and port 0, each socket
            # may get a different port; the first one is reported. Prefer literal IPs.
            self._port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving; safe to call twice or before ``start()``."""
        runner, self._runner = self._runner, None
        if runner is not None:
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
    def port(self) -> int:
        """The port actually bound (only known after ``start()``)."""
        if self._port is None:
            raise RuntimeError("mock backend is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, ending in ``/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and peaks, same JSON as ``GET /stats``."""
        return {
            "served": self._served,
            "errors": self._errors,
            "disconnected": self._disconnected,
            "in_service": self._in_service,
            "waiting": self._waiting,
            "max_concurrency": self._max_concurrency,
            "max_in_flight": self._max_in_flight,
            "capacity": self.config.capacity,
            "latency_ms": self.config.latency_ms,
            "models": list(self.config.models),
            "served_ids": list(self._served_ids),
        }

    def reset_stats(self) -> None:
        """Zero counters between runs; config and requests currently open are kept."""
        self._reset_counters()

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
                response = _error_response(exc.status, code, exc.reason)
            if 400 <= response.status < 500:
                self._errors += 1
            return response

        app = web.Application(middlewares=[openai_errors])
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/stats/reset", self._handle_stats_reset)
        return app

    async def _handle_chat(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error_response(400, "invalid_request", "request body is not valid JSON")
        try:
            chat = _parse_chat_request(body, self.config.models)
        except _RequestError as exc:
            return _error_response(exc.status, exc.code, exc.message)
        request_id = request.headers.get("X-Request-Id")
        try:
            await self._occupy_slot()
        except asyncio.CancelledError:
            self._disconnected += 1
            raise
        response = self._completion(chat)
        self._served += 1
        headers = {}
        if request_id is not None:
            self._served_ids.append(request_id)
            headers["X-Request-Id"] = request_id
        return web.json_response(response, headers=headers)

    async def _occupy_slot(self) -> None:
        """Wait FIFO for a slot, then hold it for the latency; counters survive cancellation."""
        self._waiting += 1
        self._max_in_flight = max(self._max_in_flight, self._waiting + self._in_service)
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            self._in_service += 1
            self._max_concurrency = max(self._max_concurrency, self._in_service)
            try:
                await asyncio.sleep(self.config.latency_ms / 1000.0)
            finally:
                self._in_service -= 1
        finally:
            self._slots.release()

    def _completion(self, chat: _ChatRequest) -> dict[str, Any]:
        reply = _REPLY_PREFIX + chat.texts[-1][:_ECHO_CHARS]
        finish_reason = "stop"
        words = reply.split()
        if chat.max_tokens is not None and len(words) > chat.max_tokens:
            words = words[: chat.max_tokens]
            reply = " ".join(words)
            finish_reason = "length"
        prompt_tokens = sum(len(text.split()) for text in chat.texts)
        completion_tokens = len(words)
        self._next_id += 1
        return {
            "id": f"chatcmpl-mock-{self._next_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _handle_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "hutch-mock"} for m in self.config.models]
        return web.json_response({"object": "list", "data": data})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_stats_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response(self.stats())


async def serve(host: str, port: int, config: MockConfig) -> None:
    """Run a mock backend until cancelled or SIGINT/SIGTERM, then stop cleanly."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_requested.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without loop signal handlers
        installed.append(sig)
    try:
        async with MockBackend(config, host, port) as mock:
            # Scripts and tests wait for this exact line before sending traffic.
            print(
                f"mock backend listening on {mock.base_url} "
                f"(capacity {config.capacity}, latency {config.latency_ms:g} ms)",
                flush=True,
            )
            await stop_requested.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mock backend's options (shared by ``hutch mock-backend`` and ``-m``)."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8001, help="port to bind, 0 = any free (default: %(default)s)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="latency per request (default: %(default)s)"
    )
    parser.add_argument(
        "--capacity", type=int, default=4, help="requests served at once (default: %(default)s)"
    )
    parser.add_argument(
        "--models",
        default="mock-small,mock-large",
        help="comma-separated model names (default: %(default)s)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the server from parsed options; 0 after a clean stop, 2 on a bad config."""
    models = tuple(name.strip() for name in str(args.models).split(",") if name.strip())
    try:
        config = MockConfig(latency_ms=args.latency_ms, capacity=args.capacity, models=models)
    except ValueError as exc:
        print(f"mock backend: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(args.host, args.port, config))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m pipeline.mock_backend", description="Mock OpenAI-compatible LLM backend."
    )
    add_arguments(_parser)
    sys.exit(run_from_args(_parser.parse_args()))
