"""`hutch status` against the real broker and a worker whose metrics are served over HTTP.

The backend is an httpx.MockTransport that holds every call until the test lets it go, so
the in-flight count, the queue behind it and the capacity are known exactly. The
management API refreshes queue counts every few seconds, so the test polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import HutchError, StatusError
from pipeline.observe.metrics import Metrics
from pipeline.ops.status import (
    BackendStatus,
    QueueStatus,
    StatsFreshness,
    StatusReport,
    WorkerStatus,
    format_status,
    metrics_url,
    status,
)
from pipeline.settings import BackendSettings, Settings
from pipeline.worker.pause import pause_pool
from tests.conftest import (
    SettingsFactory,
    amqp,
    queue_depth,
    run_hutch,
    running_worker,
    wait_for,
    write_config,
)

USER = [{"role": "user", "content": "hello"}]


class GatedBackend:
    """Answers every call only once :attr:`gate` is set; counts calls under way."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return httpx.Response(200, json={
            "id": "c1", "object": "chat.completion", "model": "mock-small",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    def factory(self) -> Callable[[BackendSettings], httpx.AsyncBaseTransport]:
        return lambda _settings: httpx.MockTransport(self.handler)


async def _depth_is(channel: AbstractChannel, queue: str, depth: int) -> bool:
    return await queue_depth(channel, queue) == depth


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def served(metrics: Metrics) -> AsyncIterator[str]:
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.close()


async def poll_status(settings: Settings, urls: list[str],
                      done: Callable[[StatusReport], bool], timeout: float = 25
                      ) -> StatusReport:
    """Read the status until ``done`` holds (management API counts lag by seconds)."""
    report = await status(settings, urls)
    try:
        async with asyncio.timeout(timeout):
            while not done(report):
                await asyncio.sleep(0.5)
                report = await status(settings, urls)
    except TimeoutError:
        raise AssertionError(f"status never matched:\n{format_status(report)}") from None
    return report


async def test_status_shows_depth_consumers_in_flight_capacity_and_parked(
        make_settings: SettingsFactory) -> None:
    backend = GatedBackend()
    # No lookahead: the prefetch is exactly the free slots, so the queue's ready and
    # unacked counts are the waiting and the running requests.
    settings = make_settings([("b1", "http://127.0.0.1:9/v1", 2)],
                             pool={"retry_delays_ms": [300],
                                   "scheduling": {"lookahead": 0}})
    names = Names(settings.prefix)
    b1 = settings.pools[0].backends[0].name
    metrics = Metrics()
    await apply_topology(settings)
    async with served(metrics) as url, \
            running_worker(settings, metrics=metrics, transport_factory=backend.factory()), \
            HutchClient.from_settings(settings) as client, amqp(settings.amqp_url) as conn:
        # A request nobody can answer (no reply_to, not JSON): answered by parking it.
        channel = await conn.channel()
        exchange = await channel.get_exchange(names.requests_exchange)
        await exchange.publish(aio_pika.Message(b"not json"), routing_key="mock-small")
        await wait_for(lambda: _depth_is(channel, names.parked_queue, 1))
        pending = [asyncio.create_task(client.chat(model="mock-small", messages=USER,
                                                   timeout=60)) for _ in range(5)]

        def settled(report: StatusReport) -> bool:
            work, b = report.queue("work", "chat"), report.backends[0]
            return (work.ready, work.unacked, work.consumers, report.parked.messages,
                    b.in_flight, b.capacity, report.live_workers) == (3, 2, 1, 1, 2, 2, 1)

        report = await poll_status(settings, [url], settled)
        assert backend.waiting == 2
        work = report.queue("work", "chat")
        assert work.name == names.work_queue("chat") and work.exists and not work.paused
        assert work.messages == 5
        assert work.policy == names.work_policy("chat")
        [status_b1] = report.backends
        assert (status_b1.name, status_b1.pool, status_b1.max_concurrency) == (b1, "chat", 2)
        assert status_b1.holders == [metrics_url(url)]
        assert status_b1.state == "closed"
        assert report.queue("triage").consumers == 1
        assert report.queue("retry").name == names.retry_queue(300)
        assert report.workers == [WorkerStatus(metrics_url(url))]

        text = format_status(report)
        lines = text.splitlines()
        pool_row = next(line for line in lines if line.startswith("chat "))
        # Backlog tokens and wait (columns 7, 8): "-" until the worker's first estimate.
        cells = pool_row.split()
        assert cells[:7] + cells[9:] == ["chat", names.work_queue("chat"), "running", "5",
                                         "3", "2", "1", names.work_policy("chat")]
        backend_row = next(line for line in lines if line.startswith(b1))
        assert backend_row.split() == [b1, "chat", "2", "2", "2", "closed", metrics_url(url)]
        assert f"parking lot {names.parked_queue}: 1 message" in lines
        assert "not read" not in text and "nobody" not in text
        assert f"live workers: 1 (consumers of {names.workers_queue})" in lines
        assert report.missing == [] and "does not exist" not in text
        # The counts are sampled statistics, and the report says so.
        assert "collect_statistics_interval" in lines[-1]

        backend.gate.set()
        await asyncio.gather(*pending)
        report = await poll_status(
            settings, [url], lambda r: r.queue("work", "chat").messages == 0
            and r.backends[0].in_flight == 0)
        assert report.backends[0].capacity == 2
        # As JSON for scripts: plain data.
        assert json.loads(json.dumps(report.as_dict()))["backends"][0]["name"] == b1


