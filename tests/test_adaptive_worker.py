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
from tests.conftest import SettingsFactory, running_worker


class QueueingServer:
    """``room`` requests run at once for ``service_s``; the rest wait inside, FIFO."""

    def __init__(self, room: int, service_s: float) -> None:
        self._room = asyncio.Semaphore(room)
        self.service_s = service_s
        self.inside = 0
        self.max_inside = 0
        self.calls = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        try:
            async with self._room:
                await asyncio.sleep(self.service_s)
        finally:
            self.inside -= 1
        body = json.loads(request.content)
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}})


async def test_the_limit_rises_from_its_start_and_stays_near_the_backends_room(
        make_settings: SettingsFactory) -> None:
    settings = make_settings([("b1", "http://adaptive.invalid/v1", 32)])
    backend = settings.pools[0].backends[0]
    settings.pools[0].backends[0] = backend.model_copy(update={
        "concurrency": "adaptive", "start_concurrency": 2})
    server = QueueingServer(room=4, service_s=0.04)
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
                        timeout=60) for i in range(400)))
        watcher.cancel()
    assert len(answers) == 400 and all(a.choices[0].message.content == "ok" for a in answers)
    assert server.calls == 400  # each answered once, by one call
    assert max(limits) > 2, limits  # it rose from its start
    # Beyond the room of 4 the server's queue shows in the latency: after the cold start's
    # doubling overshoots (to 16 at most: 8 looked fine while 4's samples were in its
    # window), the limit falls back and never gets near the ceiling of 32.
    assert server.max_inside <= 24
    assert max(limits[len(limits) // 2:]) <= 12, limits
