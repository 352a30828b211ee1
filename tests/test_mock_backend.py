"""Tests for the mock backend: it must be deterministic and its cap/stats must be trustworthy,
since Hutch's own tests and benchmarks rely on it to prove caps hold."""

from __future__ import annotations

import argparse
import asyncio
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

REPO_ROOT = Path(__file__).resolve().parent.parent


def _chat(content: Any = "hello there", model: str = "mock-small", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def _eventually(check: Callable[[], bool]) -> None:
    """Poll until check() holds; bounded so a broken mock fails instead of hanging."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached within 5 s")


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
        (b'{"model": "mock-small", "messages": [{"content": "hi"}], "stream": true}', "streaming"),
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
        # 6 requests x 200 ms of service: 1.2 slot-seconds busy, 2 slots over >= 0.6 s.
        assert 1.19 <= stats["busy_slot_s"] <= 1.35
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
    "seed": None,
}


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
        assert stats["faults"] == {"failed": 2, "throttled": 0, "hung": 0}
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
        started = time.monotonic()
        r = await _post(client)
        assert time.monotonic() - started < 0.3
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert (await busy).status_code == 200
        stats = mock.stats()
        assert stats["faults"] == {"failed": 0, "throttled": 2, "hung": 0}
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
    config = MockConfig(latency_ms=10, capacity=1, hang_rate=1.0, hang_s=0.3)
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
        assert time.monotonic() - started >= 0.3
        assert r1.json()["choices"][0]["message"]["content"] == "mock reply to: hello there"
        stats = mock.stats()
        assert stats["faults"] == {"failed": 0, "throttled": 0, "hung": 1}
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
        assert r.json()["faults"] == {"failed": 0, "throttled": 0, "hung": 0}
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


async def test_stop_drops_hanging_requests_at_once() -> None:
    config = MockConfig(latency_ms=0, capacity=2, hang_rate=1.0, hang_s=3600)
    mock = MockBackend(config)
    await mock.start()
    try:
        async with httpx.AsyncClient(base_url=mock.base_url, timeout=10) as client:
            hanging = [asyncio.create_task(_post(client)) for _ in range(3)]
            await _eventually(lambda: _open(mock) == (1, 2))
            started = time.monotonic()
            await mock.stop()
            assert time.monotonic() - started < 1.5  # not the 2 s graceful drain, nor 3600 s
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
        "--hang-s", "7", "--seed", "11",
    ])
    assert {name: getattr(args, name) for name in _NO_FAULTS} == {
        "fail_rate": 0.1, "fail_status": 503, "fail_first": 2, "throttle_rate": 0.2,
        "retry_after_s": 0.5, "hang_rate": 0.3, "hang_s": 7.0, "seed": 11,
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
