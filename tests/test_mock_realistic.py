"""The mock's realistic mode: a KV budget, a batch that slows down as it grows, a FIFO
queue inside the server, preemption, vLLM's /metrics and a run-time capacity switch.

Timings are never asserted tight: order, counts and ratios with wide margins only."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.backends.saturation import fetch_saturation
from pipeline.testing.mock import EngineConfig, MockBackend, MockConfig, add_arguments
from pipeline.testing.mock.engine import Engine, Sequence, TooLongError
from pipeline.testing.mock.engine_metrics import EngineMetrics
from pipeline.testing.mock.options import config_from_args


async def _eventually(check: Callable[[], bool]) -> None:
    """Poll until check() holds; bounded so a broken engine fails instead of hanging."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached within 10 s")


def _engine(**fields: Any) -> Engine:
    return Engine(EngineConfig(**fields), EngineMetrics("m"))


def _admit_all(engine: Engine, seqs: list[Sequence]) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(engine.admit(seq)) for seq in seqs]


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def _chat(prompt_words: int = 4, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-small", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": _words(prompt_words)}], **extra}


def _metrics(text: str) -> dict[str, dict[str, float]]:
    """Sample values by name, then by the sample's labels (as JSON), via the real parser."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[json.dumps(sample.labels, sort_keys=True)] = (
                sample.value)
    return out


def _value(metrics: dict[str, dict[str, float]], name: str) -> float:
    (value,) = metrics[name].values()
    return value


# -- the engine alone -------------------------------------------------------------------------


def test_time_per_token_grows_with_the_batch() -> None:
    config = EngineConfig(tpot_ms=10, batch_slowdown=0.5)
    assert config.tpot_s(1) == pytest.approx(0.010)
    assert config.tpot_s(3) == pytest.approx(0.020)
    assert config.tpot_s(5) > config.tpot_s(4) > config.tpot_s(1)
    assert EngineConfig(tpot_ms=10, batch_slowdown=0).tpot_s(50) == pytest.approx(0.010)


@pytest.mark.parametrize("bad", [{"kv_tokens": 0}, {"max_running": -1}, {"tpot_ms": -1},
                                 {"batch_slowdown": float("nan")}, {"preempt": "yes"},
                                 {"kv_tokens": True}])
def test_engine_config_is_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(**bad)
    with pytest.raises(ValueError, match="unknown capacity field"):
        EngineConfig().with_capacity(preempt=True)


async def test_requests_beyond_the_kv_budget_wait_inside_fifo() -> None:
    engine = _engine(kv_tokens=100, max_running=10, tpot_ms=0)
    seqs = [engine.sequence(20, 20) for _ in range(5)]  # 40 tokens each: 2 fit
    admitted: list[int] = []

    async def run(i: int, seq: Sequence) -> None:
        await engine.admit(seq)
        admitted.append(i)

    tasks = [asyncio.create_task(run(i, seq)) for i, seq in enumerate(seqs)]
    await _eventually(lambda: len(admitted) == 2)
    assert (len(engine.running), len(engine.waiting)) == (2, 3)
    assert admitted == [0, 1]
    for i in range(2, 5):
        engine.finish(seqs[i - 2])
        await _eventually(lambda n=i + 1: len(admitted) == n)  # type: ignore[misc]
    assert admitted == [0, 1, 2, 3, 4]  # first come, first served
    await asyncio.gather(*tasks)


async def test_max_running_limits_the_batch_and_a_later_small_one_does_not_jump_ahead() -> None:
    engine = _engine(kv_tokens=1000, max_running=2, tpot_ms=0)
    big, other, blocked, small = (engine.sequence(10, 10), engine.sequence(10, 10),
                                  engine.sequence(10, 10), engine.sequence(1, 1))
    tasks = _admit_all(engine, [big, other, blocked, small])
    await _eventually(lambda: len(engine.running) == 2)
    assert list(engine.waiting) == [blocked, small]
    engine.finish(big)
    await _eventually(lambda: blocked.running)
    assert not small.running and list(engine.waiting) == [small]
    engine.finish(other)
    engine.finish(blocked)
    await _eventually(lambda: small.running)
    await asyncio.gather(*tasks)


async def test_a_request_that_can_never_fit_is_refused() -> None:
    engine = _engine(kv_tokens=50)
    with pytest.raises(TooLongError, match="needs 51 tokens"):
        engine.sequence(40, 11)
    assert engine.sequence(40, 10).total_tokens == 50


async def test_preemption_pauses_the_newest_and_every_reply_completes() -> None:
    # Both prompts fit at once (10 + 10), their growth does not (2 x 25 > 40).
    engine = _engine(kv_tokens=40, max_running=8, tpot_ms=1, preempt=True)
    first, second = engine.sequence(10, 15), engine.sequence(10, 15)
    preempted_while: list[int] = []
    peak_kv: list[int] = []

    async def generate(seq: Sequence) -> None:
        await engine.admit(seq)
        await engine.prefill(seq, 0.001)
        while seq.generated < seq.reply_tokens:
            await engine.step(seq, lambda s: s)
            peak_kv.append(engine.kv_used)
            if seq is first and second.preemptions and not preempted_while:
                preempted_while.append(first.generated)
        engine.finish(seq)

    await asyncio.wait_for(asyncio.gather(generate(first), generate(second)), 20)
    assert second.preemptions >= 1 and first.preemptions == 0  # the newest is paused
    assert engine.preemptions == second.preemptions
    assert first.generated == second.generated == 15
    assert preempted_while  # the oldest kept generating while the newest waited
    assert max(peak_kv) <= 40  # the budget is never overrun
    assert not engine.running and not engine.waiting


async def test_without_preemption_the_whole_length_is_reserved() -> None:
    engine = _engine(kv_tokens=40, max_running=8, tpot_ms=0)
    first, second = engine.sequence(10, 15), engine.sequence(10, 15)
    tasks = _admit_all(engine, [first, second])
    await _eventually(lambda: first.running)
    await asyncio.sleep(0.05)
    assert not second.running  # 25 + 25 > 40: it waits even though its prompt would fit
    engine.finish(first)
    await _eventually(lambda: second.running)
    await asyncio.gather(*tasks)


async def test_a_capacity_change_admits_the_waiting_at_once() -> None:
    engine = _engine(kv_tokens=1000, max_running=1, tpot_ms=0)
    seqs = [engine.sequence(5, 5) for _ in range(3)]
    tasks = _admit_all(engine, seqs)
    await _eventually(lambda: len(engine.waiting) == 2)
    engine.reconfigure(engine.config.with_capacity(max_running=3))
    await _eventually(lambda: len(engine.running) == 3)
    assert not engine.waiting
    await asyncio.gather(*tasks)


# -- over HTTP --------------------------------------------------------------------------------


@pytest.fixture
async def realistic() -> AsyncIterator[Callable[..., Any]]:
    """Start realistic mocks; each with its own client (``base_url`` without ``/v1``)."""
    started: list[tuple[MockBackend, httpx.AsyncClient]] = []

    async def start(**engine: Any) -> tuple[MockBackend, httpx.AsyncClient]:
        config = MockConfig(ttft_ms=engine.pop("ttft_ms", 5), engine=EngineConfig(**engine),
                            reply_tokens=8)
        mock = MockBackend(config)
        await mock.start()
        client = httpx.AsyncClient(base_url=mock.base_url.removesuffix("/v1"), timeout=30)
        started.append((mock, client))
        return mock, client

    yield start
    for mock, client in started:
        await client.aclose()
        await mock.stop()


async def _scrape(client: httpx.AsyncClient) -> dict[str, dict[str, float]]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return _metrics(response.text)


async def test_metrics_parse_under_vllm_names_with_model_name(realistic: Any) -> None:
    _, client = await realistic(kv_tokens=500, tpot_ms=1)
    answer = await client.post("/v1/chat/completions", json=_chat(max_tokens=5))
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == 5
    metrics = await _scrape(client)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:time_per_output_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count",
                 "vllm:time_to_first_token_seconds_count"):
        (labels,) = metrics[name]
        assert json.loads(labels) == {"engine": "0", "model_name": "mock-small"}, name
    assert _value(metrics, "vllm:num_requests_running") == 0
    assert _value(metrics, "vllm:kv_cache_usage_perc") == 0
    assert _value(metrics, "vllm:e2e_request_latency_seconds_count") == 1
    assert _value(metrics, "vllm:time_per_output_token_seconds_count") == 4  # after the 1st
    assert not any(name.endswith("_created") for name in metrics)


async def test_whole_answers_and_streams_slow_down_as_the_batch_grows(realistic: Any) -> None:
    mock, client = await realistic(kv_tokens=10_000, max_running=64, tpot_ms=10,
                                   batch_slowdown=1.0)
    assert (await client.post("/v1/chat/completions", json=_chat(max_tokens=6))).is_success
    alone = await _scrape(client)
    alone_mean = (_value(alone, "vllm:time_per_output_token_seconds_sum")
                  / _value(alone, "vllm:time_per_output_token_seconds_count"))

    async def stream() -> int:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=_chat(max_tokens=6, stream=True)) as response:
            lines = [line async for line in response.aiter_lines()]
        return sum(1 for line in lines if line.startswith("data: {")
                   and '"content":"' in line and '"role"' not in line)

    whole = [client.post("/v1/chat/completions", json=_chat(max_tokens=6)) for _ in range(4)]
    results = await asyncio.gather(*whole, *(stream() for _ in range(4)))
    assert all(r.is_success for r in results[:4])
    assert results[4:] == [6, 6, 6, 6]  # every token of every stream, paced by the engine
    batch = await _scrape(client)
    count = (_value(batch, "vllm:time_per_output_token_seconds_count")
             - _value(alone, "vllm:time_per_output_token_seconds_count"))
    batch_mean = (_value(batch, "vllm:time_per_output_token_seconds_sum")
                  - _value(alone, "vllm:time_per_output_token_seconds_sum")) / count
    # 8 at once: up to 8x the lone pace; 2x leaves room for a busy machine.
    assert batch_mean > 2 * alone_mean
    assert mock.stats()["engine"]["running"] == 0


async def test_the_queue_inside_is_visible_and_fifo(realistic: Any) -> None:
    # 8-word prompts + 8-token replies ("mock reply to:" + 8 words = 11 echo tokens cut at
    # 8): 16 tokens each, so a 40-token budget runs 2 and queues the rest.
    mock, client = await realistic(kv_tokens=40, max_running=64, tpot_ms=20)
    order: list[int] = []

    async def ask(i: int) -> None:
        response = await client.post("/v1/chat/completions",
                                     json=_chat(prompt_words=8, max_tokens=8),
                                     headers={"X-Request-Id": f"r{i}"})
        assert response.status_code == 200
        order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(ask(i)))
        await _eventually(
            lambda n=i + 1: mock.stats()["in_service"] + mock.stats()["waiting"] == n)  # type: ignore[misc]
    metrics = await _scrape(client)
    assert _value(metrics, "vllm:num_requests_running") == 2
    assert _value(metrics, "vllm:num_requests_waiting") == 3
    assert _value(metrics, "vllm:kv_cache_usage_perc") > 0
    saturation = await fetch_saturation(client, str(client.base_url.join("/metrics")))
    assert (saturation.server, saturation.running, saturation.waiting) == ("vllm", 2, 3)
    await asyncio.gather(*tasks)
    assert order.index(2) < order.index(4)  # queued ones leave in arrival order
    assert mock.stats()["served_ids"][-1] == "r4"


async def test_preemption_shows_in_metrics_and_no_answer_is_lost(realistic: Any) -> None:
    mock, client = await realistic(kv_tokens=48, max_running=64, tpot_ms=2, preempt=True)
    replies = await asyncio.gather(*(
        client.post("/v1/chat/completions", json=_chat(prompt_words=4, max_tokens=30))
        for _ in range(4)))
    assert [r.json()["usage"]["completion_tokens"] for r in replies] == [30] * 4
    metrics = await _scrape(client)
    assert _value(metrics, "vllm:num_preemptions_total") >= 1
    assert mock.stats()["engine"]["preemptions"] == _value(metrics, "vllm:num_preemptions_total")


async def test_a_too_long_request_gets_400(realistic: Any) -> None:
    _, client = await realistic(kv_tokens=20)
    response = await client.post("/v1/chat/completions", json=_chat(prompt_words=15,
                                                                     max_tokens=10))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


async def test_capacity_switch_at_run_time(realistic: Any) -> None:
    mock, client = await realistic(kv_tokens=1000, max_running=1, tpot_ms=50)
    tasks = [asyncio.create_task(client.post("/v1/chat/completions",
                                             json=_chat(max_tokens=20))) for _ in range(3)]
    await _eventually(lambda: mock.stats()["engine"]["waiting"] == 2)
    answer = await client.post("/admin/capacity", json={"max_running": 3, "tpot_ms": 1})
    assert answer.status_code == 200
    assert answer.json() == {"kv_tokens": 1000, "max_running": 3, "tpot_ms": 1,
                             "batch_slowdown": 0.05, "preempt": False}
    await _eventually(lambda: mock.stats()["engine"]["running"] == 3)
    assert (await client.get("/admin/capacity")).json()["max_running"] == 3
    assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))
    for bad in ({"max_running": 0}, {"preempt": True}, {"kv_tokens": "many"}, [1]):
        refused = await client.post("/admin/capacity", json=bad)
        assert refused.status_code == 400, bad
    assert mock.config.engine is not None and mock.config.engine.max_running == 3
    # Halving the KV budget: new requests wait for what now fits.
    assert mock.set_capacity(kv_tokens=500)["kv_tokens"] == 500


async def test_default_mode_is_unchanged() -> None:
    async with MockBackend(MockConfig(latency_ms=1)) as mock, httpx.AsyncClient(
            base_url=mock.base_url.removesuffix("/v1"), timeout=10) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.post("/admin/capacity", json={"max_running": 2})).status_code == 404
        assert "engine" not in mock.stats()
        with pytest.raises(ValueError, match="without the realistic engine"):
            mock.set_capacity(max_running=2)


def test_cli_options_build_the_engine() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).engine is None
    config = config_from_args(parser.parse_args(
        ["--realistic", "--kv-tokens", "2048", "--max-running", "12", "--tpot-ms", "15",
         "--batch-slowdown", "0.1", "--preempt"]))
    assert config.engine == EngineConfig(kv_tokens=2048, max_running=12, tpot_ms=15,
                                         batch_slowdown=0.1, preempt=True)
    with pytest.raises(ValueError, match="kv_tokens"):
        config_from_args(parser.parse_args(["--realistic", "--kv-tokens", "0"]))
