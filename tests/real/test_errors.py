"""Errors by kind against each real server: what the server said reaches the client.

A request the server refuses as too long for its context (llama.cpp's own
``context_length_exceeded``, LiteLLM's context-window error) is the client's to fix:
``invalid_request`` with the server's ``status``, ``type``, ``code`` and ``param`` kept
(issue 11 item 4: it became a bare ``backend_error``). A request the server answers 500
(llama.cpp's to a ``min_p`` it cannot parse, a field Hutch passes on unchecked; LiteLLM's
``real-error`` deployment) is retried, then ``backend_error`` with the server's details,
and it does not take the backend out of service for the next request (issue 11 item 1).
"""

from __future__ import annotations

import pytest

from pipeline import protocol as p
from tests.real.harness import (
    RealBackend,
    chat_body,
    eventually,
    real_settings,
    serving,
    wire_client,
)

pytestmark = pytest.mark.timeout(180)


async def test_too_long_for_the_context_is_the_clients_error_with_the_servers_detail(
        real_backend: RealBackend, amqp_url: str, prefix: str) -> None:
    settings = real_settings(amqp_url, prefix, real_backend)
    server = real_backend.server
    refused_before = server.calls(400)
    async with serving(settings), wire_client(settings) as wire:
        final = await wire.final(await wire.send(
            {**chat_body(real_backend.model), **real_backend.too_long}))
    error = final.error()
    assert error["code"] == p.ErrorCode.INVALID_REQUEST, error
    assert error["status"] == 400
    assert error["backend"]["type"] == "invalid_request_error", error
    assert error["backend"]["code"] == real_backend.too_long_code, error
    assert final.headers[p.H_ATTEMPTS] == 1, "a client error was retried"
    assert await eventually(lambda: server.calls(400) == refused_before + 1)


async def test_a_server_error_is_retried_reported_and_leaves_the_backend_in_service(
        real_backend: RealBackend, amqp_url: str, prefix: str) -> None:
    """Two poison requests make six failed calls, twice the breaker's threshold; the
    next valid request is still served at once, not after a 30 s cooldown."""
    settings = real_settings(amqp_url, prefix, real_backend, max_attempts=3,
                             attempts_per_delivery=3, retry_delays_ms=[100],
                             breaker_failures=3, breaker_cooldown_s=30)
    server = real_backend.server
    failed_before = server.calls(500)
    poison = {**chat_body(real_backend.model), **real_backend.server_error}
    async with serving(settings), wire_client(settings) as wire:
        finals = [await wire.final(await wire.send(poison)) for _ in range(2)]
        good = await wire.final(await wire.send(chat_body(real_backend.model, max_tokens=4),
                                                timeout_s=10), timeout_s=15)
    for final in finals:
        error = final.error()
        assert error["code"] == p.ErrorCode.BACKEND_ERROR, error
        assert error["status"] == 500
        assert error["backend"]["type"] == "internal_server_error", error
        assert final.headers[p.H_ATTEMPTS] == 3
    assert await eventually(lambda: server.calls(500) == failed_before + 6), server.log_tail()
    assert good.ok, good.body()
