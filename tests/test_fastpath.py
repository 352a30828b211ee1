"""The hot path's shortcuts send exactly what the slower, general paths would send.

* :meth:`Backend.chat` hands its request straight to the transport instead of going
  through ``AsyncClient.post``: same URL, headers (in order), body and timeouts.
* A reply is published with hand-built AMQP properties instead of an ``aio_pika.Message``:
  the same properties.
* The dispatcher makes the first backend attempt without tenacity: retries after it
  behave as before.
* Metric children are cached: the cached child is the one ``labels()`` returns.
"""

from __future__ import annotations

import aio_pika
import aiormq
import httpx
import pytest

from pipeline.backends.http import Backend
from pipeline.errors import RetryableError
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
        with pytest.raises(RetryableError, match=r"timed out after 30\.0s"):
            await backend.chat(BODY)
    finally:
        await backend.aclose()


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
