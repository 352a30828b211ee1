"""The worker's event loop: uvloop where installed (it is a dependency on Linux)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from pipeline import eventloop


def test_run_uses_uvloop_and_returns_the_result() -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    module = eventloop.run(main())
    if sys.platform == "win32":
        assert eventloop.loop_name() == "asyncio"
    else:
        assert eventloop.loop_name() == "uvloop"
        assert module.startswith("uvloop")


def test_run_propagates_errors() -> None:
    async def main() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        eventloop.run(main())
