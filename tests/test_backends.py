"""Backend: one HTTP call, classified once by type (ok, retryable kinds, throttled, terminal).

The first half drives :class:`Backend` through ``httpx.MockTransport`` (the seam the tests
of the worker use); the second half through Hutch's aiohttp transport against real sockets
on 127.0.0.1 that refuse, close, reset, stall or answer badly, and streams.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from pipeline.backends.hints import parse_retry_after
from pipeline.backends.http import Backend, BackendResult
from pipeline.backends.probe import probe_backend, probe_backends
from pipeline.backends.transport import AiohttpTransport
from pipeline.errors import (
    BackendCallError,
    BackendConnectTimeoutError,
    BackendDisconnectedError,
    BackendNotFoundError,
    BackendProtocolError,
    BackendTimeoutError,
    BackendUnreachableError,
    ConfigError,
    InvalidCompletionError,
    RetryableError,
    RetryableStatusError,
    TerminalError,
    TerminalStatusError,
    ThrottledError,
)
from pipeline.settings import BackendSettings

KEY = "sk-test-9f8e7d6c5b4a"
REQUEST = json.dumps({"model": "mock-small",
                      "messages": [{"role": "user", "content": "hi"}]}).encode()
COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000,
    "model": "mock-small", "system_fingerprint": "fp_1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
MakeBackend = Callable[..., Backend]


def openai_error(status: int, message: str, etype: str = "invalid_request_error"
                 ) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": etype,
                                                  "code": None, "param": None}})


@pytest.fixture
async def make_backend(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeBackend]:
    """Backends on an httpx.MockTransport; closed at the end of the test."""
    monkeypatch.setenv("HUTCH_TEST_BACKEND_KEY", KEY)
    made: list[Backend] = []

    def factory(handler: Handler, **settings: Any) -> Backend:
        data: dict[str, Any] = {"name": "gpu-1", "url": "http://backend.test:8001/v1/",
                                "max_concurrency": 2, "timeout_s": 5.0}
        data.update(settings)
        backend = Backend(BackendSettings(**data), transport=httpx.MockTransport(handler))
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()


async def test_200_returns_the_completion(make_backend: MakeBackend) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=COMPLETION)

    backend = make_backend(handler)
    result = await backend.chat(REQUEST, request_id="req-42")
    assert isinstance(result, BackendResult)
    assert result.completion.choices[0].message.content == "hello"
    assert result.completion.id == "chatcmpl-1"
    # The body is passed on exactly as the backend sent it (unknown fields included).
    assert json.loads(result.body) == COMPLETION
    assert result.elapsed_s >= 0
    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == "http://backend.test:8001/v1/chat/completions"
    assert request.content == REQUEST
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-request-id"] == "req-42"
    assert "authorization" not in request.headers


async def test_async_handler_and_no_request_id(make_backend: MakeBackend) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        assert "x-request-id" not in request.headers
        return httpx.Response(200, json=COMPLETION)

    result = await make_backend(handler).chat(REQUEST)
    assert result.completion.model == "mock-small"


@pytest.mark.parametrize("content", [b"not json", b"{}", b'{"id": "x", "model": "m"}',
                                     json.dumps({**COMPLETION, "choices": "no"}).encode()])
async def test_invalid_completion_is_retryable(make_backend: MakeBackend,
                                               content: bytes) -> None:
    backend = make_backend(lambda request: httpx.Response(200, content=content))
    with pytest.raises(InvalidCompletionError,
                       match="gpu-1 returned an invalid completion") as info:
        await backend.chat(REQUEST)
    assert isinstance(info.value, RetryableError)
    assert info.value.status == 200
    assert info.value.reason == "invalid_completion"
    assert not isinstance(info.value, ThrottledError)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
async def test_server_errors_and_408_are_retryable(make_backend: MakeBackend,
                                                   status: int) -> None:
    backend = make_backend(lambda request: openai_error(status, "engine overloaded",
                                                        "server_error"))
    with pytest.raises(RetryableError) as info:
        await backend.chat(REQUEST)
    assert type(info.value) is RetryableStatusError
    assert info.value.status == status
    assert info.value.reason == f"http_{status}"
    assert f"HTTP {status}" in info.value.message
    assert "engine overloaded" in info.value.message


async def test_non_json_error_body_is_reported_raw(make_backend: MakeBackend) -> None:
    backend = make_backend(lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(RetryableError, match="HTTP 502: <html>Bad Gateway</html>"):
        await backend.chat(REQUEST)
    backend = make_backend(lambda request: httpx.Response(503))
    with pytest.raises(RetryableError, match="HTTP 503: Service Unavailable"):
        await backend.chat(REQUEST)


@pytest.mark.parametrize(("retry_after", "expected"), [("7", 7.0), ("0.5", 0.5),
                                                       (None, None), ("soon", None)])
async def test_429_is_throttled(make_backend: MakeBackend, retry_after: str | None,
                                expected: float | None) -> None:
    headers = {"retry-after": retry_after} if retry_after is not None else {}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers=headers,
                              json={"error": {"message": "rate limited", "type": "x"}})

    with pytest.raises(ThrottledError) as info:
        await make_backend(handler).chat(REQUEST)
    assert isinstance(info.value, RetryableError)
    assert info.value.status == 429
    assert info.value.retry_after_s == expected
    assert info.value.reason == "throttled"
    assert "rate limited" in info.value.message


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
async def test_other_4xx_are_terminal_with_the_backends_message(make_backend: MakeBackend,
                                                                status: int) -> None:
    message = "This model's maximum context length is 8192 tokens"
    backend = make_backend(lambda request: openai_error(status, message))
    with pytest.raises(TerminalStatusError) as info:
        await backend.chat(REQUEST)
    assert isinstance(info.value, TerminalError)
    assert not isinstance(info.value, RetryableError)
    assert info.value.status == status
    assert info.value.reason == "other"  # the label of retries: 4xx are never retried
    assert info.value.message == f"backend gpu-1 answered HTTP {status}: {message}"
    assert str(info.value) == info.value.message


@pytest.mark.parametrize("response", [
    httpx.Response(404, text="404 page not found"),       # Ollama, Go servers
    httpx.Response(404, json={"detail": "Not Found"}),    # FastAPI (vLLM, LiteLLM)
    httpx.Response(404),
    httpx.Response(404, json={"error": {"message": "File Not Found",  # llama.cpp
                                        "type": "not_found_error", "code": 404}}),
    httpx.Response(404, json={"error": {"message": "Invalid URL (POST /chat/completions)",
                                        "type": "invalid_request_error"}}),  # OpenAI
], ids=["text", "fastapi", "empty", "llama.cpp", "openai"])
async def test_a_404_of_a_path_is_the_backends_fault(
        make_backend: MakeBackend, response: httpx.Response) -> None:
    """A base url without /v1: every request 404s. That is the backend's configuration, so
    it is retried and counts toward the circuit, and the message says what to check."""
    backend = make_backend(lambda request: response, url="http://backend.test:8001/")
    with pytest.raises(BackendNotFoundError) as info:
        await backend.chat(REQUEST)
    assert isinstance(info.value, RetryableError)
    assert info.value.reason == "not_found"
    assert info.value.status == 404
    assert "check the backend url" in info.value.message
    # An unknown model is the request's fault (terminal): vLLM's, OpenAI's, Ollama's.
    for body in ({"object": "error", "message": "The model `x` does not exist.", "code": 404},
                 {"error": {"message": "The model `x` does not exist", "type":
                            "invalid_request_error", "code": "model_not_found"}},
                 {"error": "model 'x' not found"}):
        answer = httpx.Response(404, json=body)
        with pytest.raises(TerminalStatusError):
            await make_backend(lambda request, a=answer: a).chat(REQUEST)


async def test_probe_at_start_says_check_the_backend_url(
        make_backend: MakeBackend, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url}")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": []})
        return httpx.Response(404, text="Not Found")

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    good = make_backend(handler)
    wrong = make_backend(handler, name="no-v1", url="http://backend.test:8001")
    dead = make_backend(down, name="dead")
    caplog.set_level("DEBUG", logger="hutch.backend")
    assert await probe_backends([good, wrong, dead]) == ["ok", "not_found", "unreachable"]
    assert seen == ["GET http://backend.test:8001/v1/models",
                    "GET http://backend.test:8001/models"]
    [warning] = [r for r in caplog.records if r.getMessage() == "backend.url_not_found"]
    assert warning.levelname == "WARNING"
    fields = warning.fields  # type: ignore[attr-defined]
    assert fields["backend"] == "no-v1" and "check the backend url" in fields["hint"]
    assert await probe_backend(make_backend(lambda r: httpx.Response(401))) == "status_401"


async def test_long_error_messages_are_cut(make_backend: MakeBackend) -> None:
    backend = make_backend(lambda request: openai_error(400, "x" * 5000))
    with pytest.raises(TerminalError) as info:
        await backend.chat(REQUEST)
    assert len(info.value.message) < 600


async def test_connection_error_is_retryable(make_backend: MakeBackend) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(BackendUnreachableError) as info:
        await make_backend(handler).chat(REQUEST)
    assert info.value.reason == "unreachable"
    assert "gpu-1 unreachable" in info.value.message
    assert "Connection refused" in info.value.message
    assert info.value.status is None
    assert info.value.__cause__ is None and info.value.__suppress_context__


async def test_timeout_is_retryable(make_backend: MakeBackend) -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        raise httpx.ReadTimeout("timed out", request=request)

    backend = make_backend(handler, timeout_s=5.0)
    with pytest.raises(BackendTimeoutError, match=r"gpu-1 timed out after 5\.0s") as info:
        await backend.chat(REQUEST)
    assert info.value.reason == "timeout"
    # A shorter remaining deadline shortens the call's timeout; a longer one does not.
    with pytest.raises(RetryableError, match=r"timed out after 1\.5s"):
        await backend.chat(REQUEST, timeout_s=1.5)
    with pytest.raises(RetryableError, match=r"timed out after 5\.0s"):
        await backend.chat(REQUEST, timeout_s=60)
    assert [t["read"] for t in seen] == [5.0, 1.5, 5.0]


async def test_api_key_is_sent_as_bearer(make_backend: MakeBackend) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json=COMPLETION)

    backend = make_backend(handler, api_key_env="HUTCH_TEST_BACKEND_KEY")
    await backend.chat(REQUEST)
    assert seen == [f"Bearer {KEY}"]
    assert KEY not in repr(backend.settings)


def _echo_key(request: httpx.Request) -> httpx.Response:
    """A backend (or proxy) that repeats the credentials it got in its error."""
    return openai_error(401, f"Incorrect API key provided: {request.headers['authorization']}")


def _echo_key_in_exception(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError(f"proxy refused {request.headers['authorization']}",
                             request=request)


@pytest.mark.parametrize("handler", [
    lambda request: openai_error(401, "invalid api key"),
    lambda request: httpx.Response(500, text="oops"),
    _echo_key,
    _echo_key_in_exception,
])
async def test_api_key_never_appears_in_errors(make_backend: MakeBackend,
                                               handler: Handler) -> None:
    backend = make_backend(handler, api_key_env="HUTCH_TEST_BACKEND_KEY")
    with pytest.raises(BackendCallError) as info:
        await backend.chat(REQUEST)
    assert KEY not in str(info.value)
    assert KEY not in info.value.message
    assert KEY not in repr(info.value)


def test_missing_api_key_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUTCH_TEST_NO_SUCH_KEY", raising=False)
    settings = BackendSettings(name="gpu-1", url="http://backend.test/v1", max_concurrency=1,
                               api_key_env="HUTCH_TEST_NO_SUCH_KEY")
    with pytest.raises(ConfigError, match="HUTCH_TEST_NO_SUCH_KEY is not set"):
        Backend(settings, transport=httpx.MockTransport(lambda r: httpx.Response(200)))


@pytest.mark.parametrize(("value", "expected"), [
    ("3", 3.0), ("0", 0.0), ("2.5", 2.5), (" 4 ", 4.0),
    (None, None), ("", None), ("-1", None), ("soon", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # an HTTP date in the past: now
    ("nan", None), ("inf", None), ("1e400", None),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(("error", "kind", "reason"), [
    (httpx.ConnectError("refused"), BackendUnreachableError, "unreachable"),
    (httpx.UnsupportedProtocol("ftp"), BackendUnreachableError, "unreachable"),
    (httpx.ConnectTimeout("slow"), BackendConnectTimeoutError, "connect_timeout"),
    (httpx.PoolTimeout("busy"), BackendConnectTimeoutError, "connect_timeout"),
    (httpx.ReadTimeout("slow"), BackendTimeoutError, "timeout"),
    (httpx.WriteTimeout("slow"), BackendTimeoutError, "timeout"),
    (httpx.ReadError("reset"), BackendDisconnectedError, "disconnected"),
    (httpx.WriteError("broken pipe"), BackendDisconnectedError, "disconnected"),
    (httpx.RemoteProtocolError("bad status line"), BackendProtocolError, "invalid_response"),
])
async def test_transport_errors_are_classified_by_type(
        make_backend: MakeBackend, error: httpx.HTTPError, kind: type[BackendCallError],
        reason: str) -> None:
    """The kind follows httpx's public exception type, whatever its message says."""
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with pytest.raises(kind) as info:
        await make_backend(handler).chat(REQUEST)
    assert type(info.value) is kind
    assert isinstance(info.value, RetryableError)
    assert info.value.reason == reason
    assert info.value.status is None


