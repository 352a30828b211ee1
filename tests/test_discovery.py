"""Backends discovered by DNS (pipeline.worker.discovery): replicas from a name's
addresses, each with its own lease and cap, following the name as it changes."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from hutch import HutchClient
from pipeline.broker.topology import apply_topology
from pipeline.runtime.background import running
from pipeline.settings import BackendSettings
from pipeline.worker.config_diff import diff_settings
from pipeline.worker.discovery import Replicas, replica
from pipeline.worker.worker import Worker
from tests.conftest import SettingsFactory, wait_for
from tests.fakes import completion

TEMPLATE = BackendSettings(name="vllm", url="http://vllm.svc:8000/v1", max_concurrency=4,
                           discover="dns", metrics_url="http://vllm.svc:8000/metrics")


def test_a_replica_is_the_template_at_one_address() -> None:
    four = replica(TEMPLATE, "10.1.2.3")
    assert (four.name, four.url, four.metrics_url) == (
        "vllm-10-1-2-3", "http://10.1.2.3:8000/v1", "http://10.1.2.3:8000/metrics")
    assert four.max_concurrency == 4 and four.discover == "none"
    six = replica(TEMPLATE.model_copy(update={"metrics_url": "http://prom:9090/x"}),
                  "fd00::1")
    assert (six.name, six.url, six.metrics_url) == (
        "vllm-fd00--1", "http://[fd00::1]:8000/v1", "http://prom:9090/x")  # other host kept


async def test_replicas_follow_the_name_and_keep_their_set_when_dns_fails() -> None:
    answers: list[list[str] | OSError] = [["10.0.0.1"], ["10.0.0.1", "10.0.0.2"],
                                          OSError("SERVFAIL"), ["10.0.0.2"]]

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("vllm.svc", 8000)
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    replicas = Replicas("chat", TEMPLATE, resolver)
    added, gone = await replicas.refresh()
    assert [r.name for r in added] == ["vllm-10-0-0-1"] and gone == []
    added, gone = await replicas.refresh()
    assert [r.name for r in added] == ["vllm-10-0-0-2"] and gone == []
    assert await replicas.refresh() == ([], [])  # an outage drains nothing
    assert sorted(replicas.current) == ["vllm-10-0-0-1", "vllm-10-0-0-2"]
    added, gone = await replicas.refresh()
    assert added == [] and gone == ["vllm-10-0-0-1"]


def test_a_discovered_backend_changes_with_a_restart(make_settings: SettingsFactory) -> None:
    old = make_settings()
    pool = old.pools[0]
    backend = pool.backends[0].model_copy(update={"discover": "dns"})
    discovered = old.model_copy(update={"pools": [pool.model_copy(
        update={"backends": [backend]})]})
    recapped = discovered.model_copy(update={"pools": [pool.model_copy(update={
        "backends": [backend.model_copy(update={"max_concurrency": 9})]})]})
    diff = diff_settings(discovered, recapped)
    assert diff.backends == () and any("discovered by DNS" in line for line in diff.restart)


@pytest.mark.timeout(90)
async def test_a_worker_serves_each_address_and_drains_one_that_goes(
        make_settings: SettingsFactory) -> None:
    settings = make_settings([("b1", "http://vllm.svc:8000/v1", 2)])
    pool = settings.pools[0]
    template = pool.backends[0].model_copy(update={"discover": "dns",
                                                   "discover_interval_s": 0.2})
    settings = settings.model_copy(update={"pools": [pool.model_copy(
        update={"backends": [template]})]})
    addresses = ["10.0.0.1"]
    hosts: Counter[str] = Counter()

    async def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    async def backend(request: httpx.Request) -> httpx.Response:
        hosts[request.url.host] += 1
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=completion(request.url.host))

    await apply_topology(settings)
    worker = Worker(settings, transport_factory=lambda _: httpx.MockTransport(backend),
                    resolver=resolver)
    one, two = f"{template.name}-10-0-0-1", f"{template.name}-10-0-0-2"

    async def held(names: set[str]) -> bool:
        return set(worker.held_backends()) == names

    async def burst(client: HutchClient, n: int) -> list[str]:
        answers = await asyncio.gather(*(client.chat(
            model="mock-small", messages=[{"role": "user", "content": str(i)}], timeout=30)
            for i in range(n)))
        return [str(a.choices[0].message.content) for a in answers]

    async with running(worker.run(), ready=lambda: set(worker.held_backends()) == {one},
                       stop=worker.stop, stop_timeout_s=20), \
            HutchClient.from_settings(settings) as client:
        assert set(await burst(client, 20)) == {"10.0.0.1"}
        addresses.append("10.0.0.2")  # a pod joined
        await wait_for(lambda: held({one, two}), timeout=20)
        first = await burst(client, 60)
        assert set(first) == {"10.0.0.1", "10.0.0.2"}  # both replicas served
        addresses.remove("10.0.0.1")  # a pod left: it drains
        await wait_for(lambda: held({two}), timeout=30)
        after = await burst(client, 20)
    assert set(after) == {"10.0.0.2"}
    assert sum(hosts.values()) == 100  # every request served once
