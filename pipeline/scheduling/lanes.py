"""A pool's lanes: where a saturated backend sorts waiting requests by tenant.

The pool's queue stays the intake (the wire contract is unchanged). While a backend has
every permit taken and more requests wait than its lookahead, the one its policy would
serve last is moved (published, confirmed, then acked) into a lane of its band chosen by
its tenant, ``<prefix>.lane.<pool>.<band>.<n>``. Every backend of the pool consumes every
lane, one head at a time, beside the pool's queue: so a flood of one tenant drains out of
the intake into its lane and the next tenant's request behind it reaches the scheduler at
once, while the flood stays in the broker (durable, visible in the UI, bounded), never in
a worker. Lanes are fixed in number (``lanes`` per band, declared by ``hutch topology
apply``): tenants that hash to the same lane share it in arrival order.
"""

from __future__ import annotations

import zlib

from pipeline.broker.names import Names
from pipeline.delivery import Delivery
from pipeline.scheduling.settings import PoolScheduling

__all__ = ["LaneMap"]


class LaneMap:
    """The lanes of one pool and which one a request belongs in."""

    def __init__(self, names: Names, pool: str, scheduling: PoolScheduling) -> None:
        self._names = names
        self._pool = pool
        self._scheduling = scheduling

    @property
    def prefix(self) -> str:
        return self._names.lane_prefix(self._pool)

    def queues(self) -> list[str]:
        """Every lane of the pool, highest band first."""
        return [self._names.lane_queue(self._pool, band.name, n)
                for band in reversed(self._scheduling.bands)
                for n in range(self._scheduling.lanes)]

    def by_band(self) -> list[list[str]]:
        """Each band's lanes, lowest band first (band indexes as ``Delivery.band``)."""
        return [[self._names.lane_queue(self._pool, band.name, n)
                 for n in range(self._scheduling.lanes)] for band in self._scheduling.bands]

    def lane_for(self, delivery: Delivery) -> str:
        """The lane of the delivery's band its tenant hashes to (stable across workers)."""
        return self._lane(delivery.tenant, self._scheduling.bands[delivery.band].name)

    def lanes_of(self, tenant: str) -> list[str]:
        """The tenant's lane in each band, lowest band first."""
        return [self._lane(tenant, band.name) for band in self._scheduling.bands]

    def _lane(self, tenant: str, band: str) -> str:
        n = zlib.crc32(tenant.encode()) % self._scheduling.lanes
        return self._names.lane_queue(self._pool, band, n)