async def test_stream_through_the_mock_transport(make_backend: MakeBackend) -> None:
    """MockTransport still works through the seam, streamed bodies and drops included."""
    async def events() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        yield b"data: two\n\ndata: [DONE]\n\n"

    async def dropped() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        raise httpx.ReadError("connection reset")

    backend = make_backend(lambda request: httpx.Response(200, content=events()))
    async with backend.stream(REQUEST, request_id="req-9") as answer:
        assert [line async for line in answer.aiter_lines()] == [
            "data: one", "", "data: two", "", "data: [DONE]", ""]
    backend = make_backend(lambda request: httpx.Response(200, content=dropped()))
    async with backend.stream(REQUEST) as answer:
        with pytest.raises(BackendDisconnectedError):
            async for _ in answer.aiter_bytes():
                pass
    backend = make_backend(lambda request: openai_error(400, "bad top_p"))
    with pytest.raises(TerminalStatusError, match="bad top_p"):
        async with backend.stream(REQUEST):
            raise AssertionError("a status error is raised on entry")


# -- real sockets, through Hutch's aiohttp transport ------------------------------------

SocketHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 request (head and body, by content-length); its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return head


def response(status: int, body: bytes, headers: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(body)}\r\n".encode()
            + headers + b"\r\n" + body)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class SocketServer:
    """A raw HTTP server on 127.0.0.1 that runs ``handler`` on every connection.

    Handlers that stall wait on :attr:`release`, set on exit; connections still open then
    are aborted, so no task outlives a test.
    """

    def __init__(self, handler: SocketHandler) -> None:
        self.handler = handler
        self.release = asyncio.Event()
        self.connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SocketServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        self.release.set()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def real_backend() -> AsyncIterator[Callable[..., Backend]]:
    """Backends on their default transport (Hutch's aiohttp one); closed at the end."""
    made: list[Backend] = []

    def factory(url: str, **settings: Any) -> Backend:
        data: dict[str, Any] = {"name": "gpu-1", "url": url, "max_concurrency": 2,
                                "timeout_s": 5.0, **settings}
        made.append(Backend(BackendSettings(**data)))
        return made[-1]

    yield factory
    for backend in made:
        await backend.aclose()


