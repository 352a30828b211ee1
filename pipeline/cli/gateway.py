"""``hutch gateway``: the OpenAI-compatible HTTP gateway in front of the queue."""

from __future__ import annotations

import argparse

from pipeline.cli.common import Subparsers, add_config, add_log_level, settings_of

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``gateway``."""
    gateway = sub.add_parser(
        "gateway", help="run the OpenAI-compatible HTTP gateway (any OpenAI client, any "
        "SDK: change only its base_url)",
        description="Serve OpenAI's HTTP API (/v1/chat/completions with SSE streaming, "
                    "/v1/completions, /v1/embeddings, /v1/models) and put every request on "
                    "the queue: an OpenAI SDK needs only its base_url changed. API keys "
                    "from [[gateway.keys]] map to identities and priority ceilings; without "
                    "keys it runs open (development only). Runs until SIGTERM or SIGINT.")
    add_config(gateway, required=False)
    gateway.add_argument("--host", default=None,
                         help="address to listen on (default: [gateway] host, 127.0.0.1)")
    gateway.add_argument("--port", type=int, default=None,
                         help="port to listen on (default: [gateway] port, 8080)")
    gateway.add_argument("--metrics-port", type=int, default=None,
                         help="serve Prometheus metrics on this port")
    gateway.add_argument("--replica-id", default=None,
                         help="this replica's name in its reply queue (default: "
                              "host-pid-random)")
    add_log_level(gateway)
    gateway.add_argument("--hash-key", action="store_true",
                         help="read an API key from stdin, print its key_hash for "
                              "[[gateway.keys]], and exit")
    gateway.set_defaults(func=run)


def _hash_key() -> int:
    import sys

    from pipeline.gateway.auth import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        print("hutch gateway --hash-key: no key on stdin", file=sys.stderr)
        return 2
    print(f'key_hash = "{hash_key(key)}"')
    return 0


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads the API keys."""
    if args.hash_key:
        return _hash_key()
    import asyncio
    import signal

    from pipeline.gateway.server import GatewayServer
    from pipeline.observe.log import configure_logging
    settings = settings_of(args)
    configure_logging(args.log_level)
    server = GatewayServer(settings, host=args.host, port=args.port,
                           replica_id=args.replica_id)
    if args.metrics_port is not None:
        server.serve_metrics(args.metrics_port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload_keys)  # keys, no restart
        async with server:
            await stop.wait()

    asyncio.run(main())
    return 0
