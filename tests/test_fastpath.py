"""The hot path's shortcuts send exactly what the slower, general paths would send.

* :meth:`Backend.chat` hands its request straight to the transport instead of going
  through ``AsyncClient.post``: same URL, headers (in order), body and timeouts; so does
  :meth:`Backend.stream`, and Hutch's aiohttp transport puts exactly that on the wire.
* A reply is published with hand-built AMQP properties instead of an ``aio_pika.Message``:
  the same properties.
* The dispatcher makes the first backend attempt without tenacity: retries after it
  behave as before.
* Metric children are cached: the cached child is the one ``labels()`` returns.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import httpx
import pytest

from pipeline.backends.http import Backend
from pipeline.errors import BackendTimeoutError
from pipeline.observe.metrics import Metrics
from pipeline.settings import BackendSettings

COMPLETION = (b'{"id":"c1","object":"chat.completion","created":1,"model":"m",'
              b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},'
              b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,'
              b'"total_tokens":3}}')
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def _backend(handler: httpx.MockTransport, api_key_env: str | None = None) -> Backend:
    settings = BackendSettings(name="b", url="http://backend.test:8000/v1", max_concurrency=4,
                               timeout_s=30, api_key_env=api_key_env)
    return Backend(settings, handler)


@pytest.mark.parametrize("request_id", ["corr-1", None])
async def test_backend_request_is_the_one_the_client_would_build(
        request_id: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTPATH_TEST_KEY", "sk-secret")
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=COMPLETION)

    backend = _backend(httpx.MockTransport(handle), api_key_env="FASTPATH_TEST_KEY")
    try:
        result = await backend.chat(BODY, timeout_s=12.5, request_id=request_id)
        assert result.body == COMPLETION and result.completion.id == "c1"
        expected = backend._http.build_request(
            "POST", "/chat/completions", content=BODY, timeout=12.5,
            headers={"x-request-id": request_id} if request_id else None)
        (sent,) = seen
        assert sent.method == expected.method
        assert sent.url == expected.url == "http://backend.test:8000/v1/chat/completions"
        assert sent.headers.raw == expected.headers.raw
        assert sent.headers["authorization"] == "Bearer sk-secret"
        assert sent.content == expected.content == BODY
        assert sent.extensions["timeout"] == expected.extensions["timeout"]
        # Without a per-call limit the configured timeout applies.
        await backend.chat(BODY)
        assert seen[-1].extensions["timeout"] == httpx.Timeout(30).as_dict()
    finally:
        await backend.aclose()


async def test_backend_keeps_cookies_like_the_client() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=COMPLETION,
                              headers={"set-cookie": "lb=node-2; Path=/"})

    backend = _backend(httpx.MockTransport(handle))
    try:
        await backend.chat(BODY)
        await backend.chat(BODY)
        assert "cookie" not in seen[0].headers
        assert seen[1].headers["cookie"] == "lb=node-2"
    finally:
        await backend.aclose()


async def test_backend_transport_errors_stay_retryable() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    backend = _backend(httpx.MockTransport(handle))
    try:
        with pytest.raises(BackendTimeoutError, match=r"timed out after 30\.0s"):
            await backend.chat(BODY)
    finally:
        await backend.aclose()


async def test_stream_sends_the_request_chat_sends() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=COMPLETION)

    backend = _backend(httpx.MockTransport(handle))
    try:
        await backend.chat(BODY, timeout_s=3, request_id="r-1")
        async with backend.stream(BODY, timeout_s=3, request_id="r-1") as answer:
            assert b"".join([part async for part in answer.aiter_bytes()]) == COMPLETION
        chat, stream = seen
        assert (chat.method, chat.url, chat.headers.raw, chat.content) == (
            stream.method, stream.url, stream.headers.raw, stream.content)
        assert chat.extensions["timeout"] == stream.extensions["timeout"]
    finally:
        await backend.aclose()


async def test_aiohttp_transport_sends_the_request_httpx_would() -> None:
    """On the wire: the method, path, body and every header of the httpx request, once."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head + await reader.readexactly(len(BODY)))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(COMPLETION)
                     + COMPLETION)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = BackendSettings(name="b", url=f"http://127.0.0.1:{port}/v1",
                               max_concurrency=1, timeout_s=5)
    backend = Backend(settings)
    try:
        await backend.chat(BODY, request_id="corr-1")
        expected = backend._http.build_request("POST", "/chat/completions", content=BODY,
                                               headers={"x-request-id": "corr-1"})
    finally:
        await backend.aclose()
        server.close()
    head, _, body = heads[0].partition(b"\r\n\r\n")
    request_line, *lines = head.decode().split("\r\n")
    assert request_line == "POST /v1/chat/completions HTTP/1.1"
    sent = sorted((name.lower(), value.strip()) for name, _, value in
                  (line.partition(":") for line in lines))
    assert sent == sorted(expected.headers.multi_items())
    assert body == BODY


def test_reply_properties_match_aio_pika_message() -> None:
    headers = {"x-hutch-outcome": "ok", "x-hutch-attempts": 1}
    for priority in (None, 0, 7):
        message = aio_pika.Message(b"{}", content_type="application/json",
                                   correlation_id="c", headers=headers,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   priority=priority)
        built = aiormq.spec.Basic.Properties(
            content_type="application/json", correlation_id="c", delivery_mode=2,
            headers=headers, priority=priority or 0)
        assert built == message.properties


def test_cached_metric_child_is_the_labelled_one() -> None:
    metrics = Metrics()
    child = metrics.child(metrics.requests, "chat", "ok")
    assert child is metrics.requests.labels("chat", "ok")
    assert metrics.child(metrics.requests, "chat", "ok") is child
    assert metrics.child(metrics.in_flight, "chat") is not metrics.child(metrics.capacity,
                                                                          "chat")
