"""``hutch cancel``: cancel requests by correlation id, as an operator."""

from __future__ import annotations

import argparse

from pipeline.cli.common import Subparsers, add_config

__all__ = ["register", "run"]

_HELP = (
    "Publish a cancel for each CORRELATION_ID to the cancel exchange (<prefix>.cancel), as "
    "the user of the configured amqp_url. Workers honour a cancel only from the request's "
    "own user, the worker's user or a user in trusted_users: to cancel other clients' "
    "requests, run it with the workers' configuration (or a trusted user's). A queued "
    "request is answered `cancelled` when a worker reaches it; one at a backend is "
    "aborted at once.")


def register(sub: Subparsers) -> None:
    """Add ``cancel``."""
    cancel = sub.add_parser("cancel", help="cancel requests by correlation id (operator)",
                            description=_HELP)
    add_config(cancel)
    cancel.add_argument("correlation_ids", nargs="+", metavar="CORRELATION_ID",
                        help="the correlation_id of a request to cancel")
    cancel.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Publish the cancels (with confirms); print how many were sent."""
    import asyncio

    from pipeline.broker.connection import tls_context
    from pipeline.broker.names import Names
    from pipeline.cli.common import settings_of
    from pipeline.client.cancel import publish_cancels

    settings = settings_of(args)
    sent = asyncio.run(publish_cancels(settings.amqp_url, Names(settings.prefix).cancel_exchange,
                                       settings.amqp_user, args.correlation_ids,
                                       tls=tls_context(settings)))
    print(f"sent {sent} cancel{'s' if sent != 1 else ''} as user {settings.amqp_user!r}")
    return 0
