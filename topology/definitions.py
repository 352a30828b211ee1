"""Export the topology as a RabbitMQ definitions file, and read such files back.

``hutch topology export`` writes what :func:`pipeline.broker.topology.plan` describes (the same
description ``hutch topology apply`` declares) in RabbitMQ's definitions format: the file
a node imports at boot (``definitions.local.path``) and the management UI imports under
Overview -> Import definitions (``POST /api/definitions/<vhost>``)::

    {"vhosts": [{"name"}],
     "exchanges": [{"name", "vhost", "type", "durable", "auto_delete", "internal", "arguments"}],
     "queues": [{"name", "vhost", "durable", "auto_delete", "arguments"}],
     "bindings": [{"source", "vhost", "destination", "destination_type", "routing_key",
                   "arguments"}],
     "policies": [{"vhost", "name", "pattern", "apply-to", "definition", "priority"}],
     "users": [{"name", "password_hash", "hashing_algorithm", "tags", "limits"}],
     "permissions": [{"user", "vhost", "configure", "write", "read"}]}

Every object names its vhost (a boot-time import requires it; an import into one vhost
through the API ignores it). Passwords are never written: a user is exported only with its
``password_hash``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.broker.topology import (
    BindingSpec,
    ExchangeSpec,
    PolicySpec,
    QueueSpec,
    Topology,
    plan,
)
from pipeline.errors import ConfigError
from pipeline.settings import Settings

__all__ = [
    "SHA256",
    "Exported",
    "export_definitions",
    "parse_definitions",
    "rabbit_password_hash",
    "to_definitions",
    "write_definitions",
]

#: RabbitMQ's default password hashing (the only one Hutch writes).
SHA256 = "rabbit_password_hashing_sha256"

_USER_KEYS = ("name", "password_hash", "hashing_algorithm", "tags", "limits")
_PERMISSION_KEYS = ("configure", "write", "read")


@dataclass
class Exported:
    """A definitions document, and what was left out of it (say it to the operator)."""

    definitions: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def rabbit_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """``password_hash`` as RabbitMQ computes it by default (``SHA256``):
    base64(salt + sha256(salt + password)) with a 4-byte random salt."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ's password salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _users(users: list[dict[str, Any]], notes: list[str]) -> tuple[list[dict[str, Any]],
                                                                   set[str]]:
    """Users fit for a file (with a hash, without a clear password); names left out."""
    out: list[dict[str, Any]] = []
    omitted: set[str] = set()
    for user in users:
        name = user.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"users: every user needs a name (got {sorted(user)})")
        if not user.get("password_hash"):
            omitted.add(name)
            notes.append(f"user {name!r} left out: it has no password_hash, and a definitions "
                         "file never carries a clear password (create it with rabbitmqctl "
                         "add_user, or give it a hash)")
            continue
        entry = {key: user[key] for key in _USER_KEYS if key in user}
        entry.setdefault("tags", [])
        entry.setdefault("limits", {})
        out.append(entry)
    return out, omitted


def _permissions(permissions: list[dict[str, Any]], vhost: str, omitted: set[str],
                 notes: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for permission in permissions:
        user = permission.get("user")
        missing = [key for key in _PERMISSION_KEYS if not isinstance(permission.get(key), str)]
        if not isinstance(user, str) or missing:
            raise ConfigError(f"permissions: {permission!r} needs user, configure, write, read")
        if user in omitted:
            notes.append(f"permissions of {user!r} on vhost "
                         f"{permission.get('vhost', vhost)!r} left out with the user")
            continue
        out.append({"user": user, "vhost": permission.get("vhost", vhost),
                    **{key: permission[key] for key in _PERMISSION_KEYS}})
    return out


def to_definitions(topo: Topology, *, users: list[dict[str, Any]] | None = None,
                   permissions: list[dict[str, Any]] | None = None,
                   rabbit_version: str | None = None) -> Exported:
    """Serialise a topology (and optional users and permissions) as a definitions file."""
    vhost = topo.vhost
    notes: list[str] = []
    user_list, omitted = _users(users or [], notes)
    definitions: dict[str, Any] = {}
    if rabbit_version is not None:
        definitions["rabbit_version"] = rabbit_version
    definitions |= {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": e.durable,
             "auto_delete": e.auto_delete, "internal": e.internal,
             "arguments": dict(e.arguments)}
            for e in topo.exchanges],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": q.durable,
             "auto_delete": q.auto_delete, "arguments": dict(q.arguments)}
            for q in topo.queues],
        "bindings": [
            {"source": b.source, "vhost": vhost, "destination": b.destination,
             "destination_type": b.destination_type, "routing_key": b.routing_key,
             "arguments": dict(b.arguments)}
            for b in topo.bindings],
        "policies": [
            {"vhost": vhost, "name": p.name, "pattern": p.pattern, "apply-to": p.apply_to,
             "definition": dict(p.definition), "priority": p.priority}
            for p in topo.policies],
        "users": user_list,
        "permissions": _permissions(permissions or [], vhost, omitted, notes),
    }
    return Exported(definitions, notes)


def export_definitions(settings: Settings, *, users: list[dict[str, Any]] | None = None,
                       permissions: list[dict[str, Any]] | None = None) -> Exported:
    """The definitions file of the topology ``hutch topology apply`` declares for
    ``settings``, in ``settings.vhost``; no broker is needed."""
    return to_definitions(plan(settings), users=users, permissions=permissions)


def parse_definitions(data: dict[str, Any], vhost: str) -> Topology:
    """The exchanges, queues, bindings and policies of ``vhost`` in a definitions document
    (a file, ``GET /api/definitions[/<vhost>]``, or the API's object listings). Objects
    that name no vhost (a per-vhost export) are taken as ``vhost``'s."""

    def mine(item: dict[str, Any]) -> bool:
        return bool(item.get("vhost", vhost) == vhost)

    topo = Topology(vhost=vhost)
    topo.exchanges = [
        ExchangeSpec(e["name"], e["type"], dict(e.get("arguments") or {}),
                     durable=bool(e.get("durable", True)),
                     auto_delete=bool(e.get("auto_delete", False)),
                     internal=bool(e.get("internal", False)))
        for e in data.get("exchanges", []) if mine(e)]
    topo.queues = [
        QueueSpec(q["name"], dict(q.get("arguments") or {}), durable=bool(q.get("durable", True)),
                  auto_delete=bool(q.get("auto_delete", False)))
        for q in data.get("queues", []) if mine(q)]
    topo.bindings = [
        BindingSpec(b["source"], b["destination"], b.get("routing_key", ""),
                    dict(b.get("arguments") or {}),
                    destination_type=b.get("destination_type", "queue"))
        for b in data.get("bindings", []) if mine(b)]
    topo.policies = [
        PolicySpec(p["name"], p["pattern"], p.get("apply-to", "all"), int(p.get("priority", 0)),
                   dict(p.get("definition") or {}))
        for p in data.get("policies", []) if mine(p)]
    return topo


def write_definitions(definitions: dict[str, Any], path: str | Path) -> None:
    """Write the document as JSON; ``-`` is stdout. A file is replaced atomically, so the
    broker never boots from half a file."""
    text = json.dumps(definitions, indent=2, sort_keys=True) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # the broker's user reads it
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
