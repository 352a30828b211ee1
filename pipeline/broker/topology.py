"""Declare Hutch's broker topology from the settings, idempotently.

What is declared, and why each piece exists, follows the data::

    client --publish--> <p>.requests (direct; alternate exchange <p>.unrouted)
        routing key = model ---> <p>.work.<pool> (classic, x-max-priority)
        unknown model ---------> <p>.unrouted (fanout) ---> <p>.triage
    <p>.work.<pool> --expired / queue full--> <p>.dlx (fanout) ---> <p>.triage
    worker: transient failure --> <p>.retry (headers) --> <p>.retry.<delay>ms
        --TTL expires--> <p>.requests (same model, same priority: any backend may take it)
    worker: <p>.triage --error reply, then--> <p>.parked (the parking lot)
    every worker consumes <p>.workers once (presence: its consumer count = live workers)

Queue arguments that can never change (``x-max-priority``) are declared; everything an
operator may want to tune (dead-lettering, max length, overflow, TTL) is one policy per
work queue, set through the management API.

The topology is described once, by :func:`plan`: :func:`apply_topology` declares that
description, ``topology.definitions`` exports it as a RabbitMQ definitions file and
``topology.diff`` compares it with a live broker.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractQueue

from pipeline.broker.connection import broker_identity, connect
from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.quorum import (
    QUORUM_QUEUE,
    priority_semantics,
    quorum_policy_definition,
    refuse_type_changes,
    type_changes,
)
from pipeline.errors import TopologyError
from pipeline.protocol import H_RETRY_TIER
from pipeline.scheduling.lanes import LaneMap
from pipeline.settings import PoolSettings, Settings

T = TypeVar("T")

__all__ = [
    "BindingSpec",
    "ExchangeSpec",
    "PolicySpec",
    "QueueSpec",
    "Topology",
    "TopologyReport",
    "apply_topology",
    "delete_topology",
    "lane_queue_arguments",
    "plan",
    "retry_delays",
    "retry_queue_arguments",
    "shared_queue_arguments",
    "work_policy",
    "work_queue_arguments",
]


def work_queue_arguments(settings: Settings, pool: PoolSettings | None = None
                         ) -> dict[str, Any]:
    """Arguments fixed at declaration: the broker refuses to change them later. A quorum
    pool's queue has no ``x-max-priority`` (refused): its priority is the broker's."""
    if pool is not None and pool.queue_type == "quorum":
        return {"x-queue-type": "quorum"}
    return {"x-queue-type": "classic", "x-max-priority": settings.max_priority}


def shared_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Triage, parking lot and presence: quorum as soon as one pool is (see
    :mod:`pipeline.broker.quorum`)."""
    return {"x-queue-type": "quorum" if settings.quorum() else "classic"}


def retry_delays(settings: Settings) -> list[int]:
    """Every retry tier any pool uses (tiers are shared: they route back by model)."""
    return sorted({delay for pool in settings.pools for delay in pool.retry_delays_ms})


def retry_queue_arguments(settings: Settings, delay_ms: int) -> dict[str, Any]:
    """A tier's TTL is its identity, so it is an argument, not a policy: every message in
    it has the same TTL and expires at the head, in order."""
    kind = QUORUM_QUEUE if settings.quorum() else {"x-queue-type": "classic"}
    return {**kind, "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": Names(settings.prefix).requests_exchange}


def lane_queue_arguments(settings: Settings, pool: PoolSettings) -> dict[str, Any]:
    """A lane (:mod:`pipeline.scheduling.lanes`): the pool's kind of queue, its priorities
    (classic), dead-lettered like the pool's queue when a request's deadline passes in it,
    and bounded like it: a full lane refuses the move and the request stays where it was."""
    names = Names(settings.prefix)
    limits = {"x-dead-letter-exchange": names.dead_letter_exchange,
              "x-max-length": pool.max_queue_length, "x-overflow": "reject-publish"}
    return {**work_queue_arguments(settings, pool), **limits}


def work_policy(settings: Settings, pool: PoolSettings) -> dict[str, Any]:
    """The one policy of a pool's work queue (at most one policy applies to a queue)."""
    names = Names(settings.prefix)
    definition: dict[str, Any] = {
        "dead-letter-exchange": names.dead_letter_exchange,
        "max-length": pool.max_queue_length,
        "overflow": "reject-publish-dlx",
    }
    if pool.message_ttl_ms is not None:
        definition["message-ttl"] = pool.message_ttl_ms
    if pool.queue_type == "quorum":
        definition = quorum_policy_definition(names.dead_letter_exchange,
                                              pool.max_queue_length, pool.delivery_limit,
                                              pool.message_ttl_ms)
    return {
        "pattern": f"^{re.escape(names.work_queue(pool.name))}$",
        "apply-to": "queues",
        "priority": 0,
        "definition": definition,
    }


