"""HutchClient against the real broker: streams, cancels, a missing topology, and the
temporary reply queue of one-shot commands.

The streaming backends are tests/test_streaming.py's (httpx MockTransport handlers that
stream server-sent events), so a fault or an abort is exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import RequestCancelledError, StreamInterruptedError, TopologyError
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import (
    SettingsFactory,
    amqp,
    body,
    run_hutch,
    running_worker,
    wait_for,
    write_config,
)
from tests.test_streaming import WORDS, StreamingBackend, transports

MESSAGES = [{"role": "user", "content": "hi"}]


async def cancel_listener(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    """A queue of our own on the cancel exchange: every cancel published lands in it."""
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(Names(settings.prefix).cancel_exchange)
    return queue


async def next_cancel(queue: AbstractQueue, timeout: float = 10) -> tuple[str, str, bytes]:
    async with asyncio.timeout(timeout):
        while (message := await queue.get(no_ack=True, fail=False)) is None:
            await asyncio.sleep(0.02)
    return str(message.correlation_id), str(message.user_id), message.body


@pytest.fixture
async def streaming(make_settings: SettingsFactory) -> AsyncIterator[
        tuple[Settings, StreamingBackend, HutchClient]]:
    """A topology, a worker on a streaming backend (its fault set by the test), a client."""
    settings = make_settings(stream_window_ms=0, stream_idle_timeout_s=0.5)
    backend = StreamingBackend(gap_s=0.02)
    await apply_topology(settings)
    async with running_worker(settings, transport_factory=transports(backend)), \
            HutchClient.from_settings(settings) as client:
        yield settings, backend, client


async def test_a_stream_yields_the_chunks_then_the_final_completion(
        streaming: tuple[Settings, StreamingBackend, HutchClient]) -> None:
    _, _, client = streaming
    async with client.chat_stream(model="mock-small", messages=MESSAGES, timeout=20,
                                  stream_options={"include_usage": True}) as stream:
        chunks = [c async for c in stream]
        completion = await stream.completion()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(WORDS) == completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == len(WORDS)
    assert sum(c.usage is not None for c in chunks) == 1 and stream.dropped_chunks == 0


async def test_many_concurrent_streams_share_one_client_connection(
        make_settings: SettingsFactory) -> None:
    settings = make_settings([("b1", "http://stream.invalid/v1", 50)], stream_window_ms=10)
    backend = StreamingBackend(gap_s=0.01)
    await apply_topology(settings)

    async def one(client: HutchClient, i: int) -> str:
        async with client.chat_stream(model="mock-small", timeout=60,
                                      messages=[{"role": "user", "content": f"q{i}"}]) as s:
            text = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
            assert (await s.completion()).choices[0].message.content == text
            return text

    async with running_worker(settings, transport_factory=transports(backend)), \
            HutchClient.from_settings(settings) as client:
        texts = await asyncio.gather(*(one(client, i) for i in range(300)))
    assert texts == ["".join(WORDS)] * 300 and backend.calls == 300


async def test_a_stream_cut_short_raises_stream_interrupted_with_what_was_sent(
        streaming: tuple[Settings, StreamingBackend, HutchClient]) -> None:
    _, backend, client = streaming
    backend.fault = "drop"
    shown = ""
    with pytest.raises(StreamInterruptedError) as caught:
        async with client.chat_stream(model="mock-small", messages=MESSAGES,
                                      timeout=20) as stream:
            async for chunk in stream:
                shown += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert not caught.value.restarted and caught.value.chunks_sent == 3
    assert caught.value.content_chars_sent == len(shown) == len("".join(WORDS[:3]))


async def test_stream_cancel_and_breaking_out_abort_the_backend_call(
        streaming: tuple[Settings, StreamingBackend, HutchClient]) -> None:
    _, backend, client = streaming
    backend.gap_s = 0.3
    with pytest.raises(RequestCancelledError):
        async with client.chat_stream(model="mock-small", messages=MESSAGES,
                                      timeout=20) as stream:
            async for _ in stream:
                await stream.cancel()  # the worker aborts and answers cancelled
    await wait_for(_true_when(lambda: backend.aborted == 1))
    async with client.chat_stream(model="mock-small", messages=MESSAGES, timeout=20) as s:
        async for _ in s:
            break  # leaving early cancels in the background
    await wait_for(_true_when(lambda: backend.aborted == 2))


def _true_when(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """An async predicate for wait_for."""
    async def check() -> bool:
        return condition()
    return check


async def test_cancelling_the_task_awaiting_chat_cancels_the_request(
        make_settings: SettingsFactory) -> None:
    async with MockBackend(MockConfig(latency_ms=5000, capacity=2)) as mock:
        settings = make_settings([("b1", mock.base_url, 2)])
        await apply_topology(settings)
        async with amqp(settings.amqp_url) as connection, \
                running_worker(settings) as worker, \
                HutchClient.from_settings(settings) as client:
            cancels = await cancel_listener(await connection.channel(), settings)
            task = asyncio.create_task(client.chat(model="mock-small", messages=MESSAGES,
                                                   timeout=30))
            # At the backend now (waited for: 0.5 s was not always enough under load, and a
            # cancel before it counts as "queued", not "in_flight").
            await wait_for(_true_when(lambda: mock.stats()["in_service"] == 1), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            cid, user, payload = await next_cancel(cancels)
            assert (user, payload) == ("guest", b"") and len(cid) == 32
            sample = worker.metrics.registry.get_sample_value
            await wait_for(_true_when(lambda: sample(
                "hutch_cancels_total", {"pool": "chat", "stage": "in_flight"}) == 1))
            await wait_for(_true_when(lambda: mock.stats()["disconnected"] == 1))
            assert mock.stats()["served"] == 0  # aborted at the backend, not served


async def test_cancel_publishes_a_confirmed_tombstone_as_the_clients_user(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    settings = make_settings()
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection, \
            HutchClient.from_settings(settings) as client:
        cancels = await cancel_listener(await connection.channel(), settings)
        await client.cancel("abc123")
        assert await next_cancel(cancels) == ("abc123", "guest", b"")
        config = str(write_config(tmp_path / "hutch.toml", settings))
        code, out, err = await run_hutch(["cancel", "-c", config, "id-1", "id-2"], hutch_env)
        assert code == 0, err
        assert "sent 2 cancels" in out
        assert [(await next_cancel(cancels))[0] for _ in range(2)] == ["id-1", "id-2"]


async def test_a_missing_topology_is_reported_at_once_not_retried(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    settings = make_settings()  # no topology applied under this prefix
    started = time.monotonic()
    with pytest.raises(TopologyError, match=r"requests' does not exist.*hutch topology apply"):
        async with HutchClient.from_settings(settings):
            pass
    config = str(write_config(tmp_path / "hutch.toml", settings))
    code, _, err = await run_hutch(["submit", "-c", config, "-m", "mock-small", "hi"],
                                     hutch_env)
    assert code == 1 and "hutch topology apply" in err and f"{settings.prefix}.requests" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert time.monotonic() - started < 15


async def test_a_publish_to_a_deleted_exchange_raises_topology_error(
        make_settings: SettingsFactory) -> None:
    settings = make_settings()
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as connection, \
            HutchClient.from_settings(settings) as client:
        channel = await connection.channel()
        await channel.exchange_delete(Names(settings.prefix).requests_exchange)
        with pytest.raises(TopologyError, match="hutch topology apply"):
            await client.submit(body(), model="mock-small", timeout=5)


async def _reply_queues(settings: Settings) -> list[str]:
    base, user, password = settings.management_api()
    vhost = quote(settings.vhost, safe="")
    async with httpx.AsyncClient(auth=(user, password), timeout=10) as http:
        response = await http.get(f"{base}/api/queues/{vhost}", params={"columns": "name"})
        response.raise_for_status()
    return [q["name"] for q in response.json()
            if q["name"].startswith(Names(settings.prefix).reply_queue(""))]


async def test_one_shot_submit_leaves_no_reply_queue(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    async with MockBackend(MockConfig(latency_ms=5, capacity=2)) as mock:
        settings = make_settings([("b1", mock.base_url, 2)])
        await apply_topology(settings)
        config = str(write_config(tmp_path / "hutch.toml", settings))
        async with running_worker(settings):
            code, out, err = await run_hutch(
                ["submit", "-c", config, "-m", "mock-small", "hello"], hutch_env)
            assert (code, out.strip()) == (0, "mock reply to: hello"), err
            assert await _reply_queues(settings) == []
            async with HutchClient.from_settings(settings, client_id="durable") as client:
                await client.chat(model="mock-small", messages=MESSAGES, timeout=20)
            # The library's default stays the durable queue that waits for a reconnect.
            assert await _reply_queues(settings) == [Names(settings.prefix).reply_queue(
                "durable")]
    async with amqp(settings.amqp_url) as connection:
        await (await connection.channel()).queue_delete(
            Names(settings.prefix).reply_queue("durable"))
