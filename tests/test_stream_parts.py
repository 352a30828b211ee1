"""The parts of streaming that need no broker: SSE decoding, assembling the final
completion, coalescing chunks into messages, and the cancel registry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import aiormq
import httpx
import pytest

from pipeline import protocol as p
from pipeline.backends.sse import SSEReader
from pipeline.dispatch.assemble import Assembler
from pipeline.dispatch.cancels import CANCEL_MESSAGE, CancelRegistry
from pipeline.errors import BackendProtocolError
from pipeline.settle.publisher import Publisher
from pipeline.settle.stream import ReplyQueueGone, StreamSink
from tests.fakes import delivery


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def events(*items: str) -> tuple[list[dict[str, Any]], bool]:
    reader = SSEReader(lines(*items), "b1")
    got = [event async for _, event in reader.events()]
    return got, reader.done


# -- SSE ----------------------------------------------------------------------------------


async def test_sse_events_comments_multiline_and_done() -> None:
    got, done = await events(": keep-alive", "", 'data: {"a": 1}', "", "event: x",
                             'data: {"b":', 'data: 2}', "", "data: [DONE]", "",
                             'data: {"after": "done"}', "")
    assert got == [{"a": 1}, {"b": 2}] and done


async def test_sse_body_ending_without_done_or_blank_line() -> None:
    got, done = await events('data: {"a": 1}', "", 'data:{"b": 2}')
    assert got == [{"a": 1}, {"b": 2}] and not done


@pytest.mark.parametrize("data", ["data: {nope", "data: [1, 2]", "data: 42"])
async def test_malformed_events_are_protocol_errors(data: str) -> None:
    with pytest.raises(BackendProtocolError) as failure:
        await events(data, "")
    assert failure.value.reason == "invalid_response"


# -- assembling ---------------------------------------------------------------------------


def chunk(content: str | None = None, *, finish: str | None = None, index: int = 0,
          **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "system_fingerprint": "fp", "choices": [
                {"index": index, "delta": delta, "finish_reason": finish}]}


def test_assembled_completion_has_the_exact_text_usage_and_fields() -> None:
    assembler = Assembler()
    assembler.add(chunk("", role="assistant"))
    for word in ("Hel", "lo", " wörld"):
        assembler.add(chunk(word))
    assembler.add(chunk(finish="stop"))
    assembler.add({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})
    done = assembler.completion()
    assert done["object"] == "chat.completion" and done["system_fingerprint"] == "fp"
    assert done["choices"] == [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Hello wörld"}}]
    assert done["usage"]["total_tokens"] == 5
    assert assembler.finished and assembler.content_chars == len("Hello wörld")


def test_tool_calls_merge_by_index_and_choices_stay_apart() -> None:
    assembler = Assembler()
    assembler.add(chunk(tool_calls=[{"index": 0, "id": "t1", "type": "function",
                                     "function": {"name": "get", "arguments": '{"ci'}}]))
    assembler.add(chunk(tool_calls=[{"index": 0, "function": {"arguments": 'ty": 1}'}}]))
    assembler.add(chunk("other", index=1))
    assert not assembler.finished
    assembler.add(chunk(finish="tool_calls"))
    assembler.add(chunk(finish="stop", index=1))
    first, second = assembler.completion()["choices"]
    assert first["message"]["content"] is None
    assert first["message"]["tool_calls"] == [
        {"id": "t1", "type": "function", "function": {"name": "get", "arguments": '{"city": 1}'}}]
    assert second["message"]["content"] == "other" and assembler.finished


# -- coalescing ---------------------------------------------------------------------------


class Recorder:
    def __init__(self, gone: bool = False) -> None:
        self.bodies: list[list[Any]] = []
        self.headers: list[dict[str, Any]] = []
        self.gone = gone

    async def publish(self, body: bytes, properties: aiormq.spec.Basic.Properties, *,
                      routing_key: str, exchange: str = "") -> bool:
        if self.gone:
            return False
        assert properties.delivery_mode == 1  # chunks are transient
        self.bodies.append(json.loads(body))
        self.headers.append(dict(properties.headers or {}))
        return True


async def test_first_chunk_goes_out_at_once_then_per_window_or_size() -> None:
    recorder = Recorder()
    d = delivery()
    sink = StreamSink(cast(Publisher, recorder), d, window_s=0.05, max_chunks=3)
    await sink.add('{"n": 0}')
    assert recorder.bodies == [[{"n": 0}]]  # at once
    assert d.stream is not None and d.stream.messages == 1
    await sink.add('{"n": 1}')
    await sink.add('{"n": 2}')
    assert len(recorder.bodies) == 1  # waiting for the window
    async with asyncio.timeout(5):  # the window's timer sends them (a loaded machine may
        while len(recorder.bodies) < 2:  # run it late: wait for it, do not time it)
            await asyncio.sleep(0.01)
    assert recorder.bodies[1] == [{"n": 1}, {"n": 2}]
    await asyncio.sleep(0.06)  # a quiet window
    await sink.add('{"n": 3}')
    assert recorder.bodies[2] == [{"n": 3}]  # after a quiet window: at once again
    for n in range(4, 7):
        await sink.add(f'{{"n": {n}}}')
    assert recorder.bodies[3] == [{"n": 4}, {"n": 5}, {"n": 6}]  # max_chunks reached
    await sink.add('{"n": 7}')
    await sink.flush()
    await sink.close()
    assert recorder.bodies[4] == [{"n": 7}]
    assert [h[p.H_SEQ] for h in recorder.headers] == [0, 1, 2, 3, 4]
    assert {h[p.H_STREAM_ID] for h in recorder.headers} == {d.stream.stream_id}
    assert all(h[p.H_KIND] == p.KIND_CHUNK for h in recorder.headers)
    assert (d.stream.messages, d.stream.chunks) == (5, 8)


async def test_a_vanished_reply_queue_stops_the_stream() -> None:
    sink = StreamSink(cast(Publisher, Recorder(gone=True)), delivery(), window_s=0,
                      max_chunks=10)
    with pytest.raises(ReplyQueueGone):
        await sink.add("{}")


# -- cancels ------------------------------------------------------------------------------


def registry(max_ids: int = 100) -> CancelRegistry:
    return CancelRegistry(ttl_s=60, max_ids=max_ids, privileged=frozenset({"worker", "ops"}))


def test_only_the_owner_or_a_privileged_user_cancels_a_queued_request() -> None:
    reg = registry()
    mine = delivery(user_id="app", correlation_id="r1")
    reg.cancel("r1", "intruder")
    assert not reg.is_cancelled(mine)
    reg.cancel("r1", "app")
    assert reg.is_cancelled(mine)
    reg.cancel("r2", "ops")
    assert reg.is_cancelled(delivery(user_id="app", correlation_id="r2"))
    # A request without an identity can only be cancelled by a privileged user.
    reg.cancel("r3", "app")
    assert not reg.is_cancelled(delivery(correlation_id="r3"))


def test_cancelled_ids_are_bounded() -> None:
    reg = registry(max_ids=2)
    for cid in ("a", "b", "c"):
        reg.cancel(cid, "worker")
    assert not reg.is_cancelled(delivery(correlation_id="a"))
    assert reg.is_cancelled(delivery(correlation_id="c"))


async def test_a_cancel_aborts_the_call_at_the_backend() -> None:
    reg = registry()
    d = delivery(user_id="app", correlation_id="r9")
    started = asyncio.Event()

    async def call() -> str:
        async with reg.at_backend(d):
            started.set()
            await asyncio.sleep(30)
        return "finished"

    task = asyncio.create_task(call())
    await started.wait()
    assert not reg.cancel("r9", "intruder") and not task.done()
    assert reg.cancel("r9", "app")
    with pytest.raises(asyncio.CancelledError) as cancelled:
        await task
    assert d.cancel_requested and CANCEL_MESSAGE in str(cancelled.value)
    assert not reg.cancel("r9", "app")  # gone from the registry: nothing left to abort


async def test_chunks_go_out_at_once_until_the_first_with_output() -> None:
    """Servers send a role-only chunk first: the first token must not wait a window."""
    recorder = Recorder()
    sink = StreamSink(cast(Publisher, recorder), delivery(), window_s=60, max_chunks=100)
    assembler = Assembler()
    for raw in (json.dumps(chunk("", role="assistant")), json.dumps(chunk("Hi")),
                json.dumps(chunk(" there"))):
        await sink.add(raw, content=assembler.add(json.loads(raw)))
    assert len(recorder.bodies) == 2  # the role chunk, then the first token, each at once
    await sink.flush()
    await sink.close()
    assert len(recorder.bodies) == 3


# -- the idle bound -----------------------------------------------------------------------


class SlowRecorder(Recorder):
    """A broker whose confirms take longer than the stream's idle bound (a busy one)."""

    async def publish(self, body: bytes, properties: aiormq.spec.Basic.Properties, *,
                      routing_key: str, exchange: str = "") -> bool:
        await asyncio.sleep(0.3)
        return await super().publish(body, properties, routing_key=routing_key,
                                     exchange=exchange)


