"""The HTTP gateway driven by the official `openai` SDK, against the real broker, a worker
and the streaming mock: plain, streaming, completions, embeddings, every error class, a
disconnect mid-stream cancelling the backend call, and the priority ceiling of two keys."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.testing.mock import MockConfig
from pipeline.testing.mock.endpoints import embedding_of
from tests.conftest import SettingsFactory, amqp
from tests.gateway_support import KEY_A, KEY_B, gateway_stack, keyed, until

HELLO = [{"role": "user", "content": "hello there"}]


async def test_chat_plain_and_streamed_are_the_same_answer(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack:
        client = stack.openai()
        raw = await client.chat.completions.with_raw_response.create(
            model="mock-small", messages=HELLO)  # type: ignore[arg-type]
        completion = raw.parse()
        chunks = [chunk async for chunk in await client.chat.completions.create(
            model="mock-small", messages=HELLO, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})]
    text = completion.choices[0].message.content
    assert text == "mock reply to: hello there"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == (
        completion.usage.total_tokens)
    assert len(raw.headers["x-request-id"]) == 32
    assert raw.headers[p.H_BACKEND].endswith("-b1")
    assert int(raw.headers[p.H_QUEUE_WAIT_MS]) >= 0


async def test_completions_and_embeddings_reach_their_endpoints(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack:
        client = stack.openai()
        text = await client.completions.create(model="mock-small", prompt="Once upon")
        vectors = await client.embeddings.create(model="mock-small",
                                                 input=["alpha", "beta gamma"])
        served = stack.mock.stats()["served"]
    assert text.object == "text_completion"
    assert text.choices[0].text == "mock reply to: Once upon"
    assert [d.embedding for d in vectors.data] == [embedding_of("alpha"),
                                                  embedding_of("beta gamma")]
    assert vectors.usage.prompt_tokens == 3
    assert served == 2


async def test_models_health_and_readiness(make_settings: SettingsFactory,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack:
        models = await stack.openai().models.list()
        async with httpx.AsyncClient(base_url=stack.root) as http:
            health = await http.get("/healthz")
            ready = await http.get("/readyz")
            anonymous = await http.get("/v1/models")
    assert sorted(m.id for m in models.data) == ["mock-large", "mock-small"]
    assert (health.status_code, ready.status_code) == (200, 200)
    assert anonymous.status_code == 401


async def test_each_error_class_reaches_the_sdk(make_settings: SettingsFactory,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = MockConfig(latency_ms=5, capacity=2, fail_first=1, fail_status=403)
    async with gateway_stack(make_settings, mock=config,
                             gateway=keyed(monkeypatch)) as stack:
        client = stack.openai()
        with pytest.raises(openai.InternalServerError) as backend:  # 502, status 403 inside
            await client.chat.completions.create(model="mock-small", messages=HELLO)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="nope", messages=HELLO)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as invalid:  # the worker refuses it
            await client.chat.completions.create(model="mock-small", messages=[])
        with pytest.raises(openai.AuthenticationError):
            await stack.openai("sk-wrong").chat.completions.create(
                model="mock-small", messages=HELLO)  # type: ignore[arg-type]
        parked = await _parked_user(stack.settings.amqp_url, Names(stack.settings.prefix))
    assert backend.value.status_code == 502
    assert backend.value.body["status"] == 403  # type: ignore[index]
    assert unknown.value.code == "model_not_found"
    assert invalid.value.code == "invalid_request"
    assert parked == "team-a"  # the key's identity travelled with the request


async def _parked_user(url: str, names: Names) -> str | None:
    """The x-hutch-user of the first parked message (waits for it)."""
    async with amqp(url) as connection:
        channel = await connection.channel()
        queue = await channel.get_queue(names.parked_queue, ensure=False)
        for _ in range(100):
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                value = (message.headers or {}).get(p.H_USER)
                return value.decode() if isinstance(value, bytes) else str(value)
            await asyncio.sleep(0.05)
    return None


async def _depth(url: str, queue: str) -> int:
    async with amqp(url) as connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def test_full_queue_and_deadline(make_settings: SettingsFactory,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = MockConfig(latency_ms=5, capacity=1, hang_rate=1.0, hang_s=30)
    async with gateway_stack(make_settings, mock=config, capacity=1,
                             gateway=keyed(monkeypatch),
                             pool={"max_queue_length": 1}) as stack:
        client = stack.openai()
        work = Names(stack.settings.prefix).work_queue("chat")
        # The backend hangs on its one slot; one request waits in the queue of 1.
        hanging = [asyncio.create_task(client.chat.completions.create(
            model="mock-small", messages=HELLO,  # type: ignore[arg-type]
            extra_headers={"x-hutch-timeout": "20"})) for _ in range(2)]
        await until(lambda: stack.mock.stats()["in_service"] >= 1)
        for _ in range(100):
            if await _depth(stack.settings.amqp_url, work) == 1:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as full:
            await client.chat.completions.create(model="mock-small", messages=HELLO)  # type: ignore[arg-type]
        for task in hanging:  # their clients go: both are cancelled, the slot frees
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
        await until(lambda: stack.mock.stats()["aborted"] >= 1)
        for _ in range(100):
            if await _depth(stack.settings.amqp_url, work) == 0:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as late:  # the backend hangs past it
            await client.chat.completions.create(
                model="mock-small", messages=HELLO,  # type: ignore[arg-type]
                extra_headers={"x-hutch-timeout": "0.5"})
    assert full.value.code == "queue_full"
    assert full.value.response.headers["retry-after"] == "1"
    assert late.value.status_code == 504


async def test_a_disconnect_mid_stream_cancels_the_backend_call(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    config = MockConfig(latency_ms=5, capacity=2, itl_ms=50, reply_tokens=400)
    async with gateway_stack(make_settings, mock=config, capacity=2,
                             gateway=keyed(monkeypatch)) as stack:
        body = {"model": "mock-small", "messages": HELLO, "stream": True}
        async with httpx.AsyncClient(base_url=stack.root, timeout=10) as http, http.stream(
                "POST", "/v1/chat/completions", json=body,
                headers={"Authorization": f"Bearer {KEY_A}"}) as response:
            request_id = response.headers["x-request-id"]
            lines = response.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ")
        # The connection is closed: the gateway cancels, the worker aborts the call.
        await until(lambda: request_id in stack.mock.stats()["aborted_ids"], timeout=10)
        sample = stack.gateway.metrics.registry.get_sample_value
        await until(lambda: sample("hutch_gateway_disconnects_total",
                                      {"endpoint": "chat.completions"}) == 1)
        assert stack.mock.stats()["streamed"] == 0


async def test_the_priority_ceiling_of_each_key(make_settings: SettingsFactory,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack:
        a, b = stack.openai(KEY_A), stack.openai(KEY_B)
        create = {"model": "mock-small", "messages": HELLO}
        await a.chat.completions.create(**create)  # type: ignore[call-overload]
        await a.chat.completions.create(**create, extra_headers={"x-hutch-priority": "9"})  # type: ignore[call-overload]
        await b.chat.completions.create(**create, extra_body={"priority": 8})  # type: ignore[call-overload]
        await b.chat.completions.create(**create)  # type: ignore[call-overload]
        sample = stack.worker.metrics.registry.get_sample_value

        def count(priority: int) -> float:
            return sample("hutch_request_outcomes_total", {
                "pool": "chat", "model": "mock-small", "priority": str(priority),
                "outcome": "ok"}) or 0.0

        # The worker counts a request once it is settled, just after its reply went out.
        await until(lambda: sum(count(prio) for prio in (1, 2, 5, 8, 9)) >= 4)
        counts = {prio: count(prio) for prio in (1, 2, 5, 8, 9)}
        requests = stack.gateway.metrics.registry.get_sample_value(
            "hutch_gateway_requests_total",
            {"endpoint": "chat.completions", "client": "team-b", "status": "200"})
    # team-a: default 1, asked 9 -> its ceiling 2; team-b: asked 8 (body) -> 8, default 5.
    assert counts == {1: 1.0, 2: 1.0, 5: 1.0, 8: 1.0, 9: 0.0}
    assert requests == 2


async def test_open_mode_says_so_and_serves_everyone(
        make_settings: SettingsFactory, capsys: pytest.CaptureFixture[str]) -> None:
    async with gateway_stack(make_settings) as stack:
        answer = await stack.openai("anything").chat.completions.create(
            model="mock-small", messages=HELLO)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    assert "OPEN DEVELOPMENT MODE" in capsys.readouterr().err


async def test_the_gateway_publishes_as_a_trusted_user_for_its_clients(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ordinary clients cannot claim an identity: x-hutch-user from an untrusted
    publisher is ignored by the worker (pipeline/settle/guard.py)."""
    from pipeline.settle.guard import ReplyGuard

    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack:
        guard = ReplyGuard.from_settings(stack.settings)
        reply_to = stack.gateway.client.reply_queue_name
        user = stack.settings.amqp_user
    assert reply_to.startswith(f"{stack.settings.prefix}.reply.{user}.")
    assert guard.client_user(user, {p.H_USER: "team-a"}) == "team-a"
    assert guard.client_user("mallory", {p.H_USER: "team-a"}) == "mallory"
    assert guard.refusal("team-a", reply_to, publisher=user) is None


