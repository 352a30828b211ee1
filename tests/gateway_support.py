"""A whole Hutch behind the HTTP gateway, in this event loop: mock backend, topology,
worker and one gateway replica (tests/test_gateway*.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import openai

from pipeline.broker.topology import apply_topology
from pipeline.gateway.server import GatewayServer
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.worker import Worker
from tests.conftest import SettingsFactory, running_worker

KEY_A, KEY_B = "sk-team-a-0123456789", "sk-team-b-9876543210"


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (polled)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


@dataclass
class Stack:
    settings: Settings
    mock: MockBackend
    worker: Worker
    gateway: GatewayServer

    @property
    def base_url(self) -> str:
        return self.gateway.base_url

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def openai(self, key: str = KEY_A, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                                  **kwargs)


def keyed(monkeypatch: Any, **gateway: Any) -> dict[str, Any]:
    """A [gateway] section with two keys: team-a (priority 1, at most 2) and team-b
    (priority 5, at most 9), read from the environment."""
    monkeypatch.setenv("HUTCH_TEST_KEY_A", KEY_A)
    monkeypatch.setenv("HUTCH_TEST_KEY_B", KEY_B)
    keys = [{"identity": "team-a", "key_env": "HUTCH_TEST_KEY_A", "default_priority": 1,
             "max_priority": 2},
            {"identity": "team-b", "key_env": "HUTCH_TEST_KEY_B", "default_priority": 5,
             "max_priority": 9}]
    return {"keys": keys, **gateway}


@contextlib.asynccontextmanager
async def gateway_stack(make_settings: SettingsFactory, *, mock: MockConfig | None = None,
                        gateway: dict[str, Any] | None = None, capacity: int = 4,
                        **overrides: Any) -> AsyncIterator[Stack]:
    """Start the mock, apply the topology, run a worker and a gateway on a free port."""
    async with MockBackend(mock or MockConfig(latency_ms=5, capacity=capacity)) as backend:
        settings = make_settings([("b1", backend.base_url, capacity)],
                                 gateway=gateway or {}, **overrides)
        await apply_topology(settings)
        async with running_worker(settings) as worker, GatewayServer(
                settings, host="127.0.0.1", port=0) as server:
            yield Stack(settings, backend, worker, server)
