"""Per-application and worker users, with the least permissions each role needs.

``hutch client add NAME`` makes a RabbitMQ user for one application, ``hutch worker-user
add NAME`` one for the workers. Permissions are three regular expressions per vhost
(configure, write, read), matched against exchange and queue names; these are the
smallest sets the operations of each role pass (each one checked on RabbitMQ 3.10, see
``tests/test_security.py``):

=============  ==========================================  ================================
role           operation                                   permission it needs
=============  ==========================================  ================================
client ``A``   declare its reply queue(s)                  configure on the queue
               consume its reply queue                     read on the queue
               publish to ``<prefix>.requests``            write on that exchange (the
                                                           alternate exchange, a full
                                                           queue's dead-lettering: none)
worker         declare/delete ``<prefix>.lease.<backend>``  configure on the lease queue
               consume work queues and the triage queue    read on the queue
               read other workers' cap claims from a       read on the lease queue
               lease queue it holds
               replies, the parking lot and cap claims     write on ``amq.default``
               (default exchange)
               retry tiers                                 write on ``<prefix>.retry``
both           passive declares (topology checks, pause    none
               flags), ``basic.qos``
=============  ==========================================  ================================

A client ``A`` owns the reply queues ``<prefix>.reply.A`` and ``<prefix>.reply.A.<any
suffix>`` (several processes of one application, each with its own queue): it can
declare and read only those, so it can never read another client's replies, and it can
publish only to the request exchange (not to the default exchange: no writing into work
queues, the parking lot or other clients' reply queues). Workers answer a request only
into a reply queue of the user that published it (its broker-validated ``user_id``, see
:class:`pipeline.settle.publisher.ReplyGuard`). User names therefore contain no dot: ``A``'s
pattern must not reach another user's queues.

Users get a tag saying their role (``hutch-client``, ``hutch-worker``) and no management
tag, so they cannot log into the management UI; ``list`` shows only users with these
tags and ``remove`` deletes nothing else. Passwords are generated (or given), returned
once, never logged, and sent to the management API only as a salted SHA-256 hash.
Managing users needs the ``administrator`` tag; applying the topology stays an
operator's job too.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.errors import ConfigError, UserError
from pipeline.settings import Settings

__all__ = [
    "CLIENT_TAG",
    "WORKER_TAG",
    "HutchUser",
    "NewUser",
    "Permissions",
    "add_client",
    "add_worker_user",
    "client_permissions",
    "list_users",
    "remove_client",
    "remove_worker_user",
    "worker_permissions",
]

CLIENT_TAG = "hutch-client"
WORKER_TAG = "hutch-worker"

Role = Literal["client", "worker"]
_TAGS: dict[Role, str] = {"client": CLIENT_TAG, "worker": WORKER_TAG}

#: No dot: a client's reply queue pattern ``<prefix>.reply.NAME(.suffix)`` must not
#: cover ``<prefix>.reply.NAME.other``, the queue of a user named ``NAME.other``.
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ permissions in one vhost: regular expressions over resource names."""

    configure: str
    write: str
    read: str

    def as_json(self) -> dict[str, str]:
        return {"configure": self.configure, "write": self.write, "read": self.read}


@dataclass(frozen=True)
class NewUser:
    """A user just made: its password is shown here once and kept nowhere else."""

    name: str
    role: Role
    password: str = field(repr=False)
    #: ``amqp_url`` with this user's credentials (for the application's configuration).
    amqp_url: str = field(repr=False)
    permissions: Permissions


@dataclass(frozen=True)
class HutchUser:
    """A Hutch user on the broker and its permissions in the configured vhost."""

    name: str
    role: Role
    tags: tuple[str, ...]
    #: None: the user has no permissions in this vhost (made for another one).
    permissions: Permissions | None


def _esc(name: str) -> str:
    return re.escape(name)


def client_permissions(names: Names, user: str) -> Permissions:
    """Configure and read its own reply queues; write to the request and cancel exchanges
    only (the broker checks each message's user_id: a cancel names its sender)."""
    replies = f"^{_esc(names.reply_queue(user))}(\\..+)?$"
    return Permissions(
        configure=replies,
        write=f"^({_esc(names.requests_exchange)}|{_esc(names.cancel_exchange)})$",
        read=replies)


def worker_permissions(names: Names) -> Permissions:
    """Configure lease queues and its own cancel queue; write to the default and retry
    exchanges (and bind its cancel queue); read the work queues and their lanes, the
    lease queues (the claims of other workers' caps, pipeline.worker.cap_claims), the
    triage and presence queues (all workers' and each pool's), the cancel exchange and its
    cancel queue."""
    cancels = f"{_esc(names.cancel_queue(''))}.+"
    return Permissions(
        configure=f"^({_esc(names.lease_queue(''))}.+|{cancels})$",
        write=f"^(amq\\.default|{_esc(names.retry_exchange)}|{cancels})$",
        read=f"^({_esc(names.work_queue(''))}.+|{_esc(names.lanes_prefix)}.+"
             f"|{_esc(names.lease_queue(''))}.+"
             f"|{_esc(names.triage_queue)}"
             f"|{_esc(names.workers_queue)}|{_esc(names.pool_workers_queue(''))}.+"
             f"|{_esc(names.cancel_exchange)}|{cancels})$",
    )


