"""Tests for the mock backend: it must be deterministic and its cap/stats must be trustworthy,
since Hutch's own tests and benchmarks rely on it to prove caps hold."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.testing.mock import MockBackend, MockConfig, add_arguments, run_from_args
from pipeline.testing.mock.options import config_from_args
from pipeline.testing.mock.stream import Pacer

REPO_ROOT = Path(__file__).resolve().parent.parent


def _chat(content: Any = "hello there", model: str = "mock-small", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def _eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll until check() holds; bounded so a broken mock fails instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s} s")
        await asyncio.sleep(0.01)


@pytest.fixture
async def mock() -> AsyncIterator[MockBackend]:
    async with MockBackend(MockConfig(latency_ms=10)) as backend:
        yield backend


@pytest.fixture
async def client(mock: MockBackend) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.base_url, timeout=10) as c:
        yield c


async def test_config_validation() -> None:
    with pytest.raises(ValueError, match="capacity"):
        MockConfig(capacity=0)
    for bad in ({"ttft_ms": -1}, {"itl_ms": float("inf")}, {"jitter": 1.5}, {"jitter": True},
                {"reply_tokens": 0}, {"ids_kept": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MockConfig(**bad)
    with pytest.raises(ValueError, match="latency"):
        MockConfig(latency_ms=-1)
    with pytest.raises(ValueError, match="models"):
        MockConfig(models=())


async def test_port_and_base_url(mock: MockBackend) -> None:
    assert mock.port > 0
    assert mock.base_url == f"http://127.0.0.1:{mock.port}/v1"
    with pytest.raises(RuntimeError):
        _ = MockBackend(MockConfig()).port


async def test_deterministic_reply_and_usage(client: httpx.AsyncClient) -> None:
    body = {
        "model": "mock-large",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is"},
                    {"type": "text", "text": "rabbitmq"},
                ],
            },
        ],
    }
    r1 = await client.post("/chat/completions", json=body)
    r2 = await client.post("/chat/completions", json=body)
    assert r1.status_code == r2.status_code == 200
    d1, d2 = r1.json(), r2.json()
    assert d1["object"] == "chat.completion"
    assert d1["model"] == "mock-large"
    assert d1["id"].startswith("chatcmpl-mock-") and d1["id"] != d2["id"]
    assert isinstance(d1["created"], int)
    choice = d1["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "mock reply to: what is rabbitmq"},
        "finish_reason": "stop",
    }
    assert d1["choices"] == d2["choices"]
    assert d1["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


async def test_long_content_is_truncated_and_max_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post("/chat/completions", json=_chat("x" * 500))
    assert r.json()["choices"][0]["message"]["content"] == "mock reply to: " + "x" * 200

    r = await client.post("/chat/completions", json=_chat("one two three four", max_tokens=4))
    data = r.json()
    assert data["choices"][0]["message"]["content"] == "mock reply to: one"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 4

    r = await client.post("/chat/completions", json=_chat("hi", max_tokens=50))
    assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("content", "message_part"),
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "object"),
        (b'{"model": "mock-small"}', "messages"),
        (b'{"model": "mock-small", "messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "mock-small", "messages": [{"content": "hi"}], "stream": "yes"}', "stream"),
        (b'{"model": "mock-small", "messages": [{"content": "hi"}], "stream": true, '
         b'"stream_options": 5}', "stream_options"),
        (b'{"model": "mock-small", "messages": [{"content": "hi"}], "stream": true, '
         b'"stream_options": {"include_usage": "yes"}}', "include_usage"),
        (b'{"model": "mock-small", "messages": [{"content": "hi"}], '
         b'"stream_options": {"include_usage": true}}', "stream_options"),
        (
            b'{"model": "mock-small", "messages": [{"content": "hi"}], "max_tokens": 0}',
            "max_tokens",
        ),
    ],
)
async def test_bad_requests_get_400(
    client: httpx.AsyncClient, mock: MockBackend, content: bytes, message_part: str
) -> None:
    r = await client.post(
        "/chat/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert message_part in error["message"]
    assert mock.stats()["errors"] == 1
    assert mock.stats()["served"] == 0


async def test_unknown_model_gets_404(client: httpx.AsyncClient, mock: MockBackend) -> None:
    r = await client.post("/chat/completions", json=_chat(model="gpt-9"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = await client.get("/no/such/path")
    assert r.status_code == 404
    assert "error" in r.json()
    assert mock.stats()["errors"] == 2


async def test_models(client: httpx.AsyncClient) -> None:
    r = await client.get("/models")
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "data": [
            {"id": "mock-small", "object": "model", "owned_by": "hutch-mock"},
            {"id": "mock-large", "object": "model", "owned_by": "hutch-mock"},
        ],
    }


async def test_capacity_holds() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=200, capacity=2)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        started = time.monotonic()
        replies = await asyncio.gather(
            *(client.post("/chat/completions", json=_chat(f"n{i}")) for i in range(6))
        )
        elapsed = time.monotonic() - started
        assert all(r.status_code == 200 for r in replies)
        stats = (await client.get(f"http://127.0.0.1:{mock.port}/stats")).json()
        now = mock.stats()
        assert {**stats, "elapsed_s": 0} == {**now, "elapsed_s": 0}
        assert stats["served"] == 6
        # 6 requests x 200 ms of service: 1.2 slot-seconds busy, 2 slots over >= 0.6 s
        # (more on a busy machine, where a 200 ms sleep overruns: bounded by the elapsed
        # time of the 2 slots below, not by a wall-clock figure).
        assert stats["busy_slot_s"] >= 1.19
        assert stats["elapsed_s"] >= elapsed - 0.05
        assert stats["busy_slot_s"] / (2 * stats["elapsed_s"]) <= 1.0
        assert stats["max_concurrency"] == 2
        assert stats["max_in_flight"] == 6
        assert stats["in_service"] == stats["waiting"] == 0
        assert stats["capacity"] == 2 and stats["latency_ms"] == 200
        assert elapsed >= 0.55


async def test_served_ids_follow_fifo_order() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=100, capacity=1)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        tasks: list[asyncio.Task[httpx.Response]] = []
        for i in range(5):
            tasks.append(
                asyncio.create_task(
                    client.post(
                        "/chat/completions", json=_chat(), headers={"X-Request-Id": f"r{i}"}
                    )
                )
            )
            # Wait until the server has seen this one, so the arrival order is known.
            await _eventually(partial(_seen, mock, i + 1))
        replies = await asyncio.gather(*tasks)
        assert [r.headers["X-Request-Id"] for r in replies] == [f"r{i}" for i in range(5)]
        assert mock.stats()["served_ids"] == [f"r{i}" for i in range(5)]
        # A request without the header is served but not recorded.
        await client.post("/chat/completions", json=_chat())
        assert mock.stats()["served"] == 6
        assert len(mock.stats()["served_ids"]) == 5


def _seen(mock: MockBackend, n: int) -> bool:
    stats = mock.stats()
    return bool(stats["served"] + stats["waiting"] + stats["in_service"] == n)


def _open(mock: MockBackend) -> tuple[int, int]:
    stats = mock.stats()
    return stats["waiting"], stats["in_service"]


async def test_reset(client: httpx.AsyncClient, mock: MockBackend) -> None:
    await client.post("/chat/completions", json=_chat(), headers={"X-Request-Id": "a"})
    await client.post("/chat/completions", json=_chat(model="nope"))
    before = mock.stats()
    assert before["served"] == 1 and before["errors"] == 1 and before["max_in_flight"] == 1
    r = await client.post(f"http://127.0.0.1:{mock.port}/stats/reset")
    assert r.status_code == 200
    fresh = r.json()
    assert fresh["served"] == fresh["errors"] == 0
    assert fresh["max_concurrency"] == fresh["max_in_flight"] == 0
    assert fresh["served_ids"] == []
    assert fresh["capacity"] == 4 and fresh["latency_ms"] == 10
    assert fresh["busy_slot_s"] == 0 and before["busy_slot_s"] > 0
    assert {**fresh, "elapsed_s": 0} == {**mock.stats(), "elapsed_s": 0}
    await client.post("/chat/completions", json=_chat())
    mock.reset_stats()
    assert mock.stats()["served"] == 0


async def test_client_disconnect_releases_slot() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=500, capacity=1)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        # One request in service and one waiting; both clients go away.
        first = asyncio.create_task(client.post("/chat/completions", json=_chat()))
        await _eventually(lambda: _open(mock) == (0, 1))
        second = asyncio.create_task(client.post("/chat/completions", json=_chat()))
        await _eventually(lambda: _open(mock) == (1, 1))
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        await _eventually(lambda: _open(mock) == (0, 0))
        stats = mock.stats()
        assert stats["served"] == 0
        assert stats["disconnected"] == 2
        # The slot was really released: a new request is served promptly.
        r = await asyncio.wait_for(client.post("/chat/completions", json=_chat()), 5)
        assert r.status_code == 200
        assert mock.stats()["served"] == 1
        assert mock.stats()["max_concurrency"] == 1


async def _read_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline.testing.mock",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def test_subprocess_listens_and_stops_on_sigterm() -> None:
    proc = await _spawn("--port", "0", "--capacity", "3", "--latency-ms", "5")
    try:
        line = await _read_line(proc)
        assert line.startswith("mock backend listening on http://127.0.0.1:"), line
        assert line.rstrip().endswith("/v1 (capacity 3, latency 5 ms)"), line
        base_url = line.split(" on ", 1)[1].split(" ", 1)[0]
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            r = await client.post("/chat/completions", json=_chat())
            assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        await _kill(proc)


async def test_subprocess_rejects_bad_config() -> None:
    proc = await _spawn("--port", "0", "--capacity", "0")
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 2
        assert b"capacity" in stderr
    finally:
        await _kill(proc)


def test_add_arguments_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.latency_ms, args.capacity, args.models) == (
        "127.0.0.1",
        8001,
        50.0,
        4,
        "mock-small,mock-large",
    )
    bad = parser.parse_args(["--models", " , "])
    assert run_from_args(bad) == 2


# -- fault injection -------------------------------------------------------------------------

_NO_FAULTS = {
    "fail_rate": 0.0,
    "fail_status": 500,
    "fail_first": 0,
    "throttle_rate": 0.0,
    "retry_after_s": 1.0,
    "hang_rate": 0.0,
    "hang_s": 3600.0,
    "cut_rate": 0.0,
    "malformed_rate": 0.0,
    "stall_rate": 0.0,
    "fault_after_tokens": 1,
    "seed": None,
}
_NO_STREAM_FAULTS = {"cut": 0, "malformed": 0, "stalled": 0}


@pytest.mark.parametrize(
    ("fields", "message_part"),
    [
        ({"fail_rate": 1.5}, "fail_rate"),
        ({"fail_rate": -0.1}, "fail_rate"),
        ({"fail_rate": float("nan")}, "fail_rate"),
        ({"fail_rate": "0.5"}, "fail_rate"),
        ({"fail_rate": True}, "fail_rate"),
        ({"throttle_rate": 2}, "throttle_rate"),
        ({"hang_rate": -1}, "hang_rate"),
        ({"fail_rate": 0.5, "throttle_rate": 0.4, "hang_rate": 0.2}, "at most 1"),
        ({"fail_status": 200}, "fail_status"),
        ({"fail_status": 600}, "fail_status"),
        ({"fail_status": 500.0}, "fail_status"),
        ({"fail_first": -1}, "fail_first"),
        ({"fail_first": 1.5}, "fail_first"),
        ({"retry_after_s": -1}, "retry_after_s"),
        ({"retry_after_s": float("inf")}, "retry_after_s"),
        ({"hang_s": -0.5}, "hang_s"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"cut_rate": 1.5}, "cut_rate"),
        ({"malformed_rate": -0.5}, "malformed_rate"),
        ({"stall_rate": "1"}, "stall_rate"),
        ({"cut_rate": 0.5, "stall_rate": 0.3, "fail_rate": 0.3}, "at most 1"),
        ({"fault_after_tokens": -1}, "fault_after_tokens"),
        ({"fault_after_tokens": 1.0}, "fault_after_tokens"),
    ],
)
def test_fault_config_validation(fields: dict[str, Any], message_part: str) -> None:
    with pytest.raises(ValueError, match=message_part):
        MockConfig(**fields)
    with pytest.raises(ValueError, match=message_part):
        MockConfig().with_faults(**fields)


def test_fault_config_defaults_and_with_faults() -> None:
    config = MockConfig(latency_ms=7, capacity=3)
    assert config.faults() == _NO_FAULTS
    assert not config.has_faults
    # Exactly at the bounds is fine.
    MockConfig(fail_rate=0.5, throttle_rate=0.25, hang_rate=0.25, fail_status=599)
    changed = config.with_faults(fail_first=2, seed=3)
    assert changed.faults() == {**_NO_FAULTS, "fail_first": 2, "seed": 3}
    assert changed.has_faults and (changed.latency_ms, changed.capacity) == (7, 3)
    # Replaces, not merges: the fields not given go back to their defaults.
    assert changed.with_faults(hang_rate=0.5).faults() == {**_NO_FAULTS, "hang_rate": 0.5}
    with pytest.raises(ValueError, match="unknown fault field"):
        config.with_faults(latency_ms=3)


async def _post(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    return await client.post("/chat/completions", json=_chat(), headers=headers)


async def test_fail_first_fails_deterministically_with_an_openai_error() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=5, fail_first=2)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        replies = [await _post(client) for _ in range(4)]
        assert [r.status_code for r in replies] == [500, 500, 200, 200]
        error = replies[0].json()["error"]
        assert error["type"] == "server_error"
        assert error["code"] == "mock_fault"
        assert "injected" in error["message"]
        stats = mock.stats()
        assert stats["faults"] == {"failed": 2, "throttled": 0, "hung": 0,
                                   **_NO_STREAM_FAULTS}
        assert stats["served"] == 2
        assert stats["errors"] == 0  # faults are not counted as bad requests


async def test_fail_status_4xx_is_not_a_client_error() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=0, fail_first=1, fail_status=400)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        r = await _post(client)
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert mock.stats()["errors"] == 0
        assert mock.stats()["faults"]["failed"] == 1


async def test_a_failing_request_holds_its_slot_for_the_latency() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=200, capacity=1, fail_first=1)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        started = time.monotonic()

        async def timed() -> tuple[int, float]:
            r = await _post(client)
            return r.status_code, time.monotonic() - started

        first = asyncio.create_task(timed())
        await _eventually(lambda: _open(mock) == (0, 1))
        second = asyncio.create_task(timed())
        (status1, t1), (status2, t2) = await asyncio.gather(first, second)
        assert (status1, status2) == (500, 200)
        assert t1 >= 0.18  # the failure took the latency, like a busy server
        assert t2 >= 0.38  # and the second request waited for its slot
        assert mock.stats()["max_concurrency"] == 1


async def _statuses(mock: MockBackend, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client:
        return [(await _post(client)).status_code for _ in range(n)]


async def test_fail_rate_is_seeded_and_about_right() -> None:
    config = MockConfig(latency_ms=0, fail_rate=0.3, fail_status=503, seed=42)
    async with MockBackend(config) as a, MockBackend(config) as b:
        first = await _statuses(a, 200)
        second = await _statuses(b, 200)
    assert first == second  # same seed, same sequence
    assert set(first) == {200, 503}
    assert 30 <= first.count(503) <= 90  # 60 expected
    assert a.stats()["faults"]["failed"] == first.count(503)
    assert a.stats()["served"] == first.count(200)
    async with MockBackend(config.with_faults(fail_rate=0.3, seed=43)) as c:
        assert await _statuses(c, 200) != first  # another seed, another sequence


async def test_throttle_answers_429_at_the_door_with_retry_after() -> None:
    config = MockConfig(latency_ms=400, capacity=1, throttle_rate=1.0, retry_after_s=2.5)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        r = await _post(client)
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "2.5"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # Throttling takes no slot: with the only slot busy, a 429 still comes at once.
        mock.set_faults(fail_first=0)
        busy = asyncio.create_task(_post(client))
        await _eventually(lambda: _open(mock) == (0, 1))
        mock.set_faults(throttle_rate=1.0, retry_after_s=1.0)
        r = await _post(client)
        assert not busy.done()  # answered while the only slot was still busy (400 ms)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert (await busy).status_code == 200
        stats = mock.stats()
        assert stats["faults"] == {"failed": 0, "throttled": 2, "hung": 0,
                                   **_NO_STREAM_FAULTS}
        assert stats["errors"] == 0
        assert stats["max_in_flight"] == 1  # throttled requests never queued for a slot


async def test_rates_are_fractions_of_all_requests() -> None:
    # Half throttled at the door, the other half fail in a slot: nothing is served.
    config = MockConfig(latency_ms=0, throttle_rate=0.5, fail_rate=0.5, seed=1)
    async with MockBackend(config) as mock:
        statuses = await _statuses(mock, 100)
    assert set(statuses) == {429, 500}
    assert 25 <= statuses.count(429) <= 75
    assert mock.stats()["served"] == 0
    faults = mock.stats()["faults"]
    assert faults["throttled"] + faults["failed"] == 100
    # A mix: about 20% throttled, 30% failed, 10% hung (hang_s 0: answered at once).
    config = MockConfig(latency_ms=0, throttle_rate=0.2, fail_rate=0.3, hang_rate=0.1,
                        hang_s=0, seed=9)
    async with MockBackend(config) as mock:
        statuses = await _statuses(mock, 400)
    faults = mock.stats()["faults"]
    assert 50 <= faults["throttled"] <= 110
    assert 85 <= faults["failed"] <= 155
    assert 20 <= faults["hung"] <= 60
    assert statuses.count(429) == faults["throttled"]
    assert statuses.count(500) == faults["failed"]
    assert statuses.count(200) == mock.stats()["served"]
    assert mock.stats()["served"] == 400 - faults["throttled"] - faults["failed"]


async def test_hang_holds_the_slot_then_answers() -> None:
    # The hang (2 s) is the window for the normal request to queue behind it.
    config = MockConfig(latency_ms=10, capacity=1, hang_rate=1.0, hang_s=2.0)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        started = time.monotonic()
        hanging = asyncio.create_task(_post(client))
        await _eventually(lambda: mock.stats()["faults"]["hung"] == 1)
        mock.set_faults()  # fixed: the next request is normal, the hanging one keeps hanging
        normal = asyncio.create_task(_post(client))
        await _eventually(lambda: _open(mock) == (1, 1))  # it waits for the held slot
        r1, r2 = await asyncio.gather(hanging, normal)
        assert r1.status_code == r2.status_code == 200
        assert time.monotonic() - started >= 2.0
        assert r1.json()["choices"][0]["message"]["content"] == "mock reply to: hello there"
        stats = mock.stats()
        assert stats["faults"] == {"failed": 0, "throttled": 0, "hung": 1,
                                   **_NO_STREAM_FAULTS}
        assert stats["served"] == 2 and stats["max_concurrency"] == 1


async def test_hang_provokes_a_client_timeout_and_frees_the_slot_after() -> None:
    config = MockConfig(latency_ms=5, capacity=1, hang_rate=1.0, hang_s=60)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=0.3) as client,
    ):
        with pytest.raises(httpx.ReadTimeout):
            await _post(client)
        # The client went away: the server abandons the hung request and frees its slot.
        await _eventually(lambda: _open(mock) == (0, 0))
        assert mock.stats()["disconnected"] == 1
        mock.set_faults()
        assert (await _post(client)).status_code == 200


async def test_faults_over_http() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=0)) as mock,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{mock.port}", timeout=10) as client,
    ):
        r = await client.get("/faults")
        assert r.status_code == 200 and r.json() == _NO_FAULTS
        r = await client.post("/faults", json={"fail_first": 1, "fail_status": 502})
        assert r.status_code == 200
        assert r.json() == {**_NO_FAULTS, "fail_first": 1, "fail_status": 502}
        assert (await client.get("/faults")).json() == r.json() == mock.faults()
        chat = await client.post("/v1/chat/completions", json=_chat())
        assert chat.status_code == 502
        assert chat.json()["error"]["type"] == "server_error"
        # POST replaces: a new set of faults starts over (fail_first counts again).
        r = await client.post("/faults", json={"fail_first": 1})
        assert r.json()["fail_status"] == 500
        chat = await client.post("/v1/chat/completions", json=_chat())
        assert chat.status_code == 500
        # {} clears everything: the backend is "fixed".
        assert (await client.post("/faults", json={})).json() == _NO_FAULTS
        assert (await client.post("/v1/chat/completions", json=_chat())).status_code == 200
        assert mock.stats()["faults"]["failed"] == 2


@pytest.mark.parametrize(
    ("content", "message_part"),
    [
        (b"{nope", "JSON"),
        (b"[1]", "object"),
        (b'{"fail_rate": 2}', "fail_rate"),
        (b'{"fail_rate": 0.6, "hang_rate": 0.6}', "at most 1"),
        (b'{"fail_status": "500"}', "fail_status"),
        (b'{"latency_ms": 1}', "unknown fault field"),
    ],
)
async def test_bad_faults_get_400_and_change_nothing(content: bytes, message_part: str) -> None:
    async with (
        MockBackend(MockConfig(latency_ms=0, fail_first=3)) as mock,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{mock.port}", timeout=10) as client,
    ):
        before = mock.faults()
        r = await client.post("/faults", content=content,
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_request"
        assert message_part in error["message"]
        assert mock.faults() == before


async def test_set_faults_in_process() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=0)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        assert mock.set_faults(fail_first=1) == {**_NO_FAULTS, "fail_first": 1}
        with pytest.raises(ValueError, match="fail_rate"):
            mock.set_faults(fail_rate=7)
        assert mock.faults()["fail_first"] == 1  # unchanged by the bad call
        assert [(await _post(client)).status_code for _ in range(2)] == [500, 200]
        mock.set_faults(fail_first=1)  # armed again
        assert (await _post(client)).status_code == 500
        assert mock.set_faults() == _NO_FAULTS
        assert (await _post(client)).status_code == 200


async def test_stats_reset_clears_fault_counters() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=0, fail_first=1)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        await _post(client)
        assert mock.stats()["faults"]["failed"] == 1
        r = await client.post(f"http://127.0.0.1:{mock.port}/stats/reset")
        assert r.json()["faults"] == {"failed": 0, "throttled": 0, "hung": 0,
                                          **_NO_STREAM_FAULTS}
        assert mock.faults()["fail_first"] == 1  # the faults themselves stay


async def test_stop_refuses_connections_and_start_restarts_on_the_same_port() -> None:
    mock = MockBackend(MockConfig(latency_ms=0))
    await mock.start()
    try:
        port, url = mock.port, mock.base_url
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            assert (await _post(client)).status_code == 200
            await mock.stop()
            assert not mock.running
            assert mock.port == port  # still known while down
            with pytest.raises(httpx.ConnectError):
                await _post(client)
            await mock.start()
            assert mock.running and mock.port == port and mock.base_url == url
            assert (await _post(client)).status_code == 200
            assert mock.stats()["served"] == 2  # counters survive a restart
            await mock.stop()
            await mock.stop()  # twice is fine
            await mock.start()
            assert (await _post(client)).status_code == 200
    finally:
        await mock.stop()


@pytest.fixture
def long_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """A 30 s graceful drain on stop: "at once" (under 15 s) then tells a dropped request
    from a drained one on a busy machine too (the real 2 s left no margin for load)."""
    from pipeline.testing.mock import server
    monkeypatch.setattr(server, "_SHUTDOWN_TIMEOUT_S", 30.0)
    return 15.0


async def test_stop_drops_hanging_requests_at_once(long_grace: float) -> None:
    config = MockConfig(latency_ms=0, capacity=2, hang_rate=1.0, hang_s=3600)
    mock = MockBackend(config)
    await mock.start()
    try:
        async with httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client:
            hanging = [asyncio.create_task(_post(client)) for _ in range(3)]
            await _eventually(lambda: _open(mock) == (1, 2))
            started = time.monotonic()
            await mock.stop()
            assert time.monotonic() - started < long_grace  # not the drain, nor 3600 s
            results = await asyncio.gather(*hanging, return_exceptions=True)
            assert all(isinstance(r, httpx.TransportError) for r in results), results
            assert _open(mock) == (0, 0)
            mock.set_faults()
            await mock.start()
            assert (await _post(client)).status_code == 200
    finally:
        await mock.stop()


def test_fault_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert {name: getattr(args, name) for name in _NO_FAULTS} == _NO_FAULTS
    args = parser.parse_args([
        "--fail-rate", "0.1", "--fail-status", "503", "--fail-first", "2",
        "--throttle-rate", "0.2", "--retry-after", "0.5", "--hang-rate", "0.3",
        "--hang-s", "7", "--seed", "11", "--cut-rate", "0.1", "--malformed-rate", "0.05",
        "--stall-rate", "0.05", "--fault-after-tokens", "3",
    ])
    assert {name: getattr(args, name) for name in _NO_FAULTS} == {
        "fail_rate": 0.1, "fail_status": 503, "fail_first": 2, "throttle_rate": 0.2,
        "retry_after_s": 0.5, "hang_rate": 0.3, "hang_s": 7.0, "cut_rate": 0.1,
        "malformed_rate": 0.05, "stall_rate": 0.05, "fault_after_tokens": 3, "seed": 11,
    }
    assert run_from_args(parser.parse_args(["--fail-rate", "1.5"])) == 2
    assert run_from_args(parser.parse_args(["--fail-rate", "0.6", "--hang-rate", "0.6"])) == 2


async def test_subprocess_with_fault_flags() -> None:
    proc = await _spawn("--port", "0", "--latency-ms", "0", "--fail-first", "1",
                        "--fail-status", "502", "--throttle-rate", "0", "--seed", "5")
    try:
        line = await _read_line(proc)
        assert line.startswith("mock backend listening on "), line
        faults_line = await _read_line(proc)
        assert faults_line.startswith("mock backend faults: "), faults_line
        assert '"fail_first": 1' in faults_line and '"fail_status": 502' in faults_line
        base_url = line.split(" on ", 1)[1].split(" ", 1)[0]
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            assert [(await _post(client)).status_code for _ in range(2)] == [502, 200]
            root = base_url.removesuffix("/v1")
            assert (await client.post(f"{root}/faults", json={"fail_first": 1})).status_code \
                == 200
            assert (await _post(client)).status_code == 500
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        await _kill(proc)


# -- streaming -------------------------------------------------------------------------------


async def _sse(response: httpx.Response) -> list[str]:
    """The data of each server-sent event, read line by line as a real client reads it."""
    events: list[str] = []
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
        elif not line and data:
            events.append("\n".join(data))
            data = []
    assert not data, "the stream ended in the middle of an event"
    return events


async def _stream(client: httpx.AsyncClient, body: dict[str, Any],
                  **headers: str) -> tuple[httpx.Response, list[str]]:
    async with client.stream("POST", "/chat/completions", json=body, headers=headers) as r:
        return r, await _sse(r)


def _chunks(events: list[str]) -> list[dict[str, Any]]:
    """The chunk objects of a complete stream (checks that ``[DONE]`` ends it, once)."""
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return [json.loads(event) for event in events[:-1]]


def _content(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


async def test_stream_is_openai_server_sent_events(client: httpx.AsyncClient,
                                                   mock: MockBackend) -> None:
    body = _chat("what  is\trabbitmq? ", model="mock-large")
    r, events = await _stream(client, {**body, "stream": True}, **{"X-Request-Id": "s1"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"] == "s1"
    chunks = _chunks(events)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-mock-")
    assert {c["model"] for c in chunks} == {"mock-large"}
    assert all("usage" not in c for c in chunks)  # not asked for
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert tokens[:3] == ["mock", " reply", " to:"]  # one chunk per token
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}
    whole = (await client.post("/chat/completions", json=body)).json()
    assert _content(chunks) == whole["choices"][0]["message"]["content"]
    assert len(tokens) == whole["usage"]["completion_tokens"]
    stats = mock.stats()
    assert (stats["served"], stats["streamed"], stats["served_ids"]) == (2, 1, ["s1"])


async def test_stream_usage_chunk_comes_last_before_done(client: httpx.AsyncClient) -> None:
    body = _chat("one two three")
    _, events = await _stream(client, {**body, "stream": True,
                                       "stream_options": {"include_usage": True}})
    chunks = _chunks(events)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    assert all(c["usage"] is None for c in chunks[:-1])  # OpenAI: null on the others
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    whole = (await client.post("/chat/completions", json=body)).json()
    assert usage["usage"] == whole["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert _content(chunks) == "mock reply to: one two three"
    _, plain = await _stream(client, {**body, "stream": True,
                                      "stream_options": {"include_usage": False}})
    assert all("usage" not in c for c in _chunks(plain))


async def test_stream_length_comes_from_max_tokens() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=0, reply_tokens=20)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        for max_tokens, count, finish in ((None, 20, "stop"), (7, 7, "length"),
                                          (300, 300, "length")):
            extra: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
            body = _chat("hi", **extra)
            _, events = await _stream(client, {**body, "stream": True})
            chunks = _chunks(events)
            assert len(chunks) == count + 2  # role, one per token, finish
            assert chunks[-1]["choices"][0]["finish_reason"] == finish
            whole = (await client.post("/chat/completions", json=body)).json()
            assert whole["usage"]["completion_tokens"] == count
            assert whole["choices"][0]["finish_reason"] == finish
            assert _content(chunks) == whole["choices"][0]["message"]["content"]
            assert _content(chunks).startswith("mock reply to: hi lorem ipsum")
    # Without reply_tokens a reply is the echo, cut at max_tokens, streamed or not.
    async with (
        MockBackend(MockConfig(latency_ms=0)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        _, events = await _stream(client, _chat("a b c", max_tokens=4, stream=True))
        chunks = _chunks(events)
        assert _content(chunks) == "mock reply to: a"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def _timed_events(client: httpx.AsyncClient, body: dict[str, Any]) -> list[tuple[float, str]]:
    """Each event with the seconds since the request was sent."""
    started = time.monotonic()
    timed: list[tuple[float, str]] = []
    async with client.stream("POST", "/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                timed.append((time.monotonic() - started, line[6:]))
    return timed


async def test_stream_timing_ttft_and_itl() -> None:
    config = MockConfig(latency_ms=0, ttft_ms=200, itl_ms=50, reply_tokens=6)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        timed = await _timed_events(client, _chat(stream=True))
    arrivals = [t for t, data in timed if data != "[DONE]" and '"content":"' in data
                and '"content":""' not in data]
    assert len(arrivals) == 6
    # Upper bounds a busy machine keeps: they catch a unit slip (200 s), not a slow loop.
    assert 0.18 <= arrivals[0] < 10  # time to first token, loosely
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap >= 0.035 for gap in gaps), gaps
    assert 0.2 <= arrivals[-1] - arrivals[0] < 10  # five gaps of 50 ms, loosely


def test_jitter_is_seeded_and_bounded() -> None:
    config = MockConfig(jitter=0.5, seed=7)
    pacer, again = Pacer(config), Pacer(config)
    draws = [pacer.seconds(100) for _ in range(200)]
    assert draws == [again.seconds(100) for _ in range(200)]  # same seed, same delays
    assert all(0.05 <= d <= 0.15 for d in draws)
    assert len(set(draws)) > 100 and min(draws) < 0.07 and max(draws) > 0.13
    other = Pacer(MockConfig(jitter=0.5, seed=8))
    assert [other.seconds(100) for _ in range(200)] != draws
    assert Pacer(MockConfig(jitter=0)).seconds(100) == 0.1  # no jitter: exact


async def test_a_whole_answers_latency_is_jittered_too(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """Not only a stream's pace: a non-streamed answer's ``latency_ms`` goes through the
    same seeded jitter (constant service times move a backend's slots in lock step)."""
    asked: list[float] = []
    seconds = Pacer.seconds

    def spy(self: Pacer, ms: float) -> float:
        asked.append(ms)
        return seconds(self, ms)

    monkeypatch.setattr(Pacer, "seconds", spy)
    config = MockConfig(latency_ms=5, jitter=0.5, seed=3)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        body = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(3):
            (await client.post("/chat/completions", json=body)).raise_for_status()
    assert asked == [5, 5, 5]


async def test_streams_hold_their_slot_to_the_end() -> None:
    config = MockConfig(latency_ms=0, ttft_ms=30, itl_ms=15, jitter=0.3, seed=1,
                        capacity=2, reply_tokens=8)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        runs = await asyncio.gather(*(_timed_events(client, _chat(f"n{i}", stream=True))
                                      for i in range(6)))
        stats = mock.stats()
    assert all(run[-1][1] == "[DONE]" for run in runs)
    assert stats["max_concurrency"] == 2 and stats["max_in_flight"] == 6
    assert stats["streamed"] == stats["served"] == 6
    assert stats["in_service"] == stats["waiting"] == 0
    # Each stream holds its slot ~30 + 7 x 15 ms: three rounds of two at least.
    assert stats["busy_slot_s"] >= 6 * 0.09
    # With one slot, the next stream starts only after the previous one's [DONE].
    async with (
        MockBackend(dataclasses.replace(config, capacity=1)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        first, second = await asyncio.gather(
            _timed_events(client, _chat("a", stream=True)),
            _timed_events(client, _chat("b", stream=True)))
    early, late = sorted((first, second), key=lambda run: run[0][0])
    assert late[0][0] >= early[-1][0] - 0.005


async def test_client_closing_a_stream_aborts_it_and_frees_the_slot() -> None:
    config = MockConfig(latency_ms=0, ttft_ms=10, itl_ms=100, capacity=1, reply_tokens=50)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        body = _chat(stream=True)
        async with client.stream("POST", "/chat/completions", json=body,
                                 headers={"X-Request-Id": "gone-1"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # the first chunk is enough: the client goes away
        await _eventually(lambda: mock.stats()["aborted"] == 1)
        await _eventually(lambda: _open(mock) == (0, 0))
        stats = mock.stats()
        assert stats["aborted_ids"] == ["gone-1"] and stats["disconnected"] == 1
        assert stats["served"] == stats["streamed"] == 0
        # The slot is free (asserted above): the next stream starts while the first one's
        # 50 tokens would still be running.
        async with client.stream("POST", "/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
        assert mock.stats()["aborted"] == 1 and mock.stats()["streamed"] == 0


async def test_client_gone_before_a_plain_answer_is_aborted_with_its_id() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=400, capacity=1)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        served = asyncio.create_task(_post(client, **{"X-Request-Id": "in-service"}))
        await _eventually(lambda: _open(mock) == (0, 1))
        waiting = asyncio.create_task(_post(client, **{"X-Request-Id": "waiting"}))
        await _eventually(lambda: _open(mock) == (1, 1))
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await _eventually(lambda: mock.stats()["aborted"] == 1)
        assert (await served).status_code == 200
        stats = mock.stats()
        assert (stats["aborted_ids"], stats["served_ids"]) == (["waiting"], ["in-service"])
        r = await client.post(f"http://127.0.0.1:{mock.port}/stats/reset")
        assert r.json()["aborted"] == 0 and r.json()["aborted_ids"] == []


async def test_request_ids_in_stats_are_capped() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=0, ids_kept=3)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        for i in range(5):
            await _post(client, **{"X-Request-Id": f"r{i}"})
        stats = (await client.get(f"http://127.0.0.1:{mock.port}/stats")).json()
        assert stats["served_ids"] == ["r2", "r3", "r4"] and stats["served"] == 5
        assert stats["ids_kept"] == 3
    assert MockConfig().ids_kept == 1000  # bounded by default
    async with (
        MockBackend(MockConfig(latency_ms=0, ids_kept=0)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        await _post(client, **{"X-Request-Id": "x"})
        assert mock.stats()["served_ids"] == [] and mock.stats()["served"] == 1


async def test_cut_closes_the_connection_mid_stream() -> None:
    config = MockConfig(latency_ms=0, capacity=1, cut_rate=1.0, fault_after_tokens=2)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        seen: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/chat/completions",
                                     json=_chat(stream=True)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen.append(line[6:])
        assert _content([json.loads(data) for data in seen]) == "mock reply"  # 2 tokens
        await _eventually(lambda: _open(mock) == (0, 0))
        stats = mock.stats()
        assert stats["faults"]["cut"] == 1
        assert stats["aborted"] == stats["served"] == 0  # the mock cut it, not the client
        # Stream faults leave plain requests alone.
        assert (await _post(client)).status_code == 200
        # Due after the last token: the finish chunk and [DONE] never come.
        mock.set_faults(cut_rate=1.0, fault_after_tokens=100)
        with pytest.raises(httpx.RemoteProtocolError):
            await _stream(client, _chat(stream=True))
        assert mock.stats()["faults"]["cut"] == 2 and mock.stats()["served"] == 1


async def test_malformed_event_is_not_json() -> None:
    config = MockConfig(latency_ms=0, malformed_rate=1.0, fault_after_tokens=1)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        _, events = await _stream(client, _chat(stream=True))
    assert events[-1] == "[DONE]"
    bad = [i for i, event in enumerate(events) if not _is_json(event)]
    assert bad == [2, len(events) - 1]  # after the role chunk and one token; and [DONE]
    assert mock.stats()["faults"]["malformed"] == 1
    assert mock.stats()["served"] == 0  # a faulted answer is not a served one


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def test_stall_hangs_between_chunks_holding_the_slot() -> None:
    config = MockConfig(latency_ms=0, capacity=1, stall_rate=1.0, hang_s=0.4,
                        fault_after_tokens=1)
    async with (
        MockBackend(config) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        stalled = asyncio.create_task(_timed_events(client, _chat(stream=True)))
        await _eventually(lambda: mock.stats()["faults"]["stalled"] == 1)
        assert _open(mock) == (0, 1)
        timed = await stalled
    tokens = [t for t, data in timed if '"content":"m' in data or '"content":" ' in data]
    assert tokens[1] - tokens[0] >= 0.35  # the stall sat between the first two tokens
    assert timed[-1][1] == "[DONE]" and mock.stats()["served"] == 1


async def test_stall_makes_a_client_time_out_and_stop_drops_it(long_grace: float) -> None:
    config = MockConfig(latency_ms=0, capacity=2, stall_rate=1.0, hang_s=3600)
    mock = MockBackend(config)
    await mock.start()
    try:
        async with httpx.AsyncClient(base_url=mock.base_url, timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await _stream(client, _chat(stream=True), **{"X-Request-Id": "slow"})
            await _eventually(lambda: _open(mock) == (0, 0))
            assert mock.stats()["aborted_ids"] == ["slow"]
        async with httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client:
            stuck = asyncio.create_task(_stream(client, _chat(stream=True)))
            await _eventually(lambda: _open(mock) == (0, 1))
            started = time.monotonic()
            await mock.stop()
            assert time.monotonic() - started < long_grace
            assert isinstance((await asyncio.gather(stuck, return_exceptions=True))[0],
                              httpx.TransportError)
    finally:
        await mock.stop()


async def test_stream_faults_over_http_and_seeded_rates() -> None:
    async with (
        MockBackend(MockConfig(latency_ms=0)) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client,
    ):
        root = f"http://127.0.0.1:{mock.port}"
        r = await client.post(f"{root}/faults", json={"cut_rate": 1, "fault_after_tokens": 0})
        assert r.json() == {**_NO_FAULTS, "cut_rate": 1, "fault_after_tokens": 0}
        with pytest.raises(httpx.RemoteProtocolError):
            await _stream(client, _chat(stream=True))  # headers, then nothing
        r = await client.post(f"{root}/faults", json={"cut_rate": 0.3, "malformed_rate": 0.3,
                                                      "seed": 3})
        outcomes = [await _outcome(client) for _ in range(100)]
        faults = mock.stats()["faults"]
        assert outcomes.count("cut") == faults["cut"] - 1 and 15 <= faults["cut"] <= 50
        assert outcomes.count("malformed") == faults["malformed"]
        assert 15 <= faults["malformed"] <= 50
        assert outcomes.count("ok") == mock.stats()["streamed"]


async def _outcome(client: httpx.AsyncClient) -> str:
    try:
        _, events = await _stream(client, _chat(stream=True))
    except httpx.RemoteProtocolError:
        return "cut"
    return "ok" if all(_is_json(e) for e in events[:-1]) else "malformed"


def test_streaming_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args([]))
    assert (config.ttft_ms, config.itl_ms, config.jitter, config.reply_tokens,
            config.ids_kept) == (None, 0.0, 0.0, None, 1000)
    assert config.first_token_ms == config.latency_ms == 50.0
    config = config_from_args(parser.parse_args([
        "--ttft-ms", "120", "--itl-ms", "15", "--jitter", "0.2", "--seed", "4",
        "--reply-tokens", "64", "--ids-kept", "10"]))
    assert (config.first_token_ms, config.itl_ms, config.jitter, config.seed,
            config.reply_tokens, config.ids_kept) == (120, 15, 0.2, 4, 64, 10)
    assert run_from_args(parser.parse_args(["--jitter", "2"])) == 2
