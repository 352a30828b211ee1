"""The parking lot, operated: `hutch dlq list|replay|purge` against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import BackendError, TopologyError
from pipeline.ops import dlq
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import (
    HUTCH,
    SettingsFactory,
    amqp,
    drain_queue,
    queue_depth,
    run_hutch,
    running_worker,
    write_config,
)

DOWN = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: connection refused


async def wait_depth(channel: AbstractChannel, queue: str, n: int,
                     timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while await queue_depth(channel, queue) < n:
            await asyncio.sleep(0.05)


async def park_raw(channel: AbstractChannel, names: Names, cid: str, *,
                   reason: str = "backend_error", model: str | None = "mock-small",
                   reply_to: str | None = None, **headers: Any) -> None:
    """A parked message as Publisher.park makes it, published straight into the lot."""
    all_headers: dict[str, Any] = {
        p.H_REASON: reason, p.H_ERROR_CODE: "backend_error", p.H_ERROR_TYPE: "api_error",
        p.H_ERROR_MESSAGE: f"failed {cid}", p.H_PARKED_AT: "2025-01-31T12:00:00Z",
        p.H_ATTEMPTS: 3, p.H_POOL: "chat", p.H_BACKEND: "b1", **headers}
    if model is not None:
        all_headers[p.H_ORIGINAL_ROUTING_KEY] = model
    body = json.dumps({"model": model or "?", "messages": [{"role": "user", "content": cid}]})
    await channel.default_exchange.publish(aio_pika.Message(
        body.encode(), correlation_id=cid, reply_to=reply_to, headers=all_headers,
        content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=names.parked_queue)


# -- pure functions ------------------------------------------------------------------------


def test_replay_headers_start_afresh_and_keep_history() -> None:
    parked = {
        p.H_REASON: "backend_error", p.H_ERROR_CODE: "backend_error",
        p.H_ERROR_TYPE: "api_error", p.H_ERROR_MESSAGE: "unreachable",
        p.H_PARKED_AT: "2025-01-31T12:00:00Z", p.H_ORIGINAL_ROUTING_KEY: "mock-small",
        p.H_ATTEMPTS: 3, p.H_POOL: "chat", p.H_BACKEND: "b1", p.H_QUEUE_WAIT_MS: 5,
        p.H_BACKEND_MS: 7, p.H_DEADLINE: 1, p.H_SENT_AT: 1, p.H_RETRIES: 2,
        p.H_RETRY_TIER: "1000", "x-death": [{"queue": "llm.work.chat"}],
        "x-first-death-queue": "llm.work.chat", "x-last-death-reason": "expired",
        "x-app-trace": "keep me",
    }
    first = dlq.replay_headers(parked, now_ms=42)
    assert first == {"x-app-trace": "keep me", p.H_FIRST_FAILED_AT: "2025-01-31T12:00:00Z",
                     p.H_REPLAYED: 1, p.H_SENT_AT: 42}
    # Replayed, failed again later, parked again (Publisher.park keeps the first time).
    again = {**first, p.H_REASON: "backend_error", p.H_PARKED_AT: "2025-02-01T08:00:00Z"}
    second = dlq.replay_headers(again, now_ms=43)
    assert second[p.H_FIRST_FAILED_AT] == "2025-01-31T12:00:00Z"
    assert second[p.H_REPLAYED] == 2


def test_replay_routing_key_prefers_the_header_then_x_death() -> None:
    death = {"x-death": [{"queue": "llm.work.chat", "routing-keys": ["mock-large"]}]}
    assert dlq.replay_routing_key({p.H_ORIGINAL_ROUTING_KEY: "mock-small", **death}
                                  ) == "mock-small"
    assert dlq.replay_routing_key({p.H_ORIGINAL_ROUTING_KEY: "", **death}) == "mock-large"
    assert dlq.replay_routing_key({"x-death": [{"routing-keys": []}]}) is None
    assert dlq.replay_routing_key({}) is None


# -- the round trip ------------------------------------------------------------------------


async def test_failures_parked_listed_replayed_and_answered(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    """Backend down: requests fail and are parked. `list` shows them and the other parked
    failures without consuming or reordering. A replay while still down parks again with
    the first failure time kept. Backend fixed: replay --reason backend_error answers
    every one of them at the client's reply queue; the others stay parked, in order."""
    down = make_settings([("b1", DOWN, 2)], pool={"max_attempts": 1})
    names = Names(down.prefix)
    backend_name = down.pools[0].backends[0].name
    await apply_topology(down)
    client_id = f"dlq-{down.prefix}"
    reply_queue = names.reply_queue(client_id)
    async with amqp(down.amqp_url) as conn:
        channel = await conn.channel()
        async with running_worker(down), \
                HutchClient.from_settings(down, client_id=client_id) as client:
            for i in range(3):
                with pytest.raises(BackendError):
                    await client.chat(model="mock-small", timeout=20,
                                      messages=[{"role": "user", "content": f"fail {i}"}])
            exchange = await channel.get_exchange(names.requests_exchange)
            # One at a time: the work queue and triage are different consumers, so two
            # published together could be parked in either order.
            for parked, (cid, payload, key) in enumerate(
                    [("not-json", b"{nope", "mock-small"),
                     ("unknown-model", b'{"model": "gpt-17"}', "gpt-17")], start=4):
                await exchange.publish(aio_pika.Message(
                    payload, correlation_id=cid, reply_to=reply_queue,
                    content_type="application/json"), routing_key=key)
                await wait_depth(channel, names.parked_queue, parked)
        assert await queue_depth(channel, reply_queue) == 0  # the client took its 5 error replies

        # list: everything, oldest first, nothing consumed, nothing reordered.
        listed = await dlq.list_parked(down)
        assert [m.reason for m in listed] == ["backend_error"] * 3 + [
            "invalid_json", "unknown_model"]
        failed = listed[:3]
        for m in failed:
            assert (m.error_code, m.pool, m.backend, m.attempts) == (
                "backend_error", "chat", backend_name, 1)
            assert m.routing_key == "mock-small" and m.reply_to == reply_queue
            assert m.error_message and "unreachable" in m.error_message
            assert m.parked_at and m.first_failed_at == m.parked_at and m.replayed == 0
            assert m.size > 0
        assert listed[3].correlation_id == "not-json" and listed[3].size == 5
        assert listed[4].routing_key == "gpt-17"
        assert await queue_depth(channel, names.parked_queue) == 5
        assert [m.correlation_id for m in await dlq.list_parked(down, limit=2)] == [
            m.correlation_id for m in listed[:2]]
        assert await dlq.list_parked(down) == listed

        # The CLI shows the same, as a table and as JSON.
        config = str(write_config(tmp_path / "hutch.toml", down))
        code, out, err = await run_hutch(["dlq", "list", "-c", config], hutch_env)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["PARKED", "AT", "FIRST"]
        assert len(lines) == 1 + 5 + 1
        assert all(f" {m.correlation_id} " in out for m in listed)
        assert lines[-1] == f"5 parked messages in {names.parked_queue}"
        code, out, err = await run_hutch(["dlq", "list", "-c", config, "--json", "--limit", "1"],
                                         hutch_env)
        assert code == 0, err
        shown = json.loads(out)
        assert (shown["total"], len(shown["messages"])) == (5, 1)
        assert shown["messages"][0]["correlation_id"] == failed[0].correlation_id
        assert await queue_depth(channel, names.parked_queue) == 5

        # Replay one while the backend is still down: it fails again, is parked again at
        # the end of the lot, and still says when it first failed.
        assert await dlq.replay(down, reason="backend_error", limit=1) == dlq.ReplayResult(
            replayed=1, skipped=0, unroutable=0)
        async with running_worker(down):
            async with asyncio.timeout(15):
                while (await dlq.list_parked(down))[-1].replayed != 1:
                    await asyncio.sleep(0.1)
        relisted = await dlq.list_parked(down)
        assert [m.correlation_id for m in relisted] == [
            m.correlation_id for m in [*failed[1:], *listed[3:], failed[0]]]
        again = relisted[-1]
        assert (again.reason, again.attempts, again.replayed) == ("backend_error", 1, 1)
        assert again.first_failed_at == failed[0].parked_at
        assert await drain_queue(channel, reply_queue) != []  # the client was gone: raw error

        # Backend fixed (same backend name, now a working URL): replay answers them all.
        async with MockBackend(MockConfig(latency_ms=5, capacity=2)) as mock:
            fixed = make_settings([("b1", mock.base_url, 2)], pool={"max_attempts": 1})
            config = str(write_config(tmp_path / "fixed.toml", fixed))
            code, out, err = await run_hutch(
                ["dlq", "replay", "-c", config, "--reason", "backend_error"], hutch_env)
            assert code == 0, err
            assert out.strip() == "replayed 3 (skipped 2 with other reasons, 0 unroutable)"
            async with running_worker(fixed):
                await wait_depth(channel, reply_queue, 3)
                await asyncio.sleep(0.2)  # nothing more may arrive
            replies = await drain_queue(channel, reply_queue)
        assert sorted(r.correlation_id or "" for r in replies) == sorted(
            m.correlation_id or "" for m in failed)
        for reply in replies:
            assert (reply.headers or {})[p.H_OUTCOME] == "ok"
        contents = sorted(json.loads(r.body)["choices"][0]["message"]["content"]
                          for r in replies)
        assert contents == [f"mock reply to: fail {i}" for i in range(3)]
        rest = await dlq.list_parked(fixed)
        assert [m.correlation_id for m in rest] == ["not-json", "unknown-model"]
        assert await queue_depth(channel, names.work_queue("chat")) == 0


