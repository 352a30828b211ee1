"""SIGTERM to a `hutch worker` process, as Kubernetes sends it on a scale-down or a rollout.

tests/test_replicas.py already shows a worker finishing its in-flight requests within the
grace period and exiting 0. These add what a pod's termination also needs:

- a worker that is draining takes nothing new: requests published after the signal stay
  queued until another worker serves them;
- requests that outlive ``shutdown_grace_s`` are handed back (the calls are aborted, the
  broker redelivers), the leases go with the connection and a peer takes them, and every
  request is answered once, the backend cap holding throughout;
- streams: within the grace period they end complete; beyond it each stream the worker
  was relaying ends in the documented way (docs/contract/streaming.md): the client sees
  the stream restart (``StreamInterruptedError(restarted=True)``) and then the retried
  attempt's whole answer, never silence and never two attempts spliced.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aio_pika.abc import AbstractChannel

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory, amqp, queue_depth
from tests.stream_faults_support import (
    FinalTap,
    StreamRun,
    eventually,
    expected_text,
    read_stream,
)
from tests.test_replicas import WorkerProcess, holders, wait_for_holder, worker_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CAP = 4


def _backend(settings: Settings) -> str:
    return settings.pools[0].backends[0].name


def _chat(client: HutchClient, content: str) -> asyncio.Task[object]:
    return asyncio.create_task(client.chat(
        model="mock-small", timeout=90, messages=[{"role": "user", "content": content}]))


async def consumers(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.consumer_count or 0


async def eventually_async(read: Callable[[], Awaitable[int]], want: int, timeout: float,
                           what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while await read() != want:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def _terminate(worker: WorkerProcess, within: float) -> tuple[int, float]:
    """SIGTERM, then wait (bounded) for the exit: its code and how long it took."""
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(within):
        code = await worker.proc.wait()
    return code, time.monotonic() - started


async def test_a_draining_worker_takes_nothing_new(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    """One worker, four requests in service: SIGTERM, then four more requests. The worker
    finishes the first four and exits 0; the later four wait in the pool's queue (the
    draining worker neither calls the backend for them nor holds them) until a new worker
    starts and serves them."""
    async with MockBackend(MockConfig(latency_ms=1500, capacity=CAP, ids_kept=100)) as mock:
        settings = make_settings([("b1", mock.base_url, CAP)], shutdown_grace_s=30)
        names = Names(settings.prefix)
        await apply_topology(settings)
        async with HutchClient.from_settings(settings) as client, \
                amqp(settings.amqp_url) as conn:
            channel = await conn.channel()
            async with worker_processes(settings, tmp_path, hutch_env, 1) as [worker]:
                await wait_for_holder([worker], _backend(settings))
                first = [_chat(client, f"first {i}") for i in range(CAP)]
                await eventually(lambda: mock.stats()["in_service"] == CAP, 20, "4 in service")
                worker.proc.send_signal(signal.SIGTERM)
                # Draining: the pool's queue has lost its consumer while the four calls
                # run on, and the worker still holds the lease (nobody else may serve).
                await eventually_async(lambda: consumers(channel, names.work_queue("chat")),
                                       0, 20, "the consumer cancelled")
                assert mock.stats()["in_service"] == CAP and await worker.holds(
                    _backend(settings))
                later = [_chat(client, f"later {i}") for i in range(CAP)]
                async with asyncio.timeout(30):
                    code = await worker.proc.wait()
                firsts = await asyncio.gather(*first)
                stats = mock.stats()
                waiting = await queue_depth(channel, names.work_queue("chat"))
            assert code == 0
            assert stats["served"] == CAP and stats["aborted"] == 0, stats
            assert not any(task.done() for task in later)
            assert waiting == CAP  # back at the broker, ready for the next worker
            async with worker_processes(settings, tmp_path, hutch_env, 1):
                laters = await asyncio.gather(*later)
    assert [c.choices[0].message.content for c in firsts] == [  # type: ignore[attr-defined]
        f"mock reply to: first {i}" for i in range(CAP)]
    assert [c.choices[0].message.content for c in laters] == [  # type: ignore[attr-defined]
        f"mock reply to: later {i}" for i in range(CAP)]


async def test_requests_outliving_the_grace_are_handed_back_and_a_peer_takes_the_lease(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    """Two workers; the lease holder has four requests at the backend (each takes 5 s)
    and more waiting in its hands when SIGTERM comes with a 1 s grace period. It exits 0
    well before its calls would end; the other worker takes the lease and serves every
    request: each is answered once, and the backend never sees more than its cap."""
    n = 12
    async with MockBackend(MockConfig(latency_ms=5000, capacity=100, ids_kept=100)) as mock:
        settings = make_settings([("b1", mock.base_url, CAP)], shutdown_grace_s=1.0,
                                 lease_retry_s=0.3)
        backend = _backend(settings)
        await apply_topology(settings)
        async with worker_processes(settings, tmp_path, hutch_env, 2) as workers, \
                HutchClient.from_settings(settings) as client:
            tap = FinalTap.install(client)
            first = await wait_for_holder(workers, backend)
            tasks = [_chat(client, f"r{i}") for i in range(n)]
            await eventually(lambda: mock.stats()["in_service"] == CAP, 20, "4 in service")
            code, took = await _terminate(first, within=20)
            # The drained worker's connection is gone, and its lease with it: the peer holds it.
            second = await wait_for_holder(workers, backend, timeout=15)
            assert second is not first and await holders(workers, backend) == [second]
            completions = await asyncio.gather(*tasks)
        stats = mock.stats()
    assert code == 0
    assert [c.choices[0].message.content for c in completions] == [
        f"mock reply to: r{i}" for i in range(n)]
    assert set(tap.finals.values()) == {1} and len(tap.finals) == n, tap.finals
    assert set(tap.outcomes.values()) == {"ok"}
    # The first worker's calls were cut at the grace's end, not waited for (5 s each).
    assert stats["aborted"] == CAP, stats
    assert stats["served"] == n, stats  # each request completed at the backend once
    assert stats["max_in_flight"] <= CAP, stats
    print(f"SIGTERM, 1 s grace, {CAP} calls of 5 s in flight: exit 0 after {took:.2f} s, "
          f"{stats['aborted']} calls handed back, {n} of {n} answered once")


TOKENS = 40


@pytest.mark.parametrize("grace_s", [30.0, 0.5], ids=["within-grace", "beyond-grace"])
async def test_sigterm_during_streams(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str],
        grace_s: float) -> None:
    """SIGTERM to the worker relaying streams (40 tokens at 100 ms each). Within the grace
    period every stream ends complete and none restarts. Beyond it (0.5 s) every stream
    the worker was relaying restarts on the peer that takes the lease: the client sees
    the documented restart and then the whole answer of the retried attempt; no stream
    stays silent, none is spliced, each ends once."""
    config = MockConfig(ttft_ms=200, itl_ms=100, jitter=0.2, reply_tokens=TOKENS,
                        capacity=100, ids_kept=500, seed=4)
    async with MockBackend(config) as mock:
        settings = make_settings([("b1", mock.base_url, 8)], shutdown_grace_s=grace_s,
                                 lease_retry_s=0.3, stream_window_ms=50)
        backend = _backend(settings)
        await apply_topology(settings)
        async with worker_processes(settings, tmp_path, hutch_env, 2) as workers, \
                HutchClient.from_settings(settings) as client:
            tap = FinalTap.install(client)
            first = await wait_for_holder(workers, backend)
            runs = [StreamRun(f"stream {i}", follow=("iterate", "completion")[i % 2])
                    for i in range(16)]
            tasks = [asyncio.create_task(read_stream(client, run, timeout=90))
                     for run in runs]
            await eventually(lambda: sum(bool(r.chunks and not r.done) for r in runs) >= 6,
                             30, "streams mid-way")
            mid = {run.content for run in runs if run.chunks and not run.done}
            code, took = await _terminate(first, within=60)
            await wait_for_holder(workers, backend, timeout=15)
            async with asyncio.timeout(90):
                await asyncio.gather(*tasks)
        stats = mock.stats()
    assert code == 0
    for run in runs:  # each ended with one attempt's exact text
        want = expected_text(run.content, TOKENS)
        assert run.done and run.answer == want, (run.content, run.answer)
        if run.follow == "iterate":
            assert run.shown == want, (run.content, run.restarts, run.shown)
    assert len(tap.finals) == len(runs) and set(tap.finals.values()) == {1}, tap.finals
    restarted = {run.content for run in runs if run.restarts}
    if grace_s > 5:
        assert restarted == set() and stats["aborted"] == 0, (restarted, stats)
    else:
        # A stream takes 4 s: those mid-way at the signal outlive the 0.5 s grace (but for
        # one near its end) and restart once on the peer, as may those that began in the
        # moment before the signal; only streams in the worker's 8 slots restart.
        assert len(mid - restarted) <= 2 and len(restarted) <= 8, (mid, restarted)
        assert all(run.restarts == 1 for run in runs if run.content in restarted)
        assert stats["aborted"] >= len(restarted), stats
    print(f"SIGTERM mid-stream, grace {grace_s} s: exit 0 after {took:.2f} s, {len(mid)} "
          f"streams mid-way, {len(restarted)} restarted, {len(runs)} of {len(runs)} "
          f"complete, each final once")
