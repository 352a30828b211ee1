"""End-to-end behaviour of the pipeline against the real broker (worker in this process)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.errors import BackendError, DeadlineExceededError, QueueFullError
from pipeline.observe.metrics import Metrics
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import (
    SettingsFactory,
    amqp,
    body,
    drain_queue,
    hutch,
    queue_depth,
    running_worker,
    wait_for,
)

USER = [{"role": "user", "content": "hello"}]


async def test_reply_carries_completion_and_timings(make_settings: SettingsFactory,
                                                    mock: MockBackend) -> None:
    settings = make_settings([("b1", mock.base_url, 4)])
    async with hutch(settings) as client:
        reply = await client.request(body(content="what is a hutch"), model="mock-small",
                                     priority=5, timeout=10)
        completion = await client.chat(model="mock-large", messages=USER, max_tokens=2)
    assert reply.completion.choices[0].message.content == "mock reply to: what is a hutch"
    assert reply.completion.usage is not None and reply.completion.usage.prompt_tokens == 4
    assert reply.headers[p.H_OUTCOME] == "ok"
    assert reply.headers[p.H_POOL] == "chat"
    assert reply.headers[p.H_ATTEMPTS] == 1
    assert reply.backend == settings.pools[0].backends[0].name
    assert reply.queue_wait_ms is not None and reply.queue_wait_ms >= 0
    assert int(reply.headers[p.H_BACKEND_MS]) >= 20  # the mock's service time
    assert completion.model == "mock-large"
    assert completion.choices[0].finish_reason == "length"  # max_tokens reached the backend


async def test_high_priority_is_served_next_on_a_saturated_backend(
        make_settings: SettingsFactory) -> None:
    """Capacity 1, a queue full of low-priority work, then one high: it is served next."""
    # The first low's 1 s in service is the window to queue the high behind it: 150 ms
    # was too short on a busy machine (the next low was taken first).
    async with MockBackend(MockConfig(latency_ms=1000, capacity=1)) as mock:
        # No lookahead: the prefetch is the free slot, so the lows wait in the queue.
        settings = make_settings([("b1", mock.base_url, 1)],
                                 pool={"scheduling": {"lookahead": 0}})
        names = Names(settings.prefix)
        async with hutch(settings) as client, amqp(settings.amqp_url) as conn:
            channel = await conn.channel()
            lows = [asyncio.create_task(client.request(body(content=f"low {i}"),
                                                       model="mock-small", priority=0,
                                                       timeout=60)) for i in range(8)]
            # One low is in service, the other seven wait in the queue.
            await wait_for(lambda: _depth_at_least(channel, names.work_queue("chat"), 7), 30)
            assert mock.stats()["in_service"] == 1
            high = await client.request(body(content="high"), model="mock-small", priority=9,
                                        timeout=30)
            low_replies = await asyncio.gather(*lows)
        served = mock.stats()["served_ids"]
        assert served[0] == low_replies[0].correlation_id  # was already in service
        assert served[1] == high.correlation_id  # overtook all seven queued lows
        assert set(served[2:]) == {r.correlation_id for r in low_replies[1:]}
        assert mock.stats()["max_in_flight"] == 1


async def test_high_priority_is_served_next_with_the_fair_scheduler(
        make_settings: SettingsFactory) -> None:
    """The same with the fair scheduler's lookahead and lanes (the default): the lows wait
    in the queue, at the worker or in a lane; the high overtakes them wherever they are."""
    async with MockBackend(MockConfig(latency_ms=800, capacity=1)) as mock:  # a busy machine
        settings = make_settings([("b1", mock.base_url, 1)])
        async with hutch(settings) as client:
            lows = [await client.submit(body(content=f"low {i}"), model="mock-small",
                                        priority=0, timeout=60) for i in range(8)]
            async with asyncio.timeout(30):
                while mock.stats()["in_service"] != 1:
                    await asyncio.sleep(0.01)
            high = await client.request(body(content="high"), model="mock-small", priority=9,
                                        timeout=60)
            for cid in lows:
                await client.result(cid, timeout=60)
        served = mock.stats()["served_ids"]
        assert served.index(high.correlation_id) <= 2  # after what had already started
        assert mock.stats()["max_in_flight"] == 1


async def _depth_at_least(channel: AbstractChannel, queue: str, n: int) -> bool:
    return await queue_depth(channel, queue) >= n


async def test_thousand_concurrent_chats_on_one_client(make_settings: SettingsFactory) -> None:
    async with MockBackend(MockConfig(latency_ms=5, capacity=64)) as mock:
        settings = make_settings([("b1", mock.base_url, 32)])
        async with hutch(settings) as client:
            started = time.monotonic()
            completions = await asyncio.gather(*(
                client.chat(model="mock-small", timeout=60,
                            messages=[{"role": "user", "content": f"request {i}"}])
                for i in range(1000)))
            elapsed = time.monotonic() - started
        assert [c.choices[0].message.content for c in completions] == [
            f"mock reply to: request {i}" for i in range(1000)]
        assert client.dropped_replies == 0
        assert mock.stats()["served"] == 1000
        assert mock.stats()["max_in_flight"] <= 32
        print(f"1000 concurrent chat() calls answered in {elapsed:.2f}s "
              f"({1000 / elapsed:.0f} requests/s)")


async def test_full_queue_nacks_the_publisher_and_answers_once(
        make_settings: SettingsFactory, mock: MockBackend) -> None:
    settings = make_settings([("b1", mock.base_url, 4)], pool={"max_queue_length": 3})
    names = Names(settings.prefix)
    async with hutch(settings, worker=False) as client, amqp(settings.amqp_url) as conn:
        queued = [asyncio.create_task(client.request(body(content=f"q{i}"), model="mock-small",
                                                     timeout=30)) for i in range(3)]
        # The three are in the queue (not merely sent) before the fourth is published.
        channel = await conn.channel()
        await wait_for(lambda: _depth_at_least(channel, names.work_queue("chat"), 3), 30)
        with pytest.raises(QueueFullError) as refused:
            await client.request(body(content="one too many"), model="mock-small", timeout=30)
        assert refused.value.code == "queue_full"
        # The refused request was also dead-lettered: a worker answers and parks it, and
        # the client drops that second answer, so the caller saw exactly one.
        async with running_worker(settings):
            replies = await asyncio.gather(*queued)
            await wait_for(lambda: _dropped(client, 1))
        assert [r.completion.choices[0].message.content for r in replies] == [
            f"mock reply to: q{i}" for i in range(3)]
        async with amqp(settings.amqp_url) as conn:
            parked = await drain_queue(await conn.channel(), names.parked_queue)
        assert [m.headers[p.H_REASON] for m in parked] == ["queue_full"]
        assert json.loads(parked[0].body)["messages"][0]["content"] == "one too many"


async def _dropped(client: Any, n: int) -> bool:
    return bool(client.dropped_replies >= n)


async def test_request_expired_in_queue_never_reaches_backend(
        make_settings: SettingsFactory, mock: MockBackend) -> None:
    settings = make_settings([("b1", mock.base_url, 4)])
    names = Names(settings.prefix)
    async with hutch(settings, worker=False) as client:
        pending = asyncio.create_task(
            client.request(body(), model="mock-small", timeout=0.2))
        async with amqp(settings.amqp_url) as conn:
            channel = await conn.channel()
            # The broker expires it while queued and dead-letters it to triage.
            await wait_for(lambda: _depth_at_least(channel, names.triage_queue, 1))
            async with running_worker(settings):
                with pytest.raises(DeadlineExceededError) as exc:
                    await pending
            parked = await drain_queue(channel, names.parked_queue)
    assert exc.value.code == "deadline_exceeded"
    assert "expired" in exc.value.message
    assert mock.stats()["served"] == 0
    assert [m.headers[p.H_REASON] for m in parked] == ["deadline_exceeded"]


async def test_backend_down_gives_backend_error_after_attempts(
        make_settings: SettingsFactory) -> None:
    settings = make_settings([("down", "http://127.0.0.1:9/v1", 2)], pool={"max_attempts": 2})
    async with hutch(settings) as client:
        with pytest.raises(BackendError) as exc:
            await client.chat(model="mock-small", messages=USER, timeout=20)
    assert exc.value.code == "backend_error"
    assert "unreachable" in exc.value.message and "after 2 attempts" in exc.value.message


async def test_bad_inputs_are_answered_and_parked_while_valid_requests_flow(
        make_settings: SettingsFactory, mock: MockBackend) -> None:
    settings = make_settings([("b1", mock.base_url, 4)])
    names = Names(settings.prefix)
    metrics = Metrics()
    await apply_topology(settings)
    async with running_worker(settings, metrics=metrics), \
            amqp(settings.amqp_url) as conn:
        from pipeline.client.client import HutchClient

        channel = await conn.channel(publisher_confirms=True)
        raw_reply_queue = names.reply_queue("raw-" + settings.prefix)
        replies_q = await channel.declare_queue(raw_reply_queue, exclusive=True)
        exchange = await channel.get_exchange(names.requests_exchange)
        answers: dict[str, dict[str, Any]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            async with message.process():
                assert message.correlation_id not in answers, "two replies for one request"
                answers[message.correlation_id or ""] = json.loads(message.body)

        await replies_q.consume(on_reply)

        async def publish(cid: str, payload: bytes, routing_key: str = "mock-small",
                          reply_to: str | None = raw_reply_queue, **props: Any) -> None:
            await exchange.publish(aio_pika.Message(
                payload, correlation_id=cid, reply_to=reply_to,
                content_type="application/json", **props), routing_key=routing_key)

        async with HutchClient.from_settings(settings) as client:
            valid = [asyncio.create_task(client.chat(
                model="mock-small", timeout=30,
                messages=[{"role": "user", "content": f"valid {i}"}])) for i in range(20)]
            await publish("not-json", b"{this is not json")
            await publish("bad-shape", json.dumps({"model": "mock-small"}).encode())
            await publish("unknown-model", json.dumps(body("gpt-17")).encode(),
                          routing_key="gpt-17")
            await publish("no-reply-to", json.dumps(body()).encode(), reply_to=None)
            await publish("forged-reply-to", json.dumps(body()).encode(),
                          reply_to=names.work_queue("chat"))
            await publish("past-deadline", json.dumps(body()).encode(),
                          headers={p.H_DEADLINE: p.now_ms() - 1000})
            await publish("too-large", json.dumps(body(content="x" * 1_100_000)).encode())
            valid_done = await asyncio.gather(*valid)
            assert [c.choices[0].message.content for c in valid_done] == [
                f"mock reply to: valid {i}" for i in range(20)]
            await wait_for(lambda: _has(answers, 5))
            await wait_for(lambda: _depth_at_least(channel, names.parked_queue, 7))
            await asyncio.sleep(0.3)  # nothing more may arrive: no loops, no extra answers
            parked = await drain_queue(channel, names.parked_queue)

    codes = {cid: a["error"]["code"] for cid, a in answers.items()}
    assert codes == {
        "not-json": "invalid_request",
        "bad-shape": "invalid_request",
        "unknown-model": "unknown_model",
        "past-deadline": "deadline_exceeded",
        "too-large": "invalid_request",
    }
    assert "not valid JSON" in answers["not-json"]["error"]["message"]
    assert "messages" in answers["bad-shape"]["error"]["message"]
    reasons = {m.correlation_id: m.headers[p.H_REASON] for m in parked}
    assert reasons == {
        "not-json": "invalid_json",
        "bad-shape": "invalid_request",
        "unknown-model": "unknown_model",
        "no-reply-to": "no_reply_to",
        "forged-reply-to": "no_reply_to",
        "past-deadline": "deadline_exceeded",
        "too-large": "too_large",
    }
    for message in parked:
        assert message.headers[p.H_ERROR_MESSAGE]
        assert message.headers[p.H_PARKED_AT]
        assert message.expiration is None
    # Only the 20 valid requests reached the backend; the forged reply_to got nothing.
    assert mock.stats()["served"] == 20
    async with amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        assert await queue_depth(channel, names.work_queue("chat")) == 0
        assert await queue_depth(channel, names.triage_queue) == 0
    sample = metrics.registry.get_sample_value
    assert sample("hutch_requests_total", {"pool": "chat", "outcome": "ok"}) == 20
    assert sample("hutch_parked_total", {"reason": "invalid_json"}) == 1


async def _has(answers: dict[str, Any], n: int) -> bool:
    return len(answers) >= n


async def test_client_raises_typed_errors(make_settings: SettingsFactory,
                                          mock: MockBackend) -> None:
    from pipeline.errors import InvalidRequestError, RequestFailed, UnknownModelError

    settings = make_settings([("b1", mock.base_url, 4)])
    async with hutch(settings) as client:
        with pytest.raises(UnknownModelError) as unknown:
            await client.chat(model="gpt-17", messages=USER, timeout=10)
        with pytest.raises(InvalidRequestError) as invalid:
            await client.chat(model="mock-small", messages=[], timeout=10)
        with pytest.raises(InvalidRequestError) as streaming:
            await client.chat(model="mock-small", messages=USER, stream="yes", timeout=10)
        # Still serving after the failures.
        ok = await client.chat(model="mock-small", messages=USER, timeout=10)
    assert isinstance(unknown.value, RequestFailed) and "gpt-17" in unknown.value.message
    assert invalid.value.type == "invalid_request_error"
    assert "messages" in invalid.value.message
    assert "stream" in streaming.value.message
    assert ok.choices[0].message.content == "mock reply to: hello"
    assert mock.stats()["served"] == 1


async def test_a_worker_bug_is_answered_and_parked_not_stalled(
        make_settings: SettingsFactory) -> None:
    """An unexpected exception while handling a request ends in internal_error + parked,
    and the slot is free again for the next request."""
    import httpx

    from pipeline.errors import RequestFailed

    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated bug")
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "model": "mock-small",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}}]})

    settings = make_settings([("b1", "http://backend.invalid/v1", 1)])
    names = Names(settings.prefix)
    await apply_topology(settings)
    async with running_worker(settings, transport_factory=lambda _: httpx.MockTransport(handler)):
        from pipeline.client.client import HutchClient

        async with HutchClient.from_settings(settings) as client:
            with pytest.raises(RequestFailed) as failed:
                await client.chat(model="mock-small", messages=USER, timeout=10)
            ok = await client.chat(model="mock-small", messages=USER, timeout=10)
    assert failed.value.code == "internal_error"
    assert ok.choices[0].message.content == "fine"
    async with amqp(settings.amqp_url) as conn:
        parked = await drain_queue(await conn.channel(), names.parked_queue)
    assert [m.headers[p.H_REASON] for m in parked] == ["internal_error"]


class _RawLongString(bytes):
    """A long-string header sent as raw bytes: another client's non-UTF-8 string."""


