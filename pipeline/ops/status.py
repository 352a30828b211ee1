"""``hutch status``: the state of the pipeline at a glance, as tables.

Queue depths, consumers and policies come from the broker's management API (its numbers
are refreshed every few seconds, RabbitMQ's ``collect_statistics_interval``: the report
says so, and says when the statistics database is behind). The number of live workers is
the consumer count of the presence queue. What the broker cannot know, each backend's
requests in flight, its capacity now, who holds its lease and its circuit state, comes
from the workers' ``/metrics``: one URL per replica, summed (in flight, capacity) or told
apart (the lease holder). A worker that does not answer is reported, not fatal: the table
shows what the others said, and a lease it might hold is ``unknown``, not ``nobody``.

A queue of the topology that does not exist is reported as missing (``missing``), and
``hutch status`` exits non-zero: a vhost without the topology is not a healthy, idle one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.pauses import state_of
from pipeline.errors import StatusError, TopologyError
from pipeline.ops import worker_configs as configs_of
from pipeline.ops.leases import lease_owners
from pipeline.ops.stats_freshness import StatsFreshness
from pipeline.ops.status_text import format_status
from pipeline.ops.tenant_status import (
    TenantStatus,
    TenantValues,
    tenant_rows,
    tenant_values,
)
from pipeline.scheduling.lanes import LaneMap
from pipeline.settings import Settings
from pipeline.worker.config_diff import config_hash

__all__ = [
    "BackendStatus",
    "QueueStatus",
    "StatsFreshness",
    "StatusReport",
    "WorkerStatus",
    "format_status",
    "metrics_url",
    "status",
]

#: ``hutch_backend_state`` values (see pipeline.observe.metrics).
STATE_NAMES = {0: "closed", 1: "half_open", 2: "open", 3: "throttled"}

#: A pool's estimates (:mod:`pipeline.capacity.backlog`): tokens, then the wait.
_POOL_GAUGES = ("hutch_pool_backlog_tokens", "hutch_pool_drain_seconds")

_BACKEND_GAUGES = ("hutch_backend_in_flight", "hutch_backend_capacity",
                   "hutch_backend_lease_held", "hutch_backend_state")


@dataclass
class QueueStatus:
    """One queue as the management API reports it (counts None: not reported yet)."""

    name: str
    role: str  # "work", "triage", "retry", "parked" or "workers" (presence)
    pool: str | None = None
    exists: bool = True
    messages: int | None = None
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    policy: str | None = None
    paused: bool = False
    #: A pool's backlog in tokens and its estimated wait (s), as the workers estimate
    #: them (``hutch_pool_backlog_tokens``, ``hutch_pool_drain_seconds``); None: unknown.
    backlog_tokens: float | None = None
    wait_s: float | None = None


@dataclass
class BackendStatus:
    """One configured backend, as the workers' metrics report it."""

    name: str
    pool: str
    max_concurrency: int
    #: Requests at the backend now, summed over the workers that reported it.
    in_flight: int | None = None
    #: The prefetch its lease holder consumes with now (0: paused, throttled, open).
    capacity: int | None = None
    #: Metrics URLs of the workers holding its lease (more than one: the cap is broken).
    holders: list[str] = field(default_factory=list)
    #: closed, half_open, open or throttled, as its lease holder sees it.
    state: str | None = None
    #: The connection owning its lease queue, as the management API names it.
    owner: str | None = None


@dataclass
class WorkerStatus:
    url: str
    error: str | None = None


