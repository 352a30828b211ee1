"""The tenants part of ``hutch status``: who waits where, and who got what share.

The broker knows how many requests wait in each lane (the management API); the workers
know each tenant's requests waiting for a permit and the tokens served to it (their
``/metrics``, summed over the URLs given). A tenant's lane follows from its name (the same
hash the workers use), so the table says where in the RabbitMQ UI its backlog sits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric

from pipeline.broker.names import Names
from pipeline.scheduling.lanes import LaneMap
from pipeline.settings import Settings

__all__ = ["TENANT_FAMILIES", "TenantStatus", "TenantValues", "tenant_rows", "tenant_values"]

#: The worker metrics the table reads (counters without their ``_total``).
TENANT_FAMILIES = ("hutch_tenant_waiting", "hutch_tenant_tokens")

#: {family: {(pool, tenant): value}}, summed over the workers read.
TenantValues = dict[str, dict[tuple[str, str], float]]


@dataclass
class TenantStatus:
    pool: str
    tenant: str
    #: Requests waiting for a permit at the workers read.
    waiting: int
    #: The lanes its requests are sorted into (one per band) and what waits there now.
    lanes: list[str]
    lane_messages: int | None
    tokens: int
    #: Its part of the tokens the pool served (since the workers started), in percent.
    share: float | None


def tenant_values(families: Iterable[Metric], into: TenantValues) -> None:
    """Add one worker's tenant samples to ``into``."""
    for family in families:
        if family.name not in TENANT_FAMILIES:
            continue
        bucket = into.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name not in (family.name, family.name + "_total"):
                continue
            key = (sample.labels.get("pool", "-"), sample.labels.get("tenant", "-"))
            bucket[key] = bucket.get(key, 0.0) + sample.value


def tenant_rows(settings: Settings, values: TenantValues,
                lane_depths: dict[str, int | None]) -> list[TenantStatus]:
    """One row per tenant the workers reported, by pool, most tokens first."""
    names = Names(settings.prefix)
    waiting, tokens = values.get(TENANT_FAMILIES[0], {}), values.get(TENANT_FAMILIES[1], {})
    rows = []
    for pool in settings.pools:
        lanes = LaneMap(names, pool.name, pool.scheduling)
        tenants = {t for p, t in (*waiting, *tokens) if p == pool.name}
        total = sum(v for (p, _), v in tokens.items() if p == pool.name)
        for tenant in tenants:
            mine = lanes.lanes_of(tenant) if pool.scheduling.policy == "fair" else []
            depths = [lane_depths.get(lane) for lane in mine]
            served = int(tokens.get((pool.name, tenant), 0))
            rows.append(TenantStatus(
                pool.name, tenant, int(waiting.get((pool.name, tenant), 0)), mine,
                None if None in depths else sum(d or 0 for d in depths), served,
                round(100 * served / total, 1) if total else None))
    return sorted(rows, key=lambda r: (r.pool, -r.tokens, r.tenant))


def tenant_table(rows: list[TenantStatus]) -> tuple[list[str], list[list[str]]]:
    """The header and rows ``hutch status`` prints."""
    header = ["POOL", "TENANT", "WAITING", "LANE", "IN LANE", "TOKENS", "SHARE %"]
    body = [[r.pool, r.tenant, str(r.waiting), r.lanes[-1] if r.lanes else "-",
             "-" if r.lane_messages is None else str(r.lane_messages), str(r.tokens),
             "-" if r.share is None else f"{r.share:g}"] for r in rows]
    return header, body
