"""What only LiteLLM's proxy shows: per-model rate limits with its own retry hints, and
calls slower than Hutch's backend timeout.

The proxy's ``real-limited`` deployment allows one request a minute; the router's
``enforce_model_rate_limits`` check answers the next with 429 and the header
``llm_provider-retry-after: 60`` (not ``Retry-After``). The proxy's access log counts the
calls Hutch made.
"""

from __future__ import annotations

import time

import pytest

from pipeline import protocol as p
from tests.real.conftest import litellm_backend
from tests.real.harness import chat_body, eventually, real_settings, serving, wire_client
from tests.real.servers import ServerProcess

pytestmark = pytest.mark.timeout(180)


async def test_a_rate_limit_pauses_only_its_model_for_as_long_as_the_proxy_asks(
        litellm_proxy: ServerProcess, amqp_url: str, prefix: str) -> None:
    """Issue 11 item 3: Hutch read no hint and retried on its own doubling backoff, and a
    429 for one model paused every model of the backend. Now: the 60 s hint is honoured
    (no second call to the limited model within the request's deadline, which ends it
    ``deadline_exceeded``), and another model of the same proxy is served at once."""
    server = litellm_proxy
    settings = real_settings(amqp_url, prefix, litellm_backend(server))
    async with serving(settings), wire_client(settings) as wire:
        first = await wire.final(await wire.send(chat_body("real-limited")))
        throttled_before = server.calls(429)
        limited = await wire.send(chat_body("real-limited"), timeout_s=6)
        assert await eventually(lambda: server.calls(429) > throttled_before, 10), \
            server.log_tail()
        started = time.monotonic()
        other = await wire.final(await wire.send(chat_body("real-fast")), timeout_s=10)
        other_s = time.monotonic() - started
        answer = await wire.final(limited, timeout_s=15)
    assert first.ok, first.body()
    assert other.ok, other.body()
    assert other_s < 3, f"real-fast waited {other_s:.1f}s behind real-limited's 429"
    assert answer.error()["code"] == p.ErrorCode.DEADLINE_EXCEEDED
    assert len(wire.finals(limited)) == 1
    assert server.calls(429) == throttled_before + 1, "the 60 s retry hint was not honoured"


async def test_a_call_slower_than_the_backend_timeout_is_reported_as_a_timeout(
        litellm_proxy: ServerProcess, amqp_url: str, prefix: str) -> None:
    """``real-slow`` answers after 1 s; Hutch's backend timeout is 0.3 s: each attempt
    times out (a read timeout, not a dropped connection), and after ``max_attempts`` the
    client gets ``backend_error`` saying so."""
    settings = real_settings(amqp_url, prefix, litellm_backend(litellm_proxy),
                             timeout_s=0.3, max_attempts=2, retry_delays_ms=[100])
    async with serving(settings), wire_client(settings) as wire:
        final = await wire.final(await wire.send(chat_body("real-slow")))
    error = final.error()
    assert error["code"] == p.ErrorCode.BACKEND_ERROR
    assert "timed out" in error["message"]
    assert final.headers[p.H_ATTEMPTS] == 2