@dataclass
class StatusReport:
    vhost: str
    queues: list[QueueStatus]
    backends: list[BackendStatus]
    workers: list[WorkerStatus]
    stats: StatsFreshness = field(default_factory=StatsFreshness)
    #: Tenants the workers reported (their metrics), with their lanes' depths.
    tenants: list[TenantStatus] = field(default_factory=list)
    #: Each live worker's configuration (its presence), and the hash of the file given.
    configs: list[configs_of.WorkerConfig] = field(default_factory=list)
    config_hash: str = ""

    def queue(self, role: str, pool: str | None = None) -> QueueStatus:
        for queue in self.queues:
            if queue.role == role and queue.pool == pool:
                return queue
        raise KeyError((role, pool))

    @property
    def parked(self) -> QueueStatus:
        return self.queue("parked")

    @property
    def live_workers(self) -> int | None:
        """Workers connected now: every worker consumes the presence queue once."""
        presence = [q for q in self.queues if q.role == "workers" and q.exists]
        return presence[0].consumers if presence else None

    @property
    def missing(self) -> list[str]:
        """Queues of the topology that do not exist (``hutch topology apply`` makes them)."""
        return [q.name for q in self.queues if not q.exists]

    @property
    def unread_workers(self) -> bool:
        """Some worker's metrics could not be read: what it holds is unknown."""
        return any(worker.error is not None for worker in self.workers)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def metrics_url(url: str) -> str:
    """``host:port``, ``http://host:port`` or a full URL: where a worker's metrics are."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return parts.geturl()


def _count(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


async def _queue(api: ManagementAPI, vhost: str, name: str, role: str,
                 pool: str | None = None) -> QueueStatus:
    data = await api.get_queue(vhost, name)
    if data is None:
        return QueueStatus(name, role, pool, exists=False)
    policy = data.get("policy")
    return QueueStatus(
        name, role, pool,
        messages=_count(data, "messages"),
        ready=_count(data, "messages_ready"),
        unacked=_count(data, "messages_unacknowledged"),
        consumers=_count(data, "consumers"),
        policy=str(policy) if policy else None,
    )


async def _freshness(api: ManagementAPI) -> StatsFreshness:
    overview = await api.overview()
    backlog = overview.get("statistics_db_event_queue")
    return StatsFreshness(
        disabled=overview.get("disable_stats") is True,
        event_backlog=backlog if isinstance(backlog, int) else None)


async def _queues(settings: Settings) -> tuple[list[QueueStatus], StatsFreshness]:
    names = Names(settings.prefix)
    vhost = settings.vhost
    delays = sorted({delay for pool in settings.pools for delay in pool.retry_delays_ms})
    try:
        async with ManagementAPI.from_settings(settings) as api:
            # One clear error if the API is unreachable or refuses, before anything else.
            freshness = await _freshness(api)
            queues = await asyncio.gather(
                *(_queue(api, vhost, names.work_queue(pool.name), "work", pool.name)
                  for pool in settings.pools),
                _queue(api, vhost, names.triage_queue, "triage"),
                *(_queue(api, vhost, names.retry_queue(delay), "retry") for delay in delays),
                _queue(api, vhost, names.parked_queue, "parked"),
                _queue(api, vhost, names.workers_queue, "workers"),
                *(_queue(api, vhost, lane, "lane", pool.name) for pool in settings.pools
                  if pool.scheduling.policy == "fair"
                  for lane in LaneMap(names, pool.name, pool.scheduling).queues()))
            # The pause state's message count (pipeline.broker.pauses); an old flag queue
            # (before `topology apply` turned it into the state) still counts.
            paused = await asyncio.gather(
                *(_paused(api, vhost, names, pool.name) for pool in settings.pools))
            if not any(queue.exists for queue in queues):
                await _check_vhost(api, vhost)
    except TopologyError as exc:
        raise StatusError(str(exc)) from None
    # The work queues come first, in pool order, like the pause flags.
    for queue, flag in zip(queues[:len(paused)], paused, strict=True):
        queue.paused = flag
    return list(queues), freshness


async def _paused(api: ManagementAPI, vhost: str, names: Names, pool: str) -> bool:
    state = await api.get_queue(vhost, names.pause_state_queue(pool))
    if state_of((state or {}).get("messages")):
        return True
    return await api.get_queue(vhost, names.pause_queue(pool)) is not None


async def _check_vhost(api: ManagementAPI, vhost: str) -> None:
    """Nothing found: say so if it is because the vhost itself is not there."""
    if vhost not in {v.get("name") for v in await api.list_vhosts()}:
        raise StatusError(f"vhost {vhost!r} does not exist, or this user has no access to it")


async def _scrape(http: httpx.AsyncClient, url: str, tenants: TenantValues
                  ) -> tuple[WorkerStatus, dict[str, dict[str, float]]]:
    """One worker's backend gauges: {metric: {backend: value}}, and its pools' backlog
    estimates under their own names ({metric: {pool: value}}); its tenant figures are
    added to ``tenants``."""
    try:
        response = await http.get(url)
        response.raise_for_status()
        families = list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError) as exc:
        return WorkerStatus(url, f"{type(exc).__name__}: {exc}"), {}
    tenant_values(families, tenants)
    values: dict[str, dict[str, float]] = {name: {} for name in (*_BACKEND_GAUGES,
                                                                 *_POOL_GAUGES)}
    for family in families:
        if family.name not in values:
            continue
        for sample in family.samples:
            key = sample.labels.get("backend", sample.labels.get("pool"))
            if key is not None and sample.name == family.name and sample.value == sample.value:
                values[family.name][key] = sample.value  # (NaN: unknown, skipped)
    return WorkerStatus(url), values


async def _backends(settings: Settings, urls: list[str], tenants: TenantValues
                    ) -> tuple[list[BackendStatus], list[WorkerStatus],
                               list[dict[str, dict[str, float]]]]:
    backends = [BackendStatus(b.name, pool.name, b.max_concurrency)
                for pool in settings.pools for b in pool.backends]
    async with httpx.AsyncClient(timeout=5) as http:
        scraped = await asyncio.gather(*(_scrape(http, metrics_url(url), tenants)
                                         for url in urls))
    for backend in backends:
        states: list[float] = []
        for worker, values in scraped:
            if worker.error is not None:
                continue
            in_flight = values["hutch_backend_in_flight"].get(backend.name)
            if in_flight is not None:
                backend.in_flight = (backend.in_flight or 0) + int(in_flight)
            capacity = values["hutch_backend_capacity"].get(backend.name)
            if capacity is not None:
                backend.capacity = (backend.capacity or 0) + int(capacity)
            if values["hutch_backend_lease_held"].get(backend.name) == 1:
                backend.holders.append(worker.url)
                state = values["hutch_backend_state"].get(backend.name)
                if state is not None:
                    states.append(state)
        if states:
            worst = int(max(states))
            backend.state = STATE_NAMES.get(worst, str(worst))
    return backends, [worker for worker, _ in scraped], [values for _, values in scraped]


async def status(settings: Settings, worker_metrics_urls: list[str]) -> StatusReport:
    """Read every pool's queue, the triage, retry and parking-lot queues (management API)
    and each backend's in-flight, capacity, lease and state (the workers' metrics)."""
    tenants: TenantValues = {}
    (queues, freshness), (backends, workers, values), owners, configs = await asyncio.gather(
        _queues(settings), _backends(settings, list(worker_metrics_urls), tenants),
        lease_owners(settings), configs_of.read_worker_configs(settings))
    for backend in backends:
        backend.owner = owners.get(backend.name)
    for queue in (q for q in queues if q.role == "work" and q.pool is not None):
        tokens, waits = ([v[name][queue.pool] for v in values if queue.pool in v.get(name, {})]
                         for name in _POOL_GAUGES)  # every lease holder says the same: max
        queue.backlog_tokens, queue.wait_s = max(tokens, default=None), max(waits, default=None)
    lanes = {q.name: q.messages for q in queues if q.role == "lane"}
    return StatusReport(settings.vhost, [q for q in queues if q.role != "lane"], backends,
                        workers, freshness, tenant_rows(settings, tenants, lanes), configs,
                        config_hash(settings))
