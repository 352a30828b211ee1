"""httpx's own transport vs httpx-aiohttp, through Hutch's Backend, closed loop.

Why Hutch's backends use ``httpx_aiohttp.AiohttpTransport``. Start a mock first:

    hutch mock-backend --port 18555 --latency-ms 0 --capacity 256 &
    python benchmarks/transport.py http://127.0.0.1:18555/v1 64

Prints requests/s and this process's CPU per request for each transport, twice.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
from httpx_aiohttp import AiohttpTransport

from pipeline.backends.http import Backend
from pipeline.settings import BackendSettings

BODY = b'{"model":"mock-small","messages":[{"role":"user","content":"hi"}]}'


async def measure(kind: str, url: str, concurrency: int, seconds: float = 5.0) -> None:
    limits = httpx.Limits(max_connections=concurrency,
                          max_keepalive_connections=concurrency)
    transport: httpx.AsyncBaseTransport = (
        AiohttpTransport(limits=limits) if kind == "aiohttp"
        else httpx.AsyncHTTPTransport(limits=limits))
    backend = Backend(BackendSettings(name="t", url=url, max_concurrency=concurrency,
                                      timeout_s=30), transport=transport)
    done = 0
    stop = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await backend.chat(BODY)
            done += 1

    cpu, started = time.process_time(), time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    await backend.aclose()
    print(f"{kind:8s} {done / elapsed:7.0f} req/s  client CPU "
          f"{cpu / done * 1000:.3f} ms/request")


async def main(url: str, concurrency: int) -> None:
    for kind in ("httpx", "aiohttp", "httpx", "aiohttp"):
        await measure(kind, url, concurrency)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64))