async def test_refused_connection_is_unreachable(
        real_backend: Callable[..., Backend]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BackendUnreachableError) as info:
        await real_backend(f"http://127.0.0.1:{port}/v1").chat(REQUEST)
    assert type(info.value) is BackendUnreachableError  # refused, not a connect timeout
    assert info.value.reason == "unreachable"
    assert "gpu-1 unreachable" in info.value.message


async def test_no_connection_in_time_is_a_connect_timeout(
        real_backend: Callable[..., Backend]) -> None:
    """A listener whose accept queue is full drops new SYNs: the connect times out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = [socket.socket() for _ in range(4)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(address)
        try:
            await asyncio.sleep(0.05)
            backend = real_backend(f"http://127.0.0.1:{address[1]}/v1", timeout_s=0.3)
            with pytest.raises(BackendConnectTimeoutError,
                               match=r"gpu-1 timed out connecting after 0\.3s") as info:
                await backend.chat(REQUEST)
        finally:
            for filler in fillers:
                filler.close()
    assert info.value.reason == "connect_timeout"
    assert isinstance(info.value, BackendUnreachableError)  # the request never got there


async def test_no_free_connection_in_time_is_a_connect_timeout(
        real_backend: Callable[..., Backend]) -> None:
    """The pool's only connection is busy past the timeout: the request never left."""
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await server.release.wait()

    async with SocketServer(stall) as server:
        backend = real_backend(server.url, max_concurrency=1, timeout_s=10)
        busy = asyncio.create_task(backend.chat(REQUEST))
        await asyncio.sleep(0.05)
        with pytest.raises(BackendConnectTimeoutError):
            await backend.chat(REQUEST, timeout_s=0.3)
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
    assert server.connections == 1


