"""Fakes for the unit tests of decisions and settling (no broker: what is tested is
Hutch's own logic; everything the broker does is tested against the real one)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.delivery import Delivery
from pipeline.settle.guard import ReplyGuard

NAMES = Names("llm")
GUARD = ReplyGuard(NAMES, worker_user="worker")


def chat_body(model: str = "small", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       **extra}).encode()


def completion(content: str = "ok", model: str = "mock-small",
               usage: Mapping[str, int] | None = None) -> dict[str, Any]:
    """An OpenAI chat completion as a backend answers it (for MockTransport handlers)."""
    answer: dict[str, Any] = {
        "id": "x", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}]}
    if usage is not None:
        answer["usage"] = dict(usage)
    return answer


@dataclass
class FakeMessage:
    """The parts of an aio-pika incoming message the worker reads, with recorded acks."""

    body: bytes = field(default_factory=chat_body)
    headers: Mapping[str, Any] | None = None
    correlation_id: str | None = "req-1"
    reply_to: str | None = "llm.reply.app"
    user_id: str | None = None
    priority: int | None = 3
    routing_key: str | None = "small"
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    timestamp: datetime | None = None
    expiration: float | None = None
    message_id: str | None = None
    type: str | None = None
    app_id: str | None = None
    exchange: str | None = "llm.requests"
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack(requeue={requeue})")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(f"reject(requeue={requeue})")


def delivery(*, deadline_in_s: float | None = None, attempts: int = 0, retries: int = 0,
             pool: str = "chat", max_attempts: int = 5, **fields: Any) -> Delivery:
    """A parsed delivery of a FakeMessage with the given counters and deadline."""
    headers = dict(fields.pop("headers", {}))
    if deadline_in_s is not None:
        headers[p.H_DEADLINE] = p.now_ms() + int(deadline_in_s * 1000)
    if attempts:
        headers[p.H_ATTEMPTS] = attempts
    if retries:
        headers[p.H_RETRIES] = retries
    message = FakeMessage(headers=headers, **fields)
    return Delivery.parse(cast(AbstractIncomingMessage, message), pool=pool, backend="b1",
                          policy=GUARD, max_attempts=max_attempts)


def settled_of(d: Delivery) -> list[str]:
    return cast(FakeMessage, d.message).settled