async def test_status_of_a_paused_pool_with_an_unreachable_worker(
        make_settings: SettingsFactory) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    await apply_topology(settings)
    await pause_pool(settings, "chat")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    # A queue's counts appear in the management API at its next statistics emission.
    # (the pause state's message count too: 2 once the statistics have it).
    report = await poll_status(settings, [dead],
                               lambda r: r.queue("work", "chat").consumers is not None
                               and r.queue("work", "chat").paused)
    work = report.queue("work", "chat")
    assert work.exists and work.paused and work.consumers == 0
    assert report.workers[0].url == f"http://{dead}/metrics"
    assert report.workers[0].error is not None
    assert report.backends[0].in_flight is None and report.backends[0].holders == []
    text = format_status(report)
    assert f"worker metrics http://{dead}/metrics: not read" in text
    assert next(line for line in text.splitlines()
                if line.startswith("chat ")).split()[2] == "paused"
    # The unread worker may hold the lease: its holder is unknown, not "nobody".
    backend_row = next(line for line in text.splitlines()
                       if line.startswith(settings.pools[0].backends[0].name))
    assert backend_row.split()[-1] == "unknown"
    assert "nobody" not in text
    assert f"parking lot {names.parked_queue}:" in text


async def test_status_without_topology_or_workers(make_settings: SettingsFactory) -> None:
    settings = make_settings()  # nothing applied under this prefix
    report = await status(settings, [])
    assert not report.queue("work", "chat").exists and not report.parked.exists
    assert len(report.missing) == len(report.queues) and report.live_workers is None
    assert report.workers == [] and report.backends[0].in_flight is None
    text = format_status(report)
    assert "run `hutch topology apply`" in text
    assert "pass --metrics URL" in text


