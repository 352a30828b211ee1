"""Failure semantics against the real broker: retry tiers, attempts, 429, circuit breaker.

Backends here are httpx.MockTransport handlers (deterministic faults, counted calls)
plugged in through the worker's transport seam; the broker, the tiers and the dead
lettering are real.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from pipeline import protocol as p
from pipeline.backends.transport import AiohttpTransport
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import BackendError, DeadlineExceededError, InvalidRequestError
from pipeline.observe.metrics import Metrics
from pipeline.settings import BackendSettings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory, amqp, drain_queue, running_worker

USER = [{"role": "user", "content": "hello"}]


class FaultyBackend:
    """A scripted backend: ``script(n)`` gives the n-th call's (status, headers)."""

    def __init__(self, script: Callable[[int], tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.calls = 0
        self.served: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        status, headers = self.script(self.calls)
        if status != 200:
            return httpx.Response(status, headers=headers, json={"error": {
                "type": "server_error", "code": str(status), "message": f"scripted {status}"}})
        content = request.read().decode()
        self.served.append(request.headers.get("x-request-id", ""))
        return httpx.Response(200, json={
            "id": f"c{self.calls}", "object": "chat.completion", "model": "mock-small",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"ok {len(content)}"}}]})


def transports(backends: dict[str, FaultyBackend]
               ) -> Callable[[BackendSettings], httpx.AsyncBaseTransport]:
    def factory(settings: BackendSettings) -> httpx.AsyncBaseTransport:
        for suffix, backend in backends.items():
            if settings.name.endswith(suffix):
                return httpx.MockTransport(backend.handler)
        return AiohttpTransport()
    return factory


def always(status: int, headers: dict[str, str] | None = None
           ) -> Callable[[int], tuple[int, dict[str, str]]]:
    return lambda _: (status, headers or {})


async def test_retry_tier_frees_the_slot_then_succeeds(make_settings: SettingsFactory) -> None:
    """Two in-process failures send the request to a 3 s tier; meanwhile the backend's
    only slot serves another request; the third attempt succeeds. (The tier is the
    second request's whole window to be served first: 300 ms was too short for a round
    trip on a busy machine.)"""
    flaky = FaultyBackend(lambda n: (500, {}) if n <= 2 else (200, {}))
    settings = make_settings([("a", "http://a.invalid/v1", 1)],
                             pool={"attempts_per_delivery": 2, "retry_delays_ms": [3000]})
    metrics = Metrics()
    await apply_topology(settings)
    async with running_worker(settings, metrics=metrics,
                              transport_factory=transports({"-a": flaky})), \
            HutchClient.from_settings(settings) as client:
        first = asyncio.create_task(client.request(
            {"model": "mock-small", "messages": USER}, model="mock-small", timeout=20))
        async with asyncio.timeout(30):  # its two attempts fail, it leaves for the tier
            while flaky.calls < 2:
                await asyncio.sleep(0.01)
        second = await client.request({"model": "mock-small", "messages": USER},
                                      model="mock-small", timeout=20)
        assert not first.done(), "the retried request waits in its tier"
        retried = await first
    assert second.headers[p.H_ATTEMPTS] == 1
    assert retried.headers[p.H_ATTEMPTS] == 3
    assert flaky.served == [second.correlation_id, retried.correlation_id]
    assert metrics.registry.get_sample_value(
        "hutch_retries_total", {"pool": "chat", "tier": "3000"}) == 1


async def test_attempts_never_exceed_max_and_failure_is_parked(
        make_settings: SettingsFactory) -> None:
    broken = FaultyBackend(always(503))
    settings = make_settings([("a", "http://a.invalid/v1", 2)], pool={
        "max_attempts": 5, "attempts_per_delivery": 2, "retry_delays_ms": [50, 100],
        "breaker_failures": 1000})
    names = Names(settings.prefix)
    await apply_topology(settings)
    async with running_worker(settings, transport_factory=transports({"-a": broken})), \
            HutchClient.from_settings(settings) as client:
        started = time.monotonic()
        with pytest.raises(BackendError) as failed:
            await client.chat(model="mock-small", messages=USER, timeout=30)
        elapsed = time.monotonic() - started
    assert broken.calls == 5  # 2 + tier 50 ms + 2 + tier 100 ms + 1
    assert "after 5 attempts" in failed.value.message and failed.value.status == 503
    assert elapsed >= 0.15
    async with amqp(settings.amqp_url) as conn:
        parked = await drain_queue(await conn.channel(), names.parked_queue)
    assert [m.headers[p.H_REASON] for m in parked] == ["backend_error"]
    assert parked[0].headers[p.H_ATTEMPTS] == 5
    assert parked[0].headers[p.H_RETRIES] == 2


