"""Worker processes: the backend cap holds across replicas, takeover, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from pipeline.broker.topology import apply_topology
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import HUTCH, SettingsFactory, write_config

pytestmark = pytest.mark.slow

N = 600  # requests in the kill -9 test; at least 500 are in flight at the kill


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class WorkerProcess:
    """A `hutch worker` subprocess with its own metrics port."""

    def __init__(self, proc: asyncio.subprocess.Process, metrics_port: int) -> None:
        self.proc = proc
        self.metrics_port = metrics_port

    async def holds(self, backend: str) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                text = (await http.get(f"http://127.0.0.1:{self.metrics_port}/metrics")).text
        except httpx.HTTPError:
            return False
        match = re.search(
            rf'hutch_backend_lease_held{{backend="{re.escape(backend)}"}} (\S+)', text)
        return bool(match and float(match.group(1)) == 1.0)


@contextlib.asynccontextmanager
async def worker_processes(settings: Settings, tmp_path: Path, env: dict[str, str], n: int
                           ) -> AsyncIterator[list[WorkerProcess]]:
    config = write_config(tmp_path / "hutch.toml", settings)
    workers: list[WorkerProcess] = []
    try:
        for _ in range(n):
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                *HUTCH, "worker", "--config", str(config), "--metrics-port", str(port),
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            workers.append(WorkerProcess(proc, port))
        yield workers
    finally:
        for worker in workers:
            if worker.proc.returncode is None:
                worker.proc.kill()
            await worker.proc.wait()


async def holders(workers: list[WorkerProcess], backend: str) -> list[WorkerProcess]:
    alive = [w for w in workers if w.proc.returncode is None]
    held = await asyncio.gather(*(w.holds(backend) for w in alive))
    return [w for w, h in zip(alive, held, strict=True) if h]


async def wait_for_holder(workers: list[WorkerProcess], backend: str,
                          timeout: float = 20) -> WorkerProcess:
    async with asyncio.timeout(timeout):
        while True:
            found = await holders(workers, backend)
            if found:
                assert len(found) == 1, "two workers hold the same lease"
                return found[0]
            await asyncio.sleep(0.1)


async def test_cap_holds_across_three_workers_and_survives_kill(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    """Three workers, one backend capped at 4: the backend never sees more than 4 at once,
    and when the worker serving it is killed (-9) another takes over and every request is
    answered exactly once."""
    from pipeline.client.client import HutchClient

    # The mock could serve 100 at once: only Hutch's cap limits what it sees.
    async with MockBackend(MockConfig(latency_ms=50, capacity=100)) as mock:
        settings = make_settings([("b1", mock.base_url, 4)])
        backend = settings.pools[0].backends[0].name
        await apply_topology(settings)
        async with worker_processes(settings, tmp_path, hutch_env, 3) as workers, \
                HutchClient.from_settings(settings) as client:
            first = await wait_for_holder(workers, backend)
            requests = [asyncio.create_task(client.chat(
                model="mock-small", timeout=90,
                messages=[{"role": "user", "content": f"r{i}"}])) for i in range(N)]
            async with asyncio.timeout(30):
                while mock.stats()["served"] < 60:
                    await asyncio.sleep(0.02)
            in_flight = N - sum(task.done() for task in requests)
            assert in_flight >= 500
            first.proc.kill()  # SIGKILL, mid-load, with 4 requests in its hands
            await first.proc.wait()
            second = await wait_for_holder(workers, backend, timeout=15)
            assert second is not first
            completions = await asyncio.gather(*requests)
        stats = mock.stats()
    assert [c.choices[0].message.content for c in completions] == [
        f"mock reply to: r{i}" for i in range(N)]
    assert stats["max_in_flight"] <= 4, stats
    assert stats["max_concurrency"] == 4  # the cap was reached, and never passed
    # Requests the killed worker held were served again by its successor: the client
    # dropped any second reply, each caller saw one.
    assert stats["served"] >= N
    print(f"kill -9 mid-load: {N} sent, {in_flight} in flight at the kill, {N} answered "
          f"once each, {client.dropped_replies} duplicate replies dropped, "
          f"{stats['served'] - N} requests served twice")


async def test_sigterm_finishes_in_flight_requests_then_exits(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    from pipeline.client.client import HutchClient

    async with MockBackend(MockConfig(latency_ms=800, capacity=4)) as mock:
        settings = make_settings([("b1", mock.base_url, 4)])
        backend = settings.pools[0].backends[0].name
        await apply_topology(settings)
        async with worker_processes(settings, tmp_path, hutch_env, 1) as workers, \
                HutchClient.from_settings(settings) as client:
            await wait_for_holder(workers, backend)
            requests = [asyncio.create_task(client.chat(
                model="mock-small", timeout=30,
                messages=[{"role": "user", "content": f"r{i}"}])) for i in range(4)]
            async with asyncio.timeout(10):
                while mock.stats()["in_service"] < 4:
                    await asyncio.sleep(0.02)
            workers[0].proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                code = await workers[0].proc.wait()
            completions = await asyncio.gather(*requests)
    assert code == 0
    assert [c.choices[0].message.content for c in completions] == [
        f"mock reply to: r{i}" for i in range(4)]
    assert mock.stats()["served"] == 4  # finished by the draining worker, not redelivered


async def test_leases_spread_over_replicas(make_settings: SettingsFactory, tmp_path: Path,
                                           hutch_env: dict[str, str]) -> None:
    """Four backends, two workers started one after the other: the first takes all four
    leases, then gives two up to the second (and the cap holds throughout)."""
    from pipeline.client.client import HutchClient

    async with MockBackend(MockConfig(latency_ms=20, capacity=100)) as mock:
        settings = make_settings([(f"b{i}", mock.base_url, 2) for i in range(4)],
                                 lease_retry_s=0.3)
        names = [b.name for b in settings.pools[0].backends]
        await apply_topology(settings)
        async with worker_processes(settings, tmp_path, hutch_env, 1) as first:
            async with asyncio.timeout(15):
                while len(await held_by(first[0], names)) < 4:
                    await asyncio.sleep(0.1)
            async with worker_processes(settings, tmp_path, hutch_env, 1) as second, \
                    HutchClient.from_settings(settings) as client:
                load = [asyncio.create_task(client.chat(
                    model="mock-small", timeout=60,
                    messages=[{"role": "user", "content": f"r{i}"}])) for i in range(400)]
                async with asyncio.timeout(30):
                    while True:
                        a = await held_by(first[0], names)
                        b = await held_by(second[0], names)
                        if len(a) == 2 and len(b) == 2:
                            break
                        await asyncio.sleep(0.2)
                assert not set(a) & set(b)
                await asyncio.gather(*load)
    assert mock.stats()["max_in_flight"] <= 4 * 2


async def held_by(worker: WorkerProcess, backends: list[str]) -> list[str]:
    held = await asyncio.gather(*(worker.holds(name) for name in backends))
    return [name for name, h in zip(backends, held, strict=True) if h]
