"""``hutch worker``: run a worker (consume pools, call backends) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

from pipeline.cli.common import Subparsers, add_config, add_log_level, settings_of
from pipeline.runtime.eventloop import LOOPS

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``worker``."""
    worker = sub.add_parser(
        "worker", help="run a worker: consume pools, call backends",
        description="Serve the configured pools until SIGTERM or SIGINT: take the leases of "
                    "as many backends as its fair share, consume their pools' queues with "
                    "prefetch = max_concurrency, call the backends, reply, retry, park. "
                    "Run one or more replicas with the same config; each backend is served "
                    "by one replica at a time. Logs are JSON lines on stderr. SIGHUP "
                    "reloads the config file (backends added, removed, re-capped or "
                    "re-pointed, pools added, models moved) without dropping a request; "
                    "see the docs, page Reloading the config (docs/operations/reload.md).")
    add_config(worker)
    worker.add_argument("--watch-config", type=float, default=None, metavar="SECONDS",
                        help="also reload when the config file's modification time "
                             "changes, checked every SECONDS")
    worker.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics on this port, with /healthz (the "
                             "event loop turns) and /readyz (connected and serving)")
    add_log_level(worker)
    worker.add_argument("--loop", choices=LOOPS, default="asyncio",
                        help="event loop: asyncio (default) or uvloop (pip install "
                             "'hutch[uvloop]'; less CPU per request, slightly more latency "
                             "at light load: see BENCHMARKS.md)")
    worker.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the worker from the settings and run it on the chosen event loop."""
    import asyncio
    import signal

    from pipeline.errors import ConfigError
    from pipeline.observe.log import configure_logging
    from pipeline.observe.metrics import Metrics
    from pipeline.observe.probes import LoopHeartbeat
    from pipeline.runtime import eventloop
    from pipeline.worker.reload import reload_triggers
    from pipeline.worker.worker import Worker

    loaded = settings_of(args)
    if not loaded.pools:
        raise ConfigError(f"{args.config}: no [[pools]] defined: the worker has nothing to do")
    configure_logging(args.log_level)
    metrics = Metrics()
    worker = Worker(loaded, metrics=metrics)
    heartbeat = LoopHeartbeat()
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, live=heartbeat.check, ready=worker.readiness)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        beating = asyncio.create_task(heartbeat.run())
        try:
            async with reload_triggers(worker, args.config, args.watch_config):
                await worker.run()
        finally:
            beating.cancel()

    eventloop.run(main(), args.loop)
    return 0
