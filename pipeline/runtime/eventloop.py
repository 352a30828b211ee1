"""The event loop of long-running processes (``hutch worker``, the bench baseline).

``asyncio`` by default; ``uvloop`` (``pip install 'hutch[uvloop]'``, Linux and macOS) on
request with ``--loop uvloop``. Measured on the overhead scenario (BENCHMARKS.md): uvloop
cuts the worker's CPU per request by 7-10%, which raises the maximum throughput of a
CPU-bound worker, but adds about 0.5 ms to the median latency at light load. LLM calls
take seconds and a worker rarely runs CPU-bound, so the default keeps the lower latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from pipeline.errors import ConfigError

__all__ = ["LOOPS", "run"]

T = TypeVar("T")

#: The ``--loop`` choices.
LOOPS = ("asyncio", "uvloop")


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """``asyncio.run(main)`` on the named event loop."""
    if loop == "asyncio":
        return asyncio.run(main)
    if loop != "uvloop":
        main.close()
        raise ConfigError(f"--loop {loop!r}: expected one of {', '.join(LOOPS)}")
    try:
        import uvloop
    except ImportError:
        main.close()
        raise ConfigError("--loop uvloop: uvloop is not installed; "
                          "pip install 'hutch[uvloop]'") from None
    return uvloop.run(main)
