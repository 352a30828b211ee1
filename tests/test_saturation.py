"""Reading a backend's saturation from its /metrics: each server's real exposition, and
every way it can fail (missing, slow, malformed, stale) giving "unknown", never "free"."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import pytest
from pydantic import ValidationError

from pipeline.backends.saturation import (
    UNKNOWN,
    Saturation,
    SaturationReader,
    fetch_saturation,
    parse_saturation,
)
from pipeline.settings import BackendSettings

# vLLM V1 (vllm/v1/metrics/loggers.py: labels model_name and engine).
VLLM_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
"""  # noqa: E501

# vLLM before V1 (vllm/engine/metrics.py): gpu_cache_usage_perc only, label model_name.
VLLM_V0 = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="/models/llama-2-7b"} 7.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="/models/llama-2-7b"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="/models/llama-2-7b"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="/models/llama-2-7b"} 0.9
"""

# SGLang (python/sglang/srt/metrics/collector.py; docs/references/production_metrics.md).
SGLANG = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 8.128902e+06
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 28.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.007507552643049313
"""

# llama-server today (tools/server/server-task.cpp, to_metrics): no KV gauge.
LLAMACPP = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6886
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 11.2
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""

# Older llama-server builds (examples/server/server.cpp) also had the KV gauge.
LLAMACPP_OLD = LLAMACPP + """\
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.75
"""


@pytest.mark.parametrize(("text", "server", "running", "waiting", "kv"), [
    (VLLM_V1, "vllm", 3, 5, 0.42),
    (VLLM_V0, "vllm", 7, 0, 0.9),
    (SGLANG, "sglang", 28, 2, 0.28),
    (LLAMACPP, "llamacpp", 4, 1, None),
    (LLAMACPP_OLD, "llamacpp", 4, 1, 0.75),
])
def test_each_server_flavour_is_read(text: str, server: str, running: float,
                                     waiting: float, kv: float | None) -> None:
    reading = parse_saturation(text, fetched_at=10.0)
    assert reading == Saturation(running=running, waiting=waiting, kv_usage=kv,
                                 fetched_at=10.0, server=server)
    assert reading.known


def test_several_engines_add_up_and_the_fullest_kv_counts() -> None:
    text = VLLM_V1 + VLLM_V1.replace('engine="0"', 'engine="1"').replace(" 0.42", " 0.8")
    # Two families of one name are not valid Prometheus text; one family, two series is.
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    reading = parse_saturation("\n".join(sorted(lines)) + "\n", fetched_at=1.0)
    assert (reading.running, reading.waiting, reading.kv_usage) == (6, 10, 0.8)


@pytest.mark.parametrize(("text", "problem"), [
    ("this is not prometheus text at all\n", "malformed"),
    ("<html><body>Not here</body></html>\n", "malformed"),
    ("vllm:num_requests_running{model_name=\"m\"} lots\n", "malformed"),
    ("", "no saturation metrics"),
    ("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n",
     "no saturation metrics"),
])
def test_malformed_or_foreign_text_is_unknown(text: str, problem: str) -> None:
    reading = parse_saturation(text, fetched_at=1.0)
    assert not reading.known
    assert reading.running is reading.waiting is reading.kv_usage is None
    assert reading.problem is not None and reading.problem.startswith(problem)


def test_values_that_cannot_be_true_are_unknown() -> None:
    text = ('vllm:num_requests_running{model_name="m"} NaN\n'
            'vllm:num_requests_waiting{model_name="m"} -3\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 1.7\n')
    reading = parse_saturation(text, fetched_at=1.0)
    assert not reading.known and reading.problem == "malformed: values"
    partly = parse_saturation(text.replace(" NaN", " 2"), fetched_at=1.0)
    assert (partly.running, partly.waiting, partly.kv_usage) == (2, None, None)


