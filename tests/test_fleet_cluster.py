"""A fleet on the local three-node cluster (tests/test_cluster.py's, shared by the
session): leases per pool, a pause that survives the loss of its queue's leader's node,
and a worker that starts while a classic pool's node is down.

Each test checks its pools' state through nodes it does not kill; the node log of the
node the worker uses must show no channel error for this test's queues.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import PauseStateError
from pipeline.ops.pools import pool_states
from pipeline.settings import Settings, load_settings
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.pause import pause_pool, resume_pool
from tests.conftest import run_hutch, write_config
from tests.nodes import NODES_DIR, LocalCluster, LocalNode
from tests.test_cluster import VHOST, cluster, leader_of, others, restore  # noqa: F401
from tests.test_fleet import POOLS, always, balanced, fleet, pools_of, until

#: Killing a node and starting it again takes a minute or more on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def fleet_on(cluster: LocalCluster, prefix: str, order: list[int],  # noqa: F811
             pools: list[dict[str, Any]]) -> Settings:
    """Settings whose first node is ``order[0]``."""
    return load_settings(
        amqp_url=cluster.urls(VHOST, order), management_url=cluster.nodes[order[0]]
        .management_url, prefix=prefix, lease_retry_s=0.2, shutdown_grace_s=5,
        heartbeat_s=5, reply_queue_type="quorum", pools=pools)


def quorum(pools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**pool, "queue_type": "quorum"} for pool in pools]


def one_pool(name: str, model: str, url: str, prefix: str, queue_type: str
             ) -> dict[str, Any]:
    return {"name": name, "models": [model], "queue_type": queue_type,
            "backends": [{"name": f"{prefix}-{name}", "url": url, "max_concurrency": 4,
                          "timeout_s": 10}]}


def channel_errors(node: LocalNode, prefix: str) -> list[str]:
    """The node's log lines of channel errors about this test's queues, but for the
    leases (taking a lease someone holds is a RESOURCE_LOCKED by design)."""
    lines = []
    for log in (NODES_DIR / node.name / "log").glob("*.log"):
        lines += [line for line in Path(log).read_text(errors="replace").splitlines()
                  if "channel exception" in line and f"'{prefix}." in line
                  and f"'{prefix}.lease." not in line]
    return lines


async def ask(client: HutchClient, model: str, n: int, tag: str) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(client.chat(
        model=model, timeout=120, messages=[{"role": "user", "content": f"{tag}{i}"}]))
        for i in range(n)]


async def test_leases_per_pool_on_the_cluster(cluster: LocalCluster,  # noqa: F811
                                              prefix: str) -> None:
    """Quorum pools; X serves chat (node 0), Y tq and tc (node 1), Z all three (node 2):
    every backend held, each pool shared among its own workers only, and no worker's
    polling costs a channel error (presence and pause reads are passive declares of
    queues that exist)."""
    every = quorum(pools_of(prefix, list(POOLS)))
    layouts = [(["chat"], [0, 1, 2]), (["tq", "tc"], [1, 2, 0]), (list(POOLS), [2, 0, 1])]
    settings = [fleet_on(cluster, prefix, order, [p for p in every if p["name"] in mine])
                for mine, order in layouts]
    await apply_topology(fleet_on(cluster, prefix, [0, 1, 2], every))
    async with fleet(*settings) as workers:
        await until(lambda: balanced(workers, prefix), 30)
        await always(lambda: balanced(workers, prefix), 3.0)
    for node in cluster.nodes:
        assert channel_errors(node, prefix) == []


async def test_a_pause_survives_the_loss_of_its_leaders_node(
        cluster: LocalCluster, prefix: str, restore: None,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """A quorum pool paused; the node leading its pause state queue is killed: the
    worker (on another node) serves nothing, `pool list` never says running, and
    `pool resume` works with the node still down."""
    caplog.set_level(logging.INFO, logger="hutch.worker")
    async with MockBackend(MockConfig(latency_ms=5, capacity=100)) as mock:
        pools = [one_pool("chat", "mock-small", mock.base_url, prefix, "quorum")]
        base = fleet_on(cluster, prefix, [0, 1, 2], pools)
        await apply_topology(base)
        victim = await leader_of(base, cluster, Names(prefix).pause_state_queue("chat"))
        a, b = others(victim)
        at_a = fleet_on(cluster, prefix, [a, b], pools)
        at_b = fleet_on(cluster, prefix, [b, a], pools)
        await pause_pool(at_b, "chat")
        async with fleet(at_a) as (worker,), HutchClient.from_settings(at_b) as client:
            await until(lambda: bool(worker.held_backends()), 30)
            pending = await ask(client, "mock-small", 20, "p")
            await asyncio.sleep(1.0)
            await asyncio.to_thread(cluster.nodes[victim].kill)
            killed_at = time.monotonic()
            seen = set()
            while time.monotonic() - killed_at < 4.0:
                seen |= {state.state for state in await pool_states(at_b)}
                assert mock.stats()["served"] == 0
                await asyncio.sleep(0.2)
            assert seen <= {"paused", "unknown"} and "paused" in seen, seen
            resumed_at = time.monotonic()
            await resume_pool(at_b, "chat")  # the leader's node still down
            answers = await asyncio.wait_for(asyncio.gather(*pending), 120)
            answered_in = time.monotonic() - resumed_at
    assert len(answers) == 20 and mock.stats()["served"] >= 20
    events = [r.getMessage() for r in caplog.records]
    print(f"\npause state leader's node killed: `pool list` said {sorted(seen)} for 4 s, "
          f"0 served; the worker logged pause.state_unreadable "
          f"{events.count('pause.state_unreadable')} time(s); resumed with the node down: "
          f"20 answered {answered_in:.1f} s later")
    assert events.count("pool.paused") == 1 and events.count("pool.resumed") == 1
    assert channel_errors(cluster.nodes[a], prefix) == []


async def test_worker_starts_while_a_classic_pools_node_is_down(
        cluster: LocalCluster, prefix: str, restore: None,  # noqa: F811
        caplog: pytest.LogCaptureFixture, tmp_path: Path, hutch_env: dict[str, str]
        ) -> None:
    """Pool chat is quorum, pool batch classic, declared through node 1 (its queues live
    there). With node 1 killed a worker starts on node 0: it says batch's queues are
    unavailable and serves chat (it does not exit with "run apply"); `pool list` says
    batch is unknown and `pool resume batch` fails in one line; with node 1 back the
    batch requests queued before are answered."""
    caplog.set_level(logging.INFO, logger="hutch.worker")
    async with MockBackend(MockConfig(latency_ms=5, capacity=100)) as mock:
        pools = [one_pool("chat", "mock-small", mock.base_url, prefix, "quorum"),
                 one_pool("batch", "mock-large", mock.base_url, prefix, "classic")]
        home = fleet_on(cluster, prefix, [1, 0, 2], pools)
        elsewhere = fleet_on(cluster, prefix, [0, 2], pools)
        await apply_topology(home)
        async with HutchClient.from_settings(fleet_on(cluster, prefix, [2, 0], pools)
                                             ) as client:
            batch = await ask(client, "mock-large", 10, "b")
            await asyncio.sleep(0.5)
            await asyncio.to_thread(cluster.nodes[1].kill)
            async with fleet(elsewhere):
                chat = await asyncio.wait_for(asyncio.gather(*await ask(
                    client, "mock-small", 5, "c")), 60)
                states = {s.name: s.state for s in await pool_states(elsewhere)}
                with pytest.raises(PauseStateError, match="cannot resume pool 'batch'"):
                    await resume_pool(elsewhere, "batch")
                config = str(write_config(tmp_path / "hutch.toml", elsewhere))
                listed = await run_hutch(["pool", "list", "-c", config], hutch_env)
                resumed = await run_hutch(["pool", "resume", "-c", config, "batch"], hutch_env)
                assert not any(task.done() for task in batch)
                await asyncio.to_thread(cluster.nodes[1].start_again)
                answers = await asyncio.wait_for(asyncio.gather(*batch), 120)
    assert [c.choices[0].message.content for c in chat] == [
        f"mock reply to: c{i}" for i in range(5)]
    assert sorted(c.choices[0].message.content or "" for c in answers) == sorted(
        f"mock reply to: b{i}" for i in range(10))
    assert states == {"chat": "running", "batch": "unknown"}
    assert listed[0] == 0 and "batch" in listed[2] and "Traceback" not in listed[2]
    assert [line.split()[:2] for line in listed[1].splitlines()] == [
        ["chat", "running"], ["batch", "unknown"]]
    assert resumed[0] == 1 and len(resumed[2].strip().splitlines()) == 1, resumed
    assert "cannot resume pool 'batch' now" in resumed[2] and "is down" in resumed[2]
    print(f"\nclassic pool's node down at worker start: `pool resume batch`: {resumed[2]}")
    unavailable = [r for r in caplog.records if r.getMessage() == "worker.queue_unavailable"]
    assert Names(prefix).work_queue("batch") in {
        r.fields["queue"] for r in unavailable}  # type: ignore[attr-defined]
