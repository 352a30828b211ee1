"""``hutch status``: queue depths, consumers, backends' in-flight and capacity, parked."""

from __future__ import annotations

import argparse

from pipeline.cli.common import EXIT_FAILED, Subparsers, add_config, settings_of

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``status``."""
    status = sub.add_parser(
        "status", help="queue depths, consumers, backends' in-flight and capacity, parked",
        description="One report of the broker's view: each pool's queue depth and "
                    "consumers, each backend's lease holder (the connection that owns its "
                    "lease queue), the retry tiers, the parking lot by reason. With "
                    "--metrics, each worker's in-flight requests, capacity and circuit "
                    "state too. Exit 1 when queues of the topology are missing.")
    add_config(status)
    status.add_argument("--metrics", action="append", default=[], metavar="URL",
                        help="a worker's metrics endpoint (host:port, http://host:port or a "
                             "full URL); repeat for every replica")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the broker and the workers' metrics; print one report. Exit 1 when the
    topology is missing, in part (the report says which queues) or in whole (one line)."""
    import asyncio
    import json
    import sys

    from pipeline.errors import TopologyError
    from pipeline.ops.status import format_status, status

    settings = settings_of(args)
    report = asyncio.run(status(settings, args.metrics))
    if len(report.missing) == len(report.queues):
        raise TopologyError(
            f"no Hutch topology with prefix {settings.prefix!r} in vhost {settings.vhost!r}: "
            f"run `hutch topology apply --config {args.config}` first")
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_status(report))
    if report.missing:
        print(f"hutch: topology: {len(report.missing)} queue(s) missing in vhost "
              f"{settings.vhost!r} ({', '.join(report.missing)}): run "
              f"`hutch topology apply --config {args.config}`", file=sys.stderr)
        return EXIT_FAILED
    return 0