def test_a_stale_reading_is_unknown_never_free() -> None:
    reading = parse_saturation(VLLM_V1, fetched_at=100.0)
    assert reading.fresh(now=104.0, max_age_s=5.0) is reading
    stale = reading.fresh(now=106.0, max_age_s=5.0)
    assert not stale.known and stale.problem == "stale" and stale.fetched_at == 100.0
    assert not UNKNOWN.fresh(now=0.0, max_age_s=5.0).known


def _client(handler: httpx.MockTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=handler)


async def test_fetch_reads_a_200() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=SGLANG))
    async with _client(transport) as client:
        reading = await fetch_saturation(client, "http://sglang:30000/metrics",
                                         clock=lambda: 42.0)
    assert (reading.server, reading.running, reading.fetched_at) == ("sglang", 28, 42.0)


@pytest.mark.parametrize(("respond", "problem"), [
    (lambda request: httpx.Response(404, text="Not Found"), "status 404"),
    (lambda request: httpx.Response(503, text="busy"), "status 503"),
    (lambda request: httpx.Response(200, text="{\"error\": \"metrics disabled\"}"),
     "malformed"),
])
async def test_missing_or_malformed_endpoint_is_unknown(
        respond: Callable[[httpx.Request], httpx.Response], problem: str) -> None:
    async with _client(httpx.MockTransport(respond)) as client:
        reading = await fetch_saturation(client, "http://b/metrics")
    assert not reading.known
    assert reading.problem is not None and reading.problem.startswith(problem)


@pytest.mark.parametrize(("error", "problem"), [
    (httpx.ReadTimeout, "timeout"),
    (httpx.ConnectTimeout, "timeout"),
    (httpx.ConnectError, "unreachable: ConnectError"),
    (httpx.RemoteProtocolError, "unreachable: RemoteProtocolError"),
])
async def test_slow_or_unreachable_endpoint_is_unknown(error: type[httpx.HTTPError],
                                                       problem: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error("no answer", request=request)

    async with _client(httpx.MockTransport(fail)) as client:
        reading = await fetch_saturation(client, "http://b/metrics", timeout_s=0.1)
    assert not reading.known and reading.problem == problem


async def test_reader_forgets_old_figures_and_logs_changes_once(
        caplog: pytest.LogCaptureFixture) -> None:
    answers = [httpx.Response(200, text=VLLM_V1), httpx.Response(200, text=VLLM_V1),
               httpx.Response(404), httpx.Response(404), httpx.Response(200, text=VLLM_V1)]
    now = [0.0]
    async with _client(httpx.MockTransport(lambda request: answers.pop(0))) as client:
        reader = SaturationReader("vllm-1", "http://b/metrics", client, max_age_s=5.0,
                                  clock=lambda: now[0])
        assert not reader.current().known  # nothing read yet
        with caplog.at_level(logging.INFO, logger="hutch.backend"):
            assert (await reader.refresh()).running == 3
            assert (await reader.refresh()).known
            now[0] = 4.0
            assert reader.current().kv_usage == 0.42
            now[0] = 6.0
            assert not reader.current().known  # stale: 6 s after the last reading
            now[0] = 7.0
            assert (await reader.refresh()).running is None  # 404: the old 3 is not kept
            assert not reader.current().known
            await reader.refresh()
            assert reader.current().running is None
            assert (await reader.refresh()).running == 3
    events = [r.getMessage() for r in caplog.records if "saturation" in r.getMessage()]
    assert [("saturation_known" in e) for e in events] == [True, False, True]


def test_backend_metrics_url_setting() -> None:
    base = {"name": "vllm-1", "url": "http://127.0.0.1:8000/v1", "max_concurrency": 4}
    assert BackendSettings.model_validate(base).metrics_url is None
    url = "http://127.0.0.1:8000/metrics"
    assert BackendSettings.model_validate({**base, "metrics_url": url}).metrics_url == url
    with pytest.raises(ValidationError, match="metrics_url"):
        BackendSettings.model_validate({**base, "metrics_url": "127.0.0.1:8000/metrics"})
