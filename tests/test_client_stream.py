"""The client's stream logic with fake messages: routing, dedup, gaps, restarts, buffers.

No broker: a fake host stands in for HutchClient and messages are plain objects with the
headers the wire contract defines, so each arrival order is exact.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from pipeline import protocol as p
from pipeline.client.assembly import Assembly
from pipeline.client.router import ReplyRouter
from pipeline.client.stream import ChatStream
from pipeline.errors import (
    BackendError,
    DeadlineExceededError,
    RequestCancelledError,
    StreamInterruptedError,
)
from pipeline.models import ChatCompletionChunk

WORDS = ["Hutch", " streams", " tokens", " through", " the", " broker", "."]
TEXT = "".join(WORDS)
USAGE = {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}


@dataclass
class Msg:
    headers: Mapping[str, Any]
    body: bytes
    correlation_id: str | None = "c1"


def event(content: str | None = None, finish: str | None = None, role: str | None = None
          ) -> dict[str, Any]:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def chunk(sid: str, seq: int, *events: dict[str, Any], cid: str = "c1") -> Msg:
    return Msg({p.H_KIND: p.KIND_CHUNK, p.H_STREAM_ID: sid, p.H_SEQ: seq},
               json.dumps(list(events)).encode(), cid)


def final(sid: str | None, text: str = TEXT, *, seq: int = 0, usage: bool = True,
          cid: str = "c1") -> Msg:
    headers: dict[str, Any] = {p.H_KIND: p.KIND_FINAL, p.H_OUTCOME: "ok", p.H_SEQ: seq}
    if sid is not None:
        headers[p.H_STREAM_ID] = sid
    body = {"id": "s", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}
    if usage:
        body["usage"] = USAGE
    return Msg(headers, json.dumps(body).encode(), cid)


def error_final(code: str, *, cid: str = "c1", **extra: Any) -> Msg:
    return Msg({p.H_KIND: p.KIND_FINAL, p.H_OUTCOME: "error"},
               p.error_body(p.ErrorCode(code), "it failed", **extra), cid)


def word_chunks(sid: str, words: list[str] = WORDS, start: int = 0) -> list[Msg]:
    """One chunk message per word (the first with the role), then the finish."""
    msgs = [chunk(sid, start + i, event(w, role="assistant" if start + i == 0 else None))
            for i, w in enumerate(words)]
    return [*msgs, chunk(sid, start + len(words), event(finish="stop"))]


def drain(assembly: Assembly) -> list[ChatCompletionChunk]:
    out = []
    while (c := assembly.take()) is not None:
        out.append(c)
    return out


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def run(assembly: Assembly, messages: list[Msg]) -> list[ChatCompletionChunk]:
    shown: list[ChatCompletionChunk] = []
    for message in messages:
        assembly.feed(message)
        shown += drain(assembly)
    return shown


# -- the assembly ---------------------------------------------------------------------


def test_in_order_chunks_are_shown_once_and_the_final_adds_only_usage() -> None:
    a = Assembly()
    shown = run(a, [*word_chunks("A"), final("A", seq=8)])
    assert text_of(shown) == TEXT and a.completion is not None
    assert shown[-1].choices == [] and shown[-1].usage is not None  # only what was missing
    assert sum(c.choices[0].finish_reason == "stop" for c in shown if c.choices) == 1


def test_repeats_are_dropped_and_gaps_wait_for_their_chunk() -> None:
    msgs = word_chunks("A")
    a = Assembly()
    shown = run(a, [msgs[0], msgs[2], msgs[1], msgs[1], msgs[0], *msgs[3:], final("A")])
    assert text_of(shown) == TEXT
    assert a.dropped == 2


def test_missed_chunks_are_filled_by_the_final_message() -> None:
    msgs = word_chunks("A")
    a = Assembly()
    shown = run(a, [msgs[0], msgs[1], msgs[4], msgs[5], final("A")])  # 2, 3 lost
    assert text_of(shown) == TEXT  # chunks after the gap were held, the final fills
    last = shown[-1]
    assert last.choices[0].delta.content == TEXT[len("Hutch streams"):]
    assert last.choices[0].finish_reason == "stop" and last.usage is not None


def test_a_final_alone_yields_the_whole_answer_with_its_role() -> None:
    a = Assembly()
    shown = run(a, [final(None)])
    assert len(shown) == 1 and shown[0].choices[0].delta.role == "assistant"
    assert text_of(shown) == TEXT


def test_a_new_stream_id_after_shown_chunks_is_a_restart_never_a_splice() -> None:
    a = Assembly()
    run(a, word_chunks("A")[:3])
    second = word_chunks("B", ["Another", " answer"])
    with pytest.raises(StreamInterruptedError) as caught:
        a.feed(second[0])
    assert caught.value.restarted and caught.value.chunks_sent == 3
    assert caught.value.content_chars_sent == len("Hutch streams tokens")
    late_a = word_chunks("A")[3]
    shown = run(a, [*second[:1], late_a, *second[1:], final("B", "Another answer")])
    assert text_of(drain(a)) == "" and text_of(shown) == "Another answer"
    assert a.dropped >= 2  # the repeat of B's first and A's late chunk


def test_a_new_stream_id_before_anything_was_shown_is_followed_silently() -> None:
    a = Assembly()
    a.feed(word_chunks("A")[1])  # held behind a gap: nothing shown
    shown = run(a, [*word_chunks("B"), final("B")])
    assert text_of(shown) == TEXT


def test_a_final_of_another_attempt_after_shown_chunks_restarts_with_its_answer() -> None:
    a = Assembly()
    run(a, word_chunks("A")[:2])
    with pytest.raises(StreamInterruptedError) as caught:
        a.feed(final("B", "The retried answer"))
    assert caught.value.restarted
    shown = drain(a)
    assert text_of(shown) == "The retried answer" and shown[0].choices[0].delta.role
    assert a.completion is not None


def test_errors_end_the_stream_with_their_exception() -> None:
    a = Assembly()
    run(a, word_chunks("A")[:3])
    a.feed(error_final("stream_interrupted", chunks_sent=3, content_chars_sent=20))
    assert isinstance(a.error, StreamInterruptedError) and not a.error.restarted
    assert (a.error.chunks_sent, a.error.content_chars_sent) == (3, 20)
    b = Assembly()
    b.feed(error_final("cancelled"))
    assert isinstance(b.error, RequestCancelledError)
    b.feed(chunk("A", 0, event("late")))
    assert drain(b) == [] and b.dropped == 1


def test_held_chunks_are_bounded() -> None:
    a = Assembly(max_held=3)
    shown = run(a, [chunk("A", seq, event(str(seq))) for seq in range(1, 10)])
    assert shown == [] and a.dropped == 6
    assert text_of(run(a, [final("A", "0123456789")])) == "0123456789"


# -- the router -----------------------------------------------------------------------


async def test_router_resolves_the_first_final_and_drops_chunks_and_repeats() -> None:
    router = ReplyRouter()
    future = router.expect("c1")
    router.route(chunk("A", 0, event("x")))  # a plain call ignores chunks
    router.route(final(None))
    router.route(final(None))
    assert future.done() and router.dropped_chunks == 1 and router.dropped_replies == 1
    router.forget("c1")
    router.route(final(None))
    assert router.dropped_replies == 2
    router.route(final(None, cid="earlier"))
    assert router.claim_orphan("earlier") is not None


# -- the stream, with a fake host ------------------------------------------------------


@dataclass
class FakeHost:
    router: ReplyRouter = field(default_factory=ReplyRouter)
    cancels: list[tuple[str, str]] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)

    async def start_stream(self, stream: ChatStream, body: Mapping[str, Any], *,
                           model: str, priority: int, timeout_s: float) -> str:
        assert body["stream"] is True
        stream.correlation_id = "c1"
        self.router.expect_stream("c1", stream)
        return "c1"

    def end_stream(self, correlation_id: str, *, cancel: str | None) -> None:
        self.router.forget(correlation_id)
        if cancel is not None:
            self.cancels.append((correlation_id, cancel))

    async def cancel(self, correlation_id: str) -> None:
        self.confirmed.append(correlation_id)


def make_stream(host: FakeHost, *, timeout_s: float = 5, max_buffered: int = 100
                ) -> ChatStream:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return ChatStream(host, body, model="m", priority=0, timeout_s=timeout_s,
                      idle_timeout_s=timeout_s, max_buffered=max_buffered)


async def test_a_stream_yields_chunks_then_its_completion() -> None:
    host = FakeHost()
    async with make_stream(host) as stream:
        for message in [*word_chunks("A"), final("A")]:
            host.router.route(message)
        texts = [c.choices[0].delta.content async for c in stream if c.choices]
        completion = await stream.completion()
    assert "".join(t or "" for t in texts) == TEXT
    assert completion.choices[0].message.content == TEXT and host.cancels == []


async def test_a_restart_raises_and_iterating_again_follows_the_new_attempt() -> None:
    host = FakeHost()
    async with make_stream(host) as stream:
        for message in [*word_chunks("A")[:3], *word_chunks("B", ["Again"]),
                        final("B", "Again")]:
            host.router.route(message)
        first = []
        with pytest.raises(StreamInterruptedError) as caught:
            async for c in stream:
                first.append(c)
        assert caught.value.restarted and text_of(first) == "Hutch streams tokens"
        assert text_of([c async for c in stream]) == "Again"
        assert (await stream.completion()).choices[0].message.content == "Again"


async def test_completion_after_a_restart_awaits_the_retried_answer() -> None:
    host = FakeHost()
    async with make_stream(host) as stream:
        for message in word_chunks("A")[:2]:
            host.router.route(message)
        async for _ in stream:
            break
    assert host.cancels and host.cancels[0][0] == "c1"  # breaking out cancelled it
    host2 = FakeHost()
    async with make_stream(host2) as stream:
        for message in [*word_chunks("A")[:2], *word_chunks("B")]:
            host2.router.route(message)
        seen = 0
        with pytest.raises(StreamInterruptedError):
            async for _ in stream:
                seen += 1
        host2.router.route(final("B"))
        assert (await stream.completion()).choices[0].message.content == TEXT
    assert host2.cancels == []


async def test_an_error_final_raises_its_exception() -> None:
    host = FakeHost()
    async with make_stream(host) as stream:
        host.router.route(error_final("backend_error"))
        with pytest.raises(BackendError):
            async for _ in stream:
                pass
    assert host.cancels == []


async def test_leaving_the_block_early_cancels_and_later_reads_raise_cancelled() -> None:
    host = FakeHost()
    stream = make_stream(host)
    async with stream:
        host.router.route(word_chunks("A")[0])
    assert host.cancels == [("c1", host.cancels[0][1])]
    with pytest.raises(RequestCancelledError):
        await stream.completion()
    host.router.route(final("A"))  # the worker's answer comes later: nobody waits
    assert host.router.dropped_replies == 1


async def test_cancelling_the_reading_task_cancels_the_request() -> None:
    host = FakeHost()
    stream = make_stream(host)
    await stream.start()

    async def read() -> None:
        async for _ in stream:
            pass

    task = asyncio.create_task(read())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [cid for cid, _ in host.cancels] == ["c1"]


async def test_no_answer_in_time_raises_deadline_exceeded_and_cancels() -> None:
    host = FakeHost()
    async with make_stream(host, timeout_s=0.1) as stream:
        with pytest.raises(DeadlineExceededError):
            await stream.completion()
    assert [cid for cid, _ in host.cancels] == ["c1"]


async def test_a_slow_reader_holds_at_most_its_buffer_and_gets_the_rest_from_the_final(
        ) -> None:
    host = FakeHost()
    async with make_stream(host, max_buffered=3) as stream:
        for message in [*word_chunks("A"), final("A")]:  # 8 chunk messages, nobody reads
            host.router.route(message)
        assert len(stream._inbox._messages) == 4  # 3 chunk messages and the final
        shown = [c async for c in stream]
    assert text_of(shown) == TEXT and stream.dropped_chunks == 5
    assert shown[-1].choices[0].delta.content == TEXT[len("Hutch streams tokens"):]


async def test_breaking_out_of_a_bare_async_for_cancels_the_request() -> None:
    host = FakeHost()
    stream = make_stream(host)
    await stream.start()
    for message in word_chunks("A")[:3]:
        host.router.route(message)
    async for _ in stream:
        break
    for _ in range(5):  # the loop closes the abandoned generator soon after
        await asyncio.sleep(0)
    assert [cid for cid, _ in host.cancels] == ["c1"]


# -- retry logs -----------------------------------------------------------------------


def test_retry_warnings_are_structured_and_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.client.connection import ThrottledLog
    from pipeline.observe.log import get_logger

    throttled = ThrottledLog(get_logger("hutch.test"), interval_s=0.05)
    with caplog.at_level("WARNING", logger="hutch.test"):
        for _ in range(100):
            throttled.warning("publish.retry", error="boom")
        time.sleep(0.06)
        throttled.warning("publish.retry", error="boom")
    fields = [getattr(r, "fields", None) for r in caplog.records]
    assert fields == [{"error": "boom"}, {"error": "boom", "suppressed": 99}]
