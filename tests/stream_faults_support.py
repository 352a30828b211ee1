"""Helpers of tests/test_stream_faults.py: what the mock sends, streams read like a chat
UI reads them, every final message a client received counted at the wire, and the parts
the requests of the cancel storm play.

A reader shows chunks as they come; when the client says the stream restarted (a worker
died mid-stream and another streams the request again) it throws away what it showed and
follows the new attempt, so at the end what it shows must be exactly one attempt's answer:
never two attempts spliced into one.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from pipeline import protocol as p
from pipeline.client.client import HutchClient
from pipeline.client.replies import ReplyMessage, is_chunk
from pipeline.client.stream import ChatStream
from pipeline.errors import RequestCancelledError, StreamInterruptedError
from pipeline.testing.mock.chat import ChatRequest, reply_for

__all__ = [
    "MODEL",
    "STORM",
    "STORM_CAP",
    "STORM_TOKENS",
    "FinalTap",
    "Planned",
    "StreamRun",
    "eventually",
    "expected_text",
    "read_stream",
    "run_storm",
    "storm_plan",
    "user_message",
]

MODEL = "mock-small"


def user_message(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def expected_text(content: str, reply_tokens: int | None, max_tokens: int | None = None
                  ) -> str:
    """The exact text the mock sends for a one-message request (streamed or not)."""
    chat = ChatRequest(model=MODEL, texts=(content,), max_tokens=max_tokens)
    return reply_for(chat, reply_tokens).text


@dataclass
class StreamRun:
    """What one streamed request showed its reader, and how it ended."""

    content: str
    #: After a restart: "iterate" (follow the new attempt's chunks), "completion" (await
    #: ``stream.completion()``) or "result" (``client.result(id)``).
    follow: str = "iterate"
    correlation_id: str = ""
    shown: str = ""  # the text shown of the attempt followed now
    chunks: int = 0  # chunks shown, over all attempts
    restarts: int = 0
    answer: str | None = None  # the completion's text
    done: bool = False


async def _show(stream: ChatStream, run: StreamRun) -> bool:
    """Show chunks to the end; False when the stream restarted and is not followed."""
    while True:
        try:
            async for chunk in stream:
                run.chunks += 1
                run.shown += "".join(c.delta.content or "" for c in chunk.choices)
            return True
        except StreamInterruptedError as exc:
            if not exc.restarted:
                raise
            run.restarts += 1
            run.shown = ""  # what was shown belongs to an attempt that died
            if run.follow != "iterate":
                return False


async def read_stream(client: HutchClient, run: StreamRun, *, timeout: float = 120,
                      **params: Any) -> StreamRun:
    """Stream one request to its end as ``run`` says; raises what the stream raises."""
    async with client.chat_stream(model=MODEL, messages=user_message(run.content),
                                  timeout=timeout, **params) as stream:
        run.correlation_id = stream.correlation_id or ""
        followed = await _show(stream, run)
        if followed or run.follow == "completion":
            completion = await stream.completion()
        else:
            completion = (await client.result(run.correlation_id)).completion
    run.answer = str(completion.choices[0].message.content)
    run.done = True
    return run


@dataclass
class FinalTap:
    """Counts, per correlation id, the final messages that reached a client, and keeps
    each one's outcome (``ok`` or the error code): installed on the client's router."""

    finals: Counter[str] = field(default_factory=Counter)
    outcomes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def install(cls, client: HutchClient) -> FinalTap:
        tap = cls()
        router = client._router
        route = router.route

        def counting(message: ReplyMessage) -> None:
            tap.see(message)
            route(message)

        router.route = counting  # type: ignore[method-assign]
        return tap

    def see(self, message: ReplyMessage) -> None:
        if is_chunk(message) or message.correlation_id is None:
            return
        cid = message.correlation_id
        self.finals[cid] += 1
        headers: Mapping[str, Any] = message.headers or {}
        outcome = str(headers.get(p.H_OUTCOME, ""))
        self.outcomes.setdefault(cid, outcome if outcome == "ok"
                                 else str(headers.get(p.H_ERROR_CODE, outcome)))


async def eventually(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate()`` (sync) until true; fail saying ``what`` was awaited."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


# -- the cancel storm -------------------------------------------------------------------

STORM = 1_000
STORM_TOKENS = 20
STORM_CAP = 16


#: Whether the backend has sent the whole answer of the request with this id.
Served = Callable[[str], bool]


@dataclass
class Planned:
    """One request of the storm: what it is, when and how it is cancelled, its end."""

    index: int
    streamed: bool
    group: str  # keep | queued | random | mid_stream | task
    delay_s: float = 0.0
    cid: str = ""
    stream: ChatStream | None = None
    #: ok, cancelled (RequestCancelledError) or task_cancelled (the caller's own task).
    terminal: str = ""
    #: The backend had sent its whole answer when the cancel went out: a worker on a busy
    #: machine may still be reading it then, and a cancel it meets ends it "cancelled".
    served_before_cancel: bool = False

    @property
    def content(self) -> str:
        return f"storm {self.index}"

    @property
    def priority(self) -> int:
        """The queued group waits behind everything else: certainly queued at its cancel."""
        return 0 if self.group == "queued" else 5


def storm_plan(rng: random.Random) -> list[Planned]:
    """Half the requests cancelled: 150 while certainly queued, 150 streams mid-stream,
    150 at a random moment (queued, at the backend, or already answered: a late cancel
    changes nothing), 50 by cancelling the caller's task; streams and plain calls mixed."""
    streams = list(range(0, STORM, 2))
    plains = list(range(1, STORM, 2))
    rng.shuffle(streams)
    rng.shuffle(plains)
    groups = {"mid_stream": streams[:150], "queued": streams[150:225] + plains[:75],
              "random": streams[225:300] + plains[75:150],
              "task": streams[300:325] + plains[150:175]}
    group_of = {i: name for name, indices in groups.items() for i in indices}
    plan = []
    for i in range(STORM):
        group = group_of.get(i, "keep")
        delay = {"random": rng.uniform(0, 12), "task": rng.uniform(0, 12),
                 "mid_stream": rng.uniform(0, 0.2)}.get(group, 0.0)
        plan.append(Planned(i, i % 2 == 0, group, delay))
    return plan


