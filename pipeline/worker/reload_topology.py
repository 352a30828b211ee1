"""Does the broker have what a reload needs? Checked before anything changes.

A reload that adds a pool needs its queues (work queue, presence, pause state, lanes),
one with new retry delays needs their tiers, and a model added to a pool needs its
binding from ``<prefix>.requests``: all of them made by ``hutch topology apply``. The
queues are checked with passive declares on the worker's own connection (a queue whose
node is down exists: it is served once the node is back). AMQP cannot tell whether a
binding exists, so bindings are read from the management API when the worker's user may
(a least-privilege worker user may not: then they are reported as unverified, and the
reload goes on; ``hutch topology diff`` tells for sure).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiormq
from aio_pika.abc import AbstractConnection

from pipeline.broker.availability import home_node_down
from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.topology import retry_delays
from pipeline.errors import TopologyError
from pipeline.scheduling.lanes import LaneMap
from pipeline.settings import PoolSettings, Settings
from pipeline.worker.config_diff import ConfigDiff, moved_models

__all__ = ["TopologyNeeds", "check_topology", "needs_of"]


@dataclass(frozen=True)
class TopologyNeeds:
    """What a reload needs on the broker beyond what the running configuration has."""

    queues: tuple[str, ...] = ()
    #: (model, work queue) bindings from the request exchange.
    bindings: tuple[tuple[str, str], ...] = ()


@dataclass
class TopologyCheck:
    """What is missing, and what could not be verified (with why)."""

    missing: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    why_unverified: str = ""


def _pool_queues(names: Names, pool: PoolSettings) -> list[str]:
    queues = [names.work_queue(pool.name), names.pool_workers_queue(pool.name),
              names.pause_state_queue(pool.name)]
    if pool.scheduling.policy == "fair":
        queues += LaneMap(names, pool.name, pool.scheduling).queues()
    return queues


def needs_of(old: Settings, new: Settings, diff: ConfigDiff) -> TopologyNeeds:
    """The queues and bindings ``new`` needs that ``old`` did not."""
    names = Names(new.prefix)
    queues = [q for change in diff.of_pools("added") if change.new is not None
              for q in _pool_queues(names, change.new)]
    queues += [names.retry_queue(d) for d in sorted(set(retry_delays(new))
                                                     - set(retry_delays(old)))]
    before = {model: pool.name for pool in old.pools for model in pool.models}
    # A model moving between two kept pools still routes to its old pool, which accepts
    # it (config_diff.accepting): its new binding is for `apply` after the reload.
    moving = {model for models in moved_models(old, new).values() for model in models}
    bindings = [(model, names.work_queue(change.name))
                for change in diff.of_pools("added", "changed") if change.new is not None
                for model in change.new.models
                if before.get(model) != change.name and model not in moving]
    return TopologyNeeds(tuple(queues), tuple(bindings))


async def _queue_exists(connection: AbstractConnection, queue: str) -> bool:
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        return home_node_down(exc)  # there, on a node that is down: served when back
    await channel.close()
    return True


async def check_topology(connection: AbstractConnection, settings: Settings,
                         needs: TopologyNeeds) -> TopologyCheck:
    """Which of ``needs`` the broker lacks (queues by AMQP, bindings by the management
    API if it answers this worker's user)."""
    check = TopologyCheck()
    for queue in needs.queues:
        if not await _queue_exists(connection, queue):
            check.missing.append(f"queue {queue}")
    if not needs.bindings:
        return check
    exchange = Names(settings.prefix).requests_exchange
    try:
        async with ManagementAPI.from_settings(settings, connection=connection,
                                               timeout_s=5) as api:
            for model, queue in needs.bindings:
                keys = {b.get("routing_key")
                        for b in await api.queue_bindings(settings.vhost, exchange, queue)}
                if model not in keys:
                    check.missing.append(f"binding {exchange} --{model}--> {queue}")
    except TopologyError as exc:
        check.unverified = [f"binding {exchange} --{model}--> {queue}"
                            for model, queue in needs.bindings]
        check.why_unverified = str(exc)
    return check
