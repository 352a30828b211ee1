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
    """List the pools with their state, or pause or resume one."""
    import asyncio

    from pipeline.errors import ConfigError
    from pipeline.worker.pause import pause_pool, paused_pools, resume_pool

    settings = settings_of(args)
    if args.pool_command == "list":
        paused = set(asyncio.run(paused_pools(settings)))
        for pool in settings.pools:
            state = "paused" if pool.name in paused else "running"
            print(f"{pool.name:<24} {state:<8} models: {', '.join(pool.models)}")
        return 0
    try:
        settings.pool(args.pool)
    except KeyError:
        known = ", ".join(p.name for p in settings.pools) or "none"
        raise ConfigError(f"no pool named {args.pool!r} in {args.config} (pools: {known})"
                          ) from None
    if args.pool_command == "pause":
        asyncio.run(pause_pool(settings, args.pool))
        print(f"pool {args.pool!r} paused: workers stop taking its requests within "
              f"~{settings.lease_retry_s * 2:g} s; requests wait in its queue")
    else:
        asyncio.run(resume_pool(settings, args.pool))
        print(f"pool {args.pool!r} resumed")
    return 0
