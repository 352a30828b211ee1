"""pipeline.runtime.background.running: ready, failing early, stopping, cancelling an overrun."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.runtime.background import running


async def test_enters_when_ready_and_stops_on_exit() -> None:
    started, stop = asyncio.Event(), asyncio.Event()

    async def service() -> None:
        started.set()
        await stop.wait()

    async with running(service(), ready=started.is_set, stop=stop.set) as task:
        assert not task.done()
    assert task.done() and task.exception() is None


async def test_an_error_before_ready_is_raised() -> None:
    async def broken() -> None:
        raise KeyError("no broker")

    with pytest.raises(KeyError):
        async with running(broken(), ready=lambda: False, stop=lambda: None):
            pytest.fail("entered")


async def test_ending_without_being_ready_is_an_error() -> None:
    async def quits() -> None:
        return None

    with pytest.raises(RuntimeError, match="before it was ready"):
        async with running(quits(), ready=lambda: False, stop=lambda: None):
            pytest.fail("entered")


async def test_a_task_that_ignores_stop_is_cancelled() -> None:
    async def stubborn() -> None:
        await asyncio.sleep(3600)

    async with running(stubborn(), ready=lambda: True, stop=lambda: None,
                       stop_timeout_s=0.05) as task:
        pass
    assert task.cancelled()
