"""A backend's concurrency limit as its settings ask for it: fixed, or adaptive."""

from __future__ import annotations

from pipeline.capacity.limit import AdaptiveLimit, ConcurrencyLimit, FixedLimit
from pipeline.observe.log import get_logger
from pipeline.settings import BackendSettings

__all__ = ["concurrency_limit"]

log = get_logger("hutch.capacity")


def concurrency_limit(settings: BackendSettings) -> ConcurrencyLimit:
    """``max_concurrency`` (``concurrency = "fixed"``), or an adaptive limit below it
    that logs one line per change."""
    if settings.concurrency == "fixed":
        return FixedLimit(settings.max_concurrency)

    def changed(before: int, after: int, reason: str) -> None:
        log.info("backend.limit", backend=settings.name, before=before, after=after,
                 reason=reason)

    return AdaptiveLimit(settings.min_concurrency, settings.max_concurrency,
                         settings.start_concurrency, on_change=changed)