async def test_non_retryable_answer_is_immediate_with_backend_status(
        make_settings: SettingsFactory) -> None:
    """A 400 is the request's fault (invalid_request), a 403 the deployment's
    (backend_error): both at once, with the backend's status."""
    settings = make_settings([("a", "http://a.invalid/v1", 2)])
    await apply_topology(settings)
    for status, expected in ((400, InvalidRequestError), (403, BackendError)):
        refusing = FaultyBackend(always(status))
        async with running_worker(settings, transport_factory=transports({"-a": refusing})), \
                HutchClient.from_settings(settings) as client:
            with pytest.raises(expected) as failed:
                await client.chat(model="mock-small", messages=USER, timeout=10)
        assert refusing.calls == 1
        assert failed.value.status == status and f"scripted {status}" in failed.value.message


async def test_deadline_bounds_the_retries(make_settings: SettingsFactory) -> None:
    """A retry that cannot happen before the deadline is not scheduled: the request is
    answered at once instead of waiting past its deadline."""
    broken = FaultyBackend(always(500))
    settings = make_settings([("a", "http://a.invalid/v1", 2)], pool={
        "attempts_per_delivery": 1, "retry_delays_ms": [5000], "breaker_failures": 1000})
    await apply_topology(settings)
    async with running_worker(settings, transport_factory=transports({"-a": broken})), \
            HutchClient.from_settings(settings) as client:
        with pytest.raises(BackendError):  # a scheduled retry would end deadline_exceeded
            await client.chat(model="mock-small", messages=USER, timeout=2)
    assert broken.calls == 1


async def test_running_out_of_time_is_not_a_backend_failure(
        make_settings: SettingsFactory) -> None:
    """Under overload requests reach a backend with little time left. A call cut at the
    request's deadline must not count against the backend (a breaker threshold of 1 would
    open on it), and once the backend's fastest answer is known, a request with less time
    left than that is answered at once without calling it."""
    # Whole seconds, not 100s of ms: a busy machine may take 150 ms from a delivery's
    # receipt to its call, and the deadlines must still fall mid-call and before it.
    async with MockBackend(MockConfig(latency_ms=2000, capacity=2)) as slow:
        settings = make_settings([("a", slow.base_url, 2)],
                                 pool={"breaker_failures": 1, "attempts_per_delivery": 1})
        metrics = Metrics()
        backend = settings.pools[0].backends[0].name
        sample = metrics.registry.get_sample_value
        await apply_topology(settings)
        async with running_worker(settings, metrics=metrics), \
                HutchClient.from_settings(settings) as client:
            with pytest.raises(DeadlineExceededError):  # cut at its deadline, mid-call
                await client.chat(model="mock-small", messages=USER, timeout=1.0)
            async with asyncio.timeout(30):
                while slow.stats()["disconnected"] < 1:
                    await asyncio.sleep(0.02)
            assert sample("hutch_backend_state", {"backend": backend}) == 0  # closed
            assert sample("hutch_backend_errors_total",
                          {"backend": backend, "kind": "retryable"}) == 0  # created at 0
            await client.chat(model="mock-small", messages=USER, timeout=10)
            served = slow.stats()["served"]
            with pytest.raises(DeadlineExceededError) as failed:
                await client.chat(model="mock-small", messages=USER, timeout=1.0)
            # Answered by the worker without a call (not the client's own timeout): the
            # outcome says so, whatever the wall time on a loaded machine.
            assert "fastest recent answer" in failed.value.message
            assert slow.stats()["served"] == served
            assert slow.stats()["disconnected"] == 1  # never called
    assert sample("hutch_requests_total", {"pool": "chat", "outcome": "deadline_exceeded"}) == 2


