"""Completions and embeddings travel the same queue to the backends' matching endpoints."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import httpx

from pipeline import protocol as p
from pipeline.broker.topology import apply_topology
from tests.conftest import SettingsFactory, amqp, running_worker
from tests.test_streaming import client

ANSWERS: dict[str, dict[str, Any]] = {
    "/v1/embeddings": {"object": "list", "model": "mock-small",
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1]}],
                       "usage": {"prompt_tokens": 2, "total_tokens": 2}},
    "/v1/completions": {"id": "t1", "object": "text_completion", "model": "mock-small",
                        "choices": [{"index": 0, "text": " upon a time",
                                     "finish_reason": "stop"}]},
}


async def test_embeddings_and_completions_reach_their_endpoints(
        make_settings: SettingsFactory) -> None:
    settings = make_settings()
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json=ANSWERS[request.url.path])

    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection, running_worker(
            settings, transport_factory=lambda _: httpx.MockTransport(handler)) as worker:
        c = await client(await connection.channel(), settings)
        exchange = await c.channel.get_exchange(c.names.requests_exchange)
        replies = []
        for endpoint, body in (("embeddings", {"model": "mock-small", "input": "hi"}),
                               ("completions", {"model": "mock-small", "prompt": "Once"})):
            await exchange.publish(aio_pika.Message(
                json.dumps(body).encode(), correlation_id=uuid.uuid4().hex,
                reply_to=c.queue.name, headers={p.H_ENDPOINT: endpoint}),
                routing_key="mock-small")
            replies.append(await c.collect())
        sample = worker.metrics.registry.get_sample_value
        tokens = sample("hutch_tokens_total",
                        {"pool": "chat", "model": "mock-small", "kind": "prompt"})
    assert paths == ["/v1/embeddings", "/v1/completions"]
    assert [r.final_body() for r in replies] == [ANSWERS[path] for path in paths]
    assert tokens == 2  # the embeddings' usage is counted like any other
