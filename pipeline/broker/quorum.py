"""Quorum pools: what a replicated pool's queues look like, what priority it gets, and
the queue-type changes ``hutch topology apply`` refuses to make.

A pool with ``queue_type = "quorum"`` has a quorum work queue; the queues every pool
shares (retry tiers, triage, parking lot, presence) are quorum as soon as one pool is,
since losing any of them loses requests (or, for presence, stops every worker from
starting while its node is down). Quorum queues differ from classic ones in ways the
topology must follow (RabbitMQ's documentation and source, see README "Running on a
cluster"):

- ``x-max-priority`` is refused (406): priority is the broker version's own (none on
  3.10-3.13, two levels on 4.0-4.2, strict 0-31 from 4.3).
- ``overflow: reject-publish-dlx`` is not supported: a full quorum queue refuses the
  publish (the publisher's nack is the ``queue_full`` answer) and dead-letters nothing.
- Dead-lettering is at-most-once unless ``dead-letter-strategy: at-least-once``, which
  needs ``overflow: reject-publish``.
- Every return (a nack with requeue, a consumer lost with the message) counts toward the
  delivery limit (on 4.x 20 by default): a request the worker hands back on a 429, a pause
  or an open circuit must not exhaust it, so each quorum pool's policy sets it high.

A queue's type never changes in place: switching a pool between classic and quorum is a
migration (drain, or shovel), which apply reports and refuses, never does silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TopologyError

__all__ = [
    "MIGRATION_HELP",
    "QUORUM_QUEUE",
    "TypeChange",
    "priority_semantics",
    "queue_type",
    "quorum_policy_definition",
    "refuse_type_changes",
    "type_changes",
]

#: Arguments of a quorum queue that may dead-letter: at-least-once needs reject-publish.
QUORUM_QUEUE: dict[str, Any] = {"x-queue-type": "quorum",
                                "x-dead-letter-strategy": "at-least-once",
                                "x-overflow": "reject-publish"}

#: Where the migration procedure is documented, for messages.
MIGRATION_HELP = ("a queue's type never changes in place: migrate it (docs, page Cluster: "
                  "\"Changing a pool's queue type\": drain, or shovel)")


def quorum_policy_definition(dead_letter_exchange: str, max_length: int,
                             delivery_limit: int, message_ttl_ms: int | None
                             ) -> dict[str, Any]:
    """The work-queue policy of a quorum pool (the classic one's keys, made to fit)."""
    definition: dict[str, Any] = {
        "dead-letter-exchange": dead_letter_exchange,
        "dead-letter-strategy": "at-least-once",
        "delivery-limit": delivery_limit,
        "max-length": max_length,
        "overflow": "reject-publish",
    }
    if message_ttl_ms is not None:
        definition["message-ttl"] = message_ttl_ms
    return definition


def _version(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match[1]), int(match[2])) if match else None


def priority_semantics(version: str | None) -> str:
    """What message priority means on a quorum queue of RabbitMQ ``version``."""
    parsed = _version(version)
    if parsed is None:
        return ("unknown (the broker did not say its version): none before 4.0, two levels "
                "on 4.0-4.2, strict 0-31 from 4.3")
    if parsed < (4, 0):
        return ("none: requests are served in arrival order whatever their priority "
                "(quorum queues have priorities from RabbitMQ 4.0)")
    if parsed < (4, 3):
        return ("two levels: priority 5 and above is high, served about 2:1 against the "
                "rest, not strictly (strict priorities from RabbitMQ 4.3)")
    return ("strict, 32 levels (0-31; a message without a priority counts as 4): "
            "like a classic pool's")


@dataclass(frozen=True)
class TypeChange:
    """A queue whose type on the broker differs from the configuration's."""

    queue: str
    live: str
    want: str
    messages: int | None = None

    def text(self) -> str:
        count = "" if self.messages is None else f", {self.messages} messages queued"
        return f"queue {self.queue}: {self.live} on the broker, {self.want} in the config{count}"


def queue_type(arguments: Mapping[str, Any], listed: object = None) -> str:
    """A queue's type from its arguments (or the API's ``type`` column); classic by
    default."""
    value = arguments.get("x-queue-type") or listed or "classic"
    return str(value)


def type_changes(want: Iterable[tuple[str, Mapping[str, Any]]],
                 live: Iterable[Mapping[str, Any]]) -> list[TypeChange]:
    """The planned queues (name, arguments) whose live type (management API listings)
    differs."""
    listed = {q["name"]: q for q in live if not q.get("exclusive")}
    out = []
    for name, arguments in want:
        got = listed.get(name)
        if got is None:
            continue
        have = queue_type(got.get("arguments") or {}, got.get("type"))
        wanted = queue_type(arguments)
        if have != wanted:
            count = got.get("messages")
            out.append(TypeChange(name, have, wanted, count if isinstance(count, int) else None))
    return out


def refuse_type_changes(changes: list[TypeChange]) -> None:
    """Raise the error ``hutch topology apply`` stops with when queue types differ."""
    if changes:
        lines = "\n".join(f"  {change.text()}" for change in changes)
        raise TopologyError(f"the configuration changes the type of {len(changes)} "
                            f"queue{'s' if len(changes) != 1 else ''}:\n{lines}\n"
                            f"{MIGRATION_HELP}. Nothing was declared.")
