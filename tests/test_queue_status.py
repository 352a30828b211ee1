"""Queue status messages on the real broker: a saturated pool (a mock backend with one
slot, a flood), a request that asks for its status gets exactly one, before its one
answer; one that does not ask gets none; HutchClient shows it beside the answer, the
gateway as an SSE comment. Order and counts only, never timings."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel

from hutch import HutchClient, QueueStatus
from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.gateway.calls import H_STATUS_AFTER
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory, body, running_worker
from tests.gateway_support import KEY_A, gateway_stack, keyed

FLOOD = 40


@pytest.fixture
async def backend() -> AsyncIterator[MockBackend]:
    """One slot, ~40 ms: a flood of 40 keeps it busy for seconds."""
    async with MockBackend(MockConfig(latency_ms=40, capacity=1, jitter=0.2)) as mock:
        yield mock


def saturated(make_settings: SettingsFactory, backend: MockBackend) -> Settings:
    return make_settings(backends=[("b1", backend.base_url, 1)])


async def publish(channel: AbstractChannel, settings: Settings, reply_to: str, cid: str,
                  headers: dict[str, Any] | None = None) -> None:
    """One request, published as a client following the wire contract would."""
    exchange = await channel.get_exchange(Names(settings.prefix).requests_exchange)
    await exchange.publish(aio_pika.Message(
        json.dumps(body()).encode(), correlation_id=cid, reply_to=reply_to,
        content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={p.H_SENT_AT: p.now_ms(), **(headers or {})}), routing_key="mock-small")


async def test_one_status_before_the_answer_only_for_the_request_that_asked(
        make_settings: SettingsFactory, backend: MockBackend) -> None:
    settings = saturated(make_settings, backend)
    await apply_topology(settings)
    reply_to = Names(settings.prefix).reply_queue(f"{settings.amqp_user}.status")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, running_worker(settings):
        channel = await connection.channel()
        queue = await channel.declare_queue(reply_to, exclusive=True)
        for i in range(FLOOD):
            await publish(channel, settings, reply_to, f"flood-{i}")
        seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        async with asyncio.timeout(90), queue.iterator() as messages:
            async for message in messages:  # a few answers first: the rate is known
                await message.ack()
                kind = str((message.headers or {}).get(p.H_KIND))
                seen.setdefault(str(message.correlation_id), []).append(
                    (kind, json.loads(message.body)))
                if sum(1 for kinds in seen.values() for k, _ in kinds if k == "final") == 3:
                    break
            await publish(channel, settings, reply_to, "asks", {p.H_STATUS_AFTER_MS: 0})
            await publish(channel, settings, reply_to, "quiet")
            async for message in messages:
                await message.ack()
                kind = str((message.headers or {}).get(p.H_KIND))
                seen.setdefault(str(message.correlation_id), []).append(
                    (kind, json.loads(message.body)))
                if sum(1 for kinds in seen.values() for k, _ in kinds
                       if k == "final") == FLOOD + 2:
                    break
    kinds = {cid: [kind for kind, _ in messages] for cid, messages in seen.items()}
    assert kinds["asks"] == [p.KIND_STATUS, p.KIND_FINAL]
    assert kinds["quiet"] == [p.KIND_FINAL]
    assert all(k == [p.KIND_FINAL] for cid, k in kinds.items() if cid.startswith("flood"))
    status = QueueStatus.model_validate(seen["asks"][0][1])
    assert status.object == p.STATUS_OBJECT and status.pool == "chat"
    assert status.position > 0  # behind what was left of the flood
    assert status.estimated_start_s is not None and status.estimated_start_s > 0
    assert status.estimated_start_at_ms is not None
    assert status.estimated_start_at_ms > status.estimated_at_ms
    assert seen["asks"][1][1]["object"] == "chat.completion"  # the answer, unchanged


async def test_hutch_client_shows_the_status_and_still_returns_the_answer(
        make_settings: SettingsFactory, backend: MockBackend) -> None:
    settings = saturated(make_settings, backend)
    await apply_topology(settings)
    async with running_worker(settings), HutchClient.from_settings(settings) as client:
        flood = [await client.submit(body(content=str(i)), model="mock-small", timeout=60)
                 for i in range(FLOOD)]
        told: list[QueueStatus] = []
        asks = await client.submit(body(content="asks"), model="mock-small", timeout=60,
                                   status_after=0, on_status=told.append)
        chatted: list[QueueStatus] = []
        chat = asyncio.create_task(client.chat(
            model="mock-small", messages=[{"role": "user", "content": "chat"}], timeout=60,
            status_after=0, on_status=chatted.append))
        silent: list[QueueStatus] = []
        quiet = await client.submit(body(content="quiet"), model="mock-small", timeout=60,
                                    on_status=silent.append)
        stream = client.chat_stream(model="mock-small", timeout=60, status_after=0,
                                    messages=[{"role": "user", "content": f"s-{uuid.uuid4()}"}])
        async with stream:
            chunks = [chunk async for chunk in stream]
        replies = await asyncio.gather(*(client.result(cid) for cid in [*flood, asks, quiet]))
        completion = await chat
    assert all(reply.completion.object == "chat.completion" for reply in replies)
    assert completion.choices[0].message.content == "mock reply to: chat"
    assert len(told) == 1 and told[0].position > 0 and silent == [] and len(chatted) == 1
    assert chunks and stream.queue_status is not None  # shown beside the chunks


async def test_the_gateway_sends_a_queued_stream_an_sse_comment(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    config = MockConfig(latency_ms=40, capacity=1, jitter=0.2)
    async with gateway_stack(make_settings, mock=config, capacity=1,
                             gateway=keyed(monkeypatch)) as stack, \
            HutchClient.from_settings(stack.settings) as client:
        flood = [await client.submit(body(content=str(i)), model="mock-small", timeout=60)
                 for i in range(FLOOD)]
        request = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}],
                   "stream": True}
        async with httpx.AsyncClient(base_url=stack.root, timeout=60) as http, http.stream(
                "POST", "/v1/chat/completions", json=request, headers={
                    "Authorization": f"Bearer {KEY_A}", H_STATUS_AFTER: "0"}) as response:
            lines = [line async for line in response.aiter_lines() if line]
        # The OpenAI SDK skips the comment: the same answer as ever.
        chunks = [chunk async for chunk in await stack.openai().chat.completions.create(
            model="mock-small", messages=request["messages"], stream=True,  # type: ignore[call-overload]
            extra_headers={H_STATUS_AFTER: "0"})]
        async with httpx.AsyncClient(base_url=stack.root, timeout=60) as http:
            refused = await http.post("/v1/chat/completions", json=request, headers={
                "Authorization": f"Bearer {KEY_A}", H_STATUS_AFTER: "soon"})
        await asyncio.gather(*(client.result(cid) for cid in flood))
    assert response.status_code == 200
    assert lines[0].startswith(": queued position="), lines[:2]
    assert "estimated_start_s=" in lines[0] and "estimated_start_at=" in lines[0]
    assert all(line.startswith("data: ") for line in lines[1:]) and lines[-1] == "data: [DONE]"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "mock reply to: hi")
    assert refused.status_code == 400 and H_STATUS_AFTER in refused.json()["error"]["message"]


async def test_a_queued_stream_that_expires_ends_with_an_error_event(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its response is open (the status went out as a comment): the error that ends it
    before any chunk is an SSE event, as after a chunk. Its key and the flood's user are
    one tenant, its priority theirs (team-a's default, 1): it waits behind the flood, past
    its deadline."""
    config = MockConfig(latency_ms=40, capacity=1, jitter=0.2)
    one = {"shared": {"users": ["guest", "team-a"]}}
    async with gateway_stack(make_settings, mock=config, capacity=1, tenants=one,
                             gateway=keyed(monkeypatch)) as stack, \
            HutchClient.from_settings(stack.settings) as client:
        flood = [await client.submit(body(content=str(i)), model="mock-small", timeout=60,
                                     priority=1) for i in range(FLOOD)]
        request = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}],
                   "stream": True}
        async with httpx.AsyncClient(base_url=stack.root, timeout=60) as http, http.stream(
                "POST", "/v1/chat/completions", json=request, headers={
                    "Authorization": f"Bearer {KEY_A}", H_STATUS_AFTER: "0",
                    "x-hutch-timeout": "0.5"}) as response:
            lines = [line async for line in response.aiter_lines() if line]
        await asyncio.gather(*(client.result(cid) for cid in flood))
    assert response.status_code == 200 and lines[0].startswith(": queued ")
    assert len(lines) == 2 and lines[1].startswith("data: "), lines
    assert json.loads(lines[1].removeprefix("data: "))["error"]["code"] == "deadline_exceeded"
