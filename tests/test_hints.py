"""Retry hints of a 429, as real servers and proxies send them."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from pipeline.backends.hints import parse_duration, retry_after_s
from pipeline.backends.http import Backend
from pipeline.errors import ThrottledError
from pipeline.settings import BackendSettings


@pytest.mark.parametrize(("value", "expected"), [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3s", 3723.0), ("0.5s", 0.5),
    ("7", 7.0), ("", None), (None, None), ("soon", None), ("1s later", None), ("-3", None),
])
def test_durations(value: str | None, expected: float | None) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
    ({"retry-after": "9", "llm_provider-retry-after": "60"}, 9.0),
    ({"llm_provider-retry-after": "60", "x-ratelimit-reset-requests": "1s"}, 60.0),
    ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "30s"}, 30.0),
    ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "30s",
      "x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "900"}, 2.0),
    ({"retry-after-ms": "junk", "retry-after": "inf"}, None),
    ({}, None),
])
def test_the_first_usable_hint_wins(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(httpx.Headers(headers)) == expected


def test_an_http_date_in_the_future() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    found = retry_after_s(httpx.Headers({"retry-after": later}))
    assert found is not None and 25 < found <= 31


async def test_a_litellm_style_429_carries_its_hint() -> None:
    """LiteLLM's proxy sends llm_provider-retry-after (and x-ratelimit-*), not Retry-After."""
    settings = BackendSettings(name="proxy", url="http://proxy.test/v1", max_concurrency=1)
    backend = Backend(settings, transport=httpx.MockTransport(lambda request: httpx.Response(
        429, headers={"llm_provider-retry-after": "60", "x-ratelimit-remaining-requests": "0",
                      "x-ratelimit-reset-requests": "59s"},
        json={"error": {"message": "rate limit", "type": "rate_limit_error"}})))
    with pytest.raises(ThrottledError) as throttled:
        await backend.chat(b'{"model": "m", "messages": []}')
    await backend.aclose()
    assert throttled.value.retry_after_s == 60.0
