"""``hutch pool pause|resume|list``: stop or restart taking a pool's requests."""

from __future__ import annotations

import argparse

from pipeline.cli.common import Subparsers, add_config, settings_of

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``pool`` and its subcommands."""
    pool = sub.add_parser("pool", help="pause, resume or list pools")
    pool_sub = pool.add_subparsers(dest="pool_command", required=True)
    for action, text in (("pause", "stop taking the pool's requests (they wait queued)"),
                         ("resume", "take the pool's requests again")):
        cmd = pool_sub.add_parser(action, help=text)
        add_config(cmd)
        cmd.add_argument("pool", help="pool name")
        cmd.set_defaults(func=run)
    pool_list = pool_sub.add_parser("list", help="each pool, running or paused")
    add_config(pool_list)
    pool_list.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List the pools with their state, or pause or resume one. A pool whose work queue
    the broker does not have is an error (exit 1): the topology is missing."""
    import asyncio
    import sys

    from pipeline.errors import ConfigError
    from pipeline.ops.pools import missing_pools_error, pause, pool_states, resume

    settings = settings_of(args)
    if args.pool_command == "list":
        states = asyncio.run(pool_states(settings))
        for pool in states:
            print(f"{pool.name:<24} {pool.state:<8} models: {', '.join(pool.models)}")
        unknown = [pool.name for pool in states if pool.exists and pool.paused is None]
        if unknown:
            print(f"hutch: the pause state of {', '.join(unknown)} cannot be read now (a "
                  "node down, a quorum queue without a leader, or `hutch topology apply` "
                  "not run since the upgrade): workers keep the state they knew",
                  file=sys.stderr)
        missing = [pool.name for pool in states if not pool.exists]
        if missing:
            raise missing_pools_error(settings, missing)
        return 0
    try:
        settings.pool(args.pool)
    except KeyError:
        known = ", ".join(p.name for p in settings.pools) or "none"
        raise ConfigError(f"no pool named {args.pool!r} in {args.config} (pools: {known})"
                          ) from None
    if args.pool_command == "pause":
        asyncio.run(pause(settings, args.pool))
        print(f"pool {args.pool!r} paused: workers stop taking its requests within "
              f"~{settings.lease_retry_s * 2:g} s; requests wait in its queue")
    else:
        was_paused = any(pool.paused for pool in asyncio.run(pool_states(settings))
                         if pool.name == args.pool)
        asyncio.run(resume(settings, args.pool))
        print(f"pool {args.pool!r} resumed" if was_paused
              else f"pool {args.pool!r} was not paused: nothing to resume")
    return 0
