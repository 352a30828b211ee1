"""The bench's baseline RPC (hutch_bench.baseline) against the real broker and the mock
backend: it must answer like Hutch's path does, respect its prefetch as the backend cap,
fail fast on a dead backend, stop cleanly on SIGTERM, and be drivable by ``run_load``;
otherwise the overhead comparison would measure a broken baseline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from hutch_bench.baseline import READY_LINE, BaselineClient, BaselineWorker
from hutch_bench.loadgen import LoadPlan, PriorityClass, run_load, schedule
from pipeline.errors import RequestFailed
from pipeline.runtime.background import running
from pipeline.testing.mock import MockBackend, MockConfig

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def chat(content: str) -> dict[str, Any]:
    return {"model": "mock-small", "messages": [{"role": "user", "content": content}]}


async def delete_queue(amqp_url: str, name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


@contextlib.asynccontextmanager
async def worker_running(worker: BaselineWorker) -> AsyncIterator[BaselineWorker]:
    """Run an in-process worker until the block ends; always stopped and awaited."""
    async with running(worker.run(), ready=worker.ready.is_set, stop=worker.stop,
                       ready_timeout_s=10):
        yield worker


async def test_fifty_concurrent_requests_are_answered_within_the_prefetch(
        amqp_url: str, prefix: str) -> None:
    queue, prefetch = f"{prefix}.baseline", 4
    try:
        async with (MockBackend(MockConfig(latency_ms=5, capacity=16)) as mock,
                    worker_running(BaselineWorker(amqp_url, queue, mock.base_url, prefetch)),
                    BaselineClient(amqp_url, queue) as client):
            async def one(i: int) -> bytes:
                cid = await client.submit(chat(f"hello {i}"), model="mock-small",
                                          priority=i % 10, timeout=20)
                return (await client.result(cid)).body

            async with asyncio.timeout(30):
                bodies = await asyncio.gather(*(one(i) for i in range(50)))
            stats = mock.stats()
        for i, body in enumerate(bodies):
            completion = json.loads(body)
            assert completion["object"] == "chat.completion"
            assert completion["choices"][0]["message"]["content"] == f"mock reply to: hello {i}"
        assert stats["served"] == 50
        assert stats["max_in_flight"] == prefetch  # used fully, never exceeded
    finally:
        await delete_queue(amqp_url, queue)


async def test_subprocess_worker_answers_and_finishes_in_flight_work_on_sigterm(
        amqp_url: str, prefix: str) -> None:
    queue = f"{prefix}.baseline"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
    try:
        async with MockBackend(MockConfig(latency_ms=150, capacity=16)) as mock:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hutch_bench.baseline", "--amqp-url", amqp_url,
                "--queue", queue, "--backend-url", mock.base_url, "--prefetch", "8",
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert proc.stdout is not None and proc.stderr is not None
                async with asyncio.timeout(15):
                    line = await proc.stdout.readline()
                assert line.decode().strip() == READY_LINE, (
                    line, (await proc.stderr.read()).decode())
                async with BaselineClient(amqp_url, queue) as client:
                    ids = [await client.submit(chat(f"q{i}"), model="mock-small", timeout=10)
                           for i in range(10)]
                    async with asyncio.timeout(15):
                        replies = [await client.result(cid) for cid in ids]
                    assert [json.loads(r.body)["choices"][0]["message"]["content"]
                            for r in replies] == [f"mock reply to: q{i}" for i in range(10)]
                    # SIGTERM with a full prefetch (8) in flight and 2 more waiting: the 8
                    # are answered, the 2 stay queued, and the process exits 0.
                    ids = [await client.submit(chat(f"r{i}"), model="mock-small", timeout=10)
                           for i in range(10)]
                    async with asyncio.timeout(5):
                        while mock.stats()["in_service"] < 8:
                            await asyncio.sleep(0.005)
                    proc.send_signal(signal.SIGTERM)
                    async with asyncio.timeout(5):
                        _, err = await proc.communicate()
                    assert proc.returncode == 0, err.decode()
                    async with asyncio.timeout(5):
                        late = [await client.result(cid) for cid in ids[:8]]
                    assert len(late) == 8
                connection = await aio_pika.connect(amqp_url)
                async with connection:
                    channel = await connection.channel()
                    left = await channel.declare_queue(queue, passive=True)
                    assert left.declaration_result.message_count == 2
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    finally:
        await delete_queue(amqp_url, queue)


async def test_a_dead_backend_gives_a_coded_failure_not_a_hang(
        amqp_url: str, prefix: str) -> None:
    queue = f"{prefix}.baseline"
    try:
        async with (worker_running(BaselineWorker(amqp_url, queue, "http://127.0.0.1:9/v1", 2,
                                                  timeout_s=5)),
                    BaselineClient(amqp_url, queue) as client):
            cid = await client.submit(chat("anyone?"), model="mock-small", timeout=10)
            async with asyncio.timeout(10):
                with pytest.raises(RequestFailed) as caught:
                    await client.result(cid)
        assert caught.value.code == "backend_error"
        assert "unreachable" in caught.value.message
    finally:
        await delete_queue(amqp_url, queue)


async def test_run_load_drives_the_baseline_client(amqp_url: str, prefix: str) -> None:
    queue = f"{prefix}.baseline"
    times = schedule(100, 0.3)
    plan = LoadPlan(times=times, classes=[PriorityClass("normal", 5, 1.0)] * len(times),
                    models=["mock-small"] * len(times), timeout_s=10)
    try:
        async with (MockBackend(MockConfig(latency_ms=5, capacity=16)) as mock,
                    worker_running(BaselineWorker(amqp_url, queue, mock.base_url, 8)),
                    BaselineClient(amqp_url, queue) as client):
            async with asyncio.timeout(30):
                records, elapsed = await run_load([client], plan)
        assert [r.error for r in records] == [None] * len(times)
        assert all(r.latency_s is not None and r.latency_s > 0 for r in records)
        assert elapsed > 0
    finally:
        await delete_queue(amqp_url, queue)
