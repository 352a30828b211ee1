"""The three ways ``bench scenario streaming`` streams one answer, and what it measures.

Each path yields once per content token, as it reaches the application: ``direct`` from
the mock's server-sent events (Hutch's own HTTP client and SSE reader), ``relay`` from
the chunk messages of :mod:`hutch_bench.stream_baseline`, ``hutch`` from
``HutchClient.chat_stream``. :func:`measure` times one stream: time to first token from
its intended start, and the gap before each later token (tokens delivered in one chunk
message arrive together: a gap of about zero). :func:`run_step` keeps ``N`` streams in
flight for a while (closed loop: each user starts its next stream when one ends).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from hutch_bench.report import distribution
from hutch_bench.stream_baseline import RelayClient
from pipeline.backends.http import Backend
from pipeline.backends.sse import SSEReader
from pipeline.client.client import HutchClient
from pipeline.errors import RequestCancelledError
from pipeline.models import ChatCompletionChunk
from pipeline.settings import BackendSettings

__all__ = [
    "DirectPath",
    "HutchPath",
    "RelayPath",
    "StreamPath",
    "StreamRecord",
    "cancels",
    "cpu_seconds",
    "measure",
    "metric_total",
    "open_loop_streams",
    "run_step",
    "step_figures",
]


class StreamPath(Protocol):
    """One way to stream an answer; ``tokens`` yields once per content token."""

    name: str

    def tokens(self, body: dict[str, Any]) -> AsyncIterator[None]: ...

    async def cancel_one(self, body: dict[str, Any], hold_s: float) -> tuple[str, float]:
        """Stream until the first token, wait ``hold_s``, cancel: the request id the
        backend saw and when (``time.monotonic()``) the cancel was sent."""


def _content(chunk: dict[str, Any]) -> bool:
    return any(c.get("delta", {}).get("content") for c in chunk.get("choices", ()))


def _has_token(chunk: ChatCompletionChunk) -> bool:
    return any(choice.delta.content for choice in chunk.choices)


class DirectPath:
    """(a) The generator calls the mock itself, with the worker's HTTP client."""

    name = "direct"

    def __init__(self, url: str, concurrency: int) -> None:
        self._backend = Backend(BackendSettings(name="direct", url=url,
                                                max_concurrency=concurrency, timeout_s=60))

    async def aclose(self) -> None:
        await self._backend.aclose()

    async def _events(self, body: dict[str, Any], request_id: str
                      ) -> AsyncGenerator[None, None]:
        async with self._backend.stream(json.dumps({**body, "stream": True}).encode(),
                                        request_id=request_id) as answer:
            async for _raw, chunk in SSEReader(answer.aiter_lines(), "direct").events():
                if _content(chunk):
                    yield None

    def tokens(self, body: dict[str, Any]) -> AsyncIterator[None]:
        return self._events(body, uuid.uuid4().hex)

    async def cancel_one(self, body: dict[str, Any], hold_s: float) -> tuple[str, float]:
        request_id = uuid.uuid4().hex
        events = self._events(body, request_id)
        await anext(events)
        await asyncio.sleep(hold_s)
        sent = time.monotonic()
        await events.aclose()  # leaves the response's block: the connection is closed
        return request_id, sent


class RelayPath:
    """(b) The minimal aio-pika relay."""

    name = "relay"

    def __init__(self, client: RelayClient) -> None:
        self.client = client

    async def tokens(self, body: dict[str, Any]) -> AsyncIterator[None]:
        async for chunks in self.client.stream(body):
            for chunk in chunks:
                if _content(chunk):
                    yield None

    async def cancel_one(self, body: dict[str, Any], hold_s: float) -> tuple[str, float]:
        raise NotImplementedError("the minimal relay has no cancels")


