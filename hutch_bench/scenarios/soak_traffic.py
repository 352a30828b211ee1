"""The soak's mixed traffic, and how it counts each request's terminal answers.

Every request is one of :data:`KINDS`: a whole or streamed request through a
:class:`~pipeline.client.client.HutchClient`, one cancelled a moment after it was sent,
a stream left after its first chunk (the caller goes away), and whole, streamed and
abandoned OpenAI HTTP calls through the gateway.

"Exactly one terminal answer" is counted where the client sees it. On AMQP the final
messages of each correlation id are counted as they reach the reply consumer, before the
client's own de-duplication (:class:`FinalCounter`): how many reached the client, and how
many of them were handed to a caller. A second final on the wire (a request redelivered
after a worker's ``kill -9`` is answered again; docs/concepts/failures.md) is counted
apart from a second answer to the caller; a request the caller left (a cancel, a
disconnect) must still get its one final (``cancelled``, or the answer if it won).
Over HTTP the answer is the response (a status and body), or a stream's ``[DONE]`` or
error event; a call the client abandons on purpose ends there (``disconnected``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from hutch_bench.scenarios.common import MODEL
from hutch_bench.scenarios.litellm import API_KEY
from pipeline.client.client import HutchClient
from pipeline.client.replies import ReplyMessage, is_chunk
from pipeline.client.stream import ChatStream
from pipeline.errors import RequestFailed

__all__ = ["KINDS", "FinalCounter", "RequestLog", "SoakRecord", "Traffic"]

#: Request kinds and their default shares of the traffic.
KINDS: dict[str, float] = {
    "whole": 0.35,
    "stream": 0.15,
    "cancel": 0.10,
    "disconnect": 0.05,
    "http_whole": 0.20,
    "http_stream": 0.10,
    "http_disconnect": 0.05,
}
#: Kinds through the gateway (the rest go through a HutchClient).
HTTP_KINDS = frozenset(k for k in KINDS if k.startswith("http_"))
#: Kinds whose caller leaves on purpose (a cancel, or a client gone).
LEAVING_KINDS = frozenset({"cancel", "disconnect", "http_disconnect"})
#: How long an abandoning caller waits before it leaves (s, uniform up to this).
_LEAVE_MAX_S = 0.3


@dataclass
class SoakRecord:
    """One request: what it was, when, how it ended, and how many terminal answers the
    client saw (filled in by :class:`FinalCounter` for AMQP requests)."""

    index: int
    kind: str
    sent_s: float
    outcome: str = ""
    done_s: float | None = None
    correlation_id: str | None = None
    #: Final messages that reached the client (AMQP), or terminal answers read (HTTP).
    answers: int = 0
    #: Of the AMQP finals, those handed to a caller still waiting (the rest the client
    #: drops: a redelivered request's second reply, one after the caller left).
    delivered: int = 0


class FinalCounter:
    """Counts the final messages per correlation id that reach one client's reply
    consumer (``finals``: before its router drops duplicates, a wrapper of its
    ``route``), and those the router hands to a caller still waiting (``delivered``)."""

    def __init__(self, client: HutchClient) -> None:
        self.finals: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        router = client._router  # the one place every reply message passes through
        route = router.route

        def counting(message: ReplyMessage) -> None:
            if not is_chunk(message):
                cid = message.correlation_id or ""
                self.finals[cid] += 1
                future = router._futures.get(cid)
                if cid in router._streams or (future is not None and not future.done()):
                    self.delivered[cid] += 1
            route(message)

        router.route = counting  # type: ignore[method-assign]


@dataclass
class RequestLog:
    """Every record of a run, and the finals counted per AMQP client."""

    records: list[SoakRecord] = field(default_factory=list)
    counters: list[FinalCounter] = field(default_factory=list)

    def settle_answers(self) -> int:
        """Copy each AMQP request's final count into its record; how many have none."""
        finals: Counter[str] = Counter()
        delivered: Counter[str] = Counter()
        for counter in self.counters:
            finals.update(counter.finals)
            delivered.update(counter.delivered)
        missing = 0
        for record in self.records:
            if record.kind not in HTTP_KINDS:
                record.answers = finals.get(record.correlation_id or "", 0)
                record.delivered = delivered.get(record.correlation_id or "", 0)
                missing += record.answers == 0
        return missing


def _code(exc: BaseException) -> str:
    if isinstance(exc, RequestFailed):
        return str(exc.code)
    return type(exc).__name__


def _http_failure(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error.get("hutch_code") or error.get("code") or f"http_{status}")
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"http_{status}"


def _body(index: int, *, stream: bool, tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": tokens, "messages": [
        {"role": "user", "content": f"soak-{index} " + "lorem " * 12}]}
    if stream:
        body["stream"] = True
    return body


