"""Streaming and cancellation under faults, through the real broker (issue 15).

The backend is the streaming mock (pace, jitter, a hard slot cap, and ``/stats`` listing
the request ids it served and the ones whose caller went away), the client is
:class:`HutchClient`. Each test is bounded in time and cleans up what it started: worker
subprocesses are killed and reaped, the restarted broker is a node of the test's own
(tests/nodes.py), never the one the suite was pointed at.

- a worker killed (-9) with 200 streams in flight: each stream ends once, complete or
  restarted then complete, never spliced, and the backend cap holds;
- a broker restart mid-stream: each stream ends with the exact text of one attempt;
- a cancel storm of 1,000 requests: one terminal answer each, no backend call for a
  request cancelled while queued, every aborted call seen by the mock;
- an in-flight cancel (streamed or not) reaches the backend and is answered;
- bad ``stream`` input is refused and parked, and a backend that cuts, garbles or stalls
  its streams ends each one with its text or one clear ``stream_interrupted``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import InvalidRequestError, RequestCancelledError, StreamInterruptedError
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import (
    SettingsFactory,
    amqp,
    drain_queue,
    hutch,
    queue_depth,
    running_worker,
)
from tests.nodes import LocalNode
from tests.stream_faults_support import (
    MODEL,
    STORM,
    STORM_CAP,
    STORM_TOKENS,
    FinalTap,
    Planned,
    StreamRun,
    eventually,
    expected_text,
    read_stream,
    run_storm,
    storm_plan,
    user_message,
)
from tests.test_replicas import wait_for_holder, worker_processes

FOLLOWS = ("iterate", "completion", "result")


def _backend(settings: Settings) -> str:
    return settings.pools[0].backends[0].name


def _check_runs(runs: list[StreamRun], reply_tokens: int) -> None:
    """Every stream ended once with the exact text the mock sends: what a reader that
    followed the restart shows is that text, not two attempts glued together."""
    for run in runs:
        want = expected_text(run.content, reply_tokens)
        assert run.done and run.answer == want, (run.content, run.answer)
        if run.follow == "iterate":
            assert run.shown == want, (run.content, run.restarts, run.shown)


# -- an in-flight cancel ------------------------------------------------------------------


async def test_an_in_flight_cancel_reaches_the_backend_and_is_answered(
        make_settings: SettingsFactory) -> None:
    """A plain call and a stream, both at the backend: ``client.cancel`` aborts each call
    (the mock counts it aborted, by id), the caller gets ``RequestCancelledError``, the
    slots are free again, and nothing is parked or retried."""
    config = MockConfig(latency_ms=30_000, ttft_ms=20, itl_ms=100, reply_tokens=300,
                        capacity=4)
    async with MockBackend(config) as mock:
        settings = make_settings([("b1", mock.base_url, 4)])
        async with asyncio.timeout(60), hutch(settings) as client:
            cid = await client.submit({"model": MODEL, "messages": user_message("plain")},
                                      model=MODEL, timeout=60)
            await eventually(lambda: mock.stats()["in_service"] == 1, 10, "the call")
            answer = asyncio.create_task(client.result(cid))
            started = time.monotonic()
            await client.cancel(cid)
            with pytest.raises(RequestCancelledError):
                await answer
            answered_s = time.monotonic() - started
            await eventually(lambda: cid in mock.stats()["aborted_ids"], 5, "the abort")

            async with client.chat_stream(model=MODEL, messages=user_message("streamed"),
                                          timeout=60) as stream:
                chunks = aiter(stream)  # one iterator: breaking out would cancel too
                shown = [await anext(chunks) for _ in range(3)]
                started = time.monotonic()
                await stream.cancel()
                with pytest.raises(RequestCancelledError):
                    async for _ in chunks:
                        pass
                stream_answered_s = time.monotonic() - started
            sid = stream.correlation_id
            await eventually(lambda: sid in mock.stats()["aborted_ids"], 5, "the abort")
            await eventually(lambda: mock.stats()["in_service"] == 0, 5, "free slots")
            async with amqp(settings.amqp_url) as connection:
                parked = await queue_depth(await connection.channel(),
                                           Names(settings.prefix).parked_queue)
        stats = mock.stats()
    assert len(shown) == 3 and parked == 0  # a cancel is not a failure
    assert stats["aborted"] == 2 and stats["served"] == 0
    assert set(stats["aborted_ids"]) == {cid, sid}
    print(f"in-flight cancel answered in {answered_s * 1000:.0f} ms (plain), "
          f"{stream_answered_s * 1000:.0f} ms (stream)")


# -- bad input and a faulty backend --------------------------------------------------------

FAULTY_STREAMS = 40
FAULTY_TOKENS = 12


async def _faulty_stream(client: HutchClient, content: str) -> StreamInterruptedError | str:
    """Read a stream; its text, or the interruption (checked against what was shown)."""
    shown = ""
    try:
        async with client.chat_stream(model=MODEL, messages=user_message(content),
                                      timeout=30) as stream:
            async for chunk in stream:
                shown += "".join(c.delta.content or "" for c in chunk.choices)
            return str((await stream.completion()).choices[0].message.content)
    except StreamInterruptedError as exc:
        assert not exc.restarted and exc.chunks_sent >= 1, exc
        # The error says how much was sent: exactly what the reader was shown.
        assert exc.content_chars_sent == len(shown), (exc.content_chars_sent, shown)
        assert expected_text(content, FAULTY_TOKENS).startswith(shown)
        return exc


async def test_bad_stream_input_and_a_faulty_backend_end_each_request_clearly(
        make_settings: SettingsFactory) -> None:
    """``stream`` not a boolean or ``stream_options`` malformed: ``invalid_request``,
    parked. A backend that cuts streams, sends malformed events or stalls between chunks:
    each stream ends with its whole text or one ``stream_interrupted`` (never retried after
    chunks went out), every slot is freed, nothing hangs."""
    config = MockConfig(ttft_ms=20, itl_ms=20, reply_tokens=FAULTY_TOKENS, capacity=8,
                        cut_rate=0.2, malformed_rate=0.2, stall_rate=0.2,
                        fault_after_tokens=3, hang_s=30, ids_kept=1_000, seed=7)
    async with MockBackend(config) as mock:
        settings = make_settings([("b1", mock.base_url, 8)], stream_window_ms=0,
                                 stream_idle_timeout_s=0.5,
                                 # 60% of calls fail: keep the breaker out of this test.
                                 pool={"breaker_failures": 1000})
        await apply_topology(settings)
        async with asyncio.timeout(60), running_worker(settings) as worker, \
                HutchClient.from_settings(settings) as client:
            for bad in ({"stream": "yes"}, {"stream": True, "stream_options": 5},
                        {"stream": True, "stream_options": {"include_usage": "no"}}):
                with pytest.raises(InvalidRequestError):
                    await client.request({"model": MODEL, "messages": user_message("x"),
                                          **bad}, model=MODEL, timeout=10)
            ends = await asyncio.gather(*(_faulty_stream(client, f"faulty {i}")
                                          for i in range(FAULTY_STREAMS)))
            await eventually(lambda: mock.stats()["in_service"] == 0, 5, "free slots")
            sample = worker.metrics.registry.get_sample_value
            await eventually(lambda: (
                sample("hutch_backend_in_flight", {"backend": _backend(settings)}),
                sample("hutch_streams_in_flight", {"pool": "chat"})) == (0, 0),
                5, "the worker's slots and streams to be free")
            async with amqp(settings.amqp_url) as connection:
                # A failure is answered first and parked second: wait for every copy.
                failures = 3 + sum(isinstance(end, StreamInterruptedError) for end in ends)
                parked = await drain_queue(await connection.channel(),
                                           Names(settings.prefix).parked_queue,
                                           at_least=failures)
        stats = mock.stats()
    interrupted = [end for end in ends if isinstance(end, StreamInterruptedError)]
    for i, end in enumerate(ends):
        assert isinstance(end, StreamInterruptedError) or end == expected_text(
            f"faulty {i}", FAULTY_TOKENS)
    faults = stats["faults"]
    assert len(interrupted) == faults["cut"] + faults["malformed"] + faults["stalled"] > 0
    assert min(faults["cut"], faults["malformed"], faults["stalled"]) > 0, faults
    # One backend call per stream: nothing was retried after its first chunk.
    calls = stats["served_ids"] + stats["aborted_ids"]
    assert len(calls) == len(set(calls)) and len(calls) + faults["cut"] <= FAULTY_STREAMS
    reasons = Counter(str((m.headers or {})[p.H_REASON]) for m in parked)
    assert reasons == {"invalid_request": 3, "stream_interrupted": len(interrupted)}


# -- a cancel storm -----------------------------------------------------------------------


def _check_storm(plan: list[Planned], tap: FinalTap, stats: dict[str, Any]) -> None:
    served, aborted = set(stats["served_ids"]), set(stats["aborted_ids"])
    assert len({item.cid for item in plan}) == STORM
    # At the wire: exactly one final message per request, ok or cancelled.
    assert set(tap.finals) == {item.cid for item in plan}
    assert set(tap.finals.values()) == {1}, [c for c, n in tap.finals.items() if n > 1]
    assert set(tap.outcomes.values()) <= {"ok", "cancelled"}, Counter(tap.outcomes.values())
    for item in plan:
        said = tap.outcomes[item.cid]
        if item.group == "keep":
            assert item.terminal == "ok", item
        if item.group == "queued":  # never reached a backend
            assert item.terminal == "cancelled" and said == "cancelled", item
            assert item.cid not in served | aborted, item
        if item.terminal == "ok":
            assert said == "ok", item
        if said == "ok":
            assert item.cid in served and item.cid not in aborted, item
        elif not item.served_before_cancel:  # the cancel came while the backend worked:
            assert item.cid not in served, item  # the call was cut (or never made)
        if item.group == "mid_stream" and said == "cancelled" \
                and not item.served_before_cancel:  # it was at the backend
            assert item.cid in aborted, item
    # The backend saw an abort only for a cancelled request, and saw each one.
    assert aborted <= {item.cid for item in plan if tap.outcomes[item.cid] == "cancelled"}
    assert stats["aborted"] == len(aborted)
    assert stats["max_in_flight"] <= STORM_CAP


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_cancel_storm_gets_one_answer_each_and_spares_the_backend(
        make_settings: SettingsFactory) -> None:
    config = MockConfig(latency_ms=300, ttft_ms=100, itl_ms=30, jitter=0.3,
                        reply_tokens=STORM_TOKENS, capacity=STORM_CAP, ids_kept=5 * STORM,
                        seed=15)
    plan = storm_plan(random.Random(15))
    async with MockBackend(config) as mock:
        settings = make_settings([("b1", mock.base_url, STORM_CAP)])
        await apply_topology(settings)
        started = time.monotonic()
        async with asyncio.timeout(200), running_worker(settings) as worker, \
                HutchClient.from_settings(settings) as client:
            tap = FinalTap.install(client)
            errors = await run_storm(
                client, plan, lambda cid: cid in mock.stats()["served_ids"])
            assert not errors, errors[:5]
            await eventually(lambda: len(tap.finals) >= STORM, 30, "every final message")
            await asyncio.sleep(0.5)  # a second final would arrive now
        elapsed = time.monotonic() - started
        stats = mock.stats()
    _check_storm(plan, tap, stats)
    sample = worker.metrics.registry.get_sample_value
    stages = {stage: sample("hutch_cancels_total", {"pool": "chat", "stage": stage}) or 0
              for stage in ("queued", "in_flight", "client_gone")}
    said_cancelled = sum(o == "cancelled" for o in tap.outcomes.values())
    assert stages["queued"] + stages["in_flight"] == said_cancelled, stages
    assert stages["queued"] >= 150 and stages["in_flight"] >= len(stats["aborted_ids"])
    assert len(stats["aborted_ids"]) >= 100  # the mid-stream cancels, at least
    ends = Counter((item.group, item.terminal) for item in plan)
    print(f"cancel storm: {STORM} requests in {elapsed:.1f}s; client ends {dict(ends)}; "
          f"worker said {dict(Counter(tap.outcomes.values()))}; cancel stages {stages}; "
          f"mock served {stats['served']}, aborted {stats['aborted']}, "
          f"peak {stats['max_in_flight']}/{STORM_CAP}")


# -- kill -9 of a worker mid-stream -------------------------------------------------------

KILL_STREAMS = 200
KILL_CAP = 64
KILL_TOKENS = 50


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_kill_9_of_a_worker_mid_stream_restarts_streams_never_splices_them(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    """Two worker processes; the one holding the backend's lease is killed (-9) with 64
    streams at the backend and the rest queued. The other takes the lease, the broker
    redelivers the killed worker's requests, and each stream ends once: complete, or
    restarted (``StreamInterruptedError(restarted=True)``) then complete with the retried
    attempt's answer, never two attempts spliced; the backend cap held throughout."""
    config = MockConfig(ttft_ms=300, itl_ms=40, jitter=0.3, reply_tokens=KILL_TOKENS,
                        capacity=KILL_CAP, ids_kept=2_000, seed=9)
    async with MockBackend(config) as mock:
        settings = make_settings([("b1", mock.base_url, KILL_CAP)], stream_window_ms=50)
        await apply_topology(settings)
        async with asyncio.timeout(180), \
                worker_processes(settings, tmp_path, hutch_env, 2) as workers, \
                HutchClient.from_settings(settings) as client:
            first = await wait_for_holder(workers, _backend(settings))
            runs = [StreamRun(f"kill {i}", follow=FOLLOWS[i % 3])
                    for i in range(KILL_STREAMS)]
            tasks = [asyncio.create_task(read_stream(client, run)) for run in runs]
            await eventually(lambda: mock.stats()["served"] >= 10, 60, "first answers")
            await eventually(lambda: sum(bool(r.chunks and not r.done) for r in runs) >= 40,
                             30, "streams mid-way")
            mid = {run.content for run in runs if run.chunks and not run.done}
            first.proc.kill()
            await first.proc.wait()
            second = await wait_for_holder(workers, _backend(settings), timeout=15)
            assert second is not first
            await asyncio.gather(*tasks)
        stats = mock.stats()
    _check_runs(runs, KILL_TOKENS)
    restarted = {run.content for run in runs if run.restarts}
    assert all(run.restarts <= 1 for run in runs)  # one kill: one restart at most
    # Only requests in the killed worker's hands restart: at most its 64 slots, and the
    # streams that were showing chunks at the kill (but for finals already on their way).
    assert len(restarted) <= KILL_CAP and len(restarted) >= len(mid) // 2, (mid, restarted)
    assert stats["max_in_flight"] <= KILL_CAP, stats  # in service plus waiting
    assert stats["aborted"] <= KILL_CAP  # only the killed worker's calls were cut
    print(f"kill -9 mid-stream: {KILL_STREAMS} streams, {len(mid)} mid-way at the kill, "
          f"{len(restarted)} restarted, {client.dropped_replies} duplicate finals dropped; "
          f"mock served {stats['served']}, aborted {stats['aborted']}, "
          f"peak {stats['max_in_flight']}/{KILL_CAP}")


