"""Backend transports through Hutch's Backend, closed loop, in one run.

Why Hutch's backends use its own aiohttp transport (pipeline/backends/transport.py) and not
httpx's default one. Compares, interleaved so a noisy machine hits them alike:

* ``hutch``: :class:`pipeline.backends.transport.AiohttpTransport` (the default);
* ``httpx-aiohttp``: ``httpx_aiohttp.AiohttpTransport``, which Hutch used before, if it is
  installed (``pip install httpx-aiohttp``; no longer a dependency);
* ``httpx``: httpx's own transport (``--with-httpx``: it is an order of magnitude slower).

Start a mock first::

    hutch mock-backend --port 18555 --latency-ms 0 --capacity 256 &
    python benchmarks/transport.py http://127.0.0.1:18555/v1 64 [--rounds 3] [--with-httpx]

Prints requests/s and this process's CPU per request for each transport and round, then
each one's median.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import httpx

from pipeline.backends.http import Backend
from pipeline.backends.transport import AiohttpTransport
from pipeline.settings import BackendSettings

BODY = b'{"model":"mock-small","messages":[{"role":"user","content":"hi"}]}'

Factory = Callable[[httpx.Limits], httpx.AsyncBaseTransport]


def transports(with_httpx: bool) -> dict[str, Factory]:
    """The transports to compare, by name (httpx-aiohttp only if installed)."""
    found: dict[str, Factory] = {"hutch": lambda limits: AiohttpTransport(limits=limits)}
    try:
        import httpx_aiohttp
    except ImportError:
        print("httpx-aiohttp is not installed: comparing without it")
    else:
        found["httpx-aiohttp"] = lambda limits: httpx_aiohttp.AiohttpTransport(limits=limits)
    if with_httpx:
        found["httpx"] = lambda limits: httpx.AsyncHTTPTransport(limits=limits)
    return found


async def measure(factory: Factory, url: str, concurrency: int,
                  seconds: float) -> tuple[float, float]:
    """Requests/s and client CPU ms per request of ``concurrency`` closed-loop callers."""
    limits = httpx.Limits(max_connections=concurrency,
                          max_keepalive_connections=concurrency)
    backend = Backend(BackendSettings(name="t", url=url, max_concurrency=concurrency,
                                      timeout_s=30), transport=factory(limits))
    await backend.chat(BODY)  # connect and warm up outside the measurement
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
    return done / elapsed, cpu / done * 1000


async def main(args: argparse.Namespace) -> None:
    found = transports(args.with_httpx)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in found}
    for round_ in range(1, args.rounds + 1):
        for name, factory in found.items():
            rate, cpu_ms = await measure(factory, args.url, args.concurrency, args.seconds)
            results[name].append((rate, cpu_ms))
            print(f"round {round_}  {name:14s} {rate:7.0f} req/s  client CPU "
                  f"{cpu_ms:.3f} ms/request", flush=True)
    for name, runs in results.items():
        print(f"median   {name:14s} {statistics.median(r for r, _ in runs):7.0f} req/s  "
              f"client CPU {statistics.median(c for _, c in runs):.3f} ms/request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("concurrency", type=int, nargs="?", default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--with-httpx", action="store_true")
    asyncio.run(main(parser.parse_args()))
