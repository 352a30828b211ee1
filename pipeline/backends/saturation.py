"""How full a backend says it is: its own ``/metrics``, read as a typed snapshot.

Why: a fixed ``max_concurrency`` cannot follow a server whose capacity moves (vLLM fits
more short requests than long ones into its KV cache and queues the rest inside itself).
The server's own gauges say how many requests run, how many wait inside it, and how full
its KV cache is; an adaptive limit trusts them first. This module only reads them: it
never decides anything, and whatever it cannot read is *unknown* (``None``), never "free".

The names, from each server's source:

- vLLM, ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``): gauges
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (0..1), and ``vllm:gpu_cache_usage_perc`` (the same value,
  the only one in releases before V1: ``vllm/engine/metrics.py``), labelled
  ``model_name`` and ``engine``;
- SGLang, ``python/sglang/srt/metrics/collector.py`` (``SchedulerMetricsCollector``):
  gauges ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ``sglang:token_usage``
  (0..1), labelled ``model_name`` (served with ``--enable-metrics``);
- llama.cpp's ``llama-server``, ``tools/server/server-task.cpp``
  (``server_task_result_metrics::to_metrics``, served with ``--metrics``): gauges
  ``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``, unlabelled; its
  KV gauge ``llamacpp:kv_cache_usage_ratio`` exists only in older builds
  (``examples/server/server.cpp``), so on a current build ``kv_usage`` stays unknown.

Several series of one name (vLLM with several engines) add up for ``running`` and
``waiting``; ``kv_usage`` is the fullest one. A value that is not a finite number >= 0
(or a KV usage above 1) is unknown. A missing, slow (timeout), refused or malformed
answer gives an unknown snapshot, and so does a snapshot older than ``max_age_s``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pipeline.observe.log import get_logger

__all__ = [
    "SERVER_METRICS",
    "UNKNOWN",
    "Saturation",
    "SaturationReader",
    "ServerMetrics",
    "fetch_saturation",
    "parse_saturation",
]

log = get_logger("hutch.backend")


@dataclass(frozen=True, slots=True)
class ServerMetrics:
    """The metric names one server flavour reports its saturation under (first found wins
    within a tuple)."""

    running: tuple[str, ...]
    waiting: tuple[str, ...]
    kv_usage: tuple[str, ...]

    def names(self) -> tuple[str, ...]:
        return (*self.running, *self.waiting, *self.kv_usage)


#: The names per server flavour, from their source (see the module docstring).
SERVER_METRICS: dict[str, ServerMetrics] = {
    "vllm": ServerMetrics(("vllm:num_requests_running",), ("vllm:num_requests_waiting",),
                          ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    "sglang": ServerMetrics(("sglang:num_running_reqs",), ("sglang:num_queue_reqs",),
                            ("sglang:token_usage",)),
    "llamacpp": ServerMetrics(("llamacpp:requests_processing",),
                              ("llamacpp:requests_deferred",),
                              ("llamacpp:kv_cache_usage_ratio",)),
}


@dataclass(frozen=True, slots=True)
class Saturation:
    """One reading of a backend's saturation; ``None`` fields are unknown.

    ``fetched_at`` is the ``time.monotonic()`` of the scrape (None: nothing was read);
    ``server`` the flavour recognised; ``problem`` why the reading is unknown.
    """

    running: float | None
    waiting: float | None
    kv_usage: float | None
    fetched_at: float | None
    server: str | None = None
    problem: str | None = None

    @property
    def known(self) -> bool:
        """True when at least one figure was read."""
        return any(v is not None for v in (self.running, self.waiting, self.kv_usage))

    def fresh(self, now: float, max_age_s: float) -> Saturation:
        """This reading, or an unknown one if it is older than ``max_age_s`` at ``now``:
        a stale reading is never taken as the backend's state."""
        if self.fetched_at is None or now - self.fetched_at > max_age_s:
            return replace(UNKNOWN, fetched_at=self.fetched_at, server=self.server,
                           problem=self.problem or "stale")
        return self