def test_error_bodies_are_openai_shaped() -> None:
    from pipeline.errors import BackendError, QueueFullError
    from pipeline.gateway.responses import error_body, status_of

    error = BackendError("backend said no", code="backend_error", type="api_error",
                         status=400)
    assert (status_of(error), error_body(error)) == (502, {"error": {
        "message": "backend said no", "type": "api_error", "param": None,
        "code": "backend_error", "status": 400}})
    assert status_of(QueueFullError("full", code="queue_full")) == 429
    assert json.dumps(error_body(QueueFullError("full")))



async def test_a_tenants_ceiling_applies_at_the_gateway_too(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """team-b's key allows 9, but its tenant (a team of both keys' identities) is capped
    at 3: the request is published at 3, as the worker would serve it anyway."""
    tenants = {"research": {"users": ["team-b"], "max_priority": 3}}
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch),
                             tenants=tenants) as stack:
        b = stack.openai(KEY_B)
        create = {"model": "mock-small", "messages": HELLO}
        await b.chat.completions.create(**create, extra_body={"priority": 8})  # type: ignore[call-overload]
        sample = stack.worker.metrics.registry.get_sample_value

        def count(priority: int) -> float:
            return sample("hutch_request_outcomes_total", {
                "pool": "chat", "model": "mock-small", "priority": str(priority),
                "outcome": "ok"}) or 0.0

        await until(lambda: count(3) + count(8) >= 1)
        tokens = sample("hutch_tenant_requests_total",
                        {"pool": "chat", "tenant": "research", "outcome": "ok"})
    assert (count(3), count(8)) == (1.0, 0.0)
    assert tokens == 1.0  # the worker served it as tenant research (team-b's team)