async def test_429_sends_work_to_the_other_backend_and_is_not_a_failure(
        make_settings: SettingsFactory) -> None:
    throttled = FaultyBackend(always(429, {"Retry-After": "30"}))
    healthy = FaultyBackend(always(200))
    settings = make_settings([("a", "http://a.invalid/v1", 4), ("b", "http://b.invalid/v1", 4)],
                             pool={"breaker_failures": 2})
    metrics = Metrics()
    await apply_topology(settings)
    async with running_worker(settings, metrics=metrics, transport_factory=transports(
            {"-a": throttled, "-b": healthy})), HutchClient.from_settings(settings) as client:
        replies = await asyncio.gather(*(
            client.request({"model": "mock-small", "messages": USER}, model="mock-small",
                           timeout=20) for _ in range(40)))
        calls_after_burst = throttled.calls
        more = await asyncio.gather(*(
            client.request({"model": "mock-small", "messages": USER}, model="mock-small",
                           timeout=20) for _ in range(20)))
    backend_a, backend_b = (b.name for b in settings.pools[0].backends)
    assert {r.backend for r in replies + more} == {backend_b}
    assert all(r.headers[p.H_ATTEMPTS] == 1 for r in replies + more)  # 429 is no attempt
    assert calls_after_burst <= 8  # a handful before its consumer was cancelled
    assert throttled.calls == calls_after_burst  # none while throttled
    sample = metrics.registry.get_sample_value
    assert sample("hutch_backend_state", {"backend": backend_a}) == 3  # throttled
    assert sample("hutch_backend_capacity", {"backend": backend_a}) == 0
    # 429s are throttling, not failures: the circuit (threshold 2) never opened.
    assert sample("hutch_backend_errors_total", {"backend": backend_a, "kind": "retryable"}
                  ) == 0  # created at 0


async def test_circuit_opens_then_a_probe_closes_it(make_settings: SettingsFactory) -> None:
    state: dict[str, Any] = {"broken": True}
    flaky = FaultyBackend(lambda _: (500, {}) if state["broken"] else (200, {}))
    healthy = FaultyBackend(always(200))
    settings = make_settings([("a", "http://a.invalid/v1", 4), ("b", "http://b.invalid/v1", 4)],
                             pool={"breaker_failures": 3, "breaker_cooldown_s": 0.5,
                                   "attempts_per_delivery": 1, "retry_delays_ms": [50]})
    metrics = Metrics()
    backend_a = settings.pools[0].backends[0].name
    sample = metrics.registry.get_sample_value
    await apply_topology(settings)
    async with running_worker(settings, metrics=metrics, transport_factory=transports(
            {"-a": flaky, "-b": healthy})), HutchClient.from_settings(settings) as client:

        async def burst(n: int) -> list[Any]:
            return await asyncio.gather(*(client.request(
                {"model": "mock-small", "messages": USER}, model="mock-small", timeout=20)
                for _ in range(n)))

        first = await burst(40)  # every request answered, by b or by a retry
        assert len(first) == 40
        assert sample("hutch_backend_state", {"backend": backend_a}) in (1, 2)
        calls_when_open = flaky.calls
        assert calls_when_open <= 3 + 4  # the threshold, plus calls already in flight
        state["broken"] = False
        await asyncio.sleep(0.7)  # cooldown passes: a probe may go through
        await burst(40)
        async with asyncio.timeout(30):
            while sample("hutch_backend_state", {"backend": backend_a}) != 0:
                await burst(4)
        served_by_a_after = len(flaky.served)
        await burst(40)
    assert sample("hutch_backend_state", {"backend": backend_a}) == 0
    assert len(flaky.served) > served_by_a_after  # a is back at full capacity


async def test_a_client_that_comes_back_gets_its_pending_replies(
        make_settings: SettingsFactory) -> None:
    """Replies published while a client was away wait in its durable reply queue; a
    client with the same client_id claims them by correlation id."""
    from pipeline.testing.mock import MockBackend, MockConfig

    async with MockBackend(MockConfig(latency_ms=200, capacity=4)) as mock:
        settings = make_settings([("b1", mock.base_url, 4)])
        names = Names(settings.prefix)
        client_id = f"{settings.prefix}-app"
        await apply_topology(settings)
        async with running_worker(settings):
            first = HutchClient.from_settings(settings, client_id=client_id)
            await first.connect()
            ids = [await first.submit({"model": "mock-small", "messages": [
                {"role": "user", "content": f"r{i}"}]}, model="mock-small", timeout=30)
                for i in range(8)]
            await first.close()  # gone before any reply
            async with amqp(settings.amqp_url) as conn:
                channel = await conn.channel()
                async with asyncio.timeout(10):
                    while (await channel.declare_queue(
                            names.reply_queue(client_id), passive=True)
                           ).declaration_result.message_count < 8:
                        await asyncio.sleep(0.05)
            async with HutchClient.from_settings(settings, client_id=client_id) as second:
                replies = [await second.result(cid, timeout=10) for cid in ids]
    assert [r.completion.choices[0].message.content for r in replies] == [
        f"mock reply to: r{i}" for i in range(8)]
    assert second.dropped_replies == 0