async def test_limit_unroutable_and_order(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        order = ["a0", "x1", "a2", "lost3", "a4", "x5", "a6"]
        for cid in order:
            if cid.startswith("lost"):
                await park_raw(channel, names, cid, model=None)
            elif cid.startswith("x"):
                await park_raw(channel, names, cid, reason="queue_full")
            else:
                await park_raw(channel, names, cid)
        # Up to a0, x1, a2, lost3, a4: three replayed, one skipped, one unroutable.
        result = await dlq.replay(settings, reason="backend_error", limit=3)
        assert result == dlq.ReplayResult(replayed=3, skipped=1, unroutable=1)
        assert [m.correlation_id for m in await dlq.list_parked(settings)] == [
            "x1", "lost3", "x5", "a6"]
        work = await drain_queue(channel, names.work_queue("chat"))
        assert [m.correlation_id for m in work] == ["a0", "a2", "a4"]
        for message in work:
            headers = message.headers or {}
            assert p.H_REASON not in headers and p.H_ATTEMPTS not in headers
            assert headers[p.H_REPLAYED] == 1
            assert headers[p.H_FIRST_FAILED_AT] == "2025-01-31T12:00:00Z"
            assert message.expiration is None
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        # Everything else: all but the unroutable one.
        assert await dlq.replay(settings) == dlq.ReplayResult(replayed=3, unroutable=1)
        assert [m.correlation_id for m in await dlq.list_parked(settings)] == ["lost3"]
        assert await dlq.replay(settings, limit=0) == dlq.ReplayResult()
        assert [m.correlation_id for m in await drain_queue(channel, names.work_queue("chat"))
                ] == ["x1", "x5", "a6"]


# -- interruption: never a duplicate, never a loss ------------------------------------------


async def _census(channel: AbstractChannel, names: Names) -> Counter[str]:
    """Correlation ids in the work queue (no worker runs) and the parking lot, consumed."""
    found: Counter[str] = Counter()
    for queue in (names.work_queue("chat"), names.parked_queue):
        found.update(m.correlation_id or "" for m in await drain_queue(channel, queue))
    return found


async def test_cancelled_replay_neither_duplicates_nor_drops(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel replays at different points, from outside (while the work queue fills) and
    from inside a transaction (the publish may be on the wire, the commit not yet): every
    message ends up in exactly one place."""
    settings = make_settings()
    names = Names(settings.prefix)
    await apply_topology(settings)
    ids = [f"r{i:03d}" for i in range(200)]
    work = names.work_queue("chat")
    async with amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        for cid in ids:
            await park_raw(channel, names, cid)

        async def settled() -> int:
            """Replayed so far, once the broker has taken back what the replay held."""
            async with asyncio.timeout(10):
                while (moved := await queue_depth(channel, work)) + await queue_depth(
                        channel, names.parked_queue) != len(ids):
                    await asyncio.sleep(0.02)
            return moved

        for stop_at in (5, 60):  # from outside
            task = asyncio.create_task(dlq.replay(settings))
            async with asyncio.timeout(30):
                while await queue_depth(channel, work) < stop_at:
                    await asyncio.sleep(0.005)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert stop_at <= await settled() < len(ids), "not interrupted mid-way"

        real = dlq._replay_message
        for nth in (1, 7, 30):  # from inside the transaction, before publish
            calls = 0

            def cancel_at_nth(message: AbstractIncomingMessage, user: str,
                              nth: int = nth) -> Any:
                nonlocal calls
                calls += 1
                if calls == nth:
                    task = asyncio.current_task()
                    assert task is not None
                    task.cancel()
                return real(message, user)

            monkeypatch.setattr(dlq, "_replay_message", cancel_at_nth)
            before = await settled()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.create_task(dlq.replay(settings))
            after = await settled()
            assert before + nth - 1 <= after <= before + nth
        monkeypatch.setattr(dlq, "_replay_message", real)

        moved = await settled()
        assert await dlq.replay(settings) == dlq.ReplayResult(replayed=len(ids) - moved)
        census = await _census(channel, names)
    assert census == Counter(ids)


async def test_killed_replay_process_neither_duplicates_nor_drops(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    config = str(write_config(tmp_path / "hutch.toml", settings))
    await apply_topology(settings)
    ids = [f"k{i:03d}" for i in range(300)]
    async with amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        for cid in ids:
            await park_raw(channel, names, cid)
        proc = await asyncio.create_subprocess_exec(
            *HUTCH, "dlq", "replay", "-c", config, env=hutch_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            async with asyncio.timeout(30):
                while await queue_depth(channel, names.work_queue("chat")) < 20:
                    await asyncio.sleep(0.005)
            proc.kill()  # SIGKILL: no cleanup, the socket just closes
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        async with asyncio.timeout(10):  # the broker notices the closed socket at once
            while (await queue_depth(channel, names.work_queue("chat"))
                   + await queue_depth(channel, names.parked_queue)) != len(ids):
                await asyncio.sleep(0.05)
        moved = await queue_depth(channel, names.work_queue("chat"))
        assert 20 <= moved < len(ids), "the replay finished before it could be killed"
        census = await _census(channel, names)
    assert census == Counter(ids)


# -- purge ---------------------------------------------------------------------------------


async def test_purge_asks_refuses_without_a_terminal_and_empties(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    config = str(write_config(tmp_path / "hutch.toml", settings))
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        for i in range(4):
            await park_raw(channel, names, f"p{i}")
        # No terminal, no --yes: refused, untouched.
        code, out, err = await run_hutch(["dlq", "purge", "-c", config], hutch_env)
        assert code == 2 and "--yes" in err and "Traceback" not in err, out + err
        assert await queue_depth(channel, names.parked_queue) == 4
        # A terminal: it asks; "n" keeps them, "y" purges.
        code, out = await _on_terminal(["dlq", "purge", "-c", config], "n\n", hutch_env)
        assert f"purge 4 parked messages from {names.parked_queue}? [y/N]" in out
        assert code == 1 and await queue_depth(channel, names.parked_queue) == 4
        code, out = await _on_terminal(["dlq", "purge", "-c", config], "y\n", hutch_env)
        assert code == 0 and f"purged 4 parked messages from {names.parked_queue}" in out
        assert await queue_depth(channel, names.parked_queue) == 0
        # --yes: no question.
        for i in range(2):
            await park_raw(channel, names, f"q{i}")
        code, out, err = await run_hutch(["dlq", "purge", "-c", config, "--yes"], hutch_env)
        assert (code, out.strip()) == (0, f"purged 2 parked messages from {names.parked_queue}")
        assert await queue_depth(channel, names.parked_queue) == 0
        assert await dlq.purge(settings) == 0


async def _on_terminal(args: list[str], answer: str, env: dict[str, str]) -> tuple[int, str]:
    """Run `hutch` with a pseudo-terminal as stdin/stdout, typing ``answer`` once asked."""
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *HUTCH, *args, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    loop = asyncio.get_running_loop()
    output = b""
    try:
        async with asyncio.timeout(30):
            while b"[y/N]" not in output and proc.returncode is None:
                output += await loop.run_in_executor(None, _read, master)
            os.write(master, answer.encode())
            while True:
                chunk = await loop.run_in_executor(None, _read, master)
                if not chunk:
                    break
                output += chunk
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)
    assert proc.returncode is not None
    return proc.returncode, output.decode(errors="replace")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the child closed the terminal
        return b""


# -- errors ----------------------------------------------------------------------------------


async def test_without_topology_it_says_what_to_run(make_settings: SettingsFactory,
                                                    tmp_path: Path,
                                                    hutch_env: dict[str, str]) -> None:
    settings: Settings = make_settings()
    with pytest.raises(TopologyError):
        await dlq.list_parked(settings)
    config = str(write_config(tmp_path / "hutch.toml", settings))
    for command in (["list"], ["replay"], ["purge", "--yes"]):
        code, _, err = await run_hutch(["dlq", *command, "-c", config], hutch_env)
        assert code == 1 and "hutch topology apply" in err and "Traceback" not in err, err
