"""An embedded Hutch: a mock backend and a worker in this process, under a prefix of its own.

``hutch demo`` and ``hutch bench --embedded`` both need "a whole Hutch with only a broker":
apply a topology under a unique prefix, start a mock backend and a worker, wait until the
worker holds the backend's lease (before that nothing consumes the pool), and undo all of
it afterwards. One context manager does this so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from pipeline.broker.topology import apply_topology, delete_topology
from pipeline.runtime.background import running
from pipeline.settings import Settings, load_settings
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.worker import Worker

__all__ = ["Embedded", "embedded_hutch"]

#: How long the worker may take to hold the mock's lease (connect, declare, consume).
_LEASE_TIMEOUT_S = 15.0


@dataclass
class Embedded:
    """What :func:`embedded_hutch` started. Add the ``client_id`` of every client used
    against it to ``client_ids`` so their reply queues are deleted with the topology."""

    settings: Settings
    mock: MockBackend
    worker: Worker
    client_ids: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def embedded_hutch(amqp_url: str, *, models: Sequence[str], capacity: int = 4,
                         latency_ms: float = 100.0, prefix: str | None = None,
                         pool: str = "embedded", keep_topology: bool = False,
                         ) -> AsyncIterator[Embedded]:
    """Run a mock backend (``capacity`` slots x ``latency_ms``) and a worker serving
    ``models`` on it, under ``prefix`` (default: unique to this process and call).

    Yields once the worker holds the backend's lease. On exit the worker drains and
    stops, the mock stops, and the topology (with the listed clients' reply queues) is
    deleted unless ``keep_topology``.
    """
    prefix = prefix or f"hutch-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    mock = MockBackend(MockConfig(latency_ms=latency_ms, capacity=capacity,
                                  models=tuple(models)))
    await mock.start()
    settings = load_settings(
        amqp_url=amqp_url, prefix=prefix, shutdown_grace_s=10,
        pools=[{"name": pool, "models": list(models), "backends": [
            {"name": f"{prefix}-mock", "url": mock.base_url, "max_concurrency": capacity,
             "timeout_s": 30}]}])
    worker = Worker(settings)
    embedded = Embedded(settings, mock, worker)
    applied = False
    try:
        await apply_topology(settings)
        applied = True
        async with running(worker.run(), ready=lambda: bool(worker.held_backends()),
                           stop=worker.stop, ready_timeout_s=_LEASE_TIMEOUT_S):
            yield embedded
    finally:
        await mock.stop()
        if applied and not keep_topology:
            await delete_topology(settings, reply_queues=embedded.client_ids)
