"""Worker layouts: workers per pool, mixed pool lists, one worker for everything. Every
backend of every pool has a holder whenever a live worker serves its pool, and leases
move only between workers of the same pool (presence and fair share per pool)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.settings import Settings
from pipeline.worker.presence import Presence
from pipeline.worker.worker import Worker
from tests.conftest import SettingsFactory, amqp

#: Backends per pool of the tests' fleet.
POOLS = {"chat": 2, "tq": 1, "tc": 1}
RETRY_S = 0.2
REBALANCE_S = RETRY_S * 5 * 1.2  # the longest rebalance interval


def pools_of(prefix: str, names: list[str]) -> list[dict[str, Any]]:
    """The pools ``names`` of the fleet (the same backends whoever serves them)."""
    return [{"name": pool, "models": [f"m-{pool}"],
             "backends": [{"name": f"{prefix}-{pool}{i}", "url": "http://127.0.0.1:9/v1",
                           "max_concurrency": 2, "timeout_s": 10}
                          for i in range(POOLS[pool])]} for pool in names]


def fleet_settings(make_settings: SettingsFactory, prefix: str, *layouts: list[str]
                   ) -> list[Settings]:
    return [make_settings(pools=pools_of(prefix, layout), lease_retry_s=RETRY_S)
            for layout in layouts]


@contextlib.asynccontextmanager
async def fleet(*settings: Settings) -> AsyncIterator[list[Worker]]:
    """In-process workers, one per settings, stopped when the block ends."""
    started = [Worker(s) for s in settings]
    tasks = [asyncio.create_task(w.run()) for w in started]
    try:
        async with asyncio.timeout(30):
            for worker in started:
                await worker.ready.wait()
        yield started
    finally:
        for worker in started:
            worker.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


def holders(workers: list[Worker]) -> dict[str, list[int]]:
    """Backend -> the indexes of the workers holding its lease."""
    out: dict[str, list[int]] = {}
    for i, worker in enumerate(workers):
        for backend in worker.held_backends():
            out.setdefault(backend, []).append(i)
    return out


def all_backends(prefix: str) -> set[str]:
    return {b["name"] for pool in pools_of(prefix, list(POOLS)) for b in pool["backends"]}


def balanced(workers: list[Worker], prefix: str) -> bool:
    """Every backend held once, and per pool nobody above its share."""
    held = holders(workers)
    if set(held) != all_backends(prefix) or any(len(h) != 1 for h in held.values()):
        return False
    for pool, count in POOLS.items():
        serving = [w for w in workers if any(p.name == pool for p in w.settings.pools)]
        share = math.ceil(count / len(serving))
        for worker in serving:
            mine = [b for b in worker.held_backends() if b.startswith(f"{prefix}-{pool}")]
            if len(mine) > share:
                return False
    return True


async def until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


async def always(condition: Callable[[], bool], seconds: float) -> None:
    """``condition`` holds at every check (each 50 ms) for ``seconds``."""
    for _ in range(int(seconds / 0.05)):
        assert condition(), "the condition stopped holding"
        await asyncio.sleep(0.05)


async def test_workers_per_pool_strand_no_backend(
        make_settings: SettingsFactory, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The issue's layout: X serves chat, Y serves tq and tc. Y's share of each of its
    pools is the whole pool: it holds both leases and never gives one up."""
    caplog.set_level(logging.INFO, logger="hutch.worker")
    x, y = fleet_settings(make_settings, prefix, ["chat"], ["tq", "tc"])
    await apply_topology(make_settings(pools=pools_of(prefix, list(POOLS))))
    async with fleet(x, y) as workers:
        await until(lambda: balanced(workers, prefix), 20)
        await always(lambda: balanced(workers, prefix), REBALANCE_S * 4)
        assert sorted(workers[1].held_backends()) == [f"{prefix}-tc0", f"{prefix}-tq0"]
    assert "lease.rebalance" not in [r.getMessage() for r in caplog.records]


async def test_mixed_pool_lists_share_each_pool_among_its_workers(
        make_settings: SettingsFactory, prefix: str) -> None:
    """X serves chat and tq, Y tq and tc, Z chat: chat's two backends split between X
    and Z, tq goes to X or Y, tc to Y; Z leaving gives X both chat backends."""
    x, y, z = fleet_settings(make_settings, prefix, ["chat", "tq"], ["tq", "tc"], ["chat"])
    await apply_topology(make_settings(pools=pools_of(prefix, list(POOLS))))
    async with fleet(x, y) as first:
        await until(lambda: balanced(first, prefix), 20)
        async with fleet(z) as (third,):
            workers = [*first, third]
            await until(lambda: balanced(workers, prefix)
                        and len(third.held_backends()) == 1, REBALANCE_S * 10)
            await asyncio.sleep(REBALANCE_S * 3)
            await until(lambda: balanced(workers, prefix), REBALANCE_S * 6)
        await until(lambda: balanced(first, prefix)
                    and len([b for b in first[0].held_backends() if "-chat" in b]) == 2,
                    REBALANCE_S * 10)


async def test_one_worker_for_everything_then_two(
        make_settings: SettingsFactory, prefix: str) -> None:
    """One worker serving every pool holds every lease; a second one like it takes half
    of chat (its only pool with more than one backend) and nothing stays unheld."""
    a, b = fleet_settings(make_settings, prefix, list(POOLS), list(POOLS))
    await apply_topology(a)
    async with fleet(a) as first:
        await until(lambda: balanced(first, prefix), 20)
        assert len(first[0].held_backends()) == 4
        async with fleet(b) as (second,):
            workers = [*first, second]
            await until(lambda: balanced(workers, prefix) and bool(second.held_backends()),
                        REBALANCE_S * 10)
            await asyncio.sleep(REBALANCE_S * 3)
            await until(lambda: balanced(workers, prefix), REBALANCE_S * 6)


async def test_pool_presence_counts_only_the_pools_workers(
        make_settings: SettingsFactory, prefix: str) -> None:
    """<prefix>.workers.<pool> has one consumer per live worker serving the pool; the
    all-workers queue <prefix>.workers counts everyone (for `hutch status`)."""
    x, y = fleet_settings(make_settings, prefix, ["chat"], ["chat", "tq"])
    await apply_topology(make_settings(pools=pools_of(prefix, list(POOLS))))
    names = Names(prefix)
    async with fleet(x, y), amqp(x.amqp_url) as conn:
        channel = await conn.channel()
        counts = {queue: await Presence(queue).count(channel) for queue in (
            names.workers_queue, names.pool_workers_queue("chat"),
            names.pool_workers_queue("tq"))}
        tc = await channel.declare_queue(names.pool_workers_queue("tc"), passive=True)
    assert counts == {names.workers_queue: 2, names.pool_workers_queue("chat"): 2,
                      names.pool_workers_queue("tq"): 1}
    assert tc.declaration_result.consumer_count == 0
