"""Hutch in front of a real server: settings, a raw wire client, direct calls.

The contract checks run the same way against each server (``RealBackend`` says what
differs: model names, whether its stream sends usage, how to make it fail). Replies are
read with a raw aio-pika client of the wire contract, so a check sees every message a
request got (a duplicate reply is a failure, not something a client library drops).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.settings import Settings, load_settings
from pipeline.worker.worker import Worker
from tests.conftest import running_worker
from tests.real.servers import ServerProcess

__all__ = ["Final", "RealBackend", "WireClient", "chat_body", "direct_chat", "direct_stream",
           "eventually", "parked", "real_settings", "serving", "wire_client"]


@dataclass(frozen=True)
class RealBackend:
    """One real server as the contract checks use it."""

    kind: str  # the extra: "litellm" or "llamacpp"
    server: ServerProcess
    #: A model it answers; every model Hutch's pool lists for it.
    model: str
    models: tuple[str, ...]
    #: Does its stream end with a usage chunk when asked (``include_usage``)?
    usage_in_stream: bool
    #: Calls it serves at once (llama.cpp's server runs one generation at a time).
    max_concurrency: int
    #: Extra body fields for a deterministic answer (same text direct and through Hutch).
    deterministic: dict[str, Any] = field(default_factory=dict)
    #: Body fields that make the server refuse the request as too long for its context.
    too_long: dict[str, Any] = field(default_factory=dict)
    #: The ``code`` of the server's error then (LiteLLM's proxy says ``"400"``).
    too_long_code: str = "context_length_exceeded"
    #: Body fields that make the server answer 500 to this request alone (a poison
    #: request: its other requests succeed).
    server_error: dict[str, Any] = field(default_factory=dict)
    api_key_env: str | None = None
    #: LiteLLM limits each model on its own, so a 429 pauses only that model.
    throttle_scope: str = "backend"

    def backend_name(self, prefix: str) -> str:
        return f"{prefix}-{self.kind}"


def real_settings(amqp_url: str, prefix: str, backend: RealBackend, *,
                  timeout_s: float = 10.0, **pool: Any) -> Settings:
    """One pool ``real`` with the server as its only backend; ``pool`` overrides keys."""
    backend_settings = {"name": backend.backend_name(prefix), "url": backend.server.base_url,
                        "max_concurrency": backend.max_concurrency, "timeout_s": timeout_s,
                        "api_key_env": backend.api_key_env,
                        "throttle_scope": backend.throttle_scope}
    pool_settings = {"name": "real", "models": list(backend.models),
                     "backends": [backend_settings], **pool}
    return load_settings(amqp_url=amqp_url, prefix=prefix, pools=[pool_settings],
                         lease_retry_s=0.5, shutdown_grace_s=10, stream_window_ms=10)


def chat_body(model: str, content: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def direct_chat(backend: RealBackend, body: dict[str, Any]) -> httpx.Response:
    """The same request sent to the server itself, not through Hutch."""
    headers = {}
    if backend.server.api_key:
        headers["authorization"] = f"Bearer {backend.server.api_key}"
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"{backend.server.base_url}/chat/completions", json=body,
                               headers=headers)


async def direct_stream(backend: RealBackend, body: dict[str, Any]
                        ) -> list[dict[str, Any]]:
    """The events of the same streamed request sent to the server itself ([DONE] left
    out)."""
    response = await direct_chat(backend, {**body, "stream": True})
    assert response.status_code == 200, response.text
    events = []
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            events.append(json.loads(line[5:]))
    return events


async def eventually(predicate: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passed (a server writes its access
    log line just after it answered); its last value."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return predicate()


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Worker]:
    """The topology applied and a worker holding the server's lease."""
    await apply_topology(settings)
    async with running_worker(settings) as worker:
        yield worker


async def parked(settings: Settings, timeout_s: float = 10.0, *, at_least: int = 1
                 ) -> dict[str, dict[str, Any]]:
    """The parked copies' headers by correlation id, once ``at_least`` are there."""
    found: dict[str, dict[str, Any]] = {}
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, asyncio.timeout(timeout_s):
        channel = await connection.channel()
        queue = await channel.declare_queue(Names(settings.prefix).parked_queue, passive=True)
        while len(found) < at_least:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            found[message.correlation_id or ""] = dict(message.headers or {})
    return found


@dataclass
class Final:
    """The final message of a request (its answer), with what arrived before it."""

    message: AbstractIncomingMessage
    chunks: list[AbstractIncomingMessage]

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.message.headers or {})

    @property
    def ok(self) -> bool:
        return self.headers.get(p.H_OUTCOME) == "ok"

    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.message.body)
        return data

    def error(self) -> dict[str, Any]:
        assert not self.ok, f"expected an error reply, got {self.body()}"
        error: dict[str, Any] = self.body()["error"]
        return error

    def streamed_text(self) -> str:
        """The text of the chunk messages of the final's stream id, in ``x-hutch-seq``
        order (as a client rebuilds it)."""
        stream_id = self.headers.get(p.H_STREAM_ID)
        ours = [m for m in self.chunks if (m.headers or {}).get(p.H_STREAM_ID) == stream_id]
        text = ""
        for message in sorted(ours, key=lambda m: int(str((m.headers or {})[p.H_SEQ]))):
            for event in json.loads(message.body):
                for choice in event.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or ""
        return text


class WireClient:
    """A raw client of the wire contract: publishes requests and keeps every message
    each correlation id got, so a check can count finals (exactly one per request)."""

    def __init__(self, channel: AbstractChannel, names: Names, queue: AbstractQueue) -> None:
        self.channel, self.names, self.queue = channel, names, queue
        self.messages: dict[str, list[AbstractIncomingMessage]] = defaultdict(list)
        self._arrived = asyncio.Condition()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        async with self._arrived:
            self.messages[message.correlation_id or ""].append(message)
            self._arrived.notify_all()

    async def send(self, body: dict[str, Any], *, timeout_s: float = 30.0,
                   priority: int = 0) -> str:
        """Publish a request (with confirms) whose deadline is ``timeout_s`` from now."""
        cid = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        exchange = await self.channel.get_exchange(self.names.requests_exchange)
        await exchange.publish(aio_pika.Message(
            json.dumps(body).encode(), correlation_id=cid, reply_to=self.queue.name,
            content_type="application/json", user_id="guest", priority=priority,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=timeout_s, headers={p.H_DEADLINE: now_ms + int(timeout_s * 1000),
                                           p.H_SENT_AT: now_ms}), routing_key=body["model"])
        return cid

    def finals(self, cid: str) -> list[AbstractIncomingMessage]:
        return [m for m in self.messages.get(cid, [])
                if (m.headers or {}).get(p.H_KIND) != p.KIND_CHUNK]

    async def final(self, cid: str, timeout_s: float = 30.0) -> Final:
        """The request's final message, once it arrived."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: bool(self.finals(cid)))
        chunks = [m for m in self.messages[cid]
                  if (m.headers or {}).get(p.H_KIND) == p.KIND_CHUNK]
        return Final(self.finals(cid)[0], chunks)


@asynccontextmanager
async def wire_client(settings: Settings) -> AsyncIterator[WireClient]:
    """A connected :class:`WireClient` with a reply queue of its own."""
    names = Names(settings.prefix)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            names.reply_queue(f"real-{uuid.uuid4().hex[:6]}"), durable=True,
            arguments={"x-expires": 120_000})
        client = WireClient(channel, names, queue)
        await queue.consume(client._on_message)
        yield client
