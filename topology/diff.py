"""Compare the configured topology with a live broker: ``hutch topology diff``.

The configured side is :func:`pipeline.broker.topology.plan` (what ``apply`` declares and ``export``
writes); the live side is read through the management API. Each difference says whether
``hutch topology apply`` fixes it, whether the object must be deleted and re-created (a
queue's arguments never change in place: its messages would be lost), or whether it is
left to the operator (apply never deletes queues, exchanges or policies).

Hutch's objects on the broker are those the configuration declares and any other exchange,
queue or policy whose name starts with ``<prefix>.``, except the queues Hutch's processes
create at run time (``<prefix>.reply.*``, ``<prefix>.lease.*``, ``<prefix>.paused.*``,
the workers' cancel queues ``<prefix>.cancel.*``) and their bindings: a worker binds its
cancel queue to the cancel exchange when it starts, and unbinding it breaks its cancels.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.quorum import MIGRATION_HELP, queue_type
from pipeline.broker.topology import PolicySpec, Topology, plan
from pipeline.errors import TopologyError
from pipeline.settings import Settings
from topology.definitions import parse_definitions

__all__ = [
    "DiffLine",
    "compare_topology",
    "diff_topology",
    "format_diff",
]

Kind = Literal["missing", "extra", "changed", "shadowed"]
Fix = Literal["apply", "recreate", "migrate", "manual"]

_SIGN = {"missing": "+", "extra": "-", "changed": "~", "shadowed": "!"}
_ABSENT = "(none)"


@dataclass(frozen=True)
class DiffLine:
    """One difference between the configuration and the broker.

    ``kind``: ``missing`` (configured, not on the broker), ``extra`` (on the broker, not
    configured), ``changed`` (both, different), ``shadowed`` (a policy that can replace
    Hutch's on a queue). ``fix``: ``apply`` (``hutch topology apply`` fixes it),
    ``recreate`` (delete the object and apply again), ``migrate`` (a queue's type changes:
    classic <-> quorum, the documented migration), ``manual`` (apply leaves it).
    ``changes`` read ``what: broker value -> config value``.
    """

    kind: Kind
    object: Literal["exchange", "queue", "binding", "policy"]
    name: str
    fix: Fix
    note: str
    changes: tuple[str, ...] = ()
    messages: int | None = None

    def text(self) -> str:
        head = f"{_SIGN[self.kind]} {self.object} {self.name}"
        if self.changes:
            head += ": " + "; ".join(self.changes)
        return f"{head} ({self.note})"


def _show(value: Any) -> str:
    return _ABSENT if value is None else json.dumps(value, sort_keys=True)


def _changes(live: Mapping[str, Any], want: Mapping[str, Any], prefix: str = ""
             ) -> list[str]:
    """``key: live -> want`` for every key whose value differs (missing = ``(none)``)."""
    out = []
    for key in sorted(set(live) | set(want)):
        if live.get(key) != want.get(key):
            out.append(f"{prefix}{key}: {_show(live.get(key))} -> {_show(want.get(key))}")
    return out


def _queue_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    # A queue declared without x-queue-type is classic; the broker lists it either way.
    return {"x-queue-type": "classic", **arguments}


def _messages(count: int | None) -> str:
    return "" if count is None else f"; {count} message{'' if count == 1 else 's'} queued"


def compare_topology(want: Topology, live: Topology, prefix: str,
                     messages: Mapping[str, int] | None = None) -> list[DiffLine]:
    """Every difference between ``want`` (the plan) and ``live`` (the broker's vhost)."""
    compare = _Comparison(want, live, prefix, messages or {})
    exchanges, managed_ex = compare.exchanges()
    queues, managed_q = compare.queues()
    return [*exchanges, *queues, *compare.bindings(managed_ex, managed_q),
            *compare.policies()]


@dataclass(frozen=True)
class _Comparison:
    """One comparison, kind by kind; ``ours``: the broker objects Hutch manages."""

    want: Topology
    live: Topology
    prefix: str
    messages: Mapping[str, int]

    def ours(self, name: str) -> bool:
        return name.startswith(f"{self.prefix}.")

    def runtime(self, queue: str) -> bool:
        """A queue Hutch's processes declare at run time: replies, leases, pause flags,
        the workers' cancel queues. Neither it nor its bindings are drift."""
        names = Names(self.prefix)
        return queue.startswith((names.reply_queue(""), names.lease_queue(""),
                                 names.pause_queue(""), names.cancel_queue("")))

    def exchanges(self) -> tuple[list[DiffLine], set[str]]:
        """The exchanges' differences, and the exchange names Hutch manages."""
        out: list[DiffLine] = []
        live_ex = {e.name: e for e in self.live.exchanges}
        for e in self.want.exchanges:
            got = live_ex.get(e.name)
            if got is None:
                out.append(DiffLine("missing", "exchange", e.name, "apply", "apply declares it"))
                continue
            changes = _changes({"type": got.type, "durable": got.durable,
                                "auto_delete": got.auto_delete, "internal": got.internal},
                               {"type": e.type, "durable": e.durable,
                                "auto_delete": e.auto_delete, "internal": e.internal})
            changes += _changes(got.arguments, e.arguments)
            if changes:
                out.append(DiffLine(
                    "changed", "exchange", e.name, "recreate",
                    "needs delete + re-create: the broker cannot change an exchange in "
                    "place; apply then re-creates its bindings (publishes in between fail)",
                    tuple(changes)))
        wanted = {e.name for e in self.want.exchanges}
        for name in sorted(set(live_ex) - wanted):
            if self.ours(name):
                out.append(DiffLine("extra", "exchange", name, "manual",
                                    "not in the config; apply leaves it: delete it by hand"))
        return out, wanted | {n for n in live_ex if self.ours(n)}

    def queues(self) -> tuple[list[DiffLine], set[str]]:
        """The queues' differences, and the queue names Hutch manages (not the queues its
        processes make at run time: replies, leases, pause flags, cancel queues)."""
        out: list[DiffLine] = []
        live_q = {q.name: q for q in self.live.queues}
        for q in self.want.queues:
            got = live_q.get(q.name)
            if got is None:
                out.append(DiffLine("missing", "queue", q.name, "apply", "apply declares it"))
                continue
            changes = _changes({"durable": got.durable, "auto_delete": got.auto_delete},
                               {"durable": q.durable, "auto_delete": q.auto_delete})
            changes += _changes(_queue_arguments(got.arguments), _queue_arguments(q.arguments))
            count = self.messages.get(q.name)
            if queue_type(got.arguments) != queue_type(q.arguments):
                out.append(DiffLine("changed", "queue", q.name, "migrate",
                                    f"apply refuses it: {MIGRATION_HELP}" + _messages(count),
                                    tuple(changes), count))
            elif changes:
                out.append(DiffLine(
                    "changed", "queue", q.name, "recreate",
                    "needs delete + re-create: messages would be lost" + _messages(count)
                    + "; or keep the broker's value in the config",
                    tuple(changes), count))
        wanted = {q.name for q in self.want.queues}
        managed = wanted | {n for n in live_q if self.ours(n) and not self.runtime(n)}
        for name in sorted(managed - wanted):
            count = self.messages.get(name)
            out.append(DiffLine(
                "extra", "queue", name, "manual",
                "not in the config; apply leaves it: delete it by hand once drained"
                + _messages(count), messages=count))
        return out, managed

    def bindings(self, managed_ex: set[str], managed_q: set[str]) -> list[DiffLine]:
        """The bindings' differences (the default exchange's implicit ones are nobody's,
        a runtime queue's are its process's)."""
        out: list[DiffLine] = []
        wanted = {b.key(): b for b in self.want.bindings}
        live_b = {b.key(): b for b in self.live.bindings
                  if b.source and not (b.destination_type == "queue"
                                       and self.runtime(b.destination))
                  and (b.source in managed_ex or (
                      b.destination_type == "queue" and b.destination in managed_q))}
        owned = set(self.want.owned_routes)
        for key, b in wanted.items():
            if key not in live_b:
                out.append(DiffLine("missing", "binding", b.label(), "apply", "apply binds it"))
        for key in sorted(set(live_b) - set(wanted)):
            b = live_b[key]
            if (b.source, b.destination) in owned:
                out.append(DiffLine("extra", "binding", b.label(), "apply",
                                    "not in the config: apply removes it"))
            else:
                out.append(DiffLine("extra", "binding", b.label(), "manual",
                                    "not in the config; apply leaves it: unbind it by hand, "
                                    "it still routes messages here"))
        return out

    def policies(self) -> list[DiffLine]:
        """The policies' differences, then the other policies that can shadow Hutch's."""
        out: list[DiffLine] = []
        live_p = {p.name: p for p in self.live.policies}
        for p in self.want.policies:
            got = live_p.get(p.name)
            if got is None:
                out.append(DiffLine("missing", "policy", p.name, "apply", "apply sets it"))
                continue
            changes = _changes({"pattern": got.pattern, "apply-to": got.apply_to,
                                "priority": got.priority},
                               {"pattern": p.pattern, "apply-to": p.apply_to,
                                "priority": p.priority})
            changes += _changes(got.definition, p.definition)
            if changes:
                out.append(DiffLine("changed", "policy", p.name, "apply",
                                    "apply sets the config's values", tuple(changes)))
        wanted = {p.name for p in self.want.policies}
        for name in sorted(n for n in live_p if self.ours(n) and n not in wanted):
            out.append(DiffLine("extra", "policy", name, "manual",
                                "not in the config; apply leaves it: delete it by hand"))
        return out + _shadowing(self.want, (p for p in self.live.policies
                                            if p.name not in wanted))


def _matches(policy: PolicySpec, queue: str) -> bool:
    if policy.apply_to not in ("queues", "all"):
        return False
    try:
        return re.search(policy.pattern, queue) is not None  # RabbitMQ: unanchored match
    except re.error:
        return False


def _shadowing(want: Topology, others: Iterable[PolicySpec]) -> list[DiffLine]:
    """Other policies that match a queue Hutch gives a policy, at the same or a higher
    priority: RabbitMQ applies one policy per queue, and it could be theirs."""
    out = []
    for other in sorted(others, key=lambda p: p.name):
        for ours in want.policies:
            hit = [q.name for q in want.queues
                   if _matches(ours, q.name) and _matches(other, q.name)]
            if hit and other.priority >= ours.priority:
                out.append(DiffLine(
                    "shadowed", "policy", other.name, "manual",
                    f"matches {', '.join(hit)} with priority {other.priority} >= "
                    f"{ours.priority}: RabbitMQ applies one policy per queue, and this one "
                    f"can replace {ours.name} (its dead-lettering and limits); give it a "
                    "lower priority or a narrower pattern"))
    return out


async def diff_topology(settings: Settings) -> list[DiffLine]:
    """Differences between the configuration and the broker (empty: they agree). Reads the
    management API's object listings only, not ``GET /api/definitions`` (administrator
    only): the user apply needs (``policymaker``) is enough. Declares nothing."""
    vhost = settings.vhost
    base, user, _ = settings.management_api()
    async with ManagementAPI.from_settings(settings) as api:
        if vhost not in {v.get("name") for v in await api.list_vhosts()}:
            raise TopologyError(f"vhost {vhost!r} does not exist on the broker at {base}, or "
                                f"{user!r} has no permissions in it")
        exchanges, queues, bindings, policies = await asyncio.gather(
            api.list_exchanges(vhost), api.list_queues(vhost), api.list_bindings(vhost),
            api.list_policies(vhost))
    # Exclusive queues (leases) belong to a connection, not to the topology.
    queues = [q for q in queues if not q.get("exclusive")]
    live = parse_definitions({"exchanges": exchanges, "queues": queues, "bindings": bindings,
                              "policies": policies}, vhost)
    counts = {q["name"]: q["messages"] for q in queues if isinstance(q.get("messages"), int)}
    return compare_topology(plan(settings), live, settings.prefix, counts)


def format_diff(lines: list[DiffLine], *, vhost: str) -> str:
    """What ``hutch topology diff`` prints."""
    if not lines:
        return f"no differences: vhost {vhost!r} matches the config"
    out = [f"config vs broker (vhost {vhost!r}): + only in the config, - only on the "
           "broker, ~ different (broker -> config), ! conflicts with Hutch's policy"]
    out += [line.text() for line in lines]
    by_fix = {fix: sum(1 for line in lines if line.fix == fix)
              for fix in ("apply", "recreate", "migrate", "manual")}
    parts = []
    if by_fix["apply"]:
        parts.append(f"{by_fix['apply']} fixed by `hutch topology apply`")
    if by_fix["recreate"]:
        n = by_fix["recreate"]
        parts.append(f"{n} need{'s' if n == 1 else ''} delete + re-create")
    if by_fix["migrate"]:
        n = by_fix["migrate"]
        parts.append(f"{n} queue type change{'s' if n != 1 else ''} (a migration: drain, "
                     "or shovel)")
    if by_fix["manual"]:
        parts.append(f"{by_fix['manual']} left to you")
    count = len(lines)
    out.append(f"{count} difference{'' if count == 1 else 's'}: {', '.join(parts)}")
    return "\n".join(out)
