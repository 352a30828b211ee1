"""Broker resource alarms (issue 21, item 1): a memory alarm blocks every publishing
connection; Hutch fails a client's publish within its bound (``broker_blocked``), the
gateway answers 503 with Retry-After and is not ready, a worker's blocked replies wait
unacked, and everything resumes by itself with nothing accepted lost.

The alarm is raised on a node of the tests' own (tests/nodes.py) by lowering its
``vm_memory_high_watermark`` at run time: never on the broker the suite was pointed at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import BrokerBlockedError
from pipeline.gateway.server import GatewayServer
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory, run_hutch, running_worker, write_config
from tests.gateway_support import KEY_A, keyed, until
from tests.nodes import LocalNode

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "hi"}]


class Alarm:
    """The node's memory alarm, raised and cleared with rabbitmqctl."""

    def __init__(self, node: LocalNode) -> None:
        self.node = node

    async def raise_(self) -> None:
        await asyncio.to_thread(self.node.ctl, "set_vm_memory_high_watermark", "0.0000001")

    async def clear(self) -> None:
        await asyncio.to_thread(self.node.ctl, "set_vm_memory_high_watermark", "0.4")


@pytest.fixture
async def alarm(local_node: LocalNode) -> AsyncIterator[Alarm]:
    """The node's alarm, cleared when the test ends whatever happened."""
    alarm = Alarm(local_node)
    try:
        yield alarm
    finally:
        await alarm.clear()


@contextlib.asynccontextmanager
async def stack(make_settings: SettingsFactory, node: LocalNode, mock: MockConfig,
                **overrides: Any) -> AsyncIterator[tuple[Settings, MockBackend]]:
    """A mock backend and the topology applied on ``node``."""
    async with MockBackend(mock) as backend:
        settings = make_settings([("b1", backend.base_url, mock.capacity)],
                                 amqp_url=node.amqp_url(),
                                 management_url=node.management_url, **overrides)
        await apply_topology(settings)
        yield settings, backend


async def test_a_blocked_publish_fails_within_its_bound_and_resumes(
        make_settings: SettingsFactory, local_node: LocalNode, alarm: Alarm) -> None:
    async with stack(make_settings, local_node, MockConfig(latency_ms=5, capacity=4)) as (
            settings, _), running_worker(settings), \
            HutchClient.from_settings(settings) as client:
        client.set_blocked_timeout(1.0)
        await client.chat(model="mock-small", messages=USER, timeout=30)
        await alarm.raise_()
        started = time.monotonic()
        with pytest.raises(BrokerBlockedError) as first:  # not a hang until the deadline
            await client.chat(model="mock-small", messages=USER, timeout=60)
        first_s = time.monotonic() - started
        # RabbitMQ blocks a connection when it publishes: this publish met the block.
        assert first.value.code == "broker_blocked" and first.value.may_have_gone_out
        assert "low on memory" in first.value.message
        assert client.blocked and not await client.ready()
        started = time.monotonic()
        with pytest.raises(BrokerBlockedError) as second:  # known blocked: nothing sent
            await client.chat(model="mock-small", messages=USER, timeout=60)
        second_s = time.monotonic() - started
        assert not second.value.may_have_gone_out
        await alarm.clear()
        await until(lambda: not client.blocked, timeout=60)
        assert await client.ready()
        completion = await client.chat(model="mock-small", messages=USER, timeout=30)
        assert completion.choices[0].message.content == "mock reply to: hi"
    print(f"\nblocked publish failed after {first_s:.2f}s, the next after {second_s:.2f}s "
          "(bound 1 s)")


async def test_hutch_submit_ends_with_one_line(
        make_settings: SettingsFactory, local_node: LocalNode, alarm: Alarm, tmp_path: Path,
        hutch_env: dict[str, str]) -> None:
    async with stack(make_settings, local_node, MockConfig(latency_ms=5, capacity=4)) as (
            settings, _):
        config = write_config(tmp_path / "hutch.toml", settings)
        await alarm.raise_()
        code, out, err = await run_hutch(
            ["submit", "-c", str(config), "-m", "mock-small", "--timeout", "60", "hi"],
            hutch_env, timeout=60)
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error broker_blocked: the broker blocks publishing"), err
    assert "Traceback" not in err


