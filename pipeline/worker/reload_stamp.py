"""What configuration a worker runs, as it shows it to ``hutch status``.

Every worker consumes the presence queue ``<prefix>.workers`` once
(:mod:`pipeline.worker.presence`); the consumer's arguments carry this stamp: the
configuration's generation in this process (1 at start, +1 per applied reload), its hash
(:func:`~pipeline.worker.config_diff.config_hash`), when it was loaded, and each backend's
cap and URL hash. The broker keeps it exact (it goes with the connection) and the
management API lists it per consumer, so ``hutch status`` can show every live worker's
configuration and find two workers that disagree about a backend, without a metrics URL.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.settings import Settings
from pipeline.worker.config_diff import config_hash, url_hash

__all__ = ["ARGUMENT", "ConfigStamp"]

#: The presence consumer's argument holding the stamp (JSON text).
ARGUMENT = "x-hutch-config"


@dataclass(frozen=True)
class ConfigStamp:
    """A worker's configuration, in short."""

    generation: int
    hash: str
    loaded_at: float
    #: backend -> [max_concurrency, url hash]
    backends: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Settings, generation: int = 1,
           loaded_at: float | None = None) -> ConfigStamp:
        return cls(generation, config_hash(settings),
                   time.time() if loaded_at is None else loaded_at,
                   {b.name: [b.max_concurrency, url_hash(b.url)]
                    for pool in settings.pools for b in pool.backends})

    def next(self, settings: Settings) -> ConfigStamp:
        """The stamp of a reload to ``settings``."""
        return ConfigStamp.of(settings, self.generation + 1)

    def arguments(self) -> dict[str, str]:
        """The presence consumer's arguments."""
        return {ARGUMENT: json.dumps({"generation": self.generation, "hash": self.hash,
                                      "loaded_at": round(self.loaded_at, 3),
                                      "backends": self.backends}, sort_keys=True)}

    @classmethod
    def parse(cls, arguments: dict[str, Any] | None) -> ConfigStamp | None:
        """The stamp in a consumer's arguments; None if absent or unreadable (a worker of
        an older version)."""
        text = (arguments or {}).get(ARGUMENT)
        if not isinstance(text, str):
            return None
        try:
            data = json.loads(text)
            return cls(int(data["generation"]), str(data["hash"]), float(data["loaded_at"]),
                       {str(k): list(v) for k, v in dict(data["backends"]).items()})
        except (ValueError, KeyError, TypeError):
            return None