async def test_status_command_exits_non_zero_without_the_topology(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    config = str(write_config(tmp_path / "hutch.toml", settings))
    # Nothing applied under this prefix: one line, no table pretending all is well.
    code, out, err = await run_hutch(["status", "-c", config], hutch_env)
    assert code == 1 and out == ""
    assert "no Hutch topology" in err and "hutch topology apply" in err
    assert "Traceback" not in err
    await apply_topology(settings)
    code, out, err = await run_hutch(["status", "-c", config], hutch_env)
    assert code == 0, err
    # Part of it gone: the report, the missing queue named, and a non-zero exit.
    async with amqp(settings.amqp_url) as conn:
        await (await conn.channel()).queue_delete(names.parked_queue)
    code, out, err = await run_hutch(["status", "-c", config], hutch_env)
    assert code == 1 and "Traceback" not in err
    assert f"queue {names.parked_queue} does not exist: run `hutch topology apply`" in out
    assert names.parked_queue in err and "hutch topology apply" in err


async def test_status_names_a_missing_vhost(make_settings: SettingsFactory) -> None:
    settings = make_settings().with_vhost("hutch-no-such-vhost")
    try:
        await status(settings, [])
    except StatusError as exc:
        assert "vhost 'hutch-no-such-vhost' does not exist" in str(exc)
    else:
        raise AssertionError("status must say the vhost does not exist")


async def test_status_fails_clearly_without_the_management_api(
        make_settings: SettingsFactory) -> None:
    settings = make_settings(management_url=f"http://127.0.0.1:{free_port()}")
    try:
        await status(settings, [])
    except HutchError as exc:
        assert "management API" in str(exc) and "not reachable" in str(exc)
    else:
        raise AssertionError("status must fail when the management API is unreachable")


def test_format_status_flags_a_broken_cap_and_an_unserved_backend() -> None:
    report = StatusReport(
        vhost="/",
        queues=[QueueStatus("llm.work.chat", "work", "chat", messages=7, ready=7, unacked=0,
                            consumers=0, policy="llm.work.chat"),
                QueueStatus("llm.triage", "triage", messages=0, consumers=2),
                QueueStatus("llm.parked", "parked", messages=None, consumers=0)],
        backends=[BackendStatus("a", "chat", 4, in_flight=8, capacity=8,
                                holders=["http://w1/metrics", "http://w2/metrics"],
                                state="closed"),
                  BackendStatus("b", "chat", 4, in_flight=0, capacity=0)],
        workers=[WorkerStatus("http://w1/metrics"), WorkerStatus("http://w2/metrics")])
    text = format_status(report)
    assert "backend a: 2 workers report its lease (expected one)" in text
    assert "backend b: no worker holds its lease (nobody serves it)" in text
    assert "parking lot llm.parked: unknown" in text
    rows: dict[str, Any] = {line.split()[0]: line.split() for line in text.splitlines()
                            if line and not line.startswith(("POOL", "BACKEND", "QUEUE"))}
    assert rows["b"][-1] == "nobody"
    assert rows["llm.triage"] == ["llm.triage", "triage", "0", "2"]


def test_format_status_lease_unknown_live_workers_and_stale_statistics() -> None:
    report = StatusReport(
        vhost="/",
        queues=[QueueStatus("llm.work.chat", "work", "chat", messages=0, consumers=1),
                QueueStatus("llm.parked", "parked", messages=0, consumers=0),
                QueueStatus("llm.workers", "workers", messages=0, consumers=3)],
        backends=[BackendStatus("a", "chat", 4, in_flight=0, capacity=0)],
        workers=[WorkerStatus("http://w1/metrics"),
                 WorkerStatus("http://w2/metrics", error="ConnectError: refused")],
        stats=StatsFreshness(event_backlog=120))
    text = format_status(report)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line}
    assert rows["a"][-1] == "unknown"  # w2 was not read: it may hold the lease
    assert "no worker holds its lease" not in text
    assert "live workers: 3 (consumers of llm.workers)" in text
    assert "2 metrics URL(s) given for 3 live worker(s)" in text
    assert "sampled every collect_statistics_interval" in text
    assert "120 events behind" in text
    disabled = format_status(dataclasses_replace(report, stats=StatsFreshness(disabled=True)))
    assert "statistics are disabled" in disabled


def test_metrics_url_forms() -> None:
    assert metrics_url("worker-1:9100") == "http://worker-1:9100/metrics"
    assert metrics_url("http://w:9100") == "http://w:9100/metrics"
    assert metrics_url("http://w:9100/") == "http://w:9100/metrics"
    assert metrics_url("https://w/custom/path") == "https://w/custom/path"
