"""``hutch dlq list|replay|purge``: inspect, replay or purge the parking lot."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    Subparsers,
    add_config,
    non_negative,
    settings_of,
)
from pipeline.protocol import ParkReason

__all__ = ["register", "run_list", "run_purge", "run_replay"]


def register(sub: Subparsers) -> None:
    """Add ``dlq`` and its subcommands."""
    dlq = sub.add_parser("dlq", help="inspect, replay or purge the parking lot")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="show parked messages (nothing is consumed)")
    add_config(dlq_list)
    dlq_list.add_argument("--limit", type=non_negative, default=None,
                          help="show at most N, oldest first")
    dlq_list.add_argument("--json", action="store_true", help="print JSON, every field")
    dlq_list.set_defaults(func=run_list)
    dlq_replay = dlq_sub.add_parser(
        "replay", help="send parked requests back to their model, with fresh attempts")
    add_config(dlq_replay)
    dlq_replay.add_argument("--reason", default=None, metavar="REASON",
                            choices=[str(reason) for reason in ParkReason],
                            help="only those parked for this x-hutch-reason (one of "
                                 f"{', '.join(ParkReason)})")
    dlq_replay.add_argument("--limit", type=non_negative, default=None,
                            help="replay at most N, oldest first")
    dlq_replay.add_argument("--force", action="store_true",
                            help="replay also those whose reply queue no longer exists "
                                 "(by default they stay parked: the backend would answer "
                                 "nobody, and they would be parked again)")
    dlq_replay.set_defaults(func=run_replay)
    dlq_purge = dlq_sub.add_parser("purge", help="delete every parked message")
    add_config(dlq_purge)
    dlq_purge.add_argument("--yes", "-y", action="store_true",
                           help="do not ask for confirmation")
    dlq_purge.set_defaults(func=run_purge)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                      ).rstrip() for row in (header, *rows)]


def _cell(value: object, width: int = 0) -> str:
    text = "-" if value is None or value == "" else " ".join(str(value).split())
    return text if not width or len(text) <= width else text[:width - 1] + "…"


def run_list(args: argparse.Namespace) -> int:
    """Print the parked messages as a table (or JSON); nothing is consumed."""
    import asyncio
    import dataclasses
    import json

    from pipeline.broker.names import Names
    from pipeline.ops.dlq import list_parked, parked_count

    settings = settings_of(args)
    queue = Names(settings.prefix).parked_queue
    parked = asyncio.run(list_parked(settings, limit=args.limit))
    total = asyncio.run(parked_count(settings))
    if args.json:
        print(json.dumps({"queue": queue, "total": total,
                          "messages": [dataclasses.asdict(m) for m in parked]}, indent=2))
        return 0
    rows = [[_cell(m.parked_at), _cell(m.first_failed_at),
             _cell(m.reason), _cell(m.error_code), _cell(m.pool), _cell(m.backend),
             _cell(m.attempts), _cell(m.replayed or None), _cell(m.routing_key, 30),
             _cell(m.correlation_id, 36), _cell(m.error_message, 60)] for m in parked]
    if rows:
        for line in _table(rows, ["PARKED AT", "FIRST FAILED", "REASON", "CODE", "POOL",
                                  "BACKEND", "ATTEMPTS", "REPLAYS", "MODEL",
                                  "CORRELATION ID", "MESSAGE"]):
            print(line)
    shown = f"{len(parked)} of {total}" if len(parked) < total else f"{total}"
    print(f"{shown} parked message{'s' if total != 1 else ''} in {queue}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """Send parked requests back with fresh attempts; print the counts."""
    import asyncio

    from pipeline.ops.dlq import replay

    result = asyncio.run(replay(settings_of(args), reason=args.reason, limit=args.limit,
                                force=args.force))
    gone = (f", {result.no_reply_queue} whose reply queue is gone: left parked, "
            "--force replays them" if result.no_reply_queue else "")
    print(f"replayed {result.replayed} (skipped {result.skipped} with other reasons, "
          f"{result.unroutable} unroutable{gone})")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    """Empty the parking lot, after a confirmation unless ``--yes``."""
    import asyncio

    from pipeline.broker.names import Names
    from pipeline.ops.dlq import parked_count, purge

    settings = settings_of(args)
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
