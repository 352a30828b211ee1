"""The options of the ``partition`` scenario (each one a command-line flag): the
backend, the load, the partition's timeline, the modes and pool types to measure."""

from __future__ import annotations

from dataclasses import dataclass

from hutch_bench.scenarios.partition_net import MODES
from pipeline.errors import ConfigError

__all__ = ["QUEUE_TYPES", "PartitionOptions"]

QUEUE_TYPES = ("quorum", "classic")


@dataclass(frozen=True)
class PartitionOptions:
    #: The backend's cap (its one lease's max_concurrency) and its service time.
    cap: int = 4
    service_ms: float = 4000.0
    #: Offered load, as a multiple of the backend's capacity (cap / service time).
    load: float = 1.5
    partition_at_s: float = 10.0
    partition_s: float = 12.0
    after_heal_s: float = 10.0
    tail_s: float = 6.0
    #: Comma-separated: cluster_partition_handling values, pool queue types.
    modes: str = "pause_minority,ignore,autoheal"
    queue_types: str = "quorum,classic"
    timeout_s: float = 120.0
    lease_retry_s: float = 0.5
    sample_s: float = 0.1
    node_timeout_s: float = 150.0
    seed: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        for value, known, flag in ((self.modes, MODES, "--modes"),
                                   (self.queue_types, QUEUE_TYPES, "--queue-types")):
            items = [v.strip() for v in value.split(",") if v.strip()]
            unknown = [v for v in items if v not in known]
            if not items or unknown:
                raise ConfigError(f"{flag} {value!r}: give some of {', '.join(known)}")

    @property
    def load_s(self) -> float:
        """The load's duration: partition, heal, after the heal, a tail."""
        return self.partition_at_s + self.partition_s + self.after_heal_s + self.tail_s

    @property
    def rate(self) -> float:
        """Offered requests per second."""
        return self.load * self.cap * 1000 / self.service_ms

    @property
    def mode_list(self) -> list[str]:
        return [m.strip() for m in self.modes.split(",") if m.strip()]

    @property
    def queue_type_list(self) -> list[str]:
        return [q.strip() for q in self.queue_types.split(",") if q.strip()]
