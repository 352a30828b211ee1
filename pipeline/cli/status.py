"""``hutch status``: queue depths, consumers, backends' in-flight and capacity, parked."""

from __future__ import annotations

import argparse

from pipeline.cli.common import Subparsers, add_config, settings_of

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``status``."""
    status = sub.add_parser(
        "status", help="queue depths, consumers, backends' in-flight and capacity, parked")
    add_config(status)
    status.add_argument("--metrics", "-m", action="append", default=[], metavar="URL",
                        help="a worker's metrics endpoint (host:port, http://host:port or a "
                             "full URL); repeat for every replica")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the broker and the workers' metrics; print one report."""
    import asyncio
    import json

    from pipeline.ops.status import format_status, status

    report = asyncio.run(status(settings_of(args), args.metrics))
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_status(report))
    return 0
