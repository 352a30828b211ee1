"""Run a long-lived coroutine (a worker) as a task of this event loop, for a block.

The embedded Hutch of ``hutch demo`` and ``hutch bench --embedded``, and the tests, all
need the same steps: start the task, wait until it says it is ready (failing with its own
error if it dies first), and afterwards ask it to stop, give it time to drain, and cancel
it only if it overruns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

__all__ = ["running"]


@contextlib.asynccontextmanager
async def running(main: Coroutine[Any, Any, None], *, ready: Callable[[], bool],
                  stop: Callable[[], None], ready_timeout_s: float = 15.0,
                  stop_timeout_s: float = 15.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``main`` until the block ends. Enter once ``ready()`` is true (TimeoutError
    after ``ready_timeout_s``; ``main``'s own exception if it ends first). On exit call
    ``stop()``, await the task up to ``stop_timeout_s``, then cancel it."""
    task = asyncio.create_task(main)
    try:
        async with asyncio.timeout(ready_timeout_s):
            while not ready():
                if task.done():
                    task.result()  # raise its error (or return: it ended without one)
                    raise RuntimeError("the task ended before it was ready")
                await asyncio.sleep(0.02)
        yield task
    finally:
        stop()
        try:
            async with asyncio.timeout(stop_timeout_s):
                await task
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
