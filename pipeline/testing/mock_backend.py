"""A mock OpenAI-compatible LLM backend with a hard concurrency cap and fault injection.

Hutch's demo, tests and benchmarks need a backend that behaves like a real one where it
matters to a request queue (fixed capacity, fixed latency, OpenAI request/response shapes)
while being deterministic and observable: ``GET /stats`` shows how many requests were ever
open at once, so a benchmark can prove that callers never exceeded a backend cap.

Failure tests need a backend that fails the way real ones do. The mock injects, on
request (none by default; see :class:`MockConfig`):

- **errors**: ``fail_rate`` (a random fraction) or ``fail_first`` (the first N requests,
  deterministic) answered with ``fail_status`` (500) and an OpenAI error body, after
  holding a slot for the latency like a real busy server;
- **throttling**: ``throttle_rate`` answered ``429`` with ``Retry-After: retry_after_s``
  at once, without taking a slot (a real server throttles at the door);
- **hangs**: ``hang_rate`` requests hold their slot for ``hang_s`` (an hour by default)
  before answering, to provoke client timeouts;
- **connection refused**: stop the mock; ``start()`` again rebinds the same port.

Faults can be replaced at runtime with ``POST /faults`` (``{}`` clears them, a test can
"fix" a backend mid-run), read with ``GET /faults``, or set in-process with
:meth:`MockBackend.set_faults`. ``seed`` makes the random choices repeatable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = [
    "FAULT_FIELDS",
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


#: The fault settings of :class:`MockConfig`: what ``POST /faults`` and ``set_faults`` take.
FAULT_FIELDS = (
    "fail_rate",
    "fail_status",
    "fail_first",
    "throttle_rate",
    "retry_after_s",
    "hang_rate",
    "hang_s",
    "seed",
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class MockConfig:
    """How the mock behaves: per-request latency, parallel slots, the models it knows, and
    the faults it injects (none by default).

    Rates are fractions of all chat requests (each in 0..1, together at most 1):
    ``throttle_rate`` are answered 429 at the door; of the rest, ``fail_rate`` and
    ``hang_rate`` (as fractions of the whole) fail with ``fail_status`` or hang for
    ``hang_s`` once they hold a slot. ``fail_first`` makes the first N requests that take
    a slot fail, before the rates apply. Invalid requests (400/404) are never faulted.
    """

    latency_ms: float = 50.0
    capacity: int = 4
    models: tuple[str, ...] = ("mock-small", "mock-large")
    #: Fraction of requests answered with ``fail_status`` (and an OpenAI error body).
    fail_rate: float = 0.0
    fail_status: int = 500
    #: The first N requests that take a slot fail with ``fail_status`` (deterministic).
    fail_first: int = 0
    #: Fraction of requests answered 429 with ``Retry-After: <retry_after_s>``, no slot taken.
    throttle_rate: float = 0.0
    retry_after_s: float = 1.0
    #: Fraction of requests that hold their slot for ``hang_s`` before answering.
    hang_rate: float = 0.0
    hang_s: float = 3600.0
    #: Seed of the random fault choices (None: unpredictable).
    seed: int | None = None

    def __post_init__(self) -> None:
        # Fail at construction: a bad config would otherwise surface as a confusing hang.
        if not _is_int(self.capacity):
            raise ValueError(f"capacity must be an integer >= 1, got {self.capacity!r}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if not _is_number(self.latency_ms) or not math.isfinite(self.latency_ms) \
                or self.latency_ms < 0:
            raise ValueError(f"latency_ms must be a finite number >= 0, got {self.latency_ms!r}")
        if not self.models or any(not isinstance(m, str) or not m for m in self.models):
            raise ValueError(
                f"models must be a non-empty tuple of non-empty names: {self.models!r}"
            )
        self._check_faults()

    def _check_faults(self) -> None:
        rates = {"fail_rate": self.fail_rate, "throttle_rate": self.throttle_rate,
                 "hang_rate": self.hang_rate}
        for name, rate in rates.items():
            if not _is_number(rate) or not 0 <= rate <= 1:  # NaN fails the comparison too
                raise ValueError(f"{name} must be a number in 0..1, got {rate!r}")
        if sum(rates.values()) > 1 + 1e-9:
            raise ValueError(
                "fail_rate + throttle_rate + hang_rate must be at most 1, got "
                f"{self.fail_rate:g} + {self.throttle_rate:g} + {self.hang_rate:g}"
            )
        if not _is_int(self.fail_status) or not 400 <= self.fail_status <= 599:
            raise ValueError(
                f"fail_status must be an HTTP error status in 400..599, got {self.fail_status!r}"
            )
        if not _is_int(self.fail_first) or self.fail_first < 0:
            raise ValueError(f"fail_first must be an integer >= 0, got {self.fail_first!r}")
        for name, seconds in (("retry_after_s", self.retry_after_s), ("hang_s", self.hang_s)):
            if not _is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")

    def faults(self) -> dict[str, Any]:
        """The fault settings, as ``GET /faults`` returns them."""
        return {name: getattr(self, name) for name in FAULT_FIELDS}

    @property
    def has_faults(self) -> bool:
        """True if any fault is configured."""
        return bool(self.fail_rate or self.fail_first or self.throttle_rate or self.hang_rate)

    def with_faults(self, **fields: Any) -> MockConfig:
        """A copy whose faults are exactly ``fields`` (the others back to their defaults)."""
        unknown = sorted(set(fields) - set(FAULT_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown fault field(s) {', '.join(unknown)}; known: {', '.join(FAULT_FIELDS)}"
            )
        return dataclasses.replace(self, **{**_FAULT_DEFAULTS, **fields})


#: Default value of every fault field (no faults).
_FAULT_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(MockConfig) if f.name in FAULT_FIELDS
}


class _Fault(Enum):
    NONE = "none"
    FAIL = "fail"
    HANG = "hang"


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


def _error_response(
    status: int, code: str | None, message: str, *, type_: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": {"type": type_, "code": code, "message": message}},
        status=status,
        headers=headers,
    )


def _drop_connection(request: web.Request) -> None:
    """Close a request's connection; aiohttp then cancels its handler."""
    if request.transport is not None:
        request.transport.close()


