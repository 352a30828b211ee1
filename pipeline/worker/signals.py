"""A leased backend's saturation metrics, scraped while this worker holds its lease.

Only the lease holder sets the backend's limit, so only it scrapes. Each scrape (every
``interval_s``) goes to the backend's health (:meth:`BackendHealthReporter.saturation`)
and from there to its adaptive limit; a scrape that fails (missing, slow, malformed
metrics) tells it "unknown" and the limit falls back to refusals and latency. One log
line per change between readable and unreadable, never one per scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pipeline.capacity.limit import Saturation
from pipeline.observe.log import get_logger
from pipeline.worker.health import BackendHealthReporter

__all__ = ["SCRAPE_INTERVAL_S", "Scrape", "watch_saturation"]

log = get_logger("hutch.capacity")

#: How often the lease holder reads a backend's metrics.
SCRAPE_INTERVAL_S = 0.5

#: One scrape: the snapshot, or None when the metrics could not be read.
Scrape = Callable[[], Awaitable[Saturation | None]]


async def watch_saturation(health: BackendHealthReporter, scrape: Scrape, *,
                           interval_s: float = SCRAPE_INTERVAL_S) -> None:
    """Scrape until cancelled (the lease ends)."""
    readable: bool | None = None
    while True:
        try:
            snapshot = await scrape()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a parser must not end the lease
            log.warning("backend.metrics_error", backend=health.backend, error=repr(exc))
            snapshot = None
        if (snapshot is not None) != readable:
            readable = snapshot is not None
            log.info("backend.metrics", backend=health.backend,
                     state="readable" if readable else "unknown")
        health.saturation(snapshot)
        await asyncio.sleep(interval_s)
