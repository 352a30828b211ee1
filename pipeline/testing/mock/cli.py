"""Run the mock backend as a process until SIGINT or SIGTERM (``hutch mock-backend``)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import signal
import sys

from pipeline.testing.mock.config import MockConfig
from pipeline.testing.mock.options import add_arguments, config_from_args
from pipeline.testing.mock.server import MockBackend

__all__ = ["main", "run_from_args", "serve"]

#: Why a listening socket could not be opened, with the fix.
_LISTEN_ERRORS = {
    errno.EADDRINUSE: "the port is already in use (another process listens there: stop "
                      "it, or pick another port with --port)",
    errno.EACCES: "permission denied (ports below 1024 need privileges: pick another "
                  "with --port)",
    errno.EADDRNOTAVAIL: "this machine has no such address (check --host)",
}


async def serve(host: str, port: int, config: MockConfig) -> None:
    """Run a mock backend until cancelled or SIGINT/SIGTERM, then stop cleanly."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_requested.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without loop signal handlers
        installed.append(sig)
    try:
        async with MockBackend(config, host, port) as mock:
            # Scripts and tests wait for this exact line before sending traffic.
            print(
                f"mock backend listening on {mock.base_url} "
                f"(capacity {config.capacity}, latency {config.latency_ms:g} ms)",
                flush=True,
            )
            if config.engine is not None:
                print(f"mock backend realistic engine: {json.dumps(config.engine.capacity())}",
                      flush=True)
            if config.has_faults:
                print(f"mock backend faults: {json.dumps(config.faults())}", flush=True)
            await stop_requested.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the server from parsed options; 0 after a clean stop, 2 on a bad config."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"mock backend: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args.host, args.port, config))
    except OSError as exc:
        if exc.errno not in _LISTEN_ERRORS:
            raise
        print(f"mock backend: cannot listen on {args.host}:{args.port}: "
              f"{_LISTEN_ERRORS[exc.errno]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.testing.mock``: the same options as ``hutch mock-backend``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.testing.mock",
        description="Mock OpenAI-compatible LLM backend.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
