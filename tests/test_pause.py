"""Pausing a pool: requests wait in its queue, across worker restarts, until resumed.

The state is the message count of ``<prefix>.pause.<pool>`` (1 running, 2+ paused, 0
"cannot tell"): see pipeline/broker/pauses.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aio_pika
import pytest
from aio_pika import Message

from pipeline.broker.names import Names
from pipeline.broker.pauses import state_of
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.observe.metrics import Metrics
from pipeline.ops.pools import pool_states
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend
from pipeline.worker.pause import pause_pool, pool_pause_states, resume_pool
from tests.conftest import (
    SettingsFactory,
    amqp,
    queue_depth,
    run_hutch,
    running_worker,
    write_config,
)


async def test_paused_pool_keeps_requests_queued_until_resumed(
        make_settings: SettingsFactory, mock: MockBackend, tmp_path: Path,
        hutch_env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="hutch.worker")
    settings = make_settings([("b1", mock.base_url, 4)], lease_retry_s=0.2)
    names = Names(settings.prefix)
    backend = settings.pools[0].backends[0].name
    config = str(write_config(tmp_path / "hutch.toml", settings))
    await apply_topology(settings)
    code, out, _ = await run_hutch(["pool", "pause", "-c", config, "chat"], hutch_env)
    assert code == 0 and "paused" in out
    code, out, _ = await run_hutch(["pool", "list", "-c", config], hutch_env)
    assert "paused" in out
    metrics = Metrics()
    async with HutchClient.from_settings(settings) as client, \
            amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        async with running_worker(settings, metrics=metrics):
            # Paused from the start: the backend's consumer never gets a prefetch.
            assert metrics.registry.get_sample_value(
                "hutch_backend_capacity", {"backend": backend}) in (None, 0)
            pending = [asyncio.create_task(client.chat(
                model="mock-small", timeout=60,
                messages=[{"role": "user", "content": f"r{i}"}])) for i in range(10)]
            await asyncio.sleep(1.0)
            assert await queue_depth(channel, names.work_queue("chat")) == 10
            assert mock.stats()["served"] == 0
        # A new worker still sees the pool paused.
        async with running_worker(settings):
            await asyncio.sleep(0.8)
            assert await queue_depth(channel, names.work_queue("chat")) == 10
            code, out, _ = await run_hutch(["pool", "resume", "-c", config, "chat"], hutch_env)
            assert code == 0 and out.strip() == "pool 'chat' resumed"
            done = await asyncio.gather(*pending)
            [resumed] = [r for r in caplog.records if r.getMessage() == "pool.resumed"]
            assert resumed.levelname == "INFO"  # the normal way back, not a warning
    code, out, _ = await run_hutch(["pool", "resume", "-c", config, "chat"], hutch_env)
    assert code == 0 and out.strip() == "pool 'chat' was not paused: nothing to resume"
    assert [c.choices[0].message.content for c in done] == [
        f"mock reply to: r{i}" for i in range(10)]
    code, _, err = await run_hutch(["pool", "pause", "-c", config, "nope"], hutch_env)
    assert code == 2 and "no pool named 'nope'" in err


async def test_pool_commands_refuse_a_pool_without_its_queue(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    """Without the topology, `pool list|pause|resume` say so and exit 1; nothing is made."""
    settings = make_settings()  # nothing applied under this prefix
    names = Names(settings.prefix)
    config = str(write_config(tmp_path / "hutch.toml", settings))
    code, out, err = await run_hutch(["pool", "list", "-c", config], hutch_env)
    assert code == 1 and "Traceback" not in err
    assert out.split()[:2] == ["chat", "missing"]  # not "running"
    assert names.work_queue("chat") in err and "hutch topology apply" in err
    for action in ("pause", "resume"):
        code, out, err = await run_hutch(["pool", action, "-c", config, "chat"], hutch_env)
        assert (code, out) == (1, ""), err
        assert "topology is missing" in err and "hutch topology apply" in err
    # The refused pause created no state for a pool the broker does not have.
    async with amqp(settings.amqp_url) as conn:
        assert await pool_pause_states(conn, names, ["chat"]) == {"chat": None}


async def state_messages(settings: Settings) -> int:
    async with amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        return await queue_depth(channel, Names(settings.prefix).pause_state_queue("chat"))


async def test_pause_and_resume_are_idempotent_counts(make_settings: SettingsFactory) -> None:
    """apply puts the floor (1: running); pause makes it 2, resume 1 again, however
    often each runs; the legacy flag is never made."""
    settings = make_settings()
    await apply_topology(settings)
    assert await state_messages(settings) == 1
    for _ in range(2):
        await pause_pool(settings, "chat")
        assert await state_messages(settings) == 2
    for _ in range(2):
        await resume_pool(settings, "chat")
        assert await state_messages(settings) == 1
    await pause_pool(settings, "chat")
    await pause_pool(settings, "chat")
    assert [s.state for s in await pool_states(settings)] == ["paused"]
    async with amqp(settings.amqp_url) as conn:  # an operator in the UI: more messages
        channel = await conn.channel()
        queue = Names(settings.prefix).pause_state_queue("chat")
        await channel.default_exchange.publish(Message(b"pause"), routing_key=queue)
        await asyncio.sleep(0.1)
    assert await state_messages(settings) == 3
    await resume_pool(settings, "chat")
    assert await state_messages(settings) == 1
    assert [s.state for s in await pool_states(settings)] == ["running"]
    assert [state_of(n) for n in (0, 1, 2, 5)] == [None, False, True, True]


async def test_the_old_pause_flag_becomes_the_pause_state(
        make_settings: SettingsFactory) -> None:
    """A pool paused by an earlier Hutch (the queue <prefix>.paused.<pool>) stays paused
    through `topology apply`, which turns the flag into the state and deletes it."""
    settings = make_settings()
    names = Names(settings.prefix)
    async with amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        await channel.declare_queue(names.pause_queue("chat"), durable=True,
                                    arguments={"x-queue-type": "classic"})
    report = await apply_topology(settings)
    assert any(names.pause_queue("chat") in line for line in report.pauses), report.pauses
    assert await state_messages(settings) == 2
    async with amqp(settings.amqp_url) as conn:
        assert await pool_pause_states(conn, names, ["chat"]) == {"chat": True}
        channel = await conn.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(names.pause_queue("chat"), passive=True)
    second = await apply_topology(settings)  # nothing left to migrate
    assert second.pauses == [] and await state_messages(settings) == 2


async def test_a_state_that_cannot_be_read_keeps_the_last_known(
        make_settings: SettingsFactory, mock: MockBackend,
        caplog: pytest.LogCaptureFixture) -> None:
    """A read of 0 messages (what a quorum queue without a leader answers; here the floor
    purged away) is "cannot tell": the worker stays paused and says so once; a state it
    can read again is followed."""
    caplog.set_level(logging.INFO, logger="hutch.worker")
    settings = make_settings([("b1", mock.base_url, 4)], lease_retry_s=0.2)
    names = Names(settings.prefix)
    await apply_topology(settings)
    await pause_pool(settings, "chat")
    async with running_worker(settings) as worker, \
            HutchClient.from_settings(settings) as client, amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        await (await channel.declare_queue(names.pause_state_queue("chat"),
                                           passive=True)).purge()
        pending = asyncio.create_task(client.chat(
            model="mock-small", timeout=60, messages=[{"role": "user", "content": "x"}]))
        await asyncio.sleep(2.0)  # five polls
        assert mock.stats()["served"] == 0 and worker.held_backends()
        unreadable = [r for r in caplog.records if r.getMessage() == "pause.state_unreadable"]
        assert len(unreadable) == 1
        assert unreadable[0].fields["keeping"] == "paused"  # type: ignore[attr-defined]
        assert [s.state for s in await pool_states(settings)] == ["unknown"]
        await resume_pool(settings, "chat")  # puts the floor back: running
        reply = await pending
    assert reply.choices[0].message.content == "mock reply to: x"
    assert "pause.state_readable" in [r.getMessage() for r in caplog.records]
