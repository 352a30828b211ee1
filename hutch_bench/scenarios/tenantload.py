"""An open-loop load of several tenants, for the ``fairness`` scenario.

Each tenant sends at its own rate (Poisson, seeded), from its own start to its own stop,
with its own prompt and answer sizes and priority. One :class:`HutchClient` publishes for
all of them, vouching for each request's tenant in ``x-hutch-user``: the client connects
as the workers' own broker user, which they trust (the gateway's path; a client made
with ``hutch client add`` per tenant would be served the same, by its ``user_id``).

Every request is a :class:`TenantRecord`: when it was meant to go, when it started at the
backend (send time plus the worker's ``x-hutch-queue-wait-ms``), its first token (a
streamed request) and its end, and its cost in tokens (prompt words and answer tokens:
the mock counts a word a token, and a prompt of 4-byte words makes the scheduler's
estimate, body bytes / 4, match it). Streamed requests ask for ``usage``
(``stream_options.include_usage``): without it the worker can only estimate the answer's
tokens from the assembled completion's size, JSON envelope included (see BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hutch_bench.scenarios.common import MODEL
from pipeline import protocol as p
from pipeline.client.client import HutchClient
from pipeline.client.stream import ChatStream
from pipeline.errors import RequestFailed, StreamInterruptedError

__all__ = ["TenantLoad", "TenantRecord", "plan_records", "prompt_text", "run_tenants"]


@dataclass(frozen=True)
class TenantLoad:
    """What one tenant sends: ``rate`` requests/s from ``start_s`` to ``stop_s`` (None:
    the end of the phase), or ``burst`` requests at ``start_s`` at once."""

    tenant: str
    rate: float = 0.0
    start_s: float = 0.0
    stop_s: float | None = None
    burst: int = 0
    prompt_words: int = 64
    max_tokens: int = 32
    priority: int = 0
    weight: float = 1.0

    def times(self, duration_s: float, seed: int) -> list[float]:
        """Intended send times: the burst, then Poisson arrivals (seeded per tenant)."""
        times = [self.start_s] * self.burst
        if self.rate > 0:
            stop = duration_s if self.stop_s is None else min(self.stop_s, duration_s)
            rng = random.Random(f"{seed}:{self.tenant}")
            t = self.start_s + rng.expovariate(self.rate)
            while t < stop:
                times.append(t)
                t += rng.expovariate(self.rate)
        return times


@dataclass
class TenantRecord:
    """One request of a tenant; times in seconds from the start of the load."""

    tenant: str
    intended_s: float
    prompt: int
    completion: int
    priority: int
    sent_s: float | None = None
    start_s: float | None = None
    first_s: float | None = None
    done_s: float | None = None
    error: str | None = None
    #: Its stream restarted on another worker (the first one was killed mid-stream).
    restarted: bool = False

    @property
    def ok(self) -> bool:
        return self.done_s is not None and self.error is None

    def cost(self, prompt_weight: float = 1.0, completion_weight: float = 2.0) -> float:
        """The request's cost in weighted tokens (VTC's ``w_in x prompt + w_out x out``)."""
        return prompt_weight * self.prompt + completion_weight * self.completion

    @property
    def queue_wait_ms(self) -> float | None:
        if self.start_s is None or self.sent_s is None:
            return None
        return (self.start_s - self.sent_s) * 1000

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_s is None else (self.first_s - self.intended_s) * 1000

    @property
    def latency_ms(self) -> float | None:
        return None if not self.ok or self.done_s is None else (
            (self.done_s - self.intended_s) * 1000)


def prompt_text(index: int, words: int) -> str:
    """``words`` words of four bytes with their space (``"tok "``): the mock counts
    ``words`` prompt tokens and the scheduler estimates about as many from the bytes."""
    return " ".join([f"{index % 1000:03d}", *(["tok"] * max(0, words - 1))])


def plan_records(loads: Sequence[TenantLoad], duration_s: float, seed: int
                 ) -> list[TenantRecord]:
    """Every request of the phase, in intended send order."""
    records = [TenantRecord(load.tenant, t, load.prompt_words, load.max_tokens,
                            load.priority)
               for load in loads for t in load.times(duration_s, seed)]
    return sorted(records, key=lambda r: r.intended_s)


class _Sender:
    """Fires records at their times on one client and fills them in."""

    def __init__(self, client: HutchClient, stream: bool, timeout_s: float) -> None:
        self.client = client
        self.stream = stream
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()

    def now(self) -> float:
        return self.loop.time() - self.start

    async def _stream(self, chat: ChatStream, record: TenantRecord) -> Mapping[str, Any]:
        """Read a stream to its end; a restart (its worker died mid-stream and another
        streams it again) is no error: the answer still comes, once."""
        try:
            async for _ in chat:
                if record.first_s is None:
                    record.first_s = self.now()
        except StreamInterruptedError as exc:
            if not exc.restarted:
                raise
            record.restarted = True
            return (await chat.reply()).headers
        return chat.headers

    async def fire(self, index: int, record: TenantRecord) -> None:
        body: dict[str, Any] = {
            "model": MODEL, "max_tokens": record.completion,
            "messages": [{"role": "user", "content": prompt_text(index, record.prompt)}]}
        headers = {p.H_USER: record.tenant}
        record.sent_s = self.now()
        try:
            if self.stream:
                chat = self.client.stream_body(
                    {**body, "stream": True, "stream_options": {"include_usage": True}},
                    model=MODEL, priority=record.priority,
                    timeout=self.timeout_s, headers=headers)
                final: Any = await self._stream(chat, record)
            else:
                cid = await self.client.submit(body, model=MODEL, priority=record.priority,
                                               timeout=self.timeout_s, headers=headers)
                final = (await self.client.result(cid)).headers
        except RequestFailed as exc:
            record.error = str(exc.code)
        except asyncio.CancelledError:
            record.error = "cancelled"
            raise
        except Exception as exc:  # a benchmark reports failures, it does not stop on them
            record.error = type(exc).__name__
        else:
            wait = final.get(p.H_QUEUE_WAIT_MS)
            if wait is not None:
                record.start_s = record.sent_s + int(wait) / 1000
        record.done_s = self.now()


async def run_tenants(client: HutchClient, records: list[TenantRecord], *,
                      stream: bool, timeout_s: float) -> float:
    """Send every record at its intended time (open loop), wait for all answers (bounded
    by the deadline plus a grace period); the elapsed time to the last answer."""
    sender = _Sender(client, stream, timeout_s)
    tasks: list[asyncio.Task[None]] = []
    try:
        for index, record in enumerate(records):
            delay = record.intended_s - sender.now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(sender.fire(index, record)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s + 15)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    ends = [r.done_s for r in records if r.done_s is not None]
    return max(ends, default=sender.now())
