"""Who holds each backend's lease, as the broker knows it (``hutch status``).

A lease is an exclusive queue (``<prefix>.lease.<backend>``), so the management API names
the connection that owns it; that connection's client-given name is the worker's
(``hutch-worker <host>:<pid>``). No worker metrics are needed to tell who serves a backend.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.errors import TopologyError
from pipeline.settings import Settings

__all__ = ["connection_label", "lease_owners"]


def connection_label(connection: dict[str, Any] | None, fallback: str) -> str:
    """``hutch-worker host:pid (peer host:port)``, or the connection's name alone."""
    if connection is None:
        return fallback
    named = (connection.get("client_properties") or {}).get("connection_name")
    peer = f"{connection.get('peer_host')}:{connection.get('peer_port')}"
    return f"{named} ({peer})" if named else fallback


async def _owner(api: ManagementAPI, vhost: str, queue: str) -> str | None:
    data = await api.get_queue(vhost, queue)
    details = (data or {}).get("owner_pid_details") or {}
    name = details.get("name") if isinstance(details, dict) else None
    if not isinstance(name, str):
        return None  # no lease queue: nobody holds it
    return connection_label(await api.get_connection(name), name)


async def lease_owners(settings: Settings) -> dict[str, str | None]:
    """Backend name -> the connection holding its lease (None: nobody). Empty when the
    management API cannot say (``hutch status`` reports the API's error elsewhere)."""
    names = Names(settings.prefix)
    backends = [b.name for pool in settings.pools for b in pool.backends]
    try:
        async with ManagementAPI.from_settings(settings) as api:
            owners = await asyncio.gather(
                *(_owner(api, settings.vhost, names.lease_queue(b)) for b in backends))
    except TopologyError:
        return {}
    return dict(zip(backends, owners, strict=True))
