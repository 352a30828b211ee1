"""The realistic engine's ``/metrics``: Prometheus text under vLLM's own names.

Why vLLM's names: what reads a real server's saturation (Hutch's
:mod:`pipeline.backends.saturation`, llm-d, KEDA) must be testable against the mock
unchanged. Names, labels and buckets follow vLLM's V1 logger
(``vllm/v1/metrics/loggers.py``: gauges ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` and the deprecated
``vllm:gpu_cache_usage_perc`` that older releases had instead, counter
``vllm:num_preemptions``, histograms ``vllm:time_to_first_token_seconds``,
``vllm:time_per_output_token_seconds``, ``vllm:e2e_request_latency_seconds``), labelled
``model_name`` and ``engine`` as vLLM labels them.

Each mock has a registry of its own (not Hutch's :mod:`pipeline.observe.metrics`): these
are the simulated server's metrics, and several mocks may run in one test process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pipeline.testing.mock.engine import Engine

__all__ = ["CONTENT_TYPE", "EngineMetrics"]

#: The Prometheus text format's content type (version 0.0.4, what vLLM serves).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LABELS = ("model_name", "engine")
# vLLM's buckets (vllm/v1/metrics/loggers.py).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _WithoutCreated(Collector):
    """The registry's metrics without the ``_created`` series, which vLLM does not serve."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class EngineMetrics:
    """One mock's vLLM-named metrics; the gauges read the engine at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._served = CollectorRegistry()
        self._served.register(_WithoutCreated(self.registry))
        labels = {"model_name": model_name, "engine": "0"}
        registry = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _LABELS, registry=registry, multiprocess_mode="mostrecent")

        self._running = gauge("vllm:num_requests_running",
                              "Number of requests in model execution batches.").labels(**labels)
        self._waiting = gauge("vllm:num_requests_waiting",
                              "Number of requests waiting to be processed.").labels(**labels)
        self._kv = gauge("vllm:kv_cache_usage_perc",
                         "KV-cache usage. 1 means 100 percent usage.").labels(**labels)
        self._gpu_kv = gauge("vllm:gpu_cache_usage_perc",
                             "GPU KV-cache usage. 1 means 100 percent usage. "
                             "DEPRECATED: Use vllm:kv_cache_usage_perc instead.").labels(**labels)
        self._preemptions = Counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
            _LABELS, registry=registry).labels(**labels)
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            _LABELS, registry=registry, buckets=_TTFT_BUCKETS).labels(**labels)
        self._tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            _LABELS, registry=registry, buckets=_TPOT_BUCKETS).labels(**labels)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            _LABELS, registry=registry, buckets=_E2E_BUCKETS).labels(**labels)

    def bind(self, engine: Engine) -> None:
        """Read ``engine``'s state at every scrape (no bookkeeping to drift)."""
        self._running.set_function(lambda: len(engine.running))
        self._waiting.set_function(lambda: len(engine.waiting))
        self._kv.set_function(lambda: engine.kv_usage)
        self._gpu_kv.set_function(lambda: engine.kv_usage)

    def preempted(self) -> None:
        self._preemptions.inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def token_time(self, seconds: float) -> None:
        self._tpot.observe(seconds)

    def finished(self, seconds: float) -> None:
        self._e2e.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self._served)
