"""``hutch submit``: send one chat request and print the reply."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import (
    EXIT_FAILED,
    Subparsers,
    add_config,
    int_range,
    positive_float,
    settings_of,
)

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``submit``."""
    submit = sub.add_parser(
        "submit", help="send one chat request and print the reply",
        description="Send PROMPT as one user message to MODEL through Hutch and print the "
                    "answer (latency, queue wait and backend on stderr). Settings come from "
                    "--config, else HUTCH_* variables and defaults.")
    add_config(submit, required=False)
    submit.add_argument("--model", "-m", required=True,
                        help="model name: the routing key, and `model` in the body; a model "
                             "no pool serves is answered unknown_model")
    submit.add_argument("--priority", "-p", type=int_range(0, 255), default=0,
                        help="AMQP priority, 0 (lowest, the default) to the configuration's "
                             "max_priority (default 9); higher values count as max_priority, "
                             "at most 255")
    submit.add_argument("--timeout", type=positive_float, default=60.0,
                        help="deadline in seconds (default 60): the request's expiration "
                             "and x-hutch-deadline")
    submit.add_argument("--max-tokens", type=int, default=None,
                        help="max_tokens for the backend (default: not sent, the backend "
                             "decides)")
    submit.add_argument("--json", action="store_true", help="print the whole completion")
    submit.add_argument("prompt", metavar="PROMPT",
                        help="the user message (quote it: one argument)")
    submit.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Send the prompt; print the answer (or the error reply's code and message)."""
    import asyncio

    from pipeline.client.client import HutchClient
    from pipeline.errors import RequestFailed
    from pipeline.observe.log import configure_logging
    settings = settings_of(args)
    configure_logging("WARNING")  # reconnect warnings as JSON lines, not bare names

    async def main() -> int:
        # A one-shot command: its reply queue is exclusive and goes away when it exits.
        async with HutchClient.from_settings(settings, temporary_reply_queue=True) as client:
            body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
            if args.max_tokens:
                body["max_tokens"] = args.max_tokens
            failure: RequestFailed | None = None
            try:
                reply = await client.request(body, model=args.model, priority=args.priority,
                                             timeout=args.timeout)
            except RequestFailed as exc:
                failure = exc
        if failure is not None:  # printed last, after whatever closing the client logged
            print(f"error {failure.code}: {failure.message}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            print(reply.completion.model_dump_json(indent=2))
        else:
            for choice in reply.completion.choices:
                print(choice.message.content)
            print(f"-- {reply.latency_s * 1000:.0f} ms, queue wait {reply.queue_wait_ms} ms, "
                  f"backend {reply.backend}", file=sys.stderr)
        return 0

    return asyncio.run(main())
