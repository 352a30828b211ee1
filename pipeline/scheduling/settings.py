"""The scheduler's settings: tenants (weights, ceilings, quotas) and a pool's bands.

Part of the one settings model (:mod:`pipeline.settings` holds them as ``Settings.tenants``
and ``PoolSettings.scheduling``); imported by it, so it must not import it back.

A request's tenant is who the broker says sent it (its validated ``user_id``, or the
identity a trusted publisher such as the gateway vouches for in ``x-hutch-user``). Tenants
need no declaration to be served fairly; ``[tenants.<name>]`` only gives one a weight, a
priority ceiling, a token quota, or lists the users (a team) that share it.
"""

from __future__ import annotations

import itertools
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DEFAULT_TENANT",
    "QUORUM_LANES",
    "BandSettings",
    "PoolScheduling",
    "TenantSettings",
    "check_tenants",
]

#: Lanes per band of a quorum pool unless ``lanes`` is set (each is a Raft group).
QUORUM_LANES = 4

#: The tenant of a request that carries no identity (no ``user_id``, nobody vouching).
DEFAULT_TENANT = "default"

# Tenant and band names become metric labels and lane names: keep them boring.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantSettings(_Strict):
    """What the configuration may say about one tenant (all optional)."""

    #: Share of a backend while others are backlogged too: weight 2 gets twice the tokens
    #: of weight 1. Must be positive.
    weight: float = Field(default=1.0, gt=0, le=1000)
    #: Requests with a higher AMQP priority are served as if they had this one (their band
    #: and their order among the tenant's own requests follow the lowered priority).
    max_priority: int | None = Field(default=None, ge=0, le=255)
    #: Tokens (prompt + completion) per minute this tenant is served at full standing;
    #: beyond it its requests are "overflow": served only from capacity nobody else wants.
    tokens_per_minute: int | None = Field(default=None, ge=0)
    #: Beyond the quota: ``overflow`` (the default) or ``reject`` (answered ``quota_exceeded``,
    #: HTTP 429 at the gateway).
    over_quota: Literal["overflow", "reject"] = "overflow"
    #: Broker users or gateway identities that belong to this tenant (a team); a user not
    #: listed under any tenant is a tenant of its own.
    users: list[str] = Field(default_factory=list)


class BandSettings(_Strict):
    """A band: the AMQP priorities from ``min_priority`` up to the next band's minimum."""

    #: Part of lane names (``<prefix>.lane.<pool>.<band>.<n>``): no dots.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,30}$")
    min_priority: int = Field(ge=0, le=255)


class PoolScheduling(_Strict):
    """How a pool's requests are ordered at each of its backends."""

    #: ``fair``: bands first (strict), then the tenant with the lowest weighted virtual
    #: token counter, then priority and arrival inside a tenant. ``fifo``: priority and
    #: arrival only (Hutch before tenants existed).
    policy: Literal["fair", "fifo"] = "fair"
    #: Requests each backend's consumer holds beyond its free slots, so a freed slot starts
    #: the next request without a broker round trip and the scheduler has a choice. 0: the
    #: prefetch is exactly the free slots (the broker picks, by priority and arrival).
    lookahead: int = Field(default=4, ge=0, le=1000)
    #: Per band, the queues (``<prefix>.lane.<pool>.<band>.<n>``) a saturated backend sorts
    #: waiting requests into by tenant, so one tenant's flood never hides another's request
    #: behind it in the pool's queue. Tenants beyond this many share lanes. Quorum pools:
    #: 4 unless set (each quorum lane is a Raft group on every node).
    lanes: int = Field(default=16, ge=1, le=256)
    #: Priority bands, strict: every request of a higher band before any of a lower one.
    bands: list[BandSettings] = Field(
        default_factory=lambda: [BandSettings(name="default", min_priority=0)],
        min_length=1, max_length=8)
    #: Cost of a request in virtual tokens: ``prompt_weight x prompt tokens +
    #: completion_weight x completion tokens`` (VTC's usual 1 : 2).
    prompt_weight: float = Field(default=1.0, ge=0, le=100)
    completion_weight: float = Field(default=2.0, ge=0, le=100)

    @field_validator("bands")
    @classmethod
    def _bands(cls, value: list[BandSettings]) -> list[BandSettings]:
        if value[0].min_priority != 0:
            raise ValueError("the first band must start at min_priority 0")
        for lower, higher in itertools.pairwise(value):
            if higher.min_priority <= lower.min_priority:
                raise ValueError(f"band {higher.name!r}: min_priority must rise from band "
                                 f"to band ({higher.min_priority} after {lower.min_priority})")
        if len({band.name for band in value}) != len(value):
            raise ValueError("band names must be unique")
        return value

    @model_validator(mode="after")
    def _weights(self) -> PoolScheduling:
        if self.prompt_weight == 0 and self.completion_weight == 0:
            raise ValueError("prompt_weight and completion_weight cannot both be 0")
        return self

    def band_of(self, priority: int) -> int:
        """The index of the band ``priority`` falls in (0: the lowest band)."""
        index = 0
        for i, band in enumerate(self.bands):
            if priority >= band.min_priority:
                index = i
        return index


def check_tenants(tenants: dict[str, TenantSettings]) -> None:
    """Tenant names are labels, and a user belongs to one tenant at most."""
    owner: dict[str, str] = {}
    for name, tenant in tenants.items():
        if not re.match(_NAME, name):
            raise ValueError(f"tenants.{name}: the name must match {_NAME}")
        for user in tenant.users:
            if user in owner:
                raise ValueError(f"tenants.{name}.users: user {user!r} already belongs to tenant "
                                 f"{owner[user]!r}")
            owner[user] = name