async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST, not FIN


async def _close_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(HEAD_200 + b"Content-Length: 500\r\n\r\n" + json.dumps(COMPLETION)[:40].encode())
    await writer.drain()


@pytest.mark.parametrize("handler", [_close, _reset, _close_mid_body],
                         ids=["closed", "reset", "closed-mid-body"])
async def test_dropped_connection_is_disconnected_not_a_timeout(
        real_backend: Callable[..., Backend], handler: SocketHandler) -> None:
    """A server that closes or resets mid-request (issue 11: was "timed out after 30s")."""
    async with SocketServer(handler) as server:
        with pytest.raises(BackendDisconnectedError) as info:  # not the 30 s read timeout
            await real_backend(server.url, timeout_s=30).chat(REQUEST)
    assert info.value.reason == "disconnected"
    assert "gpu-1 dropped the connection" in info.value.message
    assert "timed out" not in info.value.message


@pytest.mark.parametrize("partial", [b"", HEAD_200 + b"Content-Length: 500\r\n\r\n{\"id\""],
                         ids=["before-headers", "mid-body"])
async def test_stall_is_a_read_timeout(real_backend: Callable[..., Backend],
                                       partial: bytes) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(partial)
        await server.release.wait()

    async with SocketServer(stall) as server:
        backend = real_backend(server.url, timeout_s=5)
        started = time.monotonic()
        with pytest.raises(BackendTimeoutError, match=r"timed out after 0\.3s") as info:
            await backend.chat(REQUEST, timeout_s=0.3)
        assert time.monotonic() - started > 0.25  # the 0.3 s timeout, not the backend's 5 s
    assert info.value.reason == "timeout"


