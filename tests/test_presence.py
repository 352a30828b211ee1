"""Live workers are counted on their own queue, <prefix>.workers: an operator tool that
consumes the triage queue no longer changes any worker's fair share of the leases."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.errors import TopologyError
from pipeline.worker.presence import FairShare, Presence
from pipeline.worker.worker import Worker
from tests.conftest import SettingsFactory, amqp, running_worker
from tests.test_health import FakeClock
from topology.clients import add_worker_user, worker_permissions


def test_fair_share_is_a_ceiling_and_goes_stale() -> None:
    clock = FakeClock()
    share = FairShare(backends=5, fresh_for_s=12.0, clock=clock)
    assert not share.reached(5)  # never counted: a worker competes for every lease
    assert share.update(workers=2) == 3
    assert not share.reached(2) and share.reached(3)
    assert share.update(workers=0) == 5  # the count includes this worker: at least 1
    clock.now += 12.0
    assert not share.reached(5)  # stale count: it holds nobody back


async def test_presence_counts_joined_workers(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    await apply_topology(settings)
    queue = Names(settings.prefix).workers_queue
    first, second = Presence(queue), Presence(queue)
    async with amqp(settings.amqp_url) as conn_a, amqp(settings.amqp_url) as conn_b:
        channel = await conn_a.channel()
        assert await first.count(channel) == 1  # nobody yet: this worker counts itself
        await first.join(conn_a)
        await second.join(conn_b)
        assert await first.count(channel) == 2
        await second.leave()
        assert await first.count(channel) == 1


async def noop(message: AbstractIncomingMessage) -> None:
    pass


async def test_extra_triage_consumer_does_not_shrink_the_fair_share(
        make_settings: SettingsFactory) -> None:
    """Two backends, one worker: an operator tool on the triage queue leaves the worker
    both leases; a second member of the presence queue (another worker) takes one away,
    and when it leaves the worker takes it back."""
    settings = make_settings([("b1", "http://127.0.0.1:9/v1", 2),
                              ("b2", "http://127.0.0.1:9/v1", 2)], lease_retry_s=0.2)
    names = Names(settings.prefix)
    rebalance_s = 5 * 0.2 * 1.2  # the longest rebalance interval
    await apply_topology(settings)
    async with running_worker(settings) as worker, amqp(settings.amqp_url) as conn:
        assert len(worker.held_backends()) == 2
        tool = await conn.channel()
        triage = await tool.declare_queue(names.triage_queue, passive=True)
        await triage.consume(noop)
        await asyncio.sleep(rebalance_s * 3)
        assert len(worker.held_backends()) == 2, "an extra triage consumer shrank the share"
        other = Presence(names.pool_workers_queue("chat"))
        await other.join(conn)  # what a second worker serving chat does
        async with asyncio.timeout(rebalance_s * 4):
            while len(worker.held_backends()) != 1:
                await asyncio.sleep(0.05)
        await other.leave()
        async with asyncio.timeout(rebalance_s * 6):
            while len(worker.held_backends()) != 2:
                await asyncio.sleep(0.05)


async def test_worker_needs_the_presence_queue(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    await apply_topology(settings)
    queue = Names(settings.prefix).workers_queue
    async with amqp(settings.amqp_url) as conn:
        await (await conn.channel()).queue_delete(queue)
    with pytest.raises(TopologyError, match=rf"{queue}.*hutch topology apply"):
        async with asyncio.timeout(20):
            await Worker(settings).run()


async def test_a_worker_user_without_the_presence_queue_gets_a_clear_error(
        make_settings: SettingsFactory, prefix: str) -> None:
    """A worker user made before the per-pool presence queues existed may not read them:
    the worker says so and stops, rather than reconnecting forever."""
    settings = make_settings()
    await apply_topology(settings)
    user = await add_worker_user(settings, f"{prefix}-old-worker")
    names = Names(settings.prefix)
    now = worker_permissions(names)
    before = now.read.replace("|" + re.escape(names.pool_workers_queue("")) + ".+", "")
    assert before != now.read
    base, admin, password = settings.management_api()
    try:
        async with ManagementAPI(base, admin, password) as api:
            await api.set_permissions(settings.vhost, user.name, configure=now.configure,
                                      write=now.write, read=before)
        worker = Worker(make_settings(amqp_url=user.amqp_url))
        with pytest.raises(TopologyError,
                           match=f"presence queue '{names.pool_workers_queue('chat')}'"):
            async with asyncio.timeout(20):
                await worker.run()
    finally:
        async with httpx.AsyncClient(auth=(admin, password), timeout=10) as http:
            await http.delete(f"{base}/api/users/{user.name}")


def test_the_presence_queue_name() -> None:
    names = Names("acme")
    assert Names().workers_queue == "llm.workers"
    assert not names.workers_queue.startswith(names.work_queue(""))  # no work policy on it