# -- the one description of the topology ----------------------------------------------


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str  # direct | fanout | headers | topic
    arguments: dict[str, Any] = field(default_factory=dict)
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    durable: bool = True
    auto_delete: bool = False


@dataclass(frozen=True)
class BindingSpec:
    source: str
    destination: str
    routing_key: str
    arguments: dict[str, Any] = field(default_factory=dict)
    destination_type: str = "queue"

    def key(self) -> tuple[str, str, str, str, str]:
        """Identity of a binding (RabbitMQ's own: source, destination, key, arguments)."""
        return (self.source, self.destination_type, self.destination, self.routing_key,
                repr(sorted(self.arguments.items())))

    def label(self) -> str:
        """``src --key--> dst`` (headers: the matched headers; fanout: ``src -> dst``)."""
        if self.arguments:
            via = ",".join(f"{k}={v}" for k, v in sorted(self.arguments.items())
                           if k != "x-match")
        elif self.routing_key != self.destination:  # aio-pika's default key is the queue
            via = self.routing_key
        else:
            return f"{self.source} -> {self.destination}"
        return f"{self.source} --{via}--> {self.destination}"


@dataclass(frozen=True)
class PolicySpec:
    name: str
    pattern: str
    apply_to: str
    priority: int
    definition: dict[str, Any] = field(default_factory=dict)


@dataclass
class Topology:
    """Everything in one vhost that Hutch declares, as RabbitMQ describes it."""

    vhost: str
    exchanges: list[ExchangeSpec] = field(default_factory=list)
    queues: list[QueueSpec] = field(default_factory=list)
    bindings: list[BindingSpec] = field(default_factory=list)
    policies: list[PolicySpec] = field(default_factory=list)
    #: (exchange, queue) pairs whose bindings Hutch owns entirely: apply removes those not
    #: in ``bindings`` (a model no longer in the config must stop routing to its old pool).
    owned_routes: list[tuple[str, str]] = field(default_factory=list)

    def exchange(self, name: str) -> ExchangeSpec | None:
        return next((e for e in self.exchanges if e.name == name), None)

    def queue(self, name: str) -> QueueSpec | None:
        return next((q for q in self.queues if q.name == name), None)

    def policy(self, name: str) -> PolicySpec | None:
        return next((p for p in self.policies if p.name == name), None)


def plan(settings: Settings) -> Topology:
    """The topology the settings call for: the single source of apply, export and diff."""
    names = Names(settings.prefix)
    shared = shared_queue_arguments(settings)
    topo = Topology(vhost=settings.vhost)
    topo.exchanges += [
        ExchangeSpec(names.unrouted_exchange, "fanout"),
        ExchangeSpec(names.requests_exchange, "direct",
                     {"alternate-exchange": names.unrouted_exchange}),
        ExchangeSpec(names.dead_letter_exchange, "fanout"),
        ExchangeSpec(names.retry_exchange, "headers"),
        # Cancels: every worker binds an exclusive queue of its own (pipeline.dispatch.cancels).
        ExchangeSpec(names.cancel_exchange, "fanout"),
    ]
    # Fanout and headers exchanges ignore the routing key: it is the queue's name, as
    # aio-pika binds by default (brokers applied by earlier versions have exactly these).
    topo.queues += [QueueSpec(names.triage_queue, dict(shared)),
                    QueueSpec(names.parked_queue, dict(shared)),
                    QueueSpec(names.workers_queue, dict(shared))]  # presence, never published to
    topo.bindings += [
        BindingSpec(names.unrouted_exchange, names.triage_queue, names.triage_queue),
        BindingSpec(names.dead_letter_exchange, names.triage_queue, names.triage_queue),
    ]
    for delay in retry_delays(settings):
        tier = names.retry_queue(delay)
        topo.queues.append(QueueSpec(tier, retry_queue_arguments(settings, delay)))
        topo.bindings.append(BindingSpec(names.retry_exchange, tier, tier,
                                         {"x-match": "all", H_RETRY_TIER: str(delay)}))
    for pool in settings.pools:
        qname = names.work_queue(pool.name)
        topo.queues.append(QueueSpec(qname, work_queue_arguments(settings, pool)))
        topo.bindings += [BindingSpec(names.requests_exchange, qname, model)
                          for model in pool.models]
        topo.owned_routes.append((names.requests_exchange, qname))
        if pool.scheduling.policy == "fair":
            topo.queues += [QueueSpec(lane, lane_queue_arguments(settings, pool))
                            for lane in LaneMap(names, pool.name, pool.scheduling).queues()]
        policy = work_policy(settings, pool)
        topo.policies.append(PolicySpec(
            names.work_policy(pool.name), pattern=policy["pattern"],
            apply_to=policy["apply-to"], priority=policy["priority"],
            definition=policy["definition"]))
    return topo


# -- declaring it ------------------------------------------------------------------------


