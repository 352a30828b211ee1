"""``hutch submit``: send one chat request and print the reply."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import EXIT_FAILED, Subparsers, add_config

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``submit``."""
    submit = sub.add_parser("submit", help="send one chat request and print the reply")
    add_config(submit, required=False)
    submit.add_argument("--model", "-m", required=True)
    submit.add_argument("--priority", "-p", type=int, default=0)
    submit.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    submit.add_argument("--max-tokens", type=int, default=None)
    submit.add_argument("--json", action="store_true", help="print the whole completion")
    submit.add_argument("prompt")
    submit.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Send the prompt; print the answer (or the error reply's code and message)."""
    import asyncio

    from pipeline.client.client import HutchClient
    from pipeline.errors import RequestFailed
    from pipeline.settings import load_settings

    settings = load_settings(args.config) if args.config else load_settings()

    async def main() -> int:
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

    return asyncio.run(main())