#: Nothing known.
UNKNOWN = Saturation(running=None, waiting=None, kv_usage=None, fetched_at=None)


def _unknown(problem: str, fetched_at: float | None = None) -> Saturation:
    return replace(UNKNOWN, fetched_at=fetched_at, problem=problem)


def _samples(text: str) -> dict[str, list[float]]:
    """Sample values by name; raises ValueError on text that is not Prometheus format."""
    wanted = {name for metrics in SERVER_METRICS.values() for name in metrics.names()}
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                found.setdefault(sample.name, []).append(float(sample.value))
    return found


def _first(found: dict[str, list[float]], names: Iterable[str]) -> list[float] | None:
    return next((found[name] for name in names if name in found), None)


def _count(values: list[float] | None) -> float | None:
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        return None
    return sum(values)


def _fraction(values: list[float] | None) -> float | None:
    if not values or any(not math.isfinite(v) or not 0 <= v <= 1 for v in values):
        return None
    return max(values)


def parse_saturation(text: str, fetched_at: float) -> Saturation:
    """The saturation in a Prometheus text exposition, read at ``fetched_at``."""
    try:
        found = _samples(text)
    except (ValueError, TypeError, IndexError) as exc:  # what the parser raises on garbage
        return _unknown(f"malformed: {type(exc).__name__}", fetched_at)
    for server, names in SERVER_METRICS.items():
        if any(name in found for name in names.names()):
            reading = Saturation(running=_count(_first(found, names.running)),
                                 waiting=_count(_first(found, names.waiting)),
                                 kv_usage=_fraction(_first(found, names.kv_usage)),
                                 fetched_at=fetched_at, server=server)
            return reading if reading.known else replace(reading, problem="malformed: values")
    return _unknown("no saturation metrics", fetched_at)


async def fetch_saturation(client: httpx.AsyncClient, url: str, *, timeout_s: float = 1.0,
                           clock: Callable[[], float] = time.monotonic) -> Saturation:
    """Scrape ``url`` once; anything but a readable 200 within ``timeout_s`` is unknown."""
    try:
        response = await client.get(url, timeout=timeout_s)
    except httpx.TimeoutException:
        return _unknown("timeout")
    except httpx.HTTPError as exc:
        return _unknown(f"unreachable: {type(exc).__name__}")
    if response.status_code != 200:
        return _unknown(f"status {response.status_code}")
    try:
        text = response.text
    except UnicodeDecodeError:
        return _unknown("malformed: encoding", clock())
    return parse_saturation(text, clock())


class SaturationReader:
    """Keeps the last reading of one backend's metrics URL; ``current()`` is never older
    than ``max_age_s``. Logs one line when readings become known or unknown, not one per
    scrape."""

    def __init__(self, backend: str, url: str, client: httpx.AsyncClient, *,
                 timeout_s: float = 1.0, max_age_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.url = url
        self._client = client
        self._timeout_s = timeout_s
        self._max_age_s = max_age_s
        self._clock = clock
        self._last = UNKNOWN
        self._known: bool | None = None

    async def refresh(self) -> Saturation:
        """Scrape now; returns the new reading (and keeps it)."""
        reading = await fetch_saturation(self._client, self.url, timeout_s=self._timeout_s,
                                         clock=self._clock)
        # An unknown reading replaces a known one: the old figures are not the state now.
        self._last = reading
        self._note(reading)
        return reading

    async def aclose(self) -> None:
        await self._client.aclose()

    def current(self) -> Saturation:
        """The last reading if it is fresh, else unknown."""
        reading = self._last.fresh(self._clock(), self._max_age_s)
        if self._known:  # going stale is a change of state; never having read is not
            self._note(reading)
        return reading

    def _note(self, reading: Saturation) -> None:
        if reading.known == self._known:
            return
        self._known = reading.known
        if reading.known:
            log.info("backend.saturation_known", backend=self.backend, server=reading.server,
                     url=self.url)
        else:
            log.warning("backend.saturation_unknown", backend=self.backend, url=self.url,
                        problem=reading.problem,
                        note="falling back to latency and refusals; never read as idle")
