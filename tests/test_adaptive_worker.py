"""An adaptive backend limit in a running worker, against the real broker.

The backend is an in-process server (httpx MockTransport) with room for 4 requests that
queues the rest inside itself, as vLLM does beyond its KV cache. The worker starts from
``start_concurrency`` 2 with a ceiling of 32: the limit must rise (the backend has room),
stay well under the ceiling (beyond its room the server's queue shows in the latency) and
every request must be answered exactly once. Outcomes only, no wall-clock assertions.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from hutch import HutchClient
from pipeline.broker.topology import apply_topology
from pipeline.settings import Settings
from tests.conftest import SettingsFactory, running_worker
from tests.fakes import completion


class QueueingServer:
    """``room`` requests run at once for ``service_s``; the rest wait inside, FIFO."""

    def __init__(self, room: int, service_s: float) -> None:
        self.room = room
        self._room = asyncio.Semaphore(room)
        self.service_s = service_s
        self.inside = 0
        self.max_inside = 0
        self.calls = 0

    @property
    def waiting(self) -> int:
        return max(0, self.inside - self.room)

    async def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":  # vLLM's names
            running = self.inside - self.waiting
            return httpx.Response(200, text=(
                f'vllm:num_requests_running{{model_name="m"}} {running}\n'
                f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
                f'vllm:kv_cache_usage_perc{{model_name="m"}} {running / self.room * 0.8}\n'))
        self.calls += 1
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        try:
            async with self._room:
                await asyncio.sleep(self.service_s)
        finally:
            self.inside -= 1
        return httpx.Response(200, json=completion(
            model=json.loads(request.content)["model"],
            usage={"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}))


async def serve(settings: Settings, server: QueueingServer, requests: int) -> list[float]:
    """Send ``requests`` at once through a worker; the limit sampled every 50 ms."""
    backend = settings.pools[0].backends[0]
    await apply_topology(settings)
    limits: list[float] = []
    async with running_worker(settings, transport_factory=lambda _: httpx.MockTransport(
            server.handler)) as worker, HutchClient.from_settings(settings) as client:
        gauge = worker.metrics.registry.get_sample_value

        async def watch() -> None:
            while True:
                limits.append(gauge("hutch_backend_capacity", {"backend": backend.name}) or 0)
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        answers = await asyncio.gather(*(
            client.chat(model="mock-small", messages=[{"role": "user", "content": str(i)}],
                        timeout=60) for i in range(requests)))
        watcher.cancel()
    assert len(answers) == requests
    assert all(a.choices[0].message.content == "ok" for a in answers)
    assert server.calls == requests  # each answered once, by one call
    return limits


def adaptive(settings: Settings, **fields: object) -> Settings:
    pool = settings.pools[0]
    pool.backends[0] = pool.backends[0].model_copy(update={
        "concurrency": "adaptive", "start_concurrency": 2, **fields})
    return settings


async def test_the_limit_rises_from_its_start_and_stays_near_the_backends_room(
        make_settings: SettingsFactory) -> None:
    settings = adaptive(make_settings([("b1", "http://adaptive.invalid/v1", 32)]))
    server = QueueingServer(room=4, service_s=0.04)
    limits = await serve(settings, server, 400)
    assert max(limits) > 2, limits  # it rose from its start
    # Beyond the room of 4 the server's queue shows in the latency: after the cold start's
    # growth overshoots (a window can still hold samples of the level below), the limit
    # falls back and never gets near the ceiling of 32.
    assert server.max_inside <= 24
    assert max(limits[len(limits) // 2:]) <= 12, limits


async def test_with_the_backends_metrics_the_limit_keeps_its_queue_out_of_it(
        make_settings: SettingsFactory) -> None:
    settings = adaptive(make_settings([("b1", "http://adaptive.invalid/v1", 32)]),
                        metrics_url="http://adaptive.invalid/metrics")
    server = QueueingServer(room=4, service_s=0.04)
    limits = await serve(settings, server, 600)
    assert max(limits) >= 4, limits  # it found the room...
    # ...and each scrape that shows a queue inside the server takes it back down: over the
    # last third it mostly stays within one probe of the room (the latency fallback, on a
    # machine too busy to scrape in time, would allow up to 1.5x).
    last = sorted(limits[2 * len(limits) // 3:])
    assert last[len(last) // 2] <= 6, limits
