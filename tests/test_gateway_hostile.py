"""What a hostile (or fuzzing) caller found in the gateway (issue 21 item 7), each a test.

* a JSON body nested 100,000 deep: an OpenAI-shaped 400, not a plain-text 500;
* non-UTF-8 bytes in ``Authorization``: 401 on the POST endpoints and on ``/v1/models``;
* a UTF-16 (or BOM-prefixed) JSON body: refused before anything is published;
* requests aiohttp refuses before any handler (a 20 KB header, a duplicate
  ``Content-Length``, a TLS handshake on the plain port): OpenAI-shaped errors and one
  quiet log line each, no traceback, no header text in the log;
* a 504 ``deadline_exceeded`` and an operator's cancel carry ``x-should-retry: false``,
  so the OpenAI SDK's default two retries do not call the backend three times;
* and whatever else fails inside the gateway is a 500 in OpenAI's shape, logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.cancel import publish_cancels
from pipeline.gateway.calls import CallReader
from pipeline.gateway.server import GatewayServer
from pipeline.testing.mock import MockConfig
from tests.conftest import SettingsFactory, amqp, running_worker
from tests.gateway_support import KEY_A, gateway_stack, keyed, until

AUTH = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]
BODY = {"model": "mock-small", "messages": HELLO}
#: The start of a TLS 1.2 ClientHello, as a client configured for https sends it.
CLIENT_HELLO = bytes.fromhex("160301020001" "0001fc0303") + bytes(range(32)) + b"\x00" * 64


async def _server_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The server's records of the last request, once it logged (a busy machine may log
    after the answer went out: waited for, not slept on), plus a moment for a second."""
    def records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.startswith(("aiohttp", "hutch.gateway"))]
    async with asyncio.timeout(10):
        while not records():
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # a second record would be here by now
    return records()


