"""A config reload on the local three-node cluster: two workers on different nodes serve
a quorum pool; both reload (a backend re-capped, one added) under load. Every request is
answered once; the new cap holds; the new backend gets its lease from one of them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.reload import Reloader
from tests.conftest import write_config
from tests.nodes import LocalCluster
from tests.test_cluster import cluster  # noqa: F401  (the shared cluster's fixture)
from tests.test_fleet import fleet, holders
from tests.test_fleet_cluster import fleet_on

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def pool(prefix: str, backends: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    return [{"name": "chat", "models": ["mock-small"], "queue_type": "quorum",
             "backends": [{"name": f"{prefix}-{name}", "url": url, "max_concurrency": cap,
                           "timeout_s": 10} for name, url, cap in backends]}]


async def test_both_workers_reload_on_the_cluster(cluster: LocalCluster,  # noqa: F811
                                                  prefix: str, tmp_path: Path) -> None:
    async with MockBackend(MockConfig(latency_ms=100, capacity=16)) as a, \
            MockBackend(MockConfig(latency_ms=100, capacity=16)) as b:
        before = pool(prefix, [("a", a.base_url, 4)])
        after = pool(prefix, [("a", a.base_url, 2), ("b", b.base_url, 2)])
        first = fleet_on(cluster, prefix, [0, 1, 2], before)
        second = fleet_on(cluster, prefix, [1, 2, 0], before)
        await apply_topology(first)
        configs = [tmp_path / "w0.toml", tmp_path / "w1.toml"]
        for path, settings in zip(configs, (first, second), strict=True):
            write_config(path, settings)
        async with fleet(first, second) as workers, \
                HutchClient.from_settings(first) as client:

            async def load(n: int, tag: str) -> list[Any]:
                return await asyncio.gather(*(client.request(
                    {"model": "mock-small", "messages": [{"role": "user",
                                                          "content": f"{tag}{i}"}]},
                    model="mock-small", timeout=120) for i in range(n)))

            running = asyncio.create_task(load(40, "before"))
            await asyncio.sleep(0.5)
            for path, settings in zip(configs, (first, second), strict=True):
                write_config(path, settings.model_copy(update={
                    "pools": fleet_on(cluster, prefix, [0, 1, 2], after).pools}))
            results = [await Reloader(w, path).reload()
                       for w, path in zip(workers, configs, strict=True)]
            assert [r.result for r in results] == ["applied", "applied"], results
            replies = await running
            a.reset_stats()
            async with asyncio.timeout(60):  # the added backend's lease is taken
                while f"{prefix}-b" not in holders(workers):
                    await asyncio.sleep(0.2)
            replies += await load(40, "after")
            assert a.stats()["max_concurrency"] <= 2  # the new cap, on both workers
            assert b.stats()["served"] > 0  # the added backend serves
            owners = holders(workers)
            assert all(len(idx) == 1 for idx in owners.values()), owners
    assert len(replies) == 80
    assert len({r.correlation_id for r in replies}) == 80
    assert all(r.headers["x-hutch-outcome"] == "ok" for r in replies)
