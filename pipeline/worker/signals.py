"""A leased backend's saturation metrics, scraped while this worker holds its lease.

Only the lease holder sets the backend's limit, so only it scrapes. Each reading (every
``interval_s``) goes to the backend's health (:meth:`BackendHealthReporter.saturation`)
and from there to its limit; an unknown reading (missing, slow, malformed or stale
metrics: :mod:`pipeline.backends.saturation`) leaves the limit to refusals and latency.
The reader logs one line when readings become known or unknown, never one per scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipeline.backends.saturation import SaturationReader
from pipeline.observe.log import get_logger
from pipeline.worker.health import BackendHealthReporter

__all__ = ["SCRAPE_INTERVAL_S", "watch_saturation"]

log = get_logger("hutch.capacity")

#: How often the lease holder reads a backend's metrics.
SCRAPE_INTERVAL_S = 0.5


async def watch_saturation(health: BackendHealthReporter,
                           reader: Callable[[], SaturationReader | None], *,
                           interval_s: float = SCRAPE_INTERVAL_S) -> None:
    """Scrape until cancelled (the lease ends). ``reader()`` is asked each round: a
    reload that re-points the backend gives it a new one."""
    while True:
        current = reader()
        if current is None:
            health.saturation(None)
            await asyncio.sleep(interval_s)
            continue
        try:
            reading = await current.refresh()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a parser must not end the lease
            log.warning("backend.metrics_error", backend=health.backend, error=repr(exc))
        else:
            health.saturation(reading if reading.known else None)
        await asyncio.sleep(interval_s)
