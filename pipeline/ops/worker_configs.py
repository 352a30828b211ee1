"""Which configuration each live worker runs, and where workers disagree (``hutch status``).

Every worker's presence consumer on ``<prefix>.workers`` carries its configuration stamp
(:mod:`pipeline.worker.reload_stamp`): generation, hash, when it was loaded, and each
backend's cap and URL hash. The management API lists the consumers of that queue with
their arguments, so this needs neither the workers' metrics nor any worker to be asked.

Two workers that disagree about a backend's URL or cap are a configuration rolled out to
part of the fleet: whichever holds the backend's lease serves it with its own values. The
report names them; the workers themselves hold the stricter cap (see the docs, page
Reloading the config).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.errors import TopologyError
from pipeline.ops.leases import connection_label
from pipeline.settings import Settings
from pipeline.worker.reload_stamp import ConfigStamp

__all__ = [
    "Disagreement",
    "WorkerConfig",
    "config_notes",
    "config_table",
    "disagreements",
    "read_worker_configs",
    "worker_configs",
]


@dataclass
class WorkerConfig:
    """One live worker and its stamp (None: a worker that shows none, an older version)."""

    worker: str
    generation: int | None = None
    hash: str | None = None
    loaded_at: float | None = None
    backends: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Disagreement:
    """Workers that disagree about one backend's ``what`` (``max_concurrency``, ``url``):
    each value (a URL as its hash) with the workers that have it."""

    backend: str
    what: str
    values: dict[str, list[str]]

    def text(self) -> str:
        sides = "; ".join(f"{value} on {', '.join(workers)}"
                          for value, workers in sorted(self.values.items()))
        return f"backend {self.backend}: workers disagree about its {self.what} ({sides})"


async def _worker_config(api: ManagementAPI, consumer: dict[str, Any]) -> WorkerConfig:
    channel = consumer.get("channel_details") or {}
    name = str(channel.get("connection_name") or "?")
    worker = connection_label(await api.get_connection(name), name)
    stamp = ConfigStamp.parse(consumer.get("arguments"))
    if stamp is None:
        return WorkerConfig(worker)
    return WorkerConfig(worker, stamp.generation, stamp.hash, stamp.loaded_at, stamp.backends)


async def worker_configs(api: ManagementAPI, settings: Settings) -> list[WorkerConfig]:
    """Every consumer of the presence queue: a live worker and what it runs."""
    queue = await api.get_queue(settings.vhost, Names(settings.prefix).workers_queue)
    consumers = [c for c in (queue or {}).get("consumer_details") or []
                 if isinstance(c, dict)]
    found = await asyncio.gather(*(_worker_config(api, c) for c in consumers))
    return sorted(found, key=lambda config: config.worker)


def disagreements(configs: list[WorkerConfig]) -> list[Disagreement]:
    """Backends two or more workers see with a different cap or URL."""
    out: list[Disagreement] = []
    names = sorted({backend for config in configs for backend in config.backends})
    for backend in names:
        for what, index in (("max_concurrency", 0), ("url", 1)):
            values: dict[str, list[str]] = {}
            for config in configs:
                entry = config.backends.get(backend)
                if entry is not None and len(entry) > index:
                    values.setdefault(str(entry[index]), []).append(config.worker)
            if len(values) > 1:
                out.append(Disagreement(backend, what, values))
    return out


async def read_worker_configs(settings: Settings) -> list[WorkerConfig]:
    """:func:`worker_configs` on a management API client of its own; empty when the API
    cannot say (``hutch status`` reports the API's error elsewhere)."""
    try:
        async with ManagementAPI.from_settings(settings) as api:
            return await worker_configs(api, settings)
    except TopologyError:
        return []


def config_table(configs: list[WorkerConfig], expected: str
                 ) -> tuple[list[str], list[list[str]]]:
    """The workers table of ``hutch status``: each worker's generation, config hash
    (marked when it is not ``expected``, the hash of the file status was given) and when
    it loaded it."""
    rows = []
    for config in configs:
        loaded = ("-" if config.loaded_at is None else
                  time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(config.loaded_at)))
        shown = config.hash or "-"
        if config.hash is not None and config.hash != expected:
            shown += " (not this file's)"
        rows.append([config.worker, "-" if config.generation is None
                     else str(config.generation), shown, loaded])
    return ["WORKER", "GENERATION", "CONFIG", "LOADED (UTC)"], rows


def config_notes(configs: list[WorkerConfig], expected: str) -> list[str]:
    """Disagreements between workers, and workers running another configuration."""
    lines = [d.text() + " (the stricter cap holds)" if d.what == "max_concurrency"
             else d.text() for d in disagreements(configs)]
    other = [c.worker for c in configs if c.hash is not None and c.hash != expected]
    if other:
        lines.append(f"{len(other)} worker(s) run another config than this file ({expected}): "
                     "reload them (SIGHUP) or check which file they read")
    return lines
