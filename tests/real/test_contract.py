"""The wire contract against each real server: LiteLLM's proxy and llama.cpp's server.

Each check runs once per server (``real_backend``), through Hutch (real broker, a worker
in this process) and, where it compares, against the server called directly with the same
body: Hutch must carry the server's answer intact, stream it chunk by chunk with the
exact text, refuse a malformed request before any call, and answer every request once.
"""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import HutchClient
from pipeline import protocol as p
from tests.real.harness import (
    RealBackend,
    chat_body,
    direct_chat,
    direct_stream,
    eventually,
    real_settings,
    serving,
    wire_client,
)

pytestmark = pytest.mark.timeout(180)


def _text(completion: dict[str, Any]) -> str:
    content = completion["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    return content


async def test_a_completion_is_carried_intact_with_its_usage(
        real_backend: RealBackend, amqp_url: str, prefix: str) -> None:
    settings = real_settings(amqp_url, prefix, real_backend)
    body = chat_body(real_backend.model, **real_backend.deterministic)
    direct = await direct_chat(real_backend, body)
    assert direct.status_code == 200, direct.text
    async with serving(settings), wire_client(settings) as wire, \
            HutchClient.from_settings(settings) as client:
        final = await wire.final(await wire.send(body))
        completion = await client.chat(model=real_backend.model, messages=body["messages"],
                                       timeout=30, **real_backend.deterministic)
    assert final.ok, final.body()
    answer = final.body()
    assert answer["object"] == "chat.completion"
    assert _text(answer) == _text(direct.json()) == completion.choices[0].message.content
    usage = answer["usage"]
    assert usage == direct.json()["usage"]
    assert usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert final.headers[p.H_BACKEND] == real_backend.backend_name(prefix)
    assert final.headers[p.H_ATTEMPTS] == 1 and final.headers[p.H_POOL] == "real"


async def test_a_stream_arrives_in_chunks_and_assembles_to_the_exact_text(
        real_backend: RealBackend, amqp_url: str, prefix: str) -> None:
    """Chunk messages in order, then one final with the whole answer; usage when the
    server streams it (llama.cpp sends none, even with ``include_usage``)."""
    settings = real_settings(amqp_url, prefix, real_backend)
    body = chat_body(real_backend.model, stream_options={"include_usage": True},
                     **real_backend.deterministic)
    events = await direct_stream(real_backend, body)
    direct_text = "".join((choice.get("delta") or {}).get("content") or ""
                          for event in events for choice in event.get("choices") or [])
    direct_usage = [event["usage"] for event in events if event.get("usage")]
    assert bool(direct_usage) == real_backend.usage_in_stream
    async with serving(settings), wire_client(settings) as wire, \
            HutchClient.from_settings(settings) as client:
        final = await wire.final(await wire.send({**body, "stream": True}))
        pieces: list[str] = []
        async with client.chat_stream(model=real_backend.model, messages=body["messages"],
                                      timeout=30, stream_options={"include_usage": True},
                                      **real_backend.deterministic) as stream:
            async for chunk in stream:
                pieces.extend(choice.delta.content or "" for choice in chunk.choices)
            streamed = await stream.completion()
    assert final.ok, final.body()
    assert final.chunks, "a streamed answer came without chunk messages"
    assert final.headers[p.H_SEQ] == len(final.chunks)
    assert final.streamed_text() == _text(final.body()) == direct_text
    assert "".join(pieces) == streamed.choices[0].message.content == direct_text
    expected_usage = direct_usage[-1] if direct_usage else None
    assert final.body().get("usage") == expected_usage
    assert (streamed.usage is not None) == real_backend.usage_in_stream


async def test_malformed_fields_are_refused_before_the_server_and_harm_nothing(
        real_backend: RealBackend, amqp_url: str, prefix: str) -> None:
    """Issue 11 item 1: ``"top_p": "bad"`` made llama.cpp answer 500, Hutch retried it,
    and two such requests opened the circuit for everyone. Fields whose types OpenAI
    defines are checked first: ``invalid_request``, no backend call, the backend stays
    in service for the next request."""
    settings = real_settings(amqp_url, prefix, real_backend, breaker_failures=2)
    server = real_backend.server
    calls_before = server.calls()
    bad = [chat_body(real_backend.model, top_p="bad"), chat_body(real_backend.model, n="2"),
           chat_body(real_backend.model, max_tokens=1.5), chat_body(real_backend.model,
                                                                    stream="yes")]
    async with serving(settings), wire_client(settings) as wire:
        finals = [await wire.final(await wire.send(body)) for body in bad]
        good = await wire.final(await wire.send(chat_body(real_backend.model, max_tokens=4)),
                                timeout_s=10)
    for final in finals:
        assert final.error()["code"] == p.ErrorCode.INVALID_REQUEST
        assert final.headers[p.H_ATTEMPTS] == 0
    assert good.ok, good.body()
    assert await eventually(lambda: server.calls() == calls_before + 1), server.log_tail()