async def test_the_idle_bound_is_the_backends_silence_not_a_slow_publish() -> None:
    """The backend sends every chunk at once; each publish takes 0.3 s, the idle bound is
    0.1 s. The stream completes, and what was sent is counted: before, the watchdog cut
    a publish (blaming the backend for "going silent") whose chunk the client then had
    but ``content_chars_sent`` lacked."""
    from pipeline.backends.http import Backend
    from pipeline.dispatch.streaming import stream_attempt
    from pipeline.observe.hooks import DeliveryHook
    from pipeline.settings_backend import BackendSettings

    words = ["mock", " reply", " here"]
    sse = "".join(f"data: {json.dumps(chunk(w))}\n\n" for w in words)
    sse += f"data: {json.dumps(chunk(finish='stop'))}\n\ndata: [DONE]\n\n"
    backend = Backend(BackendSettings(name="b1", url="http://b1.test/v1", max_concurrency=1,
                                      timeout_s=5.0),
                      transport=httpx.MockTransport(lambda _: httpx.Response(
                          200, headers={"content-type": "text/event-stream"},
                          content=sse.encode())))
    recorder = SlowRecorder()
    d = delivery()
    sink = StreamSink(cast(Publisher, recorder), d, window_s=0, max_chunks=10)
    try:
        completed = await stream_attempt(d, backend, b'{"stream": true}', sink,
                                         idle_timeout_s=0.1, hooks=DeliveryHook())
    finally:
        await sink.close()
        await backend.aclose()
    content = json.loads(completed.body)["choices"][0]["message"]["content"]
    assert content == "mock reply here"
    assert d.stream is not None and d.stream.content_chars == len(content)
    assert [c for body in recorder.bodies for c in body][:3] == [chunk(w) for w in words]
