"""A request out of time never waits for a backend permit: it is answered at once, while
the backend's only permit stays with a live request (under overload, expired requests
would otherwise hold the permits while their answers are confirmed, and starve the
backend)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aio_pika
import httpx

from pipeline import protocol as p
from pipeline.broker.topology import apply_topology
from tests.conftest import SettingsFactory, amqp, running_worker
from tests.fakes import completion
from tests.test_streaming import client


async def test_an_expired_request_is_answered_while_the_only_permit_is_busy(
        make_settings: SettingsFactory) -> None:
    settings = make_settings([("b1", "http://busy.invalid/v1", 1)])  # one permit
    release = asyncio.Event()
    calls: list[str] = []

    async def backend(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content)["messages"][0]["content"])
        await release.wait()
        return httpx.Response(200, json=completion())

    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection, running_worker(
            settings, transport_factory=lambda _: httpx.MockTransport(backend)):
        live = await client(await connection.channel(), settings)
        late = await client(await connection.channel(), settings)
        await live.send({"model": "mock-small", "messages": [
            {"role": "user", "content": "live"}]})
        async with asyncio.timeout(15):  # the live request holds the only permit
            while calls != ["live"]:
                await asyncio.sleep(0.02)
        exchange = await late.channel.get_exchange(late.names.requests_exchange)
        await exchange.publish(aio_pika.Message(
            json.dumps({"model": "mock-small", "messages": [
                {"role": "user", "content": "late"}]}).encode(),
            correlation_id=uuid.uuid4().hex, reply_to=late.queue.name,
            content_type="application/json", user_id="guest",
            headers={p.H_DEADLINE: int(time.time() * 1000) - 1000}), routing_key="mock-small")
        answer = await late.collect(timeout=15)  # while "live" still holds the permit
        assert answer.final is not None and not release.is_set()
        assert answer.final.headers[p.H_OUTCOME] == "error"
        assert json.loads(answer.final.body)["error"]["code"] == "deadline_exceeded"
        release.set()
        done = await live.collect(timeout=15)
    assert done.final is not None and done.final.headers[p.H_OUTCOME] == "ok"
    assert calls == ["live"]  # the late one never reached the backend


async def test_a_delivery_arriving_when_no_backend_has_a_permit_goes_back_at_once() -> None:
    """The circuit of the pool's only backend opened (its permits at 0) while the broker
    was already sending one more delivery, before the consumer's cancel took effect: it
    goes back to the queue at once. Waiting here for a permit nobody grants, it stayed
    unacked, so it could not expire in the queue and its client got no answer."""
    from types import SimpleNamespace

    from pipeline.worker.admission import Admission
    from pipeline.worker.slots import Slot

    admission = Admission()
    admission.set_limit("b1", 0)
    delivery = SimpleNamespace(remaining_s=lambda: 30.0, backend=None, status_after_ms=0)
    set_aside: list[bool] = []

    class Dispatcher:
        def parse(self, message: object, backend: str) -> object:
            return delivery

        async def set_aside(self, parsed: object, move: bool) -> None:
            set_aside.append(move)

        async def handle(self, *args: object) -> None:
            raise AssertionError("dispatched without a permit")

    holder = SimpleNamespace(pool="chat", name="b1", intake=SimpleNamespace(
        admission=admission), health=SimpleNamespace(fastest_s=lambda: 0.0))
    slot = Slot(http=None, holder=holder)  # type: ignore[arg-type]
    class Notices:  # the request asked for its status, but it never waits: none is sent
        def took(self, parsed: object) -> None:
            return None

        def started(self, parsed: object) -> None:
            raise AssertionError("started without a permit")

        async def before_wait(self, *args: object) -> None:
            raise AssertionError("told a wait for a request that goes back at once")

        async def set_aside(self, dispatcher: Dispatcher, parsed: object, move: bool) -> None:
            await dispatcher.set_aside(parsed, move)

    notices = Notices()
    handle = slot.handler({"chat": Dispatcher()}, {"b1": slot},  # type: ignore[dict-item]
                          notices)  # type: ignore[arg-type]
    async with asyncio.timeout(5):  # before the fix: waited for a permit forever
        await handle(object())  # type: ignore[arg-type]
    assert set_aside == [False]  # handed back to the broker, not moved to a lane
    assert admission.waiting == 0