@pytest.mark.parametrize(("answer", "kind", "reason"), [
    (response(500, b'{"error": {"message": "engine died"}}'), RetryableStatusError, "http_500"),
    (response(503, b""), RetryableStatusError, "http_503"),
    (response(408, b"slow"), RetryableStatusError, "http_408"),
    (response(429, b"{}", b"Retry-After: 2\r\n"), ThrottledError, "throttled"),
    (response(400, b'{"error": {"message": "top_p"}}'), TerminalStatusError, "other"),
    (HEAD_200 + b"Content-Length: 8\r\n\r\nnot json", InvalidCompletionError,
     "invalid_completion"),
    (b"garbage\r\n\r\n", BackendProtocolError, "invalid_response"),
], ids=["500", "503", "408", "429", "400", "invalid-body", "malformed"])
async def test_answers_over_a_real_socket(real_backend: Callable[..., Backend], answer: bytes,
                                          kind: type[BackendCallError], reason: str) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await server.release.wait()

    async with SocketServer(reply) as server:
        with pytest.raises(kind) as info:
            await real_backend(server.url).chat(REQUEST)
    assert type(info.value) is kind
    assert info.value.reason == reason
    if kind is ThrottledError:
        assert isinstance(info.value, ThrottledError) and info.value.retry_after_s == 2


