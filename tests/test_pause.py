"""Pausing a pool: requests wait in its queue, across worker restarts, until resumed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.observe.metrics import Metrics
from pipeline.testing.mock import MockBackend
from pipeline.worker.pause import is_paused
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
    # The refused pause created no flag for a pool the broker does not have.
    async with amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        assert not await is_paused(channel, names, "chat")
