"""``hutch demo``: show priorities overtaking a saturated backlog, needing only a broker."""

from __future__ import annotations

import argparse

from pipeline.cli.common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``demo``."""
    demo = sub.add_parser(
        "demo", help="show priorities overtaking a saturated backlog",
        description="Start a mock backend and a worker in this process, send a burst of "
                    "low-priority requests, then a few high-priority ones, and show that "
                    "the high ones are answered first. Needs only a broker: "
                    "HUTCH_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/) and, when "
                    "its management API is not on the same host at :15672, "
                    "HUTCH_MANAGEMENT_URL. Its queues live under a prefix of their own "
                    "(hutch-demo-<pid>) and are removed at the end.")
    demo.add_argument("--low", type=int, default=60,
                      help="low-priority requests, sent first as a burst (default 60)")
    demo.add_argument("--high", type=int, default=10,
                      help="high-priority requests, sent after the burst (default 10)")
    demo.add_argument("--capacity", type=int, default=4,
                      help="the mock backend's slots (default 4)")
    demo.add_argument("--latency-ms", type=float, default=100.0,
                      help="the mock's service time per request, in ms (default 100)")
    demo.add_argument("--keep-topology", dest="keep_topology", action="store_true",
                      help="leave the demo's queues on the broker to look at in the UI "
                           "(it prints how to remove them)")
    demo.add_argument("--remove-topology", dest="remove_topology", metavar="PREFIX",
                      help="instead of running the demo, remove what an earlier "
                           "--keep-topology run kept under PREFIX (hutch-demo-<pid>)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo (its exit code says whether high priority overtook), or remove what
    a kept one left."""
    import asyncio

    from pipeline.ops.demo import remove_demo_topology, run_demo

    if args.remove_topology:
        print(asyncio.run(remove_demo_topology(args.remove_topology)))
        return 0
    return asyncio.run(run_demo(low=args.low, high=args.high, capacity=args.capacity,
                                latency_ms=args.latency_ms, keep=args.keep_topology))
