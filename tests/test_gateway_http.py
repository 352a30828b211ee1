"""The gateway over raw HTTP: status codes and headers of bad requests, and slow clients
that must never stall it (malformed JSON, huge bodies, wrong content types, slow-loris)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import SettingsFactory
from tests.gateway_support import KEY_A, gateway_stack, keyed

AUTH = {"Authorization": f"Bearer {KEY_A}"}
CHAT = "/v1/chat/completions"
BODY = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]}


async def test_bad_requests_get_clear_4xx_answers(make_settings: SettingsFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack, \
            httpx.AsyncClient(base_url=stack.root, timeout=10) as http:
        json_headers = {**AUTH, "Content-Type": "application/json"}
        answers = {
            "no key": await http.post(CHAT, json=BODY),
            "wrong key": await http.post(CHAT, json=BODY,
                                         headers={"Authorization": "Bearer nope"}),
            "malformed": await http.post(CHAT, content=b'{"model": ', headers=json_headers),
            "not an object": await http.post(CHAT, content=b"[1, 2]", headers=json_headers),
            "content type": await http.post(CHAT, content=b"model=x", headers={
                **AUTH, "Content-Type": "application/x-www-form-urlencoded"}),
            "huge": await http.post(CHAT, content=b"x" * (2 * 1024 * 1024),
                                    headers=json_headers),
            "bad priority": await http.post(CHAT, json=BODY,
                                            headers={**AUTH, "x-hutch-priority": "high"}),
            "bad timeout": await http.post(CHAT, json=BODY,
                                           headers={**AUTH, "x-hutch-timeout": "-1"}),
            "stream embeddings": await http.post("/v1/embeddings", headers=AUTH, json={
                "model": "mock-small", "input": "x", "stream": True}),
            "unknown path": await http.post("/v1/images/generations", json=BODY,
                                            headers=AUTH),
            "wrong method": await http.get(CHAT, headers=AUTH),
        }
        served = stack.mock.stats()["served"]
        ok = await http.post(CHAT, json=BODY, headers=AUTH)
    statuses = {name: r.status_code for name, r in answers.items()}
    assert statuses == {"no key": 401, "wrong key": 401, "malformed": 400,
                        "not an object": 400, "content type": 415, "huge": 413,
                        "bad priority": 400, "bad timeout": 400, "stream embeddings": 400,
                        "unknown path": 404, "wrong method": 405}
    for name, response in answers.items():
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"], name
    assert answers["no key"].json()["error"]["code"] == "invalid_api_key"
    assert served == 0  # nothing was published for any of them
    assert ok.status_code == 200 and len(ok.headers["x-request-id"]) == 32


async def _partial(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def test_slow_clients_never_stall_the_gateway(make_settings: SettingsFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The slow connections hang 10 s: the ten requests are served meanwhile (an order, not
    # a wall-clock bound: 1 s with `elapsed < 2.0` failed when a busy machine was slow).
    gateway = keyed(monkeypatch, idle_timeout_s=10.0, body_timeout_s=10.0)
    async with gateway_stack(make_settings, gateway=gateway) as stack, \
            httpx.AsyncClient(base_url=stack.root, timeout=10) as http:
        port = stack.gateway.port
        # Slow-loris: headers that never end, on 20 connections.
        loris = [await _partial(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                 for _ in range(20)]
        # A body that never arrives in full.
        slow_body = await _partial(port, (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            f"application/json\r\nAuthorization: Bearer {KEY_A}\r\n"
            "Content-Length: 1000\r\n\r\n{\"model\": ").encode())
        served = await asyncio.gather(*(http.post(CHAT, json=BODY, headers=AUTH)
                                        for _ in range(10)))
        hung_meanwhile = not any(reader.at_eof() for reader, _ in [*loris, slow_body])
        answer = await asyncio.wait_for(slow_body[0].read(200), 60)
        closed = [await asyncio.wait_for(reader.read(), 60) for reader, _ in loris]
        for _, writer in [*loris, slow_body]:
            writer.close()
    assert [r.status_code for r in served] == [200] * 10
    assert hung_meanwhile  # served while the slow connections hung
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert closed == [b""] * 20  # each slow-loris connection was closed by the gateway
