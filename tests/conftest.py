"""Fixtures: a real RabbitMQ, a vhost of our own, and ways to run Hutch against it.

The broker is found in this order: ``HUTCH_AMQP_URL``; the local broker on 127.0.0.1:5672
if it answers; a testcontainers RabbitMQ if Docker works. Otherwise the run fails and says
how to start one: integration tests are never skipped silently.

The test session works in a vhost of its own (deleted at the end) and every test in a
prefix of its own, so tests do not see each other's queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.runtime.background import running
from pipeline.settings import Settings, dump_toml, load_settings
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.worker import Worker
from tests.nodes import local_cluster, local_node, node_factory  # noqa: F401  (fixtures)

_HOW_TO_START = (
    "No RabbitMQ for the integration tests. Start one: `rabbitmq-server -detached` and "
    "`rabbitmq-plugins enable rabbitmq_management` (or `docker compose up -d rabbitmq`), "
    "or point HUTCH_AMQP_URL at a broker with the management plugin."
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that reaches the broker through its fixtures ``broker``, so the
    unit tests are ``-m "not broker"`` (the CI's lowest-versions step) without a list to
    keep up to date: ``broker_url`` is at the root of every broker fixture."""
    for item in items:
        if {"broker_url", "node_factory"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The base AMQP URL (default vhost) of a running broker with the management API."""
    if os.environ.get("HUTCH_AMQP_URL"):
        yield os.environ["HUTCH_AMQP_URL"]
        return
    if _port_open("127.0.0.1", 5672):
        yield "amqp://guest:guest@127.0.0.1:5672/"
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-management")
        container.with_exposed_ports(5672, 15672)
        container.start()
    except Exception as exc:
        pytest.fail(f"{_HOW_TO_START} (testcontainers could not start one: {exc!r})")
    try:
        host = container.get_container_host_ip()
        amqp_port = container.get_exposed_port(5672)
        mgmt_port = container.get_exposed_port(15672)
        os.environ["HUTCH_MANAGEMENT_URL"] = f"http://{host}:{mgmt_port}"
        yield f"amqp://guest:guest@{host}:{amqp_port}/"
    finally:
        container.stop()


def _management(broker_url: str) -> tuple[str, tuple[str, str]]:
    base, user, password = load_settings(amqp_url=broker_url).management_api()
    return base, (user, password)


@pytest.fixture(scope="session")
def amqp_url(broker_url: str) -> Iterator[str]:
    """An AMQP URL on a fresh vhost for this test session; the vhost is deleted at the end."""
    base, auth = _management(broker_url)
    user = auth[0]
    vhost = f"hutch-test-{uuid.uuid4().hex[:8]}"
    api = f"{base}/api"
    try:
        with httpx.Client(auth=auth, timeout=10) as http:
            http.put(f"{api}/vhosts/{quote(vhost, safe='')}").raise_for_status()
            http.put(f"{api}/permissions/{quote(vhost, safe='')}/{user}",
                     json={"configure": ".*", "write": ".*", "read": ".*"}).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"{_HOW_TO_START} (management API at {base}: {exc!r})")
    parts = urlsplit(broker_url)
    try:
        yield parts._replace(path="/" + quote(vhost, safe="")).geturl()
    finally:
        # Deleting a vhost deletes the session's queues with it: minutes on a busy broker
        # (a timeout here failed the last test of a CI run); the broker carries on with
        # the deletion whatever this client does.
        with httpx.Client(auth=auth, timeout=300) as http:
            try:
                http.delete(f"{api}/vhosts/{quote(vhost, safe='')}")
            except httpx.TimeoutException:
                warnings.warn(f"deleting vhost {vhost} took over 300 s; the broker goes on "
                              "deleting it", stacklevel=1)


@pytest.fixture
def prefix() -> str:
    """A name prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:8]}"


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(amqp_url: str, prefix: str) -> SettingsFactory:
    """Build settings for this test: one pool 'chat' serving mock-small/mock-large.

    ``backends`` is a list of (name, url, max_concurrency); pool keys may be overridden.
    """

    def factory(backends: list[tuple[str, str, int]] | None = None, **overrides: Any
                ) -> Settings:
        pool_overrides = overrides.pop("pool", {})
        backend_list = [
            {"name": f"{prefix}-{name}", "url": url, "max_concurrency": cap, "timeout_s": 10}
            for name, url, cap in (backends or [("b1", "http://127.0.0.1:9/v1", 4)])
        ]
        pool = {"name": "chat", "models": ["mock-small", "mock-large"],
                "backends": backend_list, **pool_overrides}
        data: dict[str, Any] = {"amqp_url": amqp_url, "prefix": prefix, "pools": [pool],
                                "lease_retry_s": 0.5, "shutdown_grace_s": 10}
        data.update(overrides)
        return load_settings(**data)

    return factory


@pytest.fixture
async def mock() -> AsyncIterator[MockBackend]:
    """A mock backend: 4 slots, 20 ms (tests that need others start their own)."""
    async with MockBackend(MockConfig(latency_ms=20, capacity=4)) as backend:
        yield backend


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, **kwargs: Any) -> AsyncIterator[Worker]:
    """Run a worker in this event loop until the block ends; wait for all its leases."""
    worker = Worker(settings, **kwargs)
    expected = {b.name for pool in settings.pools for b in pool.backends}
    async with running(worker.run(), ready=lambda: set(worker.held_backends()) == expected,
                       stop=worker.stop, stop_timeout_s=20):
        yield worker


@contextlib.asynccontextmanager
async def hutch(settings: Settings, *, worker: bool = True, **client_kwargs: Any
                ) -> AsyncIterator[HutchClient]:
    """Apply the topology, optionally run a worker, and yield a connected client."""
    await apply_topology(settings)
    async with contextlib.AsyncExitStack() as stack:
        if worker:
            await stack.enter_async_context(running_worker(settings))
        client = HutchClient.from_settings(settings, **client_kwargs)
        await stack.enter_async_context(client)
        yield client


def write_config(path: Path, settings: Settings) -> Path:
    """Write settings as a TOML file a `hutch` subprocess can read."""
    path.write_text(dump_toml(settings))
    return path


@pytest.fixture
def hutch_env() -> dict[str, str]:
    """Environment for `hutch` subprocesses: this interpreter's, no HUTCH_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


HUTCH = [sys.executable, "-m", "pipeline.cli.main"]


async def run_hutch(args: list[str], env: dict[str, str], timeout: float = 60
                    ) -> tuple[int, str, str]:
    """Run the `hutch` CLI as a subprocess; always reaped, killed if it overruns."""
    return await run_process([*HUTCH, *args], env, timeout)


async def run_process(argv: list[str], env: dict[str, str], timeout: float,
                      cwd: Path | None = None) -> tuple[int, str, str]:
    """Run a process to its end: (exit code, stdout, stderr); killed if it overruns."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def amqp(url: str) -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(url)
    async with connection:
        yield connection


def body(model: str = "mock-small", content: str = "hello") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


async def drain_queue(channel: AbstractChannel, name: str, *, at_least: int = 0,
                      timeout: float = 10.0) -> list[AbstractIncomingMessage]:
    """Everything in a queue, by basic.get (acked), once it holds ``at_least`` messages
    (a failure is answered first and parked second: wait for the parked copy)."""
    async with asyncio.timeout(timeout):
        while await queue_depth(channel, name) < at_least:
            await asyncio.sleep(0.05)
    queue = await channel.declare_queue(name, passive=True)
    out = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        out.append(message)
    return out


async def queue_depth(channel: AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count or 0


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(interval)
