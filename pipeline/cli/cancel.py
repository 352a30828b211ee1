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
    "aborted at once. Each worker answers whether it had the request at a backend, so the "
    "command says, per id, whether it was aborted, refused, or at no backend (queued, or "
    "unknown). A request's correlation id is the message's correlation_id, sent to the "
    "backend as the x-request-id header; a worker logs it when a call starts "
    "(request.started, at --log-level DEBUG).")


def register(sub: Subparsers) -> None:
    """Add ``cancel``."""
    cancel = sub.add_parser("cancel", help="cancel requests by correlation id (operator)",
                            description=_HELP)
    add_config(cancel)
    cancel.add_argument("correlation_ids", nargs="+", metavar="CORRELATION_ID",
                        help="the correlation_id of a request to cancel")
    cancel.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Publish the cancels (mandatory, with confirms); one line per id saying what became
    of it. Exit 1 when no worker listens for cancels."""
    import asyncio

    from pipeline.cli.common import EXIT_FAILED, settings_of
    from pipeline.ops.cancel import operator_cancel

    settings = settings_of(args)
    results = asyncio.run(operator_cancel(settings, args.correlation_ids))
    for result in results:
        print(result.text(settings.amqp_user, settings.cancel_ttl_s))
    sent = sum(result.delivered for result in results)
    print(f"sent {sent} cancel{'s' if sent != 1 else ''} as user {settings.amqp_user!r}")
    return 0 if all(result.delivered for result in results) else EXIT_FAILED
