"""A worker's first look at each backend: ``GET <url>/models`` when it starts.

A backend url without ``/v1`` answers 404 to every request; without this probe the first
sign is a failed request. The probe only logs (a backend that is down at start may come up
later; the circuit breaker judges the requests): a 404 says "check the backend url", no
connection says the backend is unreachable, any other answer is logged at debug.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpx

from pipeline.backends.http import Backend
from pipeline.observe.log import get_logger

__all__ = ["probe_backend", "probe_backends"]

log = get_logger("hutch.backend")

#: What a 404 to ``GET <url>/models`` means.
URL_HINT = ("check the backend url: GET <url>/models answered 404, so requests to "
            "<url>/chat/completions will too (an OpenAI-compatible base url usually "
            "ends in /v1)")


async def probe_backend(backend: Backend, timeout_s: float = 5.0) -> str:
    """Probe one backend and log what was found; returns ``ok``, ``not_found``,
    ``unreachable`` or ``status_<n>`` (for tests and callers that want it)."""
    try:
        response = await backend.probe(timeout_s)
    except httpx.HTTPError as exc:
        log.warning("backend.unreachable_at_start", backend=backend.name,
                    error=type(exc).__name__,
                    note="requests are retried; check the backend url and that it is up")
        return "unreachable"
    status = response.status_code
    if status == 404:
        log.warning("backend.url_not_found", backend=backend.name, status=status,
                    hint=URL_HINT)
        return "not_found"
    if status == 200:
        log.debug("backend.probed", backend=backend.name, status=status)
        return "ok"
    # 401/403 (a key), 405 (a server without /models): the requests will tell.
    log.info("backend.probed", backend=backend.name, status=status)
    return f"status_{status}"


async def probe_backends(backends: Iterable[Backend], timeout_s: float = 5.0) -> list[str]:
    """Probe every backend at once; never raises (a probe is advice, not a gate)."""
    results = await asyncio.gather(*(probe_backend(b, timeout_s) for b in backends),
                                   return_exceptions=True)
    out = []
    for result in results:
        if isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            log.debug("backend.probe_failed", error=repr(result))
            out.append("failed")
        else:
            out.append(result)
    return out