def _check_name(name: str) -> None:
    if not _USER_NAME.fullmatch(name):
        raise ConfigError(
            f"user name {name!r}: use 1..100 letters, digits, '_' or '-', starting with a "
            "letter or digit (no dots: the name is a component of reply queue names)")


def _password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + pw))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _user_url(settings: Settings, user: str, password: str) -> str:
    parts = urlsplit(settings.amqp_url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def _tags(user: dict[str, Any]) -> tuple[str, ...]:
    tags = user.get("tags") or []
    if isinstance(tags, str):  # older brokers: a comma-separated string
        tags = tags.split(",")
    return tuple(str(tag).strip() for tag in tags if str(tag).strip())


def _role(tags: tuple[str, ...]) -> Role | None:
    for role, tag in _TAGS.items():
        if tag in tags:
            return role
    return None


class _UserAPI(ManagementAPI):
    """The management API's users and permissions."""

    async def __aenter__(self) -> _UserAPI:
        return self

    async def get_user(self, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._request(
            "GET", f"/users/{quote(name, safe='')}", ok_missing=True)
        return result

    async def users(self) -> list[dict[str, Any]]:
        return list(await self._request("GET", "/users") or [])

    async def put_user(self, name: str, password: str, tags: str) -> None:
        await self._request("PUT", f"/users/{quote(name, safe='')}", json={
            "password_hash": _password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": tags,
        })

    async def delete_user(self, name: str) -> None:
        await self._request("DELETE", f"/users/{quote(name, safe='')}", ok_missing=True)

    async def get_permissions(self, vhost: str, user: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._request(
            "GET", f"/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
            ok_missing=True)
        return result


def _api(settings: Settings) -> _UserAPI:
    return _UserAPI.from_settings(settings)


async def _add(settings: Settings, name: str, role: Role, permissions: Permissions,
               password: str | None) -> NewUser:
    _check_name(name)
    if password is not None and len(password) < 12:
        raise ConfigError("the password must have at least 12 characters (or leave it out "
                          "and let Hutch generate one)")
    password = password if password is not None else secrets.token_urlsafe(24)
    async with _api(settings) as api:
        await api.check()
        if await api.get_user(name) is not None:
            raise UserError(f"user {name!r} already exists on the broker; remove it first "
                            f"(`hutch {'client' if role == 'client' else 'worker-user'} "
                            f"remove {name}`) or choose another name")
        await api.put_user(name, password, _TAGS[role])
        try:
            await api.set_permissions(settings.vhost, name, **permissions.as_json())
        except BaseException:
            await api.delete_user(name)  # no half-made user without permissions
            raise
    return NewUser(name, role, password, _user_url(settings, name, password), permissions)


async def add_client(settings: Settings, name: str, password: str | None = None) -> NewUser:
    """Create the user of one application: it may publish requests and read only its own
    reply queues ``<prefix>.reply.NAME`` and ``<prefix>.reply.NAME.<suffix>`` (use
    ``HutchClient(client_id=NAME)`` or ``client_id=f"{NAME}.<suffix>"``). The password is
    generated unless given, and returned only here."""
    return await _add(settings, name, "client",
                      client_permissions(Names(settings.prefix), name), password)


async def add_worker_user(settings: Settings, name: str, password: str | None = None
                          ) -> NewUser:
    """Create a user for the workers (run every replica as the same one: a retried
    request carries the user that sent it to the retry tier, which the others must
    trust; see ``trusted_users``)."""
    return await _add(settings, name, "worker", worker_permissions(Names(settings.prefix)),
                      password)


async def _remove(settings: Settings, name: str, role: Role) -> None:
    async with _api(settings) as api:
        user = await api.get_user(name)
        if user is None:
            raise UserError(f"there is no user {name!r} on the broker")
        if _TAGS[role] not in _tags(user):
            raise UserError(f"user {name!r} is not a Hutch {role} user (it has no "
                            f"{_TAGS[role]!r} tag); refusing to delete it")
        # The broker closes the user's open connections at once (CONNECTION_FORCED).
        await api.delete_user(name)


async def remove_client(settings: Settings, name: str) -> None:
    """Delete a client user (its connections are closed; its reply queues expire)."""
    await _remove(settings, name, "client")


async def remove_worker_user(settings: Settings, name: str) -> None:
    await _remove(settings, name, "worker")


async def list_users(settings: Settings, role: Role | None = None) -> list[HutchUser]:
    """The Hutch users (by tag), with their permissions in the configured vhost."""
    out: list[HutchUser] = []
    async with _api(settings) as api:
        for user in await api.users():
            tags = _tags(user)
            user_role = _role(tags)
            if user_role is None or (role is not None and user_role != role):
                continue
            name = str(user["name"])
            found = await api.get_permissions(settings.vhost, name)
            permissions = None if found is None else Permissions(
                str(found.get("configure", "")), str(found.get("write", "")),
                str(found.get("read", "")))
            out.append(HutchUser(name, user_role, tags, permissions))
    return sorted(out, key=lambda u: (u.role, u.name))