async def test_a_request_handed_back_keeps_its_history_and_says_why_it_expired(
        make_settings: SettingsFactory) -> None:
    """Issue 11 item 5: the circuit opens while a request is being retried in place; it is
    handed back with its attempts and last failure, expires in the queue (no backend is
    serving), and its answer and parked copy say where it last failed and why it waited."""
    broken = FaultyBackend(always(503))
    settings = make_settings([("a", "http://a.invalid/v1", 2)], pool={
        "breaker_failures": 1, "breaker_cooldown_s": 60, "attempts_per_delivery": 2})
    names = Names(settings.prefix)
    await apply_topology(settings)
    async with running_worker(settings, transport_factory=transports({"-a": broken})), \
            HutchClient.from_settings(settings) as client:
        with pytest.raises(DeadlineExceededError) as expired:
            await client.chat(model="mock-small", messages=USER, timeout=2)
        async with amqp(settings.amqp_url) as conn:
            parked = await drain_queue(await conn.channel(), names.parked_queue, at_least=1)
    assert broken.calls == 1  # the circuit opened: no second attempt
    message = expired.value.message
    assert "last attempt" in message and "scripted 503" in message, message
    assert f"no backend of pool 'chat' was serving ({settings.pools[0].backends[0].name} open)" \
        in message, message
    headers = parked[0].headers or {}
    assert headers[p.H_REASON] == "deadline_exceeded"
    assert headers[p.H_ATTEMPTS] == 1
    assert headers[p.H_BACKEND] == settings.pools[0].backends[0].name


async def test_a_429_scoped_to_a_model_pauses_only_that_model(
        make_settings: SettingsFactory) -> None:
    """Issue 11 item 3: LiteLLM limits each model on its own. With throttle_scope
    "model", a 429 for mock-large sends that request through a retry tier, while
    mock-small requests keep being served by the same backend at once."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        calls.append(model)
        if model == "mock-large" and calls.count("mock-large") == 1:
            return httpx.Response(429, headers={"llm_provider-retry-after": "0.2"},
                                  json={"error": {"message": "rpm limit for mock-large"}})
        return httpx.Response(200, json={
            "id": "c", "object": "chat.completion", "model": model, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": model},
                 "finish_reason": "stop"}]})

    # The tier (3 s) is mock-small's window to be served while mock-large waits in it.
    base = make_settings([("a", "http://a.invalid/v1", 2)], pool={"retry_delays_ms": [3000]})
    backend = base.pools[0].backends[0].model_copy(update={"throttle_scope": "model"})
    settings = base.model_copy(update={"pools": [
        base.pools[0].model_copy(update={"backends": [backend]})]})
    await apply_topology(settings)
    async with running_worker(settings, transport_factory=lambda _: httpx.MockTransport(
            handler)) as worker, HutchClient.from_settings(settings) as client:
        large = asyncio.create_task(client.chat(model="mock-large", messages=USER, timeout=10))
        async with asyncio.timeout(30):  # mock-large was called (and throttled) first
            while not calls:
                await asyncio.sleep(0.01)
        small = await client.chat(model="mock-small", messages=USER, timeout=10)
        assert not large.done()  # waiting in the retry tier, not blocking the backend
        assert (await large).choices[0].message.content == "mock-large"
        sample = worker.metrics.registry.get_sample_value
        state = sample("hutch_backend_state", {"backend": backend.name})
    assert small.choices[0].message.content == "mock-small"
    assert calls == ["mock-large", "mock-small", "mock-large"]
    assert state == 0  # the backend itself was never throttled
