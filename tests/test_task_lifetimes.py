"""Task lifetimes around a request at a backend (issue 21, item 8): a user's cancel racing
the worker's own abort, two deliveries sharing a correlation id, and the stream sink's
timed flush failing. Unit tests: what is tested is Hutch's own task handling."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any, cast

import aiormq
import pytest

from pipeline.backends.http import Backend
from pipeline.dispatch.cancels import CancelRegistry
from pipeline.dispatch.dispatcher import Dispatcher
from pipeline.observe.hooks import Hooks
from pipeline.outcome import Cancelled
from pipeline.scheduling.policy import PoolScheduler
from pipeline.scheduling.tenants import TenantBook
from pipeline.settings import load_settings
from pipeline.settle.publisher import Publisher
from pipeline.settle.settler import Settler
from pipeline.settle.stream import StreamSink
from tests.fakes import GUARD, delivery

SETTINGS = load_settings(amqp_url="amqp://guest:guest@127.0.0.1:9/", prefix="llm", pools=[{
    "name": "chat", "models": ["small"],
    "backends": [{"name": "b1", "url": "http://127.0.0.1:9/v1", "max_concurrency": 1}]}])


def registry() -> CancelRegistry:
    return CancelRegistry(ttl_s=60, max_ids=100, privileged=frozenset({"worker"}))


class Health:
    """A healthy backend that never answered yet."""

    def available(self) -> bool:
        return True

    def fastest_s(self) -> float:
        return 0.0

    def success(self, elapsed_s: float, tokens: int | None = None) -> None: ...

    def failure(self, refused: bool = False) -> None: ...

    def throttled(self, retry_after_s: float | None, model: str | None = None) -> None: ...

    def model_wait_s(self, model: str | None) -> float:
        return 0.0


class HangingBackend:
    """A backend call that never ends by itself."""

    name = "b1"
    settings = SETTINGS.pools[0].backends[0]

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        await asyncio.sleep(3600)


async def _at_backend(reg: CancelRegistry) -> tuple[asyncio.Task[Any], HangingBackend]:
    pool = SETTINGS.pools[0]
    scheduler = PoolScheduler(pool.name, pool.scheduling, TenantBook({}))
    dispatcher = Dispatcher(SETTINGS, pool, cast(Settler, None), GUARD, Hooks(), reg,
                            scheduler)
    backend = HangingBackend()
    d = delivery(user_id="app", correlation_id="r7", deadline_in_s=600)
    task = asyncio.create_task(dispatcher._run(d, cast(Backend, backend), Health()))
    async with asyncio.timeout(10):
        await backend.started.wait()
    return task, backend


async def test_a_users_cancel_alone_ends_the_request_as_cancelled() -> None:
    reg = registry()
    task, _ = await _at_backend(reg)
    assert reg.cancel("r7", "app")
    async with asyncio.timeout(10):
        outcome = await task
    assert isinstance(outcome, Cancelled) and outcome.stage == "in_flight"


@pytest.mark.parametrize("user_first", [False, True], ids=["worker-first", "user-first"])
async def test_a_users_cancel_does_not_swallow_the_workers_abort(user_first: bool) -> None:
    """The worker stops (cancels the task) while the user's cancel arrives: the task must
    end cancelled, or the worker's shutdown would wait on a task that carries on."""
    reg = registry()
    task, _ = await _at_backend(reg)
    if user_first:
        assert reg.cancel("r7", "app")
        task.cancel()
    else:
        task.cancel()
        assert reg.cancel("r7", "app")
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await task
    assert task.cancelled()


async def test_two_deliveries_with_one_id_are_both_registered() -> None:
    """The first delivery to leave the backend must not unregister the second."""
    reg = registry()
    first, second = (delivery(user_id="app", correlation_id="dup") for _ in range(2))
    inside = asyncio.Event()
    leave_first = asyncio.Event()

    async def at_backend(d: Any, leave: asyncio.Event | None) -> str:
        async with reg.at_backend(d):
            inside.set()
            if leave is not None:
                await leave.wait()
                return "left"
            await asyncio.sleep(3600)
        return "finished"

    one = asyncio.create_task(at_backend(first, leave_first))
    two = asyncio.create_task(at_backend(second, None))
    async with asyncio.timeout(10):
        await inside.wait()
        await asyncio.sleep(0)
        leave_first.set()
        assert await one == "left"
    assert reg.cancel("dup", "app")  # the second is still at the backend: aborted
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await two
    assert second.cancel_requested and not first.cancel_requested


async def test_a_cancel_aborts_every_delivery_of_the_id() -> None:
    reg = registry()
    deliveries = [delivery(user_id="app", correlation_id="dup") for _ in range(2)]
    entered = asyncio.Semaphore(0)

    async def at_backend(d: Any) -> None:
        async with reg.at_backend(d):
            entered.release()
            await asyncio.sleep(3600)

    tasks = [asyncio.create_task(at_backend(d)) for d in deliveries]
    async with asyncio.timeout(10):
        for _ in tasks:
            await entered.acquire()
    assert reg.cancel("dup", "app")
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    assert not pending
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert all(d.cancel_requested for d in deliveries)


class FailingPublisher:
    """Publishes the first chunk message, then fails as a bug would (not an AMQP error)."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.failed = asyncio.Event()

    async def publish(self, body: bytes, properties: aiormq.spec.Basic.Properties, *,
                      routing_key: str, exchange: str = "") -> bool:
        if self.bodies:
            self.failed.set()
            raise RuntimeError("unexpected failure in a timed flush")
        self.bodies.append(json.loads(body))
        return True


async def test_a_timed_flush_failure_is_raised_by_the_stream_not_lost() -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        publisher = FailingPublisher()
        sink = StreamSink(cast(Publisher, publisher), delivery(), window_s=0.01,
                          max_chunks=100)
        await sink.add('{"n": 0}')  # the first chunk goes out at once
        await sink.add('{"n": 1}')  # the second waits for the timer, whose publish fails
        async with asyncio.timeout(10):
            await publisher.failed.wait()
        for _ in range(3):
            await asyncio.sleep(0)  # the timer's task ends
        with pytest.raises(RuntimeError, match="timed flush"):
            await sink.flush()  # the stream meets what the timer met
        await sink.close()
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert publisher.bodies == [[{"n": 0}]]
    assert unretrieved == []
