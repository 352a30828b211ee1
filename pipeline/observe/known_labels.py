"""The label combinations a worker's counters can take, created at 0 when it starts.

A Prometheus series that appears only at its first event already holds 1 (or 8, after a
burst): ``rate()`` and ``increase()`` never see that step, so a burst of undeliverable
replies reads as 0 and ``HutchRepliesUndeliverable`` stays silent. Every combination known
in advance is therefore exported at 0 from the start: outcomes per pool, parking reasons,
retries by pool, stage and reason, retry tiers, cancels by stage, backend errors by kind,
tokens per model, stream counters per pool.

Left out on purpose: ``hutch_request_outcomes_total`` (pool x model x priority x outcome
is thousands of series; its per-pool sum is ``hutch_requests_total``, which is here) and
the histograms by priority (the same product, times their buckets). A retry reason that
comes from an unusual HTTP status (``http_507``) still appears at its first event.
"""

from __future__ import annotations

from pipeline import protocol as p
from pipeline.errors import BackendCallError
from pipeline.settings import Settings

__all__ = ["CALL_KINDS", "CANCEL_STAGES", "RETRY_REASONS", "known_series"]

#: ``call_ended``'s kinds that count as backend errors (``ok`` and ``deadline`` do not).
CALL_KINDS = ("throttled", "retryable", "terminal")
#: Where a request was cancelled (:class:`pipeline.outcome.Cancelled`).
CANCEL_STAGES = ("queued", "in_flight", "client_gone")
#: Final labels of a request besides the error codes.
_OUTCOMES = ("ok", "undeliverable", *(str(code) for code in p.ErrorCode))
#: Statuses a backend commonly fails with (``BackendCallError.reason``: ``http_<status>``).
_STATUS_REASONS = ("http_408", "http_500", "http_502", "http_503", "http_504")


def _class_reasons() -> list[str]:
    """The ``kind`` of every BackendCallError class (unreachable, timeout, throttled...)."""
    found: list[str] = []
    todo: list[type[BackendCallError]] = [BackendCallError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.kind is not None and cls.kind not in found:
            found.append(cls.kind)
    return sorted(found)


#: Every ``reason`` a retry is counted under, as far as it is known in advance.
RETRY_REASONS = (*_class_reasons(), *_STATUS_REASONS, "other")


def known_series(settings: Settings, no_pool: str) -> dict[str, list[tuple[str, ...]]]:
    """Label values to create at 0, by the name of the :class:`Metrics` attribute holding
    the family; ``no_pool`` is the pool label of requests that belong to no pool."""
    pools = [pool.name for pool in settings.pools]
    series: dict[str, list[tuple[str, ...]]] = {
        "requests": [(pool, outcome) for pool in [*pools, no_pool] for outcome in _OUTCOMES],
        "parked": [(str(reason),) for reason in p.ParkReason],
        "retries_by_reason": [(pool, stage, reason) for pool in pools
                              for stage in ("in_process", "tier") for reason in RETRY_REASONS],
        "cancels": [(pool, stage) for pool in pools for stage in CANCEL_STAGES],
        "stream_chunks": [(pool,) for pool in pools],
        "stream_messages": [(pool,) for pool in pools],
        "streams_in_flight": [(pool,) for pool in pools],
        "retries": [(pool.name, str(delay)) for pool in settings.pools
                    for delay in pool.retry_delays_ms],
        "tokens_used": [(pool.name, model, kind) for pool in settings.pools
                        for model in pool.models for kind in ("prompt", "completion")],
        "backend_errors": [(backend.name, kind) for pool in settings.pools
                           for backend in pool.backends for kind in CALL_KINDS],
        "backend_latency": [(backend.name,) for pool in settings.pools
                            for backend in pool.backends],
    }
    return series