def _retry_after_header(seconds: float) -> str:
    # Integral values as plain integers ("1"), as most servers send them.
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


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
        # Requests hanging now (a fault): stop() drops their connections at once.
        self._hanging: dict[int, web.Request] = {}
        self._stopping = False
        # Requests (by id) answered with an injected fault, until the middleware saw them.
        self._faulted: set[int] = set()
        # Never reset: completion ids stay unique across stats resets.
        self._next_id = 0
        self._waiting = 0
        self._in_service = 0
        self._arm_faults()
        self._reset_counters()

    def _arm_faults(self) -> None:
        """Restart the fault sequence: ``fail_first`` counts again, the seeds start over."""
        seed = self.config.seed
        # Two generators: throttling is drawn at arrival, failures and hangs once a slot is
        # held; with one generator a seeded run would depend on how those interleave.
        self._door_rng = random.Random(None if seed is None else f"{seed}:door")
        self._slot_rng = random.Random(None if seed is None else f"{seed}:slot")
        self._slots_taken = 0

    def _reset_counters(self) -> None:
        self._served = 0
        self._errors = 0
        self._disconnected = 0
        self._failed = 0
        self._throttled = 0
        self._hung = 0
        # Peaks restart from what is open now so they stay truthful mid-run.
        self._max_concurrency = self._in_service
        self._max_in_flight = self._in_service + self._waiting
        self._served_ids: deque[str] = deque(maxlen=_SERVED_IDS_KEPT)
        # Utilisation: slot-seconds in service, integrated at every change of in_service.
        self._busy_slot_s = 0.0
        self._busy_mark = time.monotonic()
        self._stats_since = self._busy_mark

    def _account_busy(self) -> None:
        now = time.monotonic()
        self._busy_slot_s += self._in_service * (now - self._busy_mark)
        self._busy_mark = now

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
        self._stopping = True
        try:
            for request in list(self._hanging.values()):
                _drop_connection(request)
            await runner.cleanup()
        finally:
            self._stopping = False

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

    # -- faults ----------------------------------------------------------------------------

    def set_faults(self, **fields: Any) -> dict[str, Any]:
        """Replace the faults with ``fields`` (names in ``FAULT_FIELDS``); no fields clears
        them all. Returns the faults now in force. Raises ValueError on bad input, leaving
        the current faults unchanged.

        Takes effect for the next decisions: a request that waits for a slot is judged by
        the faults in force when it gets one; a request already hanging keeps hanging.
        """
        self.config = self.config.with_faults(**fields)
        self._arm_faults()
        return self.config.faults()

    def faults(self) -> dict[str, Any]:
        """The faults in force, same JSON as ``GET /faults``."""
        return self.config.faults()

    def _throttle_now(self) -> bool:
        rate = self.config.throttle_rate
        return rate > 0 and self._door_rng.random() < rate

    def _fault_in_slot(self) -> _Fault:
        """What happens to a request that just took a slot."""
        config = self.config
        self._slots_taken += 1
        if self._slots_taken <= config.fail_first:
            return _Fault.FAIL
        if not (config.fail_rate or config.hang_rate):
            return _Fault.NONE
        # Rates are fractions of all requests; throttled ones never get here.
        passed = 1.0 - config.throttle_rate
        draw = self._slot_rng.random() * passed
        if draw < config.fail_rate:
            return _Fault.FAIL
        if draw < config.fail_rate + config.hang_rate:
            return _Fault.HANG
        return _Fault.NONE

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and peaks, same JSON as ``GET /stats``.

        ``busy_slot_s`` (slot-seconds spent serving) and ``elapsed_s`` (seconds since start
        or reset) give utilisation between two reads: delta busy / (capacity x delta
        elapsed)."""
        self._account_busy()
        return {
            "served": self._served,
            "errors": self._errors,
            "disconnected": self._disconnected,
            "in_service": self._in_service,
            "waiting": self._waiting,
            "max_concurrency": self._max_concurrency,
            "max_in_flight": self._max_in_flight,
            "capacity": self.config.capacity,
            "busy_slot_s": round(self._busy_slot_s, 6),
            "elapsed_s": round(self._busy_mark - self._stats_since, 6),
            "latency_ms": self.config.latency_ms,
            "models": list(self.config.models),
            "served_ids": list(self._served_ids),
            "faults": {"failed": self._failed, "throttled": self._throttled, "hung": self._hung},
        }

    def reset_stats(self) -> None:
        """Zero counters between runs; config, faults and requests currently open are kept."""
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
            # Injected faults have counters of their own: "errors" are bad requests.
            faulted = id(request) in self._faulted
            self._faulted.discard(id(request))
            if 400 <= response.status < 500 and not faulted:
                self._errors += 1
            return response

        app = web.Application(middlewares=[openai_errors])
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/stats/reset", self._handle_stats_reset)
        app.router.add_get("/faults", self._handle_faults_get)
        app.router.add_post("/faults", self._handle_faults_set)
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
        if self._throttle_now():
            self._faulted.add(id(request))
            self._throttled += 1
            retry_after = self.config.retry_after_s
            return _error_response(
                429, "rate_limit_exceeded",
                f"mock backend: injected throttling; retry after {retry_after:g}s",
                type_="requests", headers={"Retry-After": _retry_after_header(retry_after)},
            )
        request_id = request.headers.get("X-Request-Id")
        try:
            fault = await self._occupy_slot(request)
        except asyncio.CancelledError:
            self._disconnected += 1
            raise
        if fault is _Fault.FAIL:
            self._faulted.add(id(request))
            self._failed += 1
            status = self.config.fail_status
            return _error_response(
                status, "mock_fault", f"mock backend: injected failure (HTTP {status})",
                type_="server_error" if status >= 500 else "invalid_request_error",
            )
        response = self._completion(chat)
        self._served += 1
        headers = {}
        if request_id is not None:
            self._served_ids.append(request_id)
            headers["X-Request-Id"] = request_id
        return web.json_response(response, headers=headers)

    async def _occupy_slot(self, request: web.Request) -> _Fault:
        """Wait FIFO for a slot, then hold it for the latency (or a hang); counters survive
        cancellation. Returns the fault decided once the slot was taken."""
        self._waiting += 1
        self._max_in_flight = max(self._max_in_flight, self._waiting + self._in_service)
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            self._account_busy()
            self._in_service += 1
            self._max_concurrency = max(self._max_concurrency, self._in_service)
            try:
                fault = self._fault_in_slot()
                if fault is _Fault.HANG:
                    self._hung += 1
                    self._hanging[id(request)] = request
                    if self._stopping:  # got its slot during stop(): drop it like the rest
                        _drop_connection(request)
                    try:
                        await asyncio.sleep(self.config.hang_s)
                    finally:
                        self._hanging.pop(id(request), None)
                else:
                    await asyncio.sleep(self.config.latency_ms / 1000.0)
                return fault
            finally:
                self._account_busy()
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

    async def _handle_faults_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults())

    async def _handle_faults_set(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error_response(400, "invalid_request", "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error_response(
                400, "invalid_request",
                "request body must be a JSON object of fault fields ({} clears all faults)",
            )
        try:
            return web.json_response(self.set_faults(**body))
        except ValueError as exc:
            return _error_response(400, "invalid_request", str(exc))


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
            if config.has_faults:
                print(f"mock backend faults: {json.dumps(config.faults())}", flush=True)
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
    faults = parser.add_argument_group(
        "fault injection", "none by default; change them at runtime with POST /faults"
    )
    faults.add_argument(
        "--fail-rate", type=float, default=0.0,
        help="fraction of requests answered with --fail-status (default: %(default)s)",
    )
    faults.add_argument(
        "--fail-status", type=int, default=500,
        help="HTTP status of injected failures, 400..599 (default: %(default)s)",
    )
    faults.add_argument(
        "--fail-first", type=int, default=0,
        help="the first N requests fail with --fail-status (default: %(default)s)",
    )
    faults.add_argument(
        "--throttle-rate", type=float, default=0.0,
        help="fraction of requests answered 429 with Retry-After (default: %(default)s)",
    )
    faults.add_argument(
        "--retry-after", type=float, default=1.0, dest="retry_after_s",
        help="Retry-After seconds of throttled requests (default: %(default)s)",
    )
    faults.add_argument(
        "--hang-rate", type=float, default=0.0,
        help="fraction of requests that hold their slot for --hang-s (default: %(default)s)",
    )
    faults.add_argument(
        "--hang-s", type=float, default=3600.0,
        help="how long a hanging request hangs before answering (default: %(default)s)",
    )
    faults.add_argument(
        "--seed", type=int, default=None,
        help="seed of the random fault choices (default: unpredictable)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the server from parsed options; 0 after a clean stop, 2 on a bad config."""
    models = tuple(name.strip() for name in str(args.models).split(",") if name.strip())
    try:
        # Fault options may be absent from a namespace built by another parser.
        faults = {name: getattr(args, name) for name in FAULT_FIELDS if hasattr(args, name)}
        config = MockConfig(
            latency_ms=args.latency_ms, capacity=args.capacity, models=models, **faults
        )
    except ValueError as exc:
        print(f"mock backend: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(args.host, args.port, config))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m pipeline.testing.mock_backend",
        description="Mock OpenAI-compatible LLM backend.",
    )
    add_arguments(_parser)
    sys.exit(run_from_args(_parser.parse_args()))
