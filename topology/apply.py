"""Declare Hutch's broker topology from the settings, idempotently.

What is declared, and why each piece exists, follows the data::

    client --publish--> <p>.requests (direct; alternate exchange <p>.unrouted)
        routing key = model ---> <p>.work.<pool> (classic, x-max-priority)
        unknown model ---------> <p>.unrouted (fanout) ---> <p>.triage
    <p>.work.<pool> --expired / queue full--> <p>.dlx (fanout) ---> <p>.triage
    worker: transient failure --> <p>.retry (headers) --> <p>.retry.<delay>ms
        --TTL expires--> <p>.requests (same model, same priority: any backend may take it)
    worker: <p>.triage --error reply, then--> <p>.parked (the parking lot)

Queue arguments that can never change (``x-max-priority``) are declared; everything an
operator may want to tune (dead-lettering, max length, overflow, TTL) is one policy per
work queue, set through the management API.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractQueue

from pipeline.exceptions import TopologyError
from pipeline.protocol import H_RETRY_TIER
from pipeline.settings import PoolSettings, Settings
from topology.management import ManagementAPI
from topology.names import Names

T = TypeVar("T")

__all__ = [
    "TopologyReport",
    "apply_topology",
    "delete_topology",
    "retry_delays",
    "retry_queue_arguments",
    "work_policy",
    "work_queue_arguments",
]


def work_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments fixed at declaration: the broker refuses to change them later."""
    return {"x-queue-type": "classic", "x-max-priority": settings.max_priority}


def retry_delays(settings: Settings) -> list[int]:
    """Every retry tier any pool uses (tiers are shared: they route back by model)."""
    return sorted({delay for pool in settings.pools for delay in pool.retry_delays_ms})


def retry_queue_arguments(settings: Settings, delay_ms: int) -> dict[str, Any]:
    """A tier's TTL is its identity, so it is an argument, not a policy: every message in
    it has the same TTL and expires at the head, in order."""
    return {"x-queue-type": "classic", "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": Names(settings.prefix).requests_exchange}


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
    return {
        "pattern": f"^{re.escape(names.work_queue(pool.name))}$",
        "apply-to": "queues",
        "priority": 0,
        "definition": definition,
    }


@dataclass
class TopologyReport:
    """What ``apply_topology`` declared, for the CLI to print."""

    exchanges: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    bindings: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    unbound: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"exchange {name}" for name in self.exchanges]
        out += [f"queue    {name}" for name in self.queues]
        out += [f"binding  {name}" for name in self.bindings]
        out += [f"policy   {name}" for name in self.policies]
        out += [f"unbound  {name} (model no longer in the config)" for name in self.unbound]
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
    names = Names(settings.prefix)
    report = TopologyReport()
    base, user, password = settings.management_api()
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except (OSError, aiormq.exceptions.AMQPError) as exc:
        raise TopologyError(
            f"cannot connect to RabbitMQ at {settings.redacted_amqp_url()}: {exc!r}"
        ) from None
    async with connection, ManagementAPI(base, user, password) as api:
        # Without the API the queues would be left without their policy: check it first.
        await api.check()
        channel = await connection.channel()

        async def exchange(name: str, kind: aio_pika.ExchangeType,
                           arguments: dict[str, Any] | None = None) -> AbstractExchange:
            result = await _declare(f"exchange {name!r}", channel.declare_exchange(
                name, kind, durable=True, arguments=arguments))
            report.exchanges.append(name)
            return result

        async def queue(name: str, arguments: dict[str, Any]) -> AbstractQueue:
            result = await _declare(f"queue {name!r}", channel.declare_queue(
                name, durable=True, arguments=arguments))
            report.queues.append(name)
            return result

        unrouted = await exchange(names.unrouted_exchange, aio_pika.ExchangeType.FANOUT)
        requests = await exchange(names.requests_exchange, aio_pika.ExchangeType.DIRECT,
                                  {"alternate-exchange": names.unrouted_exchange})
        dlx = await exchange(names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT)

        classic = {"x-queue-type": "classic"}
        triage = await queue(names.triage_queue, classic)
        await triage.bind(unrouted)
        await triage.bind(dlx)
        report.bindings += [f"{names.unrouted_exchange} -> {names.triage_queue}",
                            f"{names.dead_letter_exchange} -> {names.triage_queue}"]
        await queue(names.parked_queue, classic)

        retry = await exchange(names.retry_exchange, aio_pika.ExchangeType.HEADERS)
        for delay in retry_delays(settings):
            tier = await queue(names.retry_queue(delay), retry_queue_arguments(settings, delay))
            await tier.bind(retry, arguments={"x-match": "all", H_RETRY_TIER: str(delay)})
            report.bindings.append(f"{names.retry_exchange} --{H_RETRY_TIER}={delay}--> "
                                   f"{tier.name} --{delay} ms--> {names.requests_exchange}")

        for pool in settings.pools:
            qname = names.work_queue(pool.name)
            work = await queue(qname, work_queue_arguments(settings))
            for model in pool.models:
                await work.bind(requests, routing_key=model)
                report.bindings.append(f"{names.requests_exchange} --{model}--> {qname}")
            # Models removed from the config must stop routing here.
            for binding in await api.queue_bindings(settings.vhost, names.requests_exchange,
                                                    qname):
                key = binding.get("routing_key", "")
                if key not in pool.models:
                    await work.unbind(requests, routing_key=key)
                    report.unbound.append(f"{names.requests_exchange} --{key}--> {qname}")
            policy = work_policy(settings, pool)
            await api.put_policy(settings.vhost, names.work_policy(pool.name),
                                 pattern=policy["pattern"], definition=policy["definition"],
                                 apply_to=policy["apply-to"], priority=policy["priority"])
            report.policies.append(names.work_policy(pool.name))
    return report


async def delete_topology(settings: Settings, reply_queues: list[str] | None = None) -> None:
    """Remove everything ``apply_topology`` declared, and the given clients' reply queues
    (the demo cleans up this way)."""
    names = Names(settings.prefix)
    base, user, password = settings.management_api()
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection, ManagementAPI(base, user, password) as api:
        channel = await connection.channel()
        for pool in settings.pools:
            await api.delete_policy(settings.vhost, names.work_policy(pool.name))
            await channel.queue_delete(names.work_queue(pool.name))
        clients = [names.reply_queue(client) for client in reply_queues or []]
        tiers = [names.retry_queue(delay) for delay in retry_delays(settings)]
        for qname in (names.triage_queue, names.parked_queue, *tiers, *clients):
            await channel.queue_delete(qname)
        for ename in (names.requests_exchange, names.unrouted_exchange,
                      names.dead_letter_exchange, names.retry_exchange):
            await channel.exchange_delete(ename)