async def test_success_reuses_the_connection(real_backend: Callable[..., Backend]) -> None:
    body = json.dumps(COMPLETION).encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(HEAD_200 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()

    async with SocketServer(serve) as server:
        backend = real_backend(server.url)
        for _ in range(3):
            result = await backend.chat(REQUEST)
            assert result.body == body and result.completion.id == "chatcmpl-1"
    assert server.connections == 1


async def test_stream_reads_incrementally_and_closing_early_is_seen(
        real_backend: Callable[..., Backend]) -> None:
    """The first event arrives while the server still holds the second; leaving the block
    early closes the connection, which the server sees at once (vLLM aborts then)."""
    proceed, gone = asyncio.Event(), asyncio.Event()

    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"data: one\n\n"))
        await proceed.wait()
        writer.write(chunk(b"data: two\n\n"))
        await writer.drain()
        if await reader.read(1) == b"":
            gone.set()

    async with SocketServer(sse) as server:
        backend = real_backend(server.url)
        async with backend.stream(REQUEST, request_id="req-1") as answer:
            assert answer.response.status_code == 200
            assert answer.headers["content-type"] == "text/event-stream"
            lines = answer.aiter_lines()
            assert await anext(lines) == "data: one"
            proceed.set()
            assert [await anext(lines), await anext(lines)] == ["", "data: two"]
        await asyncio.wait_for(gone.wait(), 1)


async def test_stream_errors_are_typed(real_backend: Callable[..., Backend]) -> None:
    """A drop mid-stream is ``disconnected``, a stall between chunks ``timeout``, a status
    error is raised on entry, before any body is read."""
    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if b"x-request-id: status" in head:
            writer.write(response(503, b'{"error": {"message": "warming up"}}'))
            await writer.drain()
            return
        writer.write(SSE_HEAD + chunk(b"data: one\n\n"))
        await writer.drain()
        if b"x-request-id: stall" in head:
            await server.release.wait()

    async with SocketServer(sse) as server:
        backend = real_backend(server.url)
        async with backend.stream(REQUEST, request_id="drop") as answer:
            with pytest.raises(BackendDisconnectedError):
                assert [line async for line in answer.aiter_lines()]
        async with backend.stream(REQUEST, timeout_s=0.3, request_id="stall") as answer:
            lines = answer.aiter_lines()
            assert [await anext(lines), await anext(lines)] == ["data: one", ""]
            with pytest.raises(BackendTimeoutError):
                await anext(lines)
        with pytest.raises(RetryableStatusError, match="warming up"):
            async with backend.stream(REQUEST, request_id="status"):
                raise AssertionError("a status error is raised on entry")


async def test_cancelled_call_closes_the_connection(
        real_backend: Callable[..., Backend]) -> None:
    """Cancelling a call (before the headers or mid-body) closes its connection: the
    server sees the client go away (what cancellation relies on)."""
    gone: list[bytes] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if b"x-request-id: mid-body" in head:
            writer.write(HEAD_200 + b"Content-Length: 500\r\n\r\n{")
        if await reader.read(1) == b"":
            gone.append(head.split(b"x-request-id: ")[1].split(b"\r\n")[0])

    async with SocketServer(stall) as server:
        backend = real_backend(server.url)
        for seen, request_id in enumerate(("before-headers", "mid-body"), start=1):
            call = asyncio.create_task(backend.chat(REQUEST, request_id=request_id))
            await asyncio.sleep(0.1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            for _ in range(100):  # within a second
                if len(gone) == seen:
                    break
                await asyncio.sleep(0.01)
    assert gone == [b"before-headers", b"mid-body"]


async def test_transport_sends_a_streamed_request_body() -> None:
    """An unread (async) request body goes out chunked, whole."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        received.append(body)
        writer.write(response(200, b"ok"))
        await writer.drain()

    async def upload() -> AsyncIterator[bytes]:
        yield b'{"model": '
        yield b'"m"}'

    transport = AiohttpTransport()
    async with SocketServer(serve) as server:
        try:
            request = httpx.Request("POST", server.url + "/chat/completions", content=upload())
            answer = await transport.handle_async_request(request)
            assert answer.status_code == 200 and await answer.aread() == b"ok"
            await answer.aclose()
        finally:
            await transport.aclose()
    assert received == [b'{"model": "m"}']
