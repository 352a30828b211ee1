"""Streaming replies and cancellation through the real broker.

The backends here are httpx.MockTransport handlers that stream server-sent events, so each
fault is exact (malformed events, a connection dropped mid-stream, silence between chunks,
a failure before the first chunk) and an aborted call is seen by the handler. The client
is raw aio-pika, as a client in any language would read the wire contract.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.settings import BackendSettings, Settings
from tests.conftest import SettingsFactory, amqp, running_worker

WORDS = ["Hutch", " streams", " tokens", " through", " the", " broker", "."]


def sse(chunk: dict[str, Any] | str) -> bytes:
    data = chunk if isinstance(chunk, str) else json.dumps(chunk)
    return f"data: {data}\n\n".encode()


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"id": "s1", "object": "chat.completion.chunk", "created": 1, "model": "mock-small",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@dataclass
class StreamingBackend:
    """An SSE backend with one fault, counting calls and the calls it saw aborted."""

    fault: str = "none"  # none | malformed | drop | hang | fail_first | hang_first
    gap_s: float = 0.01
    calls: int = 0
    aborted: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            if self.fault == "hang_first":
                await asyncio.sleep(30)
            for i, word in enumerate(WORDS):
                if i == 3 and self.fault == "malformed":
                    yield b"data: {this is not json\n\n"
                if i == 3 and self.fault == "drop":
                    raise httpx.ReadError("connection reset by peer")
                if i == 3 and self.fault == "hang":
                    await asyncio.sleep(30)
                yield sse(chunk(word))
                self.started.set()
                await asyncio.sleep(self.gap_s)
            yield sse(chunk(finish="stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                yield sse({"id": "s1", "object": "chat.completion.chunk", "choices": [],
                           "usage": {"prompt_tokens": 4, "completion_tokens": len(WORDS),
                                     "total_tokens": 4 + len(WORDS)}})
            yield sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled, or closed early: the caller went away before the end.
            self.aborted += 1
            raise

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        body = json.loads(request.content)
        if self.fault == "fail_first" and self.calls == 1:
            return httpx.Response(503, json={"error": {"message": "warming up"}})
        if not body.get("stream"):
            self.started.set()
            await asyncio.sleep(30 if self.fault.startswith("hang") else 0)
            return httpx.Response(200, json={
                "id": "c1", "object": "chat.completion", "created": 1, "model": "mock-small",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                             "finish_reason": "stop"}]})
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=self._events(body))


def transports(backend: StreamingBackend) -> Callable[[BackendSettings], httpx.AsyncBaseTransport]:
    return lambda settings: httpx.MockTransport(backend.handler)


@dataclass
class Received:
    chunks: list[AbstractIncomingMessage] = field(default_factory=list)
    final: AbstractIncomingMessage | None = None

    def text(self) -> str:
        out = ""
        for message in sorted(self.chunks, key=lambda m: (m.headers or {})[p.H_SEQ]):
            for event in json.loads(message.body):
                for choice in event["choices"]:
                    out += choice["delta"].get("content") or ""
        return out

    def final_body(self) -> dict[str, Any]:
        assert self.final is not None
        body: dict[str, Any] = json.loads(self.final.body)
        return body


class Client:
    """A raw AMQP client of the wire contract: a reply queue, publish, collect."""

    def __init__(self, channel: AbstractChannel, names: Names, queue: AbstractQueue) -> None:
        self.channel, self.names, self.queue = channel, names, queue

    async def send(self, body: dict[str, Any], cid: str | None = None) -> str:
        cid = cid or uuid.uuid4().hex
        exchange = await self.channel.get_exchange(self.names.requests_exchange)
        await exchange.publish(aio_pika.Message(
            json.dumps(body).encode(), correlation_id=cid, reply_to=self.queue.name,
            content_type="application/json", user_id="guest"), routing_key=body["model"])
        return cid

    async def cancel(self, cid: str) -> None:
        exchange = await self.channel.get_exchange(self.names.cancel_exchange)
        await exchange.publish(aio_pika.Message(b"", correlation_id=cid, user_id="guest"),
                               routing_key="")

    async def collect(self, timeout: float = 15) -> Received:
        got = Received()
        async with asyncio.timeout(timeout), self.queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if (message.headers or {}).get(p.H_KIND) == p.KIND_CHUNK:
                    got.chunks.append(message)
                else:
                    got.final = message
                    return got
        return got


async def client(channel: AbstractChannel, settings: Settings) -> Client:
    names = Names(settings.prefix)
    queue = await channel.declare_queue(names.reply_queue(f"s{uuid.uuid4().hex[:6]}"),
                                        durable=True, arguments={"x-expires": 60_000})
    return Client(channel, names, queue)


def stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}],
            "stream": True, **extra}


async def parked(channel: AbstractChannel, settings: Settings) -> list[str]:
    queue = await channel.declare_queue(Names(settings.prefix).parked_queue, passive=True)
    reasons = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        reasons.append(str((message.headers or {})[p.H_REASON]))
    return reasons


async def test_a_stream_arrives_as_numbered_chunks_then_one_complete_final(
        make_settings: SettingsFactory) -> None:
    settings = make_settings(stream_window_ms=50)
    backend = StreamingBackend()
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection, \
            running_worker(settings, transport_factory=transports(backend)):
        channel = await connection.channel()
        c = await client(channel, settings)
        await c.send(stream_body(stream_options={"include_usage": True}))
        got = await c.collect()
    assert got.final is not None and got.chunks
    headers = [m.headers or {} for m in got.chunks]
    assert [h[p.H_SEQ] for h in headers] == list(range(len(got.chunks)))
    assert len({h[p.H_STREAM_ID] for h in headers}) == 1
    assert all(m.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT for m in got.chunks)
    final = got.final.headers or {}
    assert got.final.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert final[p.H_KIND] == p.KIND_FINAL and final[p.H_OUTCOME] == "ok"
    assert final[p.H_SEQ] == len(got.chunks) and final[p.H_STREAM_ID] == headers[0][p.H_STREAM_ID]
    completion = got.final_body()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "".join(WORDS) == got.text()
    assert completion["usage"]["completion_tokens"] == len(WORDS)
    assert len(got.chunks) < len(WORDS) + 2  # coalesced: fewer messages than events


async def test_a_failure_before_the_first_chunk_is_retried_invisibly(
        make_settings: SettingsFactory) -> None:
    settings = make_settings()
    backend = StreamingBackend(fault="fail_first")
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection, \
            running_worker(settings, transport_factory=transports(backend)):
        c = await client(await connection.channel(), settings)
        await c.send(stream_body())
        got = await c.collect()
    assert backend.calls == 2
    assert got.final_body()["choices"][0]["message"]["content"] == "".join(WORDS)
    assert (got.final.headers or {})[p.H_ATTEMPTS] == 2  # type: ignore[union-attr]


async def test_faults_after_the_first_chunk_end_in_stream_interrupted(
        make_settings: SettingsFactory) -> None:
    settings = make_settings(stream_window_ms=0, stream_idle_timeout_s=0.5)
    await apply_topology(settings)
    for fault in ("malformed", "drop", "hang"):
        backend = StreamingBackend(fault=fault)
        async with amqp(settings.amqp_url) as connection, \
                running_worker(settings, transport_factory=transports(backend)):
            channel = await connection.channel()
            c = await client(channel, settings)
            await c.send(stream_body())
            got = await c.collect()
            reasons = await _eventually_parked(channel, settings)
        error = got.final_body()["error"]
        assert error["code"] == "stream_interrupted", (fault, error)
        assert error["chunks_sent"] == 3 and error["content_chars_sent"] == len(
            "".join(WORDS[:3])), (fault, error)
        assert got.text() == "".join(WORDS[:3])
        assert reasons == ["stream_interrupted"], fault
        assert backend.calls == 1, fault  # never retried after chunks went out


async def _eventually_parked(channel: AbstractChannel, settings: Settings) -> list[str]:
    for _ in range(100):
        reasons = await parked(channel, settings)
        if reasons:
            return reasons
        await asyncio.sleep(0.05)
    return []


async def test_cancel_of_a_call_at_the_backend_aborts_it(
        make_settings: SettingsFactory) -> None:
    settings = make_settings()
    await apply_topology(settings)
    for body in (stream_body(), {**stream_body(), "stream": False}):
        backend = StreamingBackend(fault="hang", gap_s=0)
        async with amqp(settings.amqp_url) as connection, \
                running_worker(settings, transport_factory=transports(backend)) as worker:
            channel = await connection.channel()
            c = await client(channel, settings)
            cid = await c.send(body)
            await asyncio.wait_for(backend.started.wait(), 10)
            await c.cancel(cid)
            got = await c.collect()
            assert await parked(channel, settings) == []
        assert got.final_body()["error"]["code"] == "cancelled", body
        assert backend.aborted == (1 if body["stream"] else 0)
        sample = worker.metrics.registry.get_sample_value
        assert sample("hutch_cancels_total", {"pool": "chat", "stage": "in_flight"}) == 1


async def test_cancel_of_a_queued_request_never_calls_the_backend(
        make_settings: SettingsFactory) -> None:
    settings = make_settings()
    backend = StreamingBackend()
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection:
        channel = await connection.channel()
        c = await client(channel, settings)
        cid = uuid.uuid4().hex
        async with running_worker(settings, transport_factory=transports(backend)):
            await c.cancel(cid)  # the tombstone is waiting when the request arrives
            await asyncio.sleep(0.2)
            await c.send(stream_body(), cid)
            got = await c.collect()
    assert got.final_body()["error"]["code"] == "cancelled"
    assert backend.calls == 0


async def test_a_client_gone_mid_stream_aborts_the_backend_call(
        make_settings: SettingsFactory) -> None:
    settings = make_settings(stream_window_ms=0)
    backend = StreamingBackend(gap_s=0.3)
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection, \
            running_worker(settings, transport_factory=transports(backend)) as worker:
        channel = await connection.channel()
        c = await client(channel, settings)
        await c.send(stream_body())
        await asyncio.wait_for(backend.started.wait(), 10)
        await c.queue.delete(if_unused=False, if_empty=False)
        for _ in range(40):
            if backend.aborted:
                break
            await asyncio.sleep(0.05)
        assert backend.aborted == 1  # within a second or so of the queue going away
        sample = worker.metrics.registry.get_sample_value
        for _ in range(40):
            if sample("hutch_cancels_total", {"pool": "chat", "stage": "client_gone"}):
                break
            await asyncio.sleep(0.05)
        assert sample("hutch_cancels_total", {"pool": "chat", "stage": "client_gone"}) == 1
        assert await parked(channel, settings) == []


async def test_send_priority_passes_the_amqp_priority_to_the_backend(
        make_settings: SettingsFactory) -> None:
    base = make_settings()
    backend = base.pools[0].backends[0].model_copy(update={"send_priority": True})
    pool = base.pools[0].model_copy(update={"backends": [backend]})
    settings = base.model_copy(update={"pools": [pool]})
    seen: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={
            "id": "c1", "object": "chat.completion", "created": 1, "model": "mock-small",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                         "finish_reason": "stop"}]})

    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection, running_worker(
            settings, transport_factory=lambda _: httpx.MockTransport(handler)):
        c = await client(await connection.channel(), settings)
        exchange = await c.channel.get_exchange(c.names.requests_exchange)
        for priority, extra in ((7, {}), (0, {}), (200, {}), (5, {"priority": -3})):
            await exchange.publish(aio_pika.Message(
                json.dumps({"model": "mock-small", "messages": [{"role": "user",
                                                                 "content": "x"}], **extra}
                           ).encode(), correlation_id=uuid.uuid4().hex, priority=priority,
                reply_to=c.queue.name), routing_key="mock-small")
            await c.collect()
    # vLLM serves lower values first: AMQP 7 of 9 -> 2, 0 -> 9; above the max counts as it.
    assert [body["priority"] for body in seen] == [2, 9, 0, -3]