async def test_binary_header_values_do_not_stop_parking(
        make_settings: SettingsFactory, mock: MockBackend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A string header that is not UTF-8 arrives as bytes, which the AMQP encoder cannot
    publish again; parking the request must not fail on it."""
    import struct

    from pamqp import encode

    table_value = encode.encode_table_value

    def with_raw(value: Any) -> bytes:
        if isinstance(value, _RawLongString):
            return b"S" + struct.pack(">I", len(value)) + bytes(value)
        return table_value(value)

    monkeypatch.setattr(encode, "encode_table_value", with_raw)
    settings = make_settings([("b1", mock.base_url, 4)])
    names = Names(settings.prefix)
    async with hutch(settings) as client, amqp(settings.amqp_url) as conn:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.requests_exchange)
        await exchange.publish(aio_pika.Message(
            b"not json", correlation_id="binary", reply_to=client.reply_queue_name,
            headers={"x-junk": _RawLongString(b"\xff\xfe"),  # type: ignore[dict-item]
                     "nested": {"k": _RawLongString(b"\xff")}}),
            routing_key="mock-small")
        from pipeline.errors import InvalidRequestError

        with pytest.raises(InvalidRequestError):
            await client.result("binary", timeout=10)
        parked = await drain_queue(channel, names.parked_queue, at_least=1)
        # The worker is still serving.
        ok = await client.chat(model="mock-small", messages=USER, timeout=10)
    assert [m.headers[p.H_REASON] for m in parked] == ["invalid_json"]
    assert bytes(parked[0].headers["x-junk"]) == b"\xff\xfe"
    assert ok.choices[0].message.content == "mock reply to: hello"
