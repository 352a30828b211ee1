"""A pool of mock backends with injected faults: every request gets one clear answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient, Reply
from pipeline.errors import RequestFailed
from pipeline.observe.metrics import Metrics
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory, amqp, drain_queue, running_worker

MAX_ATTEMPTS = 4
KNOWN_CODES = {"backend_error", "deadline_exceeded"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there: connection refused


async def test_faulty_pool_answers_every_request_once(make_settings: SettingsFactory) -> None:
    mocks = {
        "errors": MockConfig(latency_ms=10, capacity=8, fail_rate=0.3, seed=1),
        "throttles": MockConfig(latency_ms=10, capacity=8, throttle_rate=0.5,
                                retry_after_s=0.3, seed=2),
        "hangs": MockConfig(latency_ms=10, capacity=8, hang_rate=0.2, hang_s=30, seed=3),
    }
    async with contextlib.AsyncExitStack() as stack:
        started = {name: await stack.enter_async_context(MockBackend(config))
                   for name, config in mocks.items()}
        backends = [(name, mock.base_url, 4) for name, mock in started.items()]
        backends.append(("refused", f"http://127.0.0.1:{closed_port()}/v1", 4))
        settings = make_settings(backends, pool={
            "max_attempts": MAX_ATTEMPTS, "attempts_per_delivery": 2,
            "retry_delays_ms": [100, 200], "breaker_failures": 3, "breaker_cooldown_s": 1})
        # Hanging requests must time out fast: shorten that backend's timeout.
        pool = settings.pools[0]
        hangs = pool.backends[2].model_copy(update={"timeout_s": 0.5})
        settings = settings.model_copy(update={"pools": [pool.model_copy(update={
            "backends": [*pool.backends[:2], hangs, pool.backends[3]]})]})
        names = Names(settings.prefix)
        refused_name = pool.backends[3].name
        metrics = Metrics()
        await apply_topology(settings)
        async with running_worker(settings, metrics=metrics), \
                HutchClient.from_settings(settings) as client:

            async def one(i: int) -> Reply | RequestFailed:
                try:
                    return await client.request(
                        {"model": "mock-small", "messages": [
                            {"role": "user", "content": f"r{i}"}]},
                        model="mock-small", timeout=30)
                except RequestFailed as exc:
                    return exc

            outcomes = await asyncio.gather(*(one(i) for i in range(300)))
        async with amqp(settings.amqp_url) as conn:
            parked = await drain_queue(await conn.channel(), names.parked_queue)

    ok = [o for o in outcomes if isinstance(o, Reply)]
    failed = [o for o in outcomes if isinstance(o, RequestFailed)]
    assert len(ok) + len(failed) == 300
    # Every request answered: its completion, or a clear error of a known code.
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, Reply):
            assert outcome.completion.choices[0].message.content == f"mock reply to: r{i}"
    assert {f.code for f in failed} <= KNOWN_CODES
    assert len(ok) >= 250  # healthy capacity remains: most requests succeed
    # Attempts never above the maximum, on replies and on parked failures.
    assert max(int(r.headers[p.H_ATTEMPTS]) for r in ok) <= MAX_ATTEMPTS
    assert all(int(m.headers[p.H_ATTEMPTS]) <= MAX_ATTEMPTS for m in parked)
    assert len(parked) == len(failed)
    # No request waits on an open circuit: the refused backend is taken out after 3
    # failures; only calls already in flight, and one probe per cooldown, follow.
    refused_errors = metrics.registry.get_sample_value(
        "hutch_backend_errors_total", {"backend": refused_name, "kind": "retryable"}) or 0
    assert 3 <= refused_errors <= 3 + 4 + 6, refused_errors
    throttled = sum(m.stats()["faults"]["throttled"] for m in started.values())
    print(f"faulty pool: 300 sent, {len(ok)} ok, {len(failed)} errors "
          f"{dict(Counter(f.code for f in failed))}, parked {len(parked)}, "
          f"429s {throttled}, calls to the refused backend {refused_errors:.0f}, "
          f"attempts {dict(Counter(int(r.headers[p.H_ATTEMPTS]) for r in ok))}")
