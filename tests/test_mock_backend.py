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

from pipeline.mock_backend import MockBackend, MockConfig, add_arguments, run_from_args

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
        assert stats == mock.stats()
        assert stats["served"] == 6
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
    assert fresh == mock.stats()
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
        "pipeline.mock_backend",
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
