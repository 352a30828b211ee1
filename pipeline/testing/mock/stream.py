"""A streamed reply as OpenAI-compatible servers send it: server-sent events, paced.

The events are those of OpenAI and vLLM: a first ``chat.completion.chunk`` whose delta
holds the role (and empty content), one chunk per token with ``delta.content``, a chunk
with an empty delta and the ``finish_reason``, with ``stream_options.include_usage`` a
chunk with ``usage`` and no choices, then ``data: [DONE]``. The first token comes after the
time to first token, each next one after the inter-token latency, both jittered so that
concurrent streams do not move in lock step. A stream fault strikes once, after a set
number of tokens; what it does is the server's business (see :data:`StrikeFault`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from pipeline.testing.mock.chat import ChatRequest, Reply
from pipeline.testing.mock.config import MockConfig

__all__ = ["DONE_EVENT", "MALFORMED_EVENT", "Pace", "Pacer", "StreamBody", "StrikeFault",
           "sse_headers", "write_stream"]

#: The event that ends an OpenAI stream.
DONE_EVENT = b"data: [DONE]\n\n"
#: A ``data:`` line that is not JSON (a chunk cut off in the middle), for the fault.
MALFORMED_EVENT = b'data: {"object": "chat.completion.chunk", "choices": [{"delta": \n\n'

#: Called once when a stream fault is due, with the response being written; False stops
#: the stream there (its connection was closed).
StrikeFault = Callable[[web.StreamResponse], Awaitable[bool]]


def sse_headers(request_id: str | None) -> dict[str, str]:
    """Response headers of a stream, echoing the caller's request id like a reply does."""
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return headers


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class Pace(Protocol):
    """What paces a stream: a fixed pace (:class:`Pacer`) or the realistic engine's."""

    async def pause(self, tokens_sent: int) -> None: ...


class Pacer:
    """Sleeps the time to first token and the inter-token latency, jittered.

    Its own seeded generator, so a seeded run's jitter does not shift the fault draws."""

    def __init__(self, config: MockConfig) -> None:
        self._config = config
        self._rng = random.Random(None if config.seed is None else f"{config.seed}:pace")

    def seconds(self, ms: float) -> float:
        """``ms`` scaled by a random factor in [1 - jitter, 1 + jitter], in seconds."""
        jitter = self._config.jitter
        factor = self._rng.uniform(1 - jitter, 1 + jitter) if jitter else 1.0
        return ms * factor / 1000.0

    async def pause(self, tokens_sent: int) -> None:
        """Wait before the next token (always yields, so a fast stream stays cancellable)."""
        config = self._config
        ms = config.first_token_ms if tokens_sent == 0 else config.itl_ms
        await asyncio.sleep(self.seconds(ms) if ms else 0)


class StreamBody:
    """The events of one streamed reply."""

    def __init__(self, chat: ChatRequest, reply: Reply, completion_id: str) -> None:
        self.reply = reply
        self._include_usage = chat.include_usage
        self._head = {"id": completion_id, "object": "chat.completion.chunk",
                      "created": int(time.time()), "model": chat.model}

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        """One ``chat.completion.chunk`` event (with ``usage: null`` when usage was asked
        for, as OpenAI sends it on every chunk but the last)."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        data: dict[str, Any] = {**self._head, "choices": [choice]}
        if self._include_usage:
            data["usage"] = None
        return _event(data)

    def token(self, index: int) -> bytes:
        """The chunk of token ``index``; the first is preceded by the role chunk."""
        chunk = self.chunk({"content": self.reply.tokens[index]})
        return self.chunk({"role": "assistant", "content": ""}) + chunk if index == 0 else chunk

    def end(self) -> bytes:
        """The finishing chunk, the usage chunk if asked for, and ``[DONE]``."""
        events = self.chunk({}, self.reply.finish_reason)
        if not self.reply.tokens:
            events = self.chunk({"role": "assistant", "content": ""}) + events
        if self._include_usage:
            events += _event({**self._head, "choices": [], "usage": self.reply.usage()})
        return events + DONE_EVENT


async def write_stream(
    response: web.StreamResponse, body: StreamBody, pacer: Pace,
    fault_after: int, strike: StrikeFault | None,
) -> bool:
    """Write a prepared response's events, paced; ``strike`` (if any) is called once
    ``fault_after`` tokens were sent (or before the end of a shorter reply). True when the
    stream ended with ``[DONE]``, False when the fault cut it. A client that went away
    raises ``ConnectionResetError`` or cancels the handler."""
    sent = 0
    for index in range(len(body.reply.tokens)):
        await pacer.pause(sent)
        if strike is not None and sent == fault_after and not await strike(response):
            return False
        await response.write(body.token(index))
        sent += 1
    if strike is not None and fault_after >= sent and not await strike(response):
        return False
    await response.write(body.end())
    return True