class Traffic:
    """Fires the mixed requests of a soak on AMQP clients and one gateway."""

    def __init__(self, clients: Sequence[HutchClient], gateway_url: str, log: RequestLog,
                 *, timeout_s: float, tokens: int, seed: int) -> None:
        self.clients = clients
        self.url = gateway_url.rstrip("/") + "/chat/completions"
        self.log = log
        self.timeout_s = timeout_s
        self.tokens = tokens
        self.rng = random.Random(f"{seed}:leave")
        self.started = time.monotonic()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            headers={"Authorization": f"Bearer {API_KEY}"})

    async def aclose(self) -> None:
        await self._session.close()

    def now(self) -> float:
        return time.monotonic() - self.started

    async def fire(self, index: int, kind: str) -> None:
        """Send one request of ``kind`` and record how it ended (never raises)."""
        record = SoakRecord(index, kind, self.now())
        self.log.records.append(record)
        try:
            record.outcome = await getattr(self, f"_{kind}")(record)
        except asyncio.CancelledError:
            record.outcome = "unfinished"
            raise
        except Exception as exc:  # a soak counts failures, it does not stop on them
            record.outcome = _code(exc)
        finally:
            record.done_s = self.now()

    def _client(self, record: SoakRecord) -> HutchClient:
        return self.clients[record.index % len(self.clients)]

    def _leave_after(self) -> float:
        return self.rng.uniform(0, _LEAVE_MAX_S)

    # -- through a HutchClient -------------------------------------------------------

    async def _whole(self, record: SoakRecord) -> str:
        client, correlation_id = await self._submit(record)
        await client.result(correlation_id)
        return "ok"

    async def _submit(self, record: SoakRecord) -> tuple[HutchClient, str]:
        """Publish ``record``'s whole request: the client that awaits its answer, and its
        correlation id."""
        client = self._client(record)
        correlation_id = record.correlation_id = await client.submit(
            _body(record.index, stream=False, tokens=self.tokens), model=MODEL,
            timeout=self.timeout_s)
        return client, correlation_id

    def _open_stream(self, record: SoakRecord) -> ChatStream:
        return self._client(record).stream_body(
            _body(record.index, stream=True, tokens=self.tokens), model=MODEL,
            timeout=self.timeout_s)

    async def _stream(self, record: SoakRecord) -> str:
        stream = self._open_stream(record)
        async with stream:
            record.correlation_id = stream.correlation_id
            async for _ in stream:
                pass
        return "ok"

    async def _cancel(self, record: SoakRecord) -> str:
        client, correlation_id = await self._submit(record)
        await asyncio.sleep(self._leave_after())
        await client.cancel(correlation_id)
        await client.result(correlation_id)
        return "ok"  # the answer won the race with the cancel

    async def _disconnect(self, record: SoakRecord) -> str:
        """A stream whose reader goes away after its first chunk (or its end)."""
        stream = self._open_stream(record)
        async with stream:
            record.correlation_id = stream.correlation_id
            async for _ in stream:
                break
        return "disconnected"

    # -- through the gateway ---------------------------------------------------------

    def _post(self, record: SoakRecord, *, stream: bool) -> Any:
        headers = {"Content-Type": "application/json",
                   "x-hutch-timeout": f"{self.timeout_s:g}"}
        return self._session.post(
            self.url, headers=headers,
            data=json.dumps(_body(record.index, stream=stream, tokens=self.tokens)),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s + 15))

    async def _http_whole(self, record: SoakRecord) -> str:
        try:
            async with self._post(record, stream=False) as response:
                data = await response.read()
        except TimeoutError:
            return "lost"
        record.answers = 1
        return "ok" if response.status == 200 else _http_failure(response.status, data)

    async def _http_stream(self, record: SoakRecord) -> str:
        try:
            async with self._post(record, stream=True) as response:
                if response.status != 200:
                    record.answers = 1
                    return _http_failure(response.status, await response.read())
                outcome, terminals = "lost", 0
                async for raw in response.content:
                    line = raw.strip()
                    if line == b"data: [DONE]":
                        outcome, terminals = "ok", terminals + 1
                    elif line.startswith(b"data: {\"error\""):
                        outcome = _http_failure(500, line.removeprefix(b"data: "))
                        terminals += 1
        except TimeoutError:
            return "lost"
        record.answers = terminals
        return outcome

    async def _http_disconnect(self, record: SoakRecord) -> str:
        """A call whose client closes the connection a moment after sending it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._leave_after()):
                async with self._post(record, stream=self.rng.random() < 0.5) as response:
                    await response.read()
                    record.answers = 1
                    return "ok" if response.status == 200 else _http_failure(
                        response.status, b"")
        return "disconnected"