async def test_the_gateway_answers_503_and_is_not_ready_while_blocked(
        make_settings: SettingsFactory, local_node: LocalNode, alarm: Alarm,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with stack(make_settings, local_node, MockConfig(latency_ms=5, capacity=4),
                     gateway=keyed(monkeypatch, retry_after_s=3)) as (settings, _), \
            running_worker(settings), \
            GatewayServer(settings, host="127.0.0.1", port=0) as gateway, \
            httpx.AsyncClient(base_url=gateway.base_url.removesuffix("/v1"),
                              timeout=60) as http:
        headers = {"Authorization": f"Bearer {KEY_A}"}
        body = {"model": "mock-small", "messages": USER}
        blocked = gateway.metrics.registry.get_sample_value
        assert (await http.post("/v1/chat/completions", json=body, headers=headers)
                ).status_code == 200
        assert blocked("hutch_broker_blocked") == 0
        await alarm.raise_()
        answers = [await http.post("/v1/chat/completions", json=body, headers=headers)
                   for _ in range(3)]
        answers.append(await http.post("/v1/chat/completions", headers=headers,
                                       json={**body, "stream": True}))
        for answer in answers:
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "3"
            assert answer.json()["error"]["code"] == "broker_blocked"
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and "blocks publishing" in ready.text
        assert blocked("hutch_broker_blocked") == 1
        await alarm.clear()
        await until(lambda: blocked("hutch_broker_blocked") == 0, timeout=60)
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.post("/v1/chat/completions", json=body, headers=headers)
                ).status_code == 200


# Its own node's start (a minute on a busy machine) and its waits (60 s to meet the
# alarm, the hold, 240 s for the answers) are more than the suite's 120 s default.
@pytest.mark.timeout(480)
async def test_nothing_accepted_is_lost_across_an_alarm_under_load(
        make_settings: SettingsFactory, local_node: LocalNode, alarm: Alarm) -> None:
    """Requests flow in faster than the backend serves them; a 15 s alarm (or
    ``HUTCH_ALARM_HOLD_S``) blocks
    publishing (the client's requests and the worker's replies); it clears. Every accepted
    request gets exactly one answer, its own, and the backend served each at most once."""
    mock = MockConfig(latency_ms=3000, capacity=8, ids_kept=100_000)  # 8 at the backend
    async with stack(make_settings, local_node, mock) as (settings, backend), \
            running_worker(settings) as worker, \
            HutchClient.from_settings(settings) as client:
        client.set_blocked_timeout(2.0)
        load = Load(client)
        sample = worker.metrics.registry.get_sample_value
        in_flight = {"backend": settings.pools[0].backends[0].name}
        await load.publish(40, pause_s=0.05)
        started = time.monotonic()
        raising = asyncio.create_task(alarm.raise_())
        # Requests served while the alarm holds: their replies wait, unacked at the worker.
        while not (blocked_seen := sample("hutch_broker_blocked") == 1):
            await load.publish(1, pause_s=0.05)
            assert time.monotonic() - started < 60, "the worker never met the alarm"
        assert (sample("hutch_backend_in_flight", in_flight) or 0) > 0
        await raising
        # 15 s of requests, refused broker_blocked (HUTCH_ALARM_HOLD_S: a longer alarm, as
        # the 30 s target asks; the CI run keeps it short).
        hold_s = float(os.environ.get("HUTCH_ALARM_HOLD_S", "15"))
        await load.publish(int(hold_s / 0.05), pause_s=0.05)
        await alarm.clear()
        alarm_s = time.monotonic() - started
        await load.publish(40, pause_s=0.05)
        async with asyncio.timeout(240):
            await asyncio.gather(*load.tasks)
        await until(lambda: sample("hutch_broker_blocked") == 0, timeout=30)
        served = backend.stats()["served_ids"]
    assert blocked_seen and load.refused and load.accepted  # both sides of the bound
    assert {cid: [text] for cid, text in load.accepted.items()} == load.answers
    assert set(load.accepted) <= set(served)
    assert len(served) == len(set(served))  # no request called twice
    print(f"\nalarm held {alarm_s:.1f}s: {len(load.accepted)} accepted (each answered "
          f"once), {len(load.refused)} refused broker_blocked, {len(served)} served")


class Load:
    """Requests published one by one; what was accepted, refused and answered."""

    def __init__(self, client: HutchClient) -> None:
        self.client = client
        self.tasks: list[asyncio.Task[None]] = []
        self.accepted: dict[str, str] = {}
        self.answers: dict[str, list[str]] = {}
        self.refused: list[BrokerBlockedError] = []

    async def publish(self, n: int, pause_s: float) -> None:
        for _ in range(n):
            self.tasks.append(asyncio.create_task(self._one(len(self.tasks))))
            await asyncio.sleep(pause_s)

    async def _one(self, i: int) -> None:
        body = {"model": "mock-small", "messages": [{"role": "user", "content": f"r{i}"}]}
        try:
            correlation_id = await self.client.submit(body, model="mock-small", timeout=240)
        except BrokerBlockedError as exc:
            self.refused.append(exc)
            return
        self.accepted[correlation_id] = f"mock reply to: r{i}"
        reply = await self.client.result(correlation_id)
        self.answers.setdefault(correlation_id, []).append(
            reply.completion.choices[0].message.content or "")
