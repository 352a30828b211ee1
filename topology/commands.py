"""The ``hutch`` commands of the topology package: ``topology apply|export|diff``,
``client add|remove|list`` and ``worker-user add|remove|list``.

They reach the CLI through the ``hutch.commands`` entry point (pyproject.toml), so
:mod:`pipeline` never imports :mod:`topology`: imports go one way, topology -> pipeline.
:func:`register` only describes the commands; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipeline.cli.common import Subparsers, add_config, settings_of

if TYPE_CHECKING:
    from pipeline.settings import Settings
    from topology.clients import Role

__all__ = [
    "EXIT_DIFFERENT",
    "EXIT_SAME",
    "EXIT_TROUBLE",
    "register",
    "run_apply",
    "run_diff",
    "run_export",
    "run_user",
]

#: ``topology diff``'s exit codes, as diff(1): 0 the same, 1 different, 2 trouble (broker
#: unreachable, ...).
EXIT_SAME, EXIT_DIFFERENT, EXIT_TROUBLE = 0, 1, 2


def register(sub: Subparsers) -> None:
    """Add ``topology``, ``client`` and ``worker-user`` to the ``hutch`` subcommands."""
    topology = sub.add_parser("topology", help="manage the broker topology")
    topo_sub = topology.add_subparsers(dest="topology_command", required=True)
    apply = topo_sub.add_parser("apply", help="declare exchanges, queues, bindings, policies")
    add_config(apply)
    apply.set_defaults(func=run_apply)
    export = topo_sub.add_parser(
        "export", help="write the topology as a RabbitMQ definitions file (no broker needed)")
    add_config(export)
    export.add_argument("--output", "-o", default="-", metavar="FILE",
                        help="where to write the JSON (default: stdout)")
    export.set_defaults(func=run_export)
    diff = topo_sub.add_parser(
        "diff", help="compare the config with the live broker (exit 1 when they differ)")
    add_config(diff)
    diff.add_argument("--json", action="store_true", help="print the differences as JSON")
    diff.set_defaults(func=run_diff)
    for command, role, text in (
            ("client", "client", "manage per-application users (least permissions)"),
            ("worker-user", "worker", "manage the workers' user (least permissions)")):
        _register_users(sub, command, role, text)


def _register_users(sub: Subparsers, command: str, role: str, text: str) -> None:
    user_parser = sub.add_parser(command, help=text)
    user_sub = user_parser.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help=f"create a {role} user; prints its password once")
    add_config(add)
    add.add_argument("name", help="user name: letters, digits, '_' or '-' (no dots)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from stdin instead of generating one")
    add.set_defaults(func=run_user)
    remove = user_sub.add_parser("remove", help=f"delete a {role} user")
    add_config(remove)
    remove.add_argument("name")
    remove.set_defaults(func=run_user)
    listing = user_sub.add_parser("list", help=f"the {role} users and their permissions")
    add_config(listing)
    listing.set_defaults(func=run_user)


# -- topology apply|export|diff ------------------------------------------------------------


def run_apply(args: argparse.Namespace) -> int:
    """Declare the topology; print what was declared."""
    import asyncio

    from pipeline.broker.topology import apply_topology

    settings = settings_of(args)
    report = asyncio.run(apply_topology(settings))
    for line in report.lines():
        print(line)
    print(f"topology applied to vhost {settings.vhost!r} at {settings.redacted_amqp_url()}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write the definitions file (``-``: stdout); notes on what was left out go to stderr."""
    from topology.definitions import export_definitions, write_definitions

    settings = settings_of(args)
    exported = export_definitions(settings)
    for note in exported.notes:
        print(f"hutch: topology export: {note}", file=sys.stderr)
    write_definitions(exported.definitions, args.output)
    if args.output != "-":
        d = exported.definitions
        print(f"wrote {args.output}: vhost {settings.vhost!r}, {len(d['exchanges'])} "
              f"exchanges, {len(d['queues'])} queues, {len(d['bindings'])} bindings, "
              f"{len(d['policies'])} policies, {len(d['users'])} users")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    """Print the differences (text or JSON); the exit code says whether there are any."""
    import asyncio
    import json
    from dataclasses import asdict

    from pipeline.errors import TopologyError
    from topology.diff import diff_topology, format_diff

    settings = settings_of(args)
    try:
        lines = asyncio.run(diff_topology(settings))
    except TopologyError as exc:
        print(f"hutch: topology: {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    if args.json:
        print(json.dumps([asdict(line) for line in lines], indent=2))
    else:
        print(format_diff(lines, vhost=settings.vhost))
    return EXIT_DIFFERENT if lines else EXIT_SAME


# -- client|worker-user add|remove|list ----------------------------------------------------


def run_user(args: argparse.Namespace) -> int:
    """``add``, ``remove`` or ``list`` the users of one role."""
    settings = settings_of(args)
    role: Role = "client" if args.command == "client" else "worker"
    if args.user_command == "add":
        return _add_user(settings, role, args.name, args.password_stdin)
    if args.user_command == "remove":
        return _remove_user(settings, role, args.name)
    return _list_users(settings, role)


def _add_user(settings: Settings, role: Role, name: str, password_stdin: bool) -> int:
    """Create the user; print its permissions, amqp_url and (once) its password."""
    import asyncio

    from topology.clients import add_client, add_worker_user

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    add = add_client if role == "client" else add_worker_user
    created = asyncio.run(add(settings, name, password))
    p = created.permissions
    print(f"{role} user {created.name!r} created, vhost {settings.vhost!r}")
    print(f"  permissions: configure {p.configure}  write {p.write}  read {p.read}")
    if role == "client":
        print(f"  reply queues: {settings.prefix}.reply.{created.name} or "
              f"{settings.prefix}.reply.{created.name}.<suffix> "
              f"(HutchClient(client_id='{created.name}') or '{created.name}.<suffix>')")
    else:
        print("  run every worker replica as this user; set require_user_id = true")
    if password is None:
        print(f"  password: {created.password}")
    print(f"  amqp_url: {created.amqp_url}")
    print("  (the password is shown only now: store it in your secret store)")
    return 0


def _remove_user(settings: Settings, role: Role, name: str) -> int:
    import asyncio

    from topology.clients import remove_client, remove_worker_user

    remove = remove_client if role == "client" else remove_worker_user
    asyncio.run(remove(settings, name))
    print(f"{role} user {name!r} deleted (its connections were closed)")
    return 0


def _list_users(settings: Settings, role: Role) -> int:
    import asyncio

    from topology.clients import list_users

    users = asyncio.run(list_users(settings, role))
    for user in users:
        perms = user.permissions
        where = (f"configure {perms.configure}  write {perms.write}  read {perms.read}"
                 if perms else f"(no permissions in vhost {settings.vhost!r})")
        print(f"{user.name:<24} {where}")
    if not users:
        print(f"no Hutch {role} users")
    return 0
