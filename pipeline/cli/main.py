"""``hutch``: the one command-line entry point.

The parser is made of command groups: modules with one ``register(subparsers)`` function
that describes their commands; each command imports what it runs only when it runs, so
``hutch --help`` loads no worker, mock or benchmark code. Pipeline's own groups are listed
in :data:`GROUPS`; other packages add theirs through the ``hutch.commands`` entry point
group (the topology package's ``topology``, ``client`` and ``worker-user``: pipeline never
imports it).

Every expected failure (bad config, unreachable broker, topology conflict, an error reply)
ends in one readable line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import socket
import sys
from collections.abc import Callable, Iterator, Sequence

from pipeline.cli.common import EXIT_FAILED, EXIT_USAGE, Subparsers, add_subcommands

__all__ = ["ENTRY_POINTS", "GROUPS", "build_parser", "main"]

#: Pipeline's command groups, in the order ``hutch --help`` lists them.
GROUPS = (
    "pipeline.cli.worker",
    "pipeline.cli.submit",
    "pipeline.cli.mock",
    "pipeline.cli.status",
    "pipeline.cli.pool",
    "pipeline.cli.demo",
    "pipeline.cli.dlq",
    "pipeline.cli.cancel",
    "pipeline.cli.gateway",
)
#: The entry point group through which other packages add command groups.
ENTRY_POINTS = "hutch.commands"

Register = Callable[[Subparsers], None]


def _registrations() -> Iterator[Register]:
    """Pipeline's groups, then every installed ``hutch.commands`` entry point's."""
    from importlib.metadata import entry_points

    for name in GROUPS:
        register: Register = importlib.import_module(name).register
        yield register
    for entry in sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name):
        try:
            yield entry.load()
        except Exception as exc:  # a broken plugin must not take the other commands down
            print(f"hutch: commands {entry.name!r} ({entry.value}) not loaded: {exc!r}",
                  file=sys.stderr)


def _version() -> str:
    """The installed distribution's version (its metadata: one source, pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hutch")
    except PackageNotFoundError:  # a source tree on sys.path, never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The whole ``hutch`` parser: every command group registered."""
    parser = argparse.ArgumentParser(
        prog="hutch", description="Hutch: a RabbitMQ request queue for LLM backends.")
    parser.add_argument("--version", action="version", version=f"hutch {_version()}",
                        help="print the installed version and exit")
    sub = add_subcommands(parser, dest="command", required=True, metavar="COMMAND")
    for register in _registrations():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; expected failures print one line and set the exit code."""
    from pipeline.errors import ConfigError, HutchError, TopologyError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"hutch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TopologyError as exc:
        broker = getattr(args, "broker_urls", None)
        where = f" (broker: {broker})" if broker and broker not in str(exc) else ""
        print(f"hutch: topology: {exc}{where}", file=sys.stderr)
        return EXIT_FAILED
    except HutchError as exc:
        print(f"hutch: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        if not isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
            # A file, a port in use, a permission: not the broker's fault.
            print(f"hutch: {exc}", file=sys.stderr)
            return EXIT_FAILED
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
