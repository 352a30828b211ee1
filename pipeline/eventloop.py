"""The event loop of long-running processes (worker, baseline): uvloop where installed.

uvloop cut the worker's CPU per request by 7-10% in the benchmarks (BENCHMARKS.md); a
worker is CPU-bound under load, so that is throughput. It is a dependency on Linux and
macOS; elsewhere (Windows) asyncio's own loop is used. Not for ``hutch bench``: uvloop's
``loop.time()`` ticks in whole milliseconds, too coarse for latencies of a few ms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["loop_name", "run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop if it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: what :func:`run` uses here (for logs and reports)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