async def _raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a fresh connection; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()  # every answer here closes the connection
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _request(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
             ) -> bytes:
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return (method.encode() + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n" + head + b"\r\n" + body)


def _openai_error(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["message"] and error["type"] and error["code"], error
    return error


async def _parked(url: str, names: Names) -> int:
    async with amqp(url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.parked_queue, passive=True)
        return queue.declaration_result.message_count or 0


async def test_bodies_python_reads_but_the_worker_would_not_are_refused_at_once(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = (b'{"model": "mock-small", "messages": ' + b"[" * 100_000 + b"]" * 100_000
            + b"}")
    utf16 = json.dumps(BODY).encode("utf-16")
    bom = b"\xef\xbb\xbf" + json.dumps(BODY).encode()
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack, \
            httpx.AsyncClient(base_url=stack.root, timeout=10) as http:
        answers = {name: await http.post(CHAT, content=body, headers=AUTH)
                   for name, body in (("deep", deep), ("utf16", utf16), ("bom", bom))}
        ok = await http.post(CHAT, json=BODY, headers=AUTH)  # valid traffic alongside
        await asyncio.sleep(0.3)  # a published request would be parked by now
        parked = await _parked(stack.settings.amqp_url, Names(stack.settings.prefix))
        served = stack.mock.stats()["served"]
    for name, response in answers.items():
        assert response.status_code == 400, (name, response.text[:200])
        assert response.headers["content-type"].startswith("application/json"), name
        assert "x-request-id" not in response.headers, f"{name} was published"
        assert _openai_error(response.content)["code"] == "invalid_request", name
    assert "nested too deeply" in answers["deep"].json()["error"]["message"]
    assert "UTF-8" in answers["utf16"].json()["error"]["message"]
    assert ok.status_code == 200
    assert (parked, served) == (0, 1)


async def test_non_utf8_authorization_is_a_401_everywhere(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = [(b"Authorization", b"Bearer sk-\xff\xfe\x80"), (b"Content-Type",
                                                          b"application/json")]
    body = json.dumps(BODY).encode()
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack:
        port = stack.gateway.port
        answers = {path: await _raw(port, _request(
            method, path, [*bad, (b"Content-Length", str(len(payload)).encode())], payload))
            for method, path, payload in (("POST", CHAT, body),
                                          ("POST", "/v1/completions", body),
                                          ("POST", "/v1/embeddings", body),
                                          ("GET", "/v1/models", b""))}
        served = stack.mock.stats()["served"]
    for path, (status, headers, payload) in answers.items():
        assert status == 401, (path, payload[:200])
        assert headers["content-type"].startswith("application/json"), path
        assert _openai_error(payload)["code"] == "invalid_api_key", path
    assert served == 0


HUGE_HEADER = [(b"X-Padding", b"a" * 20_000), (b"Authorization", f"Bearer {KEY_A}".encode())]
DUPLICATE_LENGTH = [(b"Authorization", f"Bearer {KEY_A}".encode()),
                    (b"Content-Type", b"application/json"), (b"Content-Length", b"2"),
                    (b"Content-Length", b"2")]


async def test_requests_aiohttp_refuses_get_openai_errors_and_one_quiet_line(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cases = {"huge header": _request("POST", CHAT, HUGE_HEADER, b"{}"),
             "duplicate Content-Length": _request("POST", CHAT, DUPLICATE_LENGTH, b"{}"),
             "TLS handshake": CLIENT_HELLO}
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack:
        port = stack.gateway.port
        answers = {}
        for name, data in cases.items():
            caplog.clear()
            with caplog.at_level(logging.DEBUG):
                answers[name] = await _raw(port, data)
                records = await _server_logged(caplog)
            assert len(records) == 1, (name, [r.getMessage() for r in records])
            record = records[0]
            assert not record.exc_info and record.levelno <= logging.INFO, name
            assert KEY_A not in caplog.text and "aaaa" not in caplog.text, name
        async with httpx.AsyncClient(base_url=stack.root, timeout=10) as http:
            ok = await http.post(CHAT, json=BODY, headers=AUTH)
    for name, (status, headers, payload) in answers.items():
        assert status in (400, 431), (name, status, payload[:200])
        assert headers["content-type"].startswith("application/json"), name
        error = _openai_error(payload)
        assert KEY_A not in error["message"], name
    assert "TLS" in _openai_error(answers["TLS handshake"][2])["message"]
    assert ok.status_code == 200


async def test_a_deadline_504_is_not_retried_by_the_sdk(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    config = MockConfig(latency_ms=5, capacity=2, hang_rate=1.0, hang_s=30)
    async with gateway_stack(make_settings, mock=config, capacity=2,
                             gateway=keyed(monkeypatch)) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=KEY_A)  # 2 retries
        with pytest.raises(openai.APIStatusError) as late:
            await client.chat.completions.create(
                model="mock-small", messages=HELLO,  # type: ignore[arg-type]
                extra_headers={"x-hutch-timeout": "0.5"})
        calls = stack.gateway.metrics.registry.get_sample_value(
            "hutch_gateway_requests_total",
            {"endpoint": "chat.completions", "client": "team-a", "status": "504"})
    assert late.value.status_code == 504
    assert late.value.response.headers["x-should-retry"] == "false"
    assert calls == 1


class HangingBackend:
    """Records each call's request id and holds it until cancelled."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.ids.append(request.headers.get("x-request-id", ""))
        await asyncio.sleep(60)
        raise AssertionError("not cancelled")


@contextlib.asynccontextmanager
async def _hanging_gateway(make_settings: SettingsFactory, backend: HangingBackend
                           ) -> AsyncIterator[tuple[GatewayServer, Any]]:
    settings = make_settings([("b1", "http://backend.invalid/v1", 2)])
    await apply_topology(settings)
    async with running_worker(settings, transport_factory=lambda _: httpx.MockTransport(
            backend.handler)), GatewayServer(settings, host="127.0.0.1", port=0) as server:
        yield server, settings


async def test_an_operators_cancel_is_not_retried_by_the_sdk(
        make_settings: SettingsFactory) -> None:
    backend = HangingBackend()
    async with _hanging_gateway(make_settings, backend) as (server, settings):
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="any")  # 2 retries
        call = asyncio.create_task(client.chat.completions.create(
            model="mock-small", messages=HELLO))  # type: ignore[arg-type]
        await until(lambda: bool(backend.ids))
        await publish_cancels(settings.amqp_url, Names(settings.prefix).cancel_exchange,
                              settings.amqp_user, [backend.ids[0]])
        with pytest.raises(openai.APIStatusError) as cancelled:
            await asyncio.wait_for(call, 20)
        await asyncio.sleep(0.3)  # a retry would have reached the backend by now
    assert cancelled.value.status_code == 503
    assert cancelled.value.code == "cancelled"
    assert cancelled.value.response.headers["x-should-retry"] == "false"
    assert len(backend.ids) == 1


async def test_an_unexpected_error_is_an_openai_500_and_one_line_without_its_message(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a handler (here: the call reader raising with a key in its message) is a
    500 in OpenAI's shape, logged once with its class and place, never its message."""
    async def broken(self: CallReader, request: Any, endpoint: Any) -> Any:
        raise KeyError(KEY_A)

    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack, \
            httpx.AsyncClient(base_url=stack.root, timeout=10) as http:
        with monkeypatch.context() as patch, caplog.at_level(logging.DEBUG):
            patch.setattr(CallReader, "read", broken)
            failed = await http.post(CHAT, json=BODY, headers=AUTH)
        ok = await http.post(CHAT, json=BODY, headers=AUTH)
    records = [r for r in caplog.records if r.name.startswith(("aiohttp", "hutch.gateway"))
               and r.levelno >= logging.WARNING]
    assert failed.status_code == 500
    assert _openai_error(failed.content)["code"] == "internal_error"
    assert [r.getMessage() for r in records] == ["gateway.unexpected_error"]
    assert records[0].fields["error"] == "KeyError"  # type: ignore[attr-defined]
    assert KEY_A not in caplog.text and not records[0].exc_info
    assert ok.status_code == 200
