"""``hutch``: the one command-line entry point.

Subcommands: ``worker``, ``topology apply``, ``submit``, ``mock-backend``, ``demo``,
``dlq list|replay|purge``.
Every expected failure (bad config, unreachable broker, topology conflict, an error reply)
ends in one readable line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Literal

from pipeline.bench import add_cli as add_bench_cli
from pipeline.errors import ConfigError, HutchError, RequestFailed, TopologyError
from pipeline.observe.log import configure_logging
from pipeline.runtime import eventloop
from pipeline.settings import Settings, load_settings
from pipeline.testing import mock_backend
from topology import definitions as topology_definitions
from topology import diff as topology_diff

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILED = 1


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _cmd_worker(args: argparse.Namespace) -> int:
    from pipeline.observe.metrics import Metrics
    from pipeline.worker.worker import Worker

    settings = _settings(args)
    if not settings.pools:
        raise ConfigError(f"{args.config}: no [[pools]] defined: the worker has nothing to do")
    configure_logging(args.log_level)
    metrics = Metrics()
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port)
    worker = Worker(settings, metrics=metrics)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    eventloop.run(run(), args.loop)
    return 0


def _cmd_topology_apply(args: argparse.Namespace) -> int:
    from pipeline.broker.topology import apply_topology

    settings = _settings(args)
    report = asyncio.run(apply_topology(settings))
    for line in report.lines():
        print(line)
    print(f"topology applied to vhost {settings.vhost!r} at {settings.redacted_amqp_url()}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.client.client import HutchClient

    settings = load_settings(args.config) if args.config else load_settings()

    async def run() -> int:
        async with HutchClient.from_settings(settings) as client:
            body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
            if args.max_tokens:
                body["max_tokens"] = args.max_tokens
            try:
                reply = await client.request(body, model=args.model, priority=args.priority,
                                             timeout=args.timeout)
            except RequestFailed as exc:
                print(f"error {exc.code}: {exc.message}", file=sys.stderr)
                return EXIT_FAILED
        if args.json:
            print(reply.completion.model_dump_json(indent=2))
        else:
            for choice in reply.completion.choices:
                print(choice.message.content)
            print(f"-- {reply.latency_s * 1000:.0f} ms, queue wait {reply.queue_wait_ms} ms, "
                  f"backend {reply.backend}", file=sys.stderr)
        return 0

    return asyncio.run(run())


def _cmd_mock_backend(args: argparse.Namespace) -> int:
    return mock_backend.run_from_args(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.ops.demo import run_demo

    return asyncio.run(run_demo(low=args.low, high=args.high, capacity=args.capacity,
                                latency_ms=args.latency_ms, keep=args.keep_topology))


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                      ).rstrip() for row in (header, *rows)]


def _cmd_dlq_list(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from pipeline.broker.names import Names
    from pipeline.ops.dlq import list_parked, parked_count

    settings = _settings(args)
    queue = Names(settings.prefix).parked_queue
    parked = asyncio.run(list_parked(settings, limit=args.limit))
    total = asyncio.run(parked_count(settings))
    if args.json:
        print(json.dumps({"queue": queue, "total": total,
                          "messages": [dataclasses.asdict(m) for m in parked]}, indent=2))
        return 0

    def cell(value: object, width: int = 0) -> str:
        text = "-" if value is None or value == "" else " ".join(str(value).split())
        return text if not width or len(text) <= width else text[:width - 1] + "…"

    rows = [[cell(m.parked_at), cell(m.first_failed_at),
             cell(m.reason), cell(m.error_code), cell(m.pool), cell(m.backend),
             cell(m.attempts), cell(m.replayed or None), cell(m.routing_key, 30),
             cell(m.correlation_id, 36), cell(m.error_message, 60)] for m in parked]
    if rows:
        for line in _table(rows, ["PARKED AT", "FIRST FAILED", "REASON", "CODE", "POOL",
                                  "BACKEND", "ATTEMPTS", "REPLAYS", "MODEL",
                                  "CORRELATION ID", "MESSAGE"]):
            print(line)
    shown = f"{len(parked)} of {total}" if len(parked) < total else f"{total}"
    print(f"{shown} parked message{'s' if total != 1 else ''} in {queue}")
    return 0


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    from pipeline.ops.dlq import replay

    settings = _settings(args)
    result = asyncio.run(replay(settings, reason=args.reason, limit=args.limit))
    print(f"replayed {result.replayed} (skipped {result.skipped} with other reasons, "
          f"{result.unroutable} unroutable)")
    return 0


def _cmd_dlq_purge(args: argparse.Namespace) -> int:
    from pipeline.broker.names import Names
    from pipeline.ops.dlq import parked_count, purge

    settings = _settings(args)
    queue = Names(settings.prefix).parked_queue
    if not args.yes and not sys.stdin.isatty():
        print(f"hutch: dlq purge: refusing to purge {queue} without confirmation (stdin is "
              "not a terminal); pass --yes", file=sys.stderr)
        return EXIT_USAGE
    if not args.yes:
        count = asyncio.run(parked_count(settings))
        if count == 0:
            print(f"{queue} is empty: nothing to purge")
            return 0
        try:
            answer = input(f"purge {count} parked message{'s' if count != 1 else ''} "
                           f"from {queue}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged", file=sys.stderr)
            return EXIT_FAILED
    removed = asyncio.run(purge(settings))
    print(f"purged {removed} parked message{'s' if removed != 1 else ''} from {queue}")
    return 0


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def _cmd_pool(args: argparse.Namespace) -> int:
    from pipeline.worker.pause import pause_pool, paused_pools, resume_pool

    settings = _settings(args)
    if args.pool_command == "list":
        paused = set(asyncio.run(paused_pools(settings)))
        for pool in settings.pools:
            state = "paused" if pool.name in paused else "running"
            print(f"{pool.name:<24} {state:<8} models: {', '.join(pool.models)}")
        return 0
    try:
        settings.pool(args.pool)
    except KeyError:
        known = ", ".join(p.name for p in settings.pools) or "none"
        raise ConfigError(f"no pool named {args.pool!r} in {args.config} (pools: {known})"
                          ) from None
    if args.pool_command == "pause":
        asyncio.run(pause_pool(settings, args.pool))
        print(f"pool {args.pool!r} paused: workers stop taking its requests within "
              f"~{settings.lease_retry_s * 2:g} s; requests wait in its queue")
    else:
        asyncio.run(resume_pool(settings, args.pool))
        print(f"pool {args.pool!r} resumed")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from pipeline.ops.status import format_status, status

    settings = _settings(args)
    report = asyncio.run(status(settings, args.metrics))
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_status(report))
    return 0


def _cmd_user(args: argparse.Namespace) -> int:
    from topology.clients import (
        add_client,
        add_worker_user,
        list_users,
        remove_client,
        remove_worker_user,
    )

    settings = _settings(args)
    role: Literal["client", "worker"] = "client" if args.command == "client" else "worker"
    if args.user_command == "list":
        users = asyncio.run(list_users(settings, role))
        for user in users:
            perms = user.permissions
            where = (f"configure {perms.configure}  write {perms.write}  read {perms.read}"
                     if perms else f"(no permissions in vhost {settings.vhost!r})")
            print(f"{user.name:<24} {where}")
        if not users:
            print(f"no Hutch {role} users")
        return 0
    if args.user_command == "remove":
        remove = remove_client if role == "client" else remove_worker_user
        asyncio.run(remove(settings, args.name))
        print(f"{role} user {args.name!r} deleted (its connections were closed)")
        return 0
    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else None
    add = add_client if role == "client" else add_worker_user
    created = asyncio.run(add(settings, args.name, password))
    p = created.permissions
    print(f"{role} user {created.name!r} created, vhost {settings.vhost!r}")
    print(f"  permissions: configure {p.configure}  write {p.write}  read {p.read}")
    if role == "client":
        print(f"  reply queues: {settings.prefix}.reply.{created.name} or "
              f"{settings.prefix}.reply.{created.name}.<suffix> "
              f"(HutchClient(client_id='{created.name}') or '{created.name}.<suffix>')")
    else:
        print("  run every worker replica as this user; set require_user_id = true")
    if password is None:
        print(f"  password: {created.password}")
    print(f"  amqp_url: {created.amqp_url}")
    print("  (the password is shown only now: store it in your secret store)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hutch", description="Hutch: a RabbitMQ request queue for LLM backends.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", "-c", required=required,
                       help="TOML configuration file (HUTCH_* variables override it)")

    worker = sub.add_parser("worker", help="run a worker: consume pools, call backends")
    config_arg(worker)
    worker.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port")
    worker.add_argument("--log-level", default="INFO")
    worker.add_argument("--loop", choices=eventloop.LOOPS, default="asyncio",
                        help="event loop: asyncio (default) or uvloop (pip install "
                             "'hutch[uvloop]'; less CPU per request, slightly more latency "
                             "at light load: see BENCHMARKS.md)")
    worker.set_defaults(func=_cmd_worker)

    topology = sub.add_parser("topology", help="manage the broker topology")
    topo_sub = topology.add_subparsers(dest="topology_command", required=True)
    apply = topo_sub.add_parser("apply", help="declare exchanges, queues, bindings, policies")
    config_arg(apply)
    apply.set_defaults(func=_cmd_topology_apply)
    topology_definitions.add_cli(topo_sub, config_arg)
    topology_diff.add_cli(topo_sub, config_arg)

    submit = sub.add_parser("submit", help="send one chat request and print the reply")
    config_arg(submit, required=False)
    submit.add_argument("--model", "-m", required=True)
    submit.add_argument("--priority", "-p", type=int, default=0)
    submit.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    submit.add_argument("--max-tokens", type=int, default=None)
    submit.add_argument("--json", action="store_true", help="print the whole completion")
    submit.add_argument("prompt")
    submit.set_defaults(func=_cmd_submit)

    mock = sub.add_parser("mock-backend", help="run the OpenAI-compatible mock backend")
    mock_backend.add_arguments(mock)
    mock.set_defaults(func=_cmd_mock_backend)

    status = sub.add_parser(
        "status", help="queue depths, consumers, backends' in-flight and capacity, parked")
    config_arg(status)
    status.add_argument("--metrics", "-m", action="append", default=[], metavar="URL",
                        help="a worker's metrics endpoint (host:port, http://host:port or a "
                             "full URL); repeat for every replica")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(func=_cmd_status)

    for command, role, text in (
            ("client", "client", "manage per-application users (least permissions)"),
            ("worker-user", "worker", "manage the workers' user (least permissions)")):
        user_parser = sub.add_parser(command, help=text)
        user_sub = user_parser.add_subparsers(dest="user_command", required=True)
        add = user_sub.add_parser("add", help=f"create a {role} user; prints its password once")
        config_arg(add)
        add.add_argument("name", help="user name: letters, digits, '_' or '-' (no dots)")
        add.add_argument("--password-stdin", action="store_true",
                         help="read the password from stdin instead of generating one")
        add.set_defaults(func=_cmd_user)
        remove = user_sub.add_parser("remove", help=f"delete a {role} user")
        config_arg(remove)
        remove.add_argument("name")
        remove.set_defaults(func=_cmd_user)
        listing = user_sub.add_parser("list", help=f"the {role} users and their permissions")
        config_arg(listing)
        listing.set_defaults(func=_cmd_user)

    pool = sub.add_parser("pool", help="pause, resume or list pools")
    pool_sub = pool.add_subparsers(dest="pool_command", required=True)
    for action, text in (("pause", "stop taking the pool's requests (they wait queued)"),
                         ("resume", "take the pool's requests again")):
        cmd = pool_sub.add_parser(action, help=text)
        config_arg(cmd)
        cmd.add_argument("pool", help="pool name")
        cmd.set_defaults(func=_cmd_pool)
    pool_list = pool_sub.add_parser("list", help="each pool, running or paused")
    config_arg(pool_list)
    pool_list.set_defaults(func=_cmd_pool)

    add_bench_cli(sub, config_arg)

    demo = sub.add_parser("demo", help="show priorities overtaking a saturated backlog")
    demo.add_argument("--low", type=int, default=60, help="low-priority requests (burst)")
    demo.add_argument("--high", type=int, default=10, help="high-priority requests")
    demo.add_argument("--capacity", type=int, default=4, help="mock backend slots")
    demo.add_argument("--latency-ms", type=float, default=100.0, help="mock service time")
    demo.add_argument("--keep-topology", dest="keep_topology", action="store_true",
                      help="leave the demo's queues on the broker to look at in the UI")
    demo.set_defaults(func=_cmd_demo)

    from pipeline.protocol import ParkReason

    dlq = sub.add_parser("dlq", help="inspect, replay or purge the parking lot")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="show parked messages (nothing is consumed)")
    config_arg(dlq_list)
    dlq_list.add_argument("--limit", type=_non_negative, default=None,
                          help="show at most N, oldest first")
    dlq_list.add_argument("--json", action="store_true", help="print JSON, every field")
    dlq_list.set_defaults(func=_cmd_dlq_list)
    dlq_replay = dlq_sub.add_parser(
        "replay", help="send parked requests back to their model, with fresh attempts")
    config_arg(dlq_replay)
    dlq_replay.add_argument("--reason", default=None, metavar="REASON",
                            choices=[str(reason) for reason in ParkReason],
                            help="only those parked for this x-hutch-reason (one of "
                                 f"{', '.join(ParkReason)})")
    dlq_replay.add_argument("--limit", type=_non_negative, default=None,
                            help="replay at most N, oldest first")
    dlq_replay.set_defaults(func=_cmd_dlq_replay)
    dlq_purge = dlq_sub.add_parser("purge", help="delete every parked message")
    config_arg(dlq_purge)
    dlq_purge.add_argument("--yes", "-y", action="store_true",
                           help="do not ask for confirmation")
    dlq_purge.set_defaults(func=_cmd_dlq_purge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"hutch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TopologyError as exc:
        print(f"hutch: topology: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except HutchError as exc:
        print(f"hutch: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ConnectionError, OSError) as exc:
        print(f"hutch: cannot reach a service: {exc!r}. Is RabbitMQ running? Start it with "
              "`rabbitmq-server -detached` or `docker compose up -d rabbitmq` (the compose "
              "broker's user is hutch: HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/).",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

