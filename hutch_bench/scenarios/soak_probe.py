"""What the soak samples every few seconds: each process's memory, file descriptors and
broker connections, and the broker's own.

Processes are read from Linux ``/proc``: resident memory (VmRSS), open descriptors
(``/proc/PID/fd``) and the TCP connections to the broker's AMQP port (socket inodes of
``/proc/PID/fd`` looked up in ``/proc/net/tcp{,6}``). The broker is read from its
management API (``/api/nodes``: memory in use, descriptors, sockets; ``/api/connections``:
every connection, and those from this run's processes, matched by their client port;
``/api/queues``: the memory and messages of this run's queues, the part of the node's
memory that is this run's: the node is shared with whatever else uses the broker) and,
when the node runs on this machine, from ``/proc`` of its ``os_pid`` (the beam.smp RSS).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from pipeline.settings import Settings

__all__ = ["BrokerProbe", "process_sample", "tcp_ports"]

_RSS = re.compile(r"^VmRSS:\s+(\d+) kB", re.MULTILINE)


def _rss_mib(pid: int) -> float | None:
    try:
        match = _RSS.search(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(match[1]) / 1024 if match else None


def _socket_inodes(pid: int) -> set[str] | None:
    """The socket inodes among ``pid``'s open descriptors; None if unreadable."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    inodes = set()
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def tcp_ports(remote_port: int) -> dict[str, int]:
    """Socket inode -> local port of every established TCP connection to
    ``remote_port`` on this machine (``/proc/net/tcp`` and ``tcp6``)."""
    found: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                found[inode] = int(local.rsplit(":", 1)[1], 16)
    return found


def process_sample(pid: int, amqp_sockets: Mapping[str, int]) -> dict[str, Any]:
    """RSS (MiB), open descriptors and AMQP connections of one live process, and the
    client ports of those connections (to find them in the broker's list)."""
    inodes = _socket_inodes(pid)
    fds = None
    with contextlib.suppress(OSError):
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    ports = sorted(amqp_sockets[i] for i in inodes or () if i in amqp_sockets)
    return {"pid": pid, "rss_mib": _rss_mib(pid), "fds": fds,
            "amqp_connections": len(ports) if inodes is not None else None,
            "ports": ports}


class BrokerProbe:
    """The broker node's figures from its management API (one HTTP client, reused)."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        base, user, password = settings.management_api()
        self._prefix = prefix
        self._vhost = quote(urlsplit(settings.amqp_url).path.lstrip("/") or "/", safe="")
        self._http = httpx.AsyncClient(base_url=base.rstrip("/"), auth=(user, password),
                                       timeout=10)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def sample(self, our_ports: set[int]) -> dict[str, Any]:
        """Node memory, descriptors and sockets; all connections, and ours."""
        try:
            nodes = (await self._http.get("/api/nodes")).json()
            connections = (await self._http.get(
                "/api/connections", params={"columns": "peer_port,peer_host"})).json()
            queues = [q for q in (await self._http.get(
                f"/api/queues/{self._vhost}",
                params={"columns": "name,memory,messages"})).json()
                if str(q.get("name", "")).startswith(self._prefix)]
        except (httpx.HTTPError, ValueError):
            return {}
        node = nodes[0] if nodes else {}
        pid = node.get("os_pid")
        return {
            "node": node.get("name"),
            "mem_used_mib": node.get("mem_used", 0) / 2**20,
            "rss_mib": _rss_mib(int(pid)) if pid else None,
            "fd_used": node.get("fd_used"),
            "sockets_used": node.get("sockets_used"),
            "connections": len(connections),
            "our_connections": sum(c.get("peer_port") in our_ports for c in connections),
            "our_queues_memory_mib": sum(q.get("memory") or 0 for q in queues) / 2**20,
            "our_queues_messages": sum(q.get("messages") or 0 for q in queues),
        }