class HutchPath:
    """(c) Hutch: ``HutchClient.chat_stream`` through a worker process."""

    name = "hutch"

    def __init__(self, client: HutchClient) -> None:
        self.client = client

    async def tokens(self, body: dict[str, Any]) -> AsyncIterator[None]:
        async with self.client.chat_stream(**body) as stream:
            async for chunk in stream:
                if _has_token(chunk):
                    yield None

    async def cancel_one(self, body: dict[str, Any], hold_s: float) -> tuple[str, float]:
        async with self.client.chat_stream(**body) as stream:
            chunks = aiter(stream)
            while not _has_token(await anext(chunks)):
                pass
            await asyncio.sleep(hold_s)
            sent = time.monotonic()
            await stream.cancel()
            try:  # read to the end: the cancelled final (or the answer, if it won)
                async for _ in chunks:
                    pass
            except RequestCancelledError:
                pass
            assert stream.correlation_id is not None
            return stream.correlation_id, sent


@dataclass
class StreamRecord:
    """One stream: time to first token (from its intended start), gaps between tokens."""

    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def measure(path: StreamPath, body: dict[str, Any], intended: float) -> StreamRecord:
    """Stream one answer on ``path``; ``intended``: its start on the monotonic clock."""
    record = StreamRecord()
    last = None
    try:
        async for _ in path.tokens(body):
            now = time.monotonic()
            if last is None:
                record.ttft_s = now - intended
            else:
                record.gaps_s.append(now - last)
            last = now
            record.tokens += 1
    except Exception as exc:  # a benchmark records failures, it does not stop on them
        record.error = type(exc).__name__
    return record


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def metric_total(url: str, name: str) -> float:
    """The sum of a Prometheus counter's samples at ``url`` (a worker's ``/metrics``)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url)).raise_for_status().text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def run_step(path: StreamPath, body: dict[str, Any], concurrency: int,
                   duration_s: float, stagger_s: float) -> tuple[list[StreamRecord], float]:
    """``concurrency`` users streaming back to back for ``duration_s`` (their first starts
    spread over ``stagger_s``); the records and the time until the last stream ended."""
    records: list[StreamRecord] = []
    start = time.monotonic()
    end = start + duration_s

    async def user(index: int) -> None:
        await asyncio.sleep(stagger_s * index / concurrency)
        while time.monotonic() < end:
            record = await measure(path, body, time.monotonic())
            records.append(record)
            if record.error is not None:
                await asyncio.sleep(0.1)  # a failing path must not spin

    await asyncio.gather(*(user(i) for i in range(concurrency)))
    return records, time.monotonic() - start


def step_figures(records: Sequence[StreamRecord], elapsed_s: float) -> dict[str, Any]:
    """Streams, errors, tokens/s, and time to first token and gaps (ms) of a step."""
    ok = [r for r in records if r.error is None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    tokens = sum(r.tokens for r in records)
    return {
        "streams": len(records), "completed": len(ok), "errors": errors,
        "tokens": tokens, "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "ttft_ms": distribution([r.ttft_s * 1000 for r in ok if r.ttft_s is not None]),
        "gap_ms": distribution([g * 1000 for r in ok for g in r.gaps_s]),
        "elapsed_s": elapsed_s,
    }


async def open_loop_streams(path: StreamPath, body: dict[str, Any],
                            times: Sequence[float]) -> list[StreamRecord]:
    """One stream at each of ``times`` (seconds from now), timed from that moment."""
    start = time.monotonic()

    async def one(at: float) -> StreamRecord:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        return await measure(path, body, start + at)

    return list(await asyncio.gather(*(one(t) for t in times)))


async def cancels(cancel_one: Callable[[dict[str, Any], float], Awaitable[tuple[str, float]]],
                  body: dict[str, Any], count: int, concurrency: int, hold_max_s: float,
                  seed: int) -> list[tuple[str, float]]:
    """``count`` streams cancelled a random while (up to ``hold_max_s``) after their first
    token, ``concurrency`` at a time: each one's request id and cancel time."""
    rng = random.Random(seed)
    holds = [rng.uniform(0, hold_max_s) for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)

    async def one(hold_s: float) -> tuple[str, float]:
        async with gate:
            return await cancel_one(body, hold_s)

    return list(await asyncio.gather(*(one(h) for h in holds)))