async def _publish(client: HutchClient, item: Planned) -> None:
    if item.streamed:
        item.stream = client.chat_stream(model=MODEL, messages=user_message(item.content),
                                         priority=item.priority, timeout=150)
        item.cid = await item.stream.start()
    else:
        item.cid = await client.submit(
            {"model": MODEL, "messages": user_message(item.content)}, model=MODEL,
            priority=item.priority, timeout=150)


async def _answer(client: HutchClient, item: Planned) -> str:
    """Await the answer the plain way: ``ok`` (its text checked) or ``cancelled``."""
    try:
        if item.stream is None:
            completion = (await client.result(item.cid)).completion
            text = completion.choices[0].message.content
        else:
            shown = ""
            async with item.stream as stream:
                async for chunk in stream:
                    shown += "".join(c.delta.content or "" for c in chunk.choices)
                text = (await stream.completion()).choices[0].message.content
            assert shown == text, (item.index, shown, text)
    except RequestCancelledError:
        return "cancelled"
    assert text == expected_text(item.content, STORM_TOKENS), (item.index, text)
    return "ok"


async def _mid_stream(item: Planned, served: Served) -> str:
    """Cancel a stream after its first chunk: every other one by leaving the block, the
    others with ``stream.cancel()`` while reading on to the worker's answer."""
    assert item.stream is not None
    async with item.stream as stream:
        chunks = aiter(stream)
        await anext(chunks)
        await asyncio.sleep(item.delay_s)
        item.served_before_cancel = served(item.cid)
        if item.index % 4 == 0:
            pass  # leaving the block cancels
        else:
            await stream.cancel()
            try:
                async for _ in chunks:
                    pass
            except RequestCancelledError:
                return "cancelled"
            return "ok"  # it ended before the cancel reached the worker
    with pytest.raises(RequestCancelledError):
        await stream.completion()
    return "cancelled"


async def _run(client: HutchClient, item: Planned, served: Served) -> None:
    """Play one request's part of the storm; record its one terminal answer."""
    assert not item.terminal, "two terminal answers"
    if item.group in ("keep", "queued"):
        item.terminal = await _answer(client, item)
    elif item.group == "mid_stream":
        item.terminal = await _mid_stream(item, served)
    else:
        reader = asyncio.create_task(_answer(client, item))
        done, _ = await asyncio.wait([reader], timeout=item.delay_s)
        item.served_before_cancel = served(item.cid)
        if item.group == "random":
            await client.cancel(item.cid)  # even when answered: a late cancel is a no-op
        elif not done:
            reader.cancel()
        try:
            item.terminal = await reader
        except asyncio.CancelledError:
            item.terminal = "task_cancelled"


async def run_storm(client: HutchClient, plan: list[Planned], served: Served
                    ) -> list[BaseException]:
    """Publish everything but the queued group (priority 5), then the queued group
    (priority 0, behind all of it), each cancelled at once; play every part. ``served``
    says whether the backend has sent a request's whole answer (read as each cancel
    goes out)."""
    first = [item for item in plan if item.group != "queued"]
    await asyncio.gather(*(_publish(client, item) for item in first))
    tasks = [asyncio.create_task(_run(client, item, served)) for item in first]
    for item in plan:
        if item.group == "queued":
            await _publish(client, item)
            await client.cancel(item.cid)
            tasks.append(asyncio.create_task(_run(client, item, served)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException)]
