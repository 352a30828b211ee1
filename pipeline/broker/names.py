"""The names of every exchange, queue and policy, derived from one prefix.

The names are part of the wire contract (clients in any language publish to them), so
they are computed in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Names"]


@dataclass(frozen=True)
class Names:
    prefix: str = "llm"

    @property
    def requests_exchange(self) -> str:
        """Direct exchange clients publish to; routing key = model name."""
        return f"{self.prefix}.requests"

    @property
    def unrouted_exchange(self) -> str:
        """Alternate exchange of the request exchange: catches unknown models."""
        return f"{self.prefix}.unrouted"

    @property
    def dead_letter_exchange(self) -> str:
        """Where the broker dead-letters work queue messages (expired, queue full)."""
        return f"{self.prefix}.dlx"

    @property
    def triage_queue(self) -> str:
        """Workers consume it: every dead or unrouted request gets its error reply here."""
        return f"{self.prefix}.triage"

    @property
    def parked_queue(self) -> str:
        """The parking lot: terminal failures, kept for inspection and replay."""
        return f"{self.prefix}.parked"

    @property
    def workers_queue(self) -> str:
        """Presence: every worker consumes it once and nothing is published to it, so its
        consumer count is the number of live workers (their fair share of the leases)."""
        return f"{self.prefix}.workers"

    @property
    def cancel_exchange(self) -> str:
        """Fanout exchange of cancels: every worker binds an exclusive queue to it."""
        return f"{self.prefix}.cancel"

    def cancel_queue(self, worker: str) -> str:
        """One worker's exclusive queue of cancels (``worker``: a unique id per process)."""
        return f"{self.prefix}.cancel.{worker}"

    @property
    def retry_exchange(self) -> str:
        """Headers exchange in front of the retry tiers (routes on x-hutch-retry-tier, so
        the routing key can stay the model and route the request back when it expires)."""
        return f"{self.prefix}.retry"

    def retry_queue(self, delay_ms: int) -> str:
        """A retry tier: a fixed x-message-ttl, then dead-lettered to the request exchange."""
        return f"{self.prefix}.retry.{delay_ms}ms"

    def pause_queue(self, pool: str) -> str:
        """While this (empty, durable) queue exists, workers take no new work from
        ``pool``: an operator can pause a pool in the management UI by creating it."""
        return f"{self.prefix}.paused.{pool}"

    def work_queue(self, pool: str) -> str:
        return f"{self.prefix}.work.{pool}"

    def lane_queue(self, pool: str, band: str, lane: int) -> str:
        """One of a pool's lanes: a saturated backend sorts waiting requests into them by
        tenant (:mod:`pipeline.worker.lanes`), so a flood does not hide others' requests."""
        return f"{self.lane_prefix(pool)}{band}.{lane}"

    def lane_prefix(self, pool: str) -> str:
        """What every lane of ``pool`` starts with."""
        return f"{self.lanes_prefix}{pool}."

    @property
    def lanes_prefix(self) -> str:
        """What every lane of every pool starts with."""
        return f"{self.prefix}.lane."

    def work_policy(self, pool: str) -> str:
        return f"{self.prefix}.work.{pool}"

    def reply_queue(self, client_id: str) -> str:
        return f"{self.prefix}.reply.{client_id}"

    def lease_queue(self, backend: str) -> str:
        """Exclusive queue whose holder alone may consume for ``backend``."""
        return f"{self.prefix}.lease.{backend}"
