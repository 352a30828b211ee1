"""Backend: one HTTP call, classified once (ok, retryable, throttled, terminal)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from pipeline.backends.http import Backend, BackendResult, parse_retry_after
from pipeline.errors import (
    BackendCallError,
    ConfigError,
    RetryableError,
    TerminalError,
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
    with pytest.raises(RetryableError, match="gpu-1 returned an invalid completion") as info:
        await backend.chat(REQUEST)
    assert info.value.status == 200
    assert not isinstance(info.value, ThrottledError)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
async def test_server_errors_and_408_are_retryable(make_backend: MakeBackend,
                                                   status: int) -> None:
    backend = make_backend(lambda request: openai_error(status, "engine overloaded",
                                                        "server_error"))
    with pytest.raises(RetryableError) as info:
        await backend.chat(REQUEST)
    assert type(info.value) is RetryableError
    assert info.value.status == status
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
    assert "rate limited" in info.value.message


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
async def test_other_4xx_are_terminal_with_the_backends_message(make_backend: MakeBackend,
                                                                status: int) -> None:
    message = "This model's maximum context length is 8192 tokens"
    backend = make_backend(lambda request: openai_error(status, message))
    with pytest.raises(TerminalError) as info:
        await backend.chat(REQUEST)
    assert not isinstance(info.value, RetryableError)
    assert info.value.status == status
    assert info.value.message == f"backend gpu-1 answered HTTP {status}: {message}"
    assert str(info.value) == info.value.message


async def test_long_error_messages_are_cut(make_backend: MakeBackend) -> None:
    backend = make_backend(lambda request: openai_error(400, "x" * 5000))
    with pytest.raises(TerminalError) as info:
        await backend.chat(REQUEST)
    assert len(info.value.message) < 600


async def test_connection_error_is_retryable(make_backend: MakeBackend) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(RetryableError) as info:
        await make_backend(handler).chat(REQUEST)
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
    with pytest.raises(RetryableError, match=r"gpu-1 timed out after 5\.0s") as info:
        await backend.chat(REQUEST)
    assert not isinstance(info.value, ThrottledError)
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
    ("Wed, 21 Oct 2015 07:28:00 GMT", None),  # HTTP-date form is not supported
    ("nan", None), ("inf", None), ("1e400", None),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected
