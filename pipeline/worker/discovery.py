"""Backends discovered by DNS: one backend per address its host name resolves to.

A backend with ``discover = "dns"`` is a template: the host of its ``url`` names its
replicas (a Kubernetes headless Service gives one A/AAAA record per vLLM pod). Each
address becomes a backend of its own, named ``<name>-<address>`` (dots and colons as
dashes), with the template's settings and the address in place of the host in its ``url``
(and in ``metrics_url`` when that names the same host): its own lease, its own
``max_concurrency``. Every worker resolves the same name, so they agree on the replicas'
names and each replica has one lease holder wherever it runs.

The set is resolved again every ``discover_interval_s``: a new address is served at once
(its lease competed for); an address that disappears drains like a backend removed by a
reload (nothing new, what runs finishes, its lease released). A failed resolution keeps
the last set (a DNS outage must not drain a healthy fleet) and is logged once per state.
Plain ``http`` is the intended case: an ``https`` replica is called by address, so its
certificate must name the address (or verification must allow it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from pipeline.observe.log import get_logger
from pipeline.settings import BackendSettings, PoolSettings, Settings

__all__ = ["Discovery", "Replicas", "Resolver", "replica", "resolve"]

log = get_logger("hutch.discovery")

#: Addresses a host name resolves to (sorted, unique); raises OSError when it cannot.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """The A and AAAA addresses of ``host`` (the system resolver, as the backends' HTTP
    client would use it)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                         type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _with_host(url: str, host: str, address: str) -> str:
    parts = urlsplit(url)
    if parts.hostname != host:
        return url
    netloc = f"[{address}]" if ":" in address else address
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def replica(template: BackendSettings, address: str) -> BackendSettings:
    """The backend that serves ``template``'s replica at ``address``."""
    host = urlsplit(template.url).hostname or ""
    suffix = address.replace(".", "-").replace(":", "-").strip("-")
    name = f"{template.name}-{suffix}"[:100]
    metrics = (None if template.metrics_url is None
               else _with_host(template.metrics_url, host, address))
    return BackendSettings.model_validate({
        **template.model_dump(), "name": name, "url": _with_host(template.url, host, address),
        "metrics_url": metrics, "discover": "none"})


class Replicas:
    """One discovered backend's replicas, as last resolved."""

    def __init__(self, pool: str, template: BackendSettings,
                 resolver: Resolver = resolve) -> None:
        self.pool = pool
        self.template = template
        self._resolver = resolver
        parts = urlsplit(template.url)
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        #: The replicas served now, by backend name.
        self.current: dict[str, BackendSettings] = {}
        self._failing = False

    async def refresh(self) -> tuple[list[BackendSettings], list[str]]:
        """Resolve again: (replicas to add, names to retire). A failed resolution changes
        nothing."""
        try:
            addresses = await self._resolver(self._host, self._port)
        except OSError as exc:
            if not self._failing:
                log.warning("discovery.failed", backend=self.template.name, host=self._host,
                            error=repr(exc), kept=len(self.current))
            self._failing = True
            return [], []
        if self._failing:
            log.info("discovery.resolved_again", backend=self.template.name, host=self._host)
        self._failing = False
        found = {r.name: r for r in (replica(self.template, a) for a in addresses)}
        added = [r for name, r in found.items() if name not in self.current]
        gone = [name for name in self.current if name not in found]
        for name in gone:
            del self.current[name]
        self.current.update({r.name: r for r in added})
        if added or gone:
            log.info("discovery.changed", backend=self.template.name, host=self._host,
                     added=[r.name for r in added], gone=gone, replicas=len(self.current))
        return added, gone


class Discovery:
    """Every discovered backend of a configuration, and what their changes do to the
    worker: ``add`` a replica's slot, ``retire`` a gone one, ``resize`` a pool's count
    (its workers' fair share of leases follows it)."""

    def __init__(self, settings: Settings, resolver: Resolver = resolve) -> None:
        self._settings = settings
        self.replicas = [Replicas(pool.name, backend, resolver) for pool in settings.pools
                         for backend in pool.backends if backend.discover == "dns"]

    @staticmethod
    def static(pool: PoolSettings) -> list[BackendSettings]:
        """The backends of ``pool`` that are served as configured."""
        return [backend for backend in pool.backends if backend.discover != "dns"]

    def count(self, pool: PoolSettings) -> int:
        """Backends ``pool`` has now: its static ones and every replica found."""
        return len(self.static(pool)) + sum(len(r.current) for r in self.replicas
                                            if r.pool == pool.name)

    async def refresh(self, add: Callable[[PoolSettings, BackendSettings], None],
                      retire: Callable[[str], object],
                      resize: Callable[[str, int], None]) -> None:
        """Resolve every discovered backend once and apply what changed."""
        for replicas in self.replicas:
            added, gone = await replicas.refresh()
            pool = self._settings.pool(replicas.pool)
            for backend in added:
                add(pool, backend)
            for name in gone:
                retire(name)
            if added or gone:
                resize(pool.name, self.count(pool))

    async def run(self, add: Callable[[PoolSettings, BackendSettings], None],
                  retire: Callable[[str], object],
                  resize: Callable[[str, int], None]) -> None:
        """:meth:`refresh` every ``discover_interval_s`` (the shortest) until cancelled."""
        if not self.replicas:
            return
        interval = min(r.template.discover_interval_s for r in self.replicas)
        while True:
            await asyncio.sleep(interval)
            await self.refresh(add, retire, resize)
