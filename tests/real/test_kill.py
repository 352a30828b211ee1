"""A real server killed (``kill -9``) under load: every request is answered exactly once.

Each server runs here as a dedicated process (the session's shared one stays up). First
it is killed with calls in flight and restarted on the same port, as a supervisor would:
every request ends with the server's answer, once. Then it is killed for good: every
request ends with one error, and the parked copies of the requests that had reached it
still say how many attempts were made and at which backend (issue 11 item 5: they said
``attempts 0`` and ``backend null``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import protocol as p
from tests.real.conftest import EXTRAS, LITELLM_KEY_ENV, litellm_backend, llamacpp_backend
from tests.real.harness import (
    RealBackend,
    WireClient,
    chat_body,
    parked,
    real_settings,
    serving,
    wire_client,
)
from tests.real.servers import litellm_server, llama_server
from tests.real.tiny_model import Shape, vocabulary, write_tiny_llama

pytestmark = pytest.mark.timeout(420)

#: Requests per phase; enough that some are at the server and some queued at the kill.
LOAD = 12
#: llama.cpp's model here: 17 MB, 200 tokens in about 0.25 s (the tiny one takes 0.02 s).
SLOW = Shape(embed=256, layers=4, feed_forward=1024)


@pytest.fixture(params=sorted(EXTRAS))
def killable(request: pytest.FixtureRequest, real_workdir: Path) -> Iterator[RealBackend]:
    """A server of each kind of this test's own, started; stopped at the end."""
    name = f"{request.param}-killable"
    if request.param == "litellm":
        request.getfixturevalue("litellm_proxy")  # sets the session's master key
        server = litellm_server(real_workdir, os.environ[LITELLM_KEY_ENV], name=name)
        backend = litellm_backend(server)
    else:
        request.getfixturevalue("tiny_model")  # the extra is there
        model = real_workdir / "slow-llama.gguf"
        if not model.exists():
            write_tiny_llama(model, SLOW)
        server = llama_server(real_workdir, model, name=name)
        backend = llamacpp_backend(server)
    server.start()
    try:
        yield backend
    finally:
        server.stop()


def _body(backend: RealBackend, number: int) -> dict[str, object]:
    """A request that keeps the server busy a while: LiteLLM's ``real-slow`` (1 s), or
    200 tokens from llama.cpp (its end-of-turn tokens banned, so it never stops early)."""
    if backend.kind == "litellm":
        return chat_body("real-slow", f"request {number}")
    tokens = vocabulary()[0]
    never = {str(tokens.index(token)): -100.0 for token in ("</s>", "<|im_end|>")}
    return chat_body(backend.model, f"request {number}", max_tokens=200, logit_bias=never)


async def _load(wire: WireClient, backend: RealBackend, timeout_s: float) -> list[str]:
    """Send the load; return once the first answer came (calls are in flight then)."""
    sent = [await wire.send(_body(backend, n), timeout_s=timeout_s) for n in range(LOAD)]
    await wire.final(sent[0], timeout_s=60)
    return sent


async def test_a_killed_server_loses_no_request_and_answers_none_twice(
        killable: RealBackend, amqp_url: str, prefix: str) -> None:
    server = killable.server
    settings = real_settings(amqp_url, prefix, killable, max_attempts=30,
                             retry_delays_ms=[500, 1000, 2000], breaker_failures=3,
                             breaker_cooldown_s=1.0)
    async with serving(settings), wire_client(settings) as wire:
        # Killed mid-load, restarted on the same port: every request gets its answer.
        restarted = await _load(wire, killable, timeout_s=240)
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(1)
        await asyncio.to_thread(server.start)
        answers = [await wire.final(cid, timeout_s=240) for cid in restarted]
        # Killed for good: every request gets one error, and its history is kept.
        lost = await _load(wire, killable, timeout_s=10)
        await asyncio.to_thread(server.kill)
        errors = [await wire.final(cid, timeout_s=30) for cid in lost]
        await asyncio.sleep(2)  # a duplicate would arrive now
    assert all(answer.ok for answer in answers), [a.body() for a in answers if not a.ok]
    for cid in restarted + lost:
        assert len(wire.finals(cid)) == 1, f"{cid} was answered {len(wire.finals(cid))} times"
    failed = [cid for cid, error in zip(lost, errors, strict=True) if not error.ok]
    assert failed, "no request was left to fail after the kill"
    copies = await parked(settings, at_least=len(failed))
    backend = killable.backend_name(prefix)
    tried = [copies[cid] for cid in failed if copies[cid].get(p.H_ATTEMPTS, 0) > 0]
    assert tried, f"no parked copy kept its attempts: {list(copies.values())}"
    for headers in tried:
        assert backend in (headers.get(p.H_BACKEND), headers.get(p.H_LAST_BACKEND)), headers