# -- a broker restart mid-stream ----------------------------------------------------------

RESTART_STREAMS = 48
RESTART_CAP = 16
RESTART_TOKENS = 40


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_broker_restart_mid_stream_ends_each_stream_with_one_attempts_text(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str],
        local_node: LocalNode) -> None:
    """A worker process and a client on a node of the test's own; the node's broker is
    restarted while streams run. Chunk messages (transient) in the reply queue are lost,
    the worker drops its calls and the broker redelivers their requests: each client ends
    with the exact full text of the attempt it received, once."""
    config = MockConfig(ttft_ms=200, itl_ms=50, jitter=0.3, reply_tokens=RESTART_TOKENS,
                        capacity=RESTART_CAP, seed=2)
    async with MockBackend(config) as mock:
        settings = make_settings([("b1", mock.base_url, RESTART_CAP)],
                                 amqp_url=local_node.amqp_url(),
                                 management_url=local_node.management_url)
        await apply_topology(settings)
        async with asyncio.timeout(180), \
                worker_processes(settings, tmp_path, hutch_env, 1) as workers, \
                HutchClient.from_settings(settings) as client:
            await wait_for_holder(workers, _backend(settings))
            runs = [StreamRun(f"restart {i}", follow=FOLLOWS[i % 3])
                    for i in range(RESTART_STREAMS)]
            tasks = [asyncio.create_task(read_stream(client, run)) for run in runs]
            await eventually(lambda: sum(bool(r.chunks and not r.done) for r in runs) >= 8,
                             30, "streams mid-way")
            mid = {run.content for run in runs if run.chunks and not run.done}
            await asyncio.to_thread(local_node.stop_app)
            await asyncio.sleep(1)
            await asyncio.to_thread(local_node.start_app)
            await asyncio.gather(*tasks)
            assert workers[0].proc.returncode is None
        stats = mock.stats()
    _check_runs(runs, RESTART_TOKENS)
    restarted = {run.content for run in runs if run.restarts}
    assert client.reconnects >= 1
    assert len(restarted) <= RESTART_CAP  # only calls at the backend start again
    assert stats["max_in_flight"] <= RESTART_CAP, stats
    print(f"broker restart mid-stream: {RESTART_STREAMS} streams, {len(mid)} mid-way, "
          f"{len(restarted)} restarted, {client.dropped_replies} duplicate finals dropped; "
          f"mock served {stats['served']}, aborted {stats['aborted']}")