@dataclass
class TopologyReport:
    """What ``apply_topology`` declared, for the CLI to print."""

    exchanges: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    bindings: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    unbound: list[str] = field(default_factory=list)
    #: Per quorum pool, the priority semantics the broker's version gives it.
    priorities: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"exchange {name}" for name in self.exchanges]
        out += [f"queue    {name}" for name in self.queues]
        out += [f"binding  {name}" for name in self.bindings]
        out += [f"policy   {name}" for name in self.policies]
        out += [f"unbound  {name} (model no longer in the config)" for name in self.unbound]
        out += [f"priority {line}" for line in self.priorities]
        return out


def _explain(exc: aiormq.exceptions.AMQPError, what: str) -> TopologyError:
    text = str(exc.args[1] if len(exc.args) > 1 else exc)
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return TopologyError(
            f"{what} already exists with different arguments ({text}). The broker cannot "
            "change them in place: keep the old value in the config, or delete the object "
            "(its messages are lost) and apply again."
        )
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return TopologyError(f"not allowed to declare {what} ({text}): check the user's "
                             "configure permission on this vhost")
    return TopologyError(f"declaring {what} failed: {text}")


async def _declare(what: str, action: Awaitable[T]) -> T:
    """Run one declaration; a refused one closes its channel, so explain and stop."""
    try:
        return await action
    except aiormq.exceptions.AMQPError as exc:
        raise _explain(exc, what) from None


async def apply_topology(settings: Settings) -> TopologyReport:
    """Declare exchanges, queues, bindings and policies; safe to run any number of times."""
    topo = plan(settings)
    report = TopologyReport()
    connection = await connect(settings, name="hutch topology apply")
    async with connection, ManagementAPI.from_settings(settings, connection=connection) as api:
        # Without the API the queues would be left without their policy: check it first.
        await api.check()
        # A queue's type never changes in place: a pool switched to (or from) quorum is a
        # migration the operator runs, never something apply does on the side.
        refuse_type_changes(type_changes(((q.name, q.arguments) for q in topo.queues),
                                         await api.list_queues(topo.vhost)))
        version = broker_identity(connection).version
        report.priorities = [
            f"{pool.name} (quorum, RabbitMQ {version or '?'}): {priority_semantics(version)}"
            for pool in settings.pools if pool.queue_type == "quorum"]
        # Policies first: a work queue created below has its dead-lettering and limits
        # from its first message on.
        for policy in topo.policies:
            await api.put_policy(topo.vhost, policy.name, pattern=policy.pattern,
                                 definition=policy.definition, apply_to=policy.apply_to,
                                 priority=policy.priority)
            report.policies.append(policy.name)

        channel = await connection.channel()
        exchanges: dict[str, AbstractExchange] = {}
        queues: dict[str, AbstractQueue] = {}
        for ex in topo.exchanges:
            exchanges[ex.name] = await _declare(f"exchange {ex.name!r}", channel.declare_exchange(
                ex.name, aio_pika.ExchangeType(ex.type), durable=ex.durable,
                auto_delete=ex.auto_delete, internal=ex.internal,
                arguments=ex.arguments or None))
            report.exchanges.append(ex.name)
        for q in topo.queues:
            queues[q.name] = await _declare(f"queue {q.name!r}", channel.declare_queue(
                q.name, durable=q.durable, auto_delete=q.auto_delete,
                arguments=q.arguments or None))
            report.queues.append(q.name)
        for binding in topo.bindings:
            assert binding.destination_type == "queue", binding
            await _declare(f"binding {binding.label()}", queues[binding.destination].bind(
                exchanges[binding.source], routing_key=binding.routing_key,
                arguments=binding.arguments or None))
            report.bindings.append(binding.label())
        # Models removed from the config must stop routing to their old pool.
        wanted = {b.key() for b in topo.bindings}
        for source, destination in topo.owned_routes:
            for live in await api.queue_bindings(topo.vhost, source, destination):
                stale = BindingSpec(source, destination, live.get("routing_key", ""),
                                    live.get("arguments") or {})
                if stale.key() not in wanted:
                    await _declare(f"unbinding {stale.label()}", queues[destination].unbind(
                        exchanges[source], routing_key=stale.routing_key,
                        arguments=stale.arguments or None))
                    report.unbound.append(f"{source} --{stale.routing_key}--> {destination}")
    return report


async def delete_topology(settings: Settings, reply_queues: list[str] | None = None) -> None:
    """Remove everything ``apply_topology`` declared, and the given clients' reply queues
    (the demo cleans up this way)."""
    topo = plan(settings)
    names = Names(settings.prefix)
    connection = await connect(settings, name="hutch topology delete")
    async with connection, ManagementAPI.from_settings(settings, connection=connection) as api:
        channel = await connection.channel()
        for policy in topo.policies:
            await api.delete_policy(topo.vhost, policy.name)
        clients = [names.reply_queue(client) for client in reply_queues or []]
        for qname in [q.name for q in topo.queues] + clients:
            await channel.queue_delete(qname)
        for ex in topo.exchanges:
            await channel.exchange_delete(ex.name)
