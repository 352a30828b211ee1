"""A broker restart mid-load: worker and client reconnect by themselves, nothing is lost.

The broker restarted is a local node of the test's own (tests/nodes.py), never the broker
the suite was pointed at.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory
from tests.nodes import LocalNode
from tests.test_replicas import wait_for_holder, worker_processes

pytestmark = pytest.mark.slow


async def consumer_counts(url: str, queues: list[str]) -> list[int]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        counts = []
        for name in queues:
            queue = await channel.declare_queue(name, passive=True)
            counts.append(queue.declaration_result.consumer_count or 0)
        return counts


async def test_broker_restart_mid_load_loses_nothing(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str],
        local_node: LocalNode) -> None:
    async with MockBackend(MockConfig(latency_ms=20, capacity=8)) as mock:
        settings = make_settings([("b1", mock.base_url, 4)], amqp_url=local_node.amqp_url(),
                                 management_url=local_node.management_url)
        names = Names(settings.prefix)
        backend = settings.pools[0].backends[0].name
        await apply_topology(settings)
        async with worker_processes(settings, tmp_path, hutch_env, 1) as workers, \
                HutchClient.from_settings(settings) as client:
            await wait_for_holder(workers, backend)
            watched = [names.work_queue("chat"), names.triage_queue, client.reply_queue_name]
            assert await consumer_counts(settings.amqp_url, watched) == [1, 1, 1]

            async def one(i: int) -> str:
                completion = await client.chat(
                    model="mock-small", timeout=90,
                    messages=[{"role": "user", "content": f"r{i}"}])
                return completion.choices[0].message.content or ""

            tasks = []
            for i in range(300):
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(0.02)
                if i == 80:
                    await asyncio.to_thread(local_node.stop_app)
                    await asyncio.sleep(1)
                    await asyncio.to_thread(local_node.start_app)
            answers = await asyncio.gather(*tasks)
            assert answers == [f"mock reply to: r{i}" for i in range(300)]
            assert client.reconnects >= 1
            # Consumers really are back: the worker's backend consumer and triage
            # consumer, and the client's reply consumer.
            await wait_for_holder(workers, backend)
            assert await consumer_counts(settings.amqp_url, watched) == [1, 1, 1]
            assert workers[0].proc.returncode is None
