"""Topology apply against the real broker: idempotent, policies, bindings, conflicts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pamqp.commands import Basic

from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology, work_policy, work_queue_arguments
from pipeline.errors import BrokerUnreachableError, TopologyError
from pipeline.settings import Settings
from tests.conftest import SettingsFactory, run_hutch, write_config


@pytest.fixture
async def api(make_settings: SettingsFactory) -> AsyncIterator[ManagementAPI]:
    async with ManagementAPI(*make_settings().management_api()) as client:
        yield client


async def effective_policy(api: ManagementAPI, settings: Settings, queue: str,
                           want: dict[str, Any], timeout: float = 20) -> dict[str, Any]:
    """Poll until the broker applied ``want`` to ``queue`` (policies apply asynchronously)."""
    info: dict[str, Any] | None = None
    async with asyncio.timeout(timeout):
        while True:
            info = await api.get_queue(settings.vhost, queue)
            assert info is not None, f"queue {queue} does not exist"
            # The API shows [] (an empty Erlang proplist) when no policy applies.
            definition = info.get("effective_policy_definition") or {}
            if all(definition.get(k) == v for k, v in want.items()):
                return info
            await asyncio.sleep(0.1)


async def routing_keys(api: ManagementAPI, settings: Settings, pool: str) -> set[str]:
    names = Names(settings.prefix)
    bindings = await api.queue_bindings(settings.vhost, names.requests_exchange,
                                        names.work_queue(pool))
    return {b["routing_key"] for b in bindings}


async def test_apply_twice_is_idempotent(make_settings: SettingsFactory,
                                         api: ManagementAPI) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    first = await apply_topology(settings)
    second = await apply_topology(settings)
    # The first apply sets the new pool's pause state (running); the second has nothing
    # to set.
    assert first.pauses == [f"{names.pause_state_queue('chat')} (running)"]
    assert second.pauses == []
    assert [line for line in first.lines() if not line.startswith("pause")] == second.lines()
    assert second.unbound == []
    tiers = {names.retry_queue(delay) for delay in (1000, 5000, 30000)}
    lanes = {names.lane_queue("chat", "default", n) for n in range(16)}
    assert set(second.queues) == {names.triage_queue, names.parked_queue,
                                  names.workers_queue, names.work_queue("chat"), *tiers,
                                  *lanes,
                                  names.pool_workers_queue("chat"),
                                  names.pause_state_queue("chat")}
    assert set(second.exchanges) == {names.requests_exchange, names.unrouted_exchange,
                                     names.dead_letter_exchange, names.retry_exchange,
                                     names.cancel_exchange}
    for delay in (1000, 5000, 30000):
        tier = await api.get_queue(settings.vhost, names.retry_queue(delay))
        assert tier is not None
        assert tier["arguments"]["x-message-ttl"] == delay
        assert tier["arguments"]["x-dead-letter-exchange"] == names.requests_exchange
    assert second.policies == [names.work_policy("chat"), names.lane_policy("chat")]
    assert await routing_keys(api, settings, "chat") == {"mock-small", "mock-large"}
    for qname in second.queues:
        info = await api.get_queue(settings.vhost, qname)
        assert info is not None and info["durable"] is True
        assert info["arguments"].get("x-queue-type", "classic") == "classic"


async def test_work_queue_arguments_and_policy(make_settings: SettingsFactory,
                                               api: ManagementAPI) -> None:
    settings = make_settings(max_priority=7,
                             pool={"max_queue_length": 123, "message_ttl_ms": 60_000})
    names = Names(settings.prefix)
    await apply_topology(settings)
    qname = names.work_queue("chat")
    want = {"dead-letter-exchange": names.dead_letter_exchange, "max-length": 123,
            "overflow": "reject-publish-dlx", "message-ttl": 60_000}
    info = await effective_policy(api, settings, qname, want)
    assert info["arguments"]["x-max-priority"] == 7 == settings.max_priority
    assert info["arguments"] == work_queue_arguments(settings)
    assert info["policy"] == names.work_policy("chat")
    # Tunables live in the policy only, so operators can change them without a redeploy.
    assert not {"x-dead-letter-exchange", "x-max-length", "x-overflow",
                "x-message-ttl"} & set(info["arguments"])
    policy = await api.get_policy(settings.vhost, names.work_policy("chat"))
    assert policy is not None
    assert policy["definition"] == want
    assert policy["pattern"] == work_policy(settings, settings.pools[0])["pattern"]
    assert policy["apply-to"] == "queues"
    # The policy's pattern matches the work queue and nothing else.
    triage = await api.get_queue(settings.vhost, names.triage_queue)
    assert triage is not None and triage.get("policy") in (None, "")


async def test_policy_follows_config_changes(make_settings: SettingsFactory,
                                             api: ManagementAPI) -> None:
    settings = make_settings()
    qname = Names(settings.prefix).work_queue("chat")
    await apply_topology(settings)
    await effective_policy(api, settings, qname, {"max-length": 10_000})
    changed = make_settings(pool={"max_queue_length": 5})
    await apply_topology(changed)
    info = await effective_policy(api, changed, qname, {"max-length": 5})
    assert "message-ttl" not in info["effective_policy_definition"]


async def test_removed_model_is_unbound(make_settings: SettingsFactory,
                                       api: ManagementAPI) -> None:
    settings = make_settings(pool={"models": ["mock-small", "mock-large", "old-model"]})
    names = Names(settings.prefix)
    await apply_topology(settings)
    assert await routing_keys(api, settings, "chat") == {"mock-small", "mock-large",
                                                         "old-model"}
    smaller = make_settings(pool={"models": ["mock-small", "new-model"]})
    report = await apply_topology(smaller)
    assert await routing_keys(api, smaller, "chat") == {"mock-small", "new-model"}
    qname = names.work_queue("chat")
    assert sorted(report.unbound) == [
        f"{names.requests_exchange} --mock-large--> {qname}",
        f"{names.requests_exchange} --old-model--> {qname}",
    ]
    assert any("model no longer in the config" in line for line in report.lines())
    # Nothing left to unbind the next time.
    assert (await apply_topology(smaller)).unbound == []


async def test_changed_max_priority_is_a_topology_error(make_settings: SettingsFactory,
                                                        tmp_path: Path,
                                                        hutch_env: dict[str, str],
                                                        api: ManagementAPI) -> None:
    settings = make_settings(max_priority=5)
    qname = Names(settings.prefix).work_queue("chat")
    await apply_topology(settings)
    changed = make_settings(max_priority=9)
    with pytest.raises(TopologyError) as info:
        await apply_topology(changed)
    message = str(info.value)
    assert f"queue '{qname}' already exists with different arguments" in message
    assert "x-max-priority" in message
    # The queue was left as it was.
    queue = await api.get_queue(settings.vhost, qname)
    assert queue is not None and queue["arguments"]["x-max-priority"] == 5

    # Through the CLI: one readable line, exit code 1, no traceback.
    config = write_config(tmp_path / "c.toml", changed)
    code, out, err = await run_hutch(["topology", "apply", "-c", str(config)], hutch_env)
    assert code == 1, out + err
    assert "already exists with different arguments" in err
    assert qname in err
    assert "Traceback" not in err


async def test_cli_apply_succeeds(make_settings: SettingsFactory, tmp_path: Path,
                                  hutch_env: dict[str, str], api: ManagementAPI) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    config = write_config(tmp_path / "c.toml", settings)
    code, out, err = await run_hutch(["topology", "apply", "-c", str(config)], hutch_env)
    assert code == 0, out + err
    assert f"queue    {names.work_queue('chat')}" in out
    assert f"policy   {names.work_policy('chat')}" in out
    assert f"topology applied to vhost {settings.vhost!r}" in out
    assert "guest:guest@" not in out  # the password is redacted
    assert await routing_keys(api, settings, "chat") == {"mock-small", "mock-large"}
    assert await api.get_queue(settings.vhost, names.triage_queue) is not None


async def test_cli_config_error_names_the_key(tmp_path: Path,
                                              hutch_env: dict[str, str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[pools]]\nname = "chat"\nmodels = ["m"]\n[[pools.backends]]\n'
                    'name = "b"\nurl = "http://127.0.0.1:1/v1"\nmax_concurrency = 0\n')
    code, out, err = await run_hutch(["topology", "apply", "-c", str(path)], hutch_env)
    assert code == 2, out + err
    assert "pools.0.backends.0.max_concurrency" in err
    assert "Traceback" not in err


async def test_unknown_model_goes_to_triage(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    await apply_topology(settings)
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        requests = await channel.get_exchange(names.requests_exchange, ensure=True)
        body = b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}'
        confirm = await requests.publish(
            aio_pika.Message(body, content_type="application/json", correlation_id="c-1",
                             reply_to="nobody", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="no-such-model", mandatory=True, timeout=10)
        assert isinstance(confirm, Basic.Ack)
        # A known model goes to its pool's work queue, not to triage.
        await requests.publish(aio_pika.Message(b"{}", correlation_id="c-2"),
                               routing_key="mock-small", timeout=10)
        triage = await channel.declare_queue(names.triage_queue, passive=True)
        work = await channel.declare_queue(names.work_queue("chat"), passive=True)
        message = await triage.get(timeout=10, fail=False)
        assert message is not None, "the unknown model did not reach the triage queue"
        assert message.correlation_id == "c-1"
        assert message.routing_key == "no-such-model"
        assert message.exchange == names.requests_exchange
        assert message.body == body
        assert "x-death" not in (message.headers or {})  # the alternate exchange, not a DLX
        await message.ack()
        assert await triage.get(timeout=10, fail=False) is None
        other = await work.get(timeout=10, fail=False)
        assert other is not None and other.correlation_id == "c-2"
        await other.ack()


async def test_management_api_unreachable(make_settings: SettingsFactory) -> None:
    settings = make_settings(management_url="http://127.0.0.1:1")
    async with asyncio.timeout(30):
        with pytest.raises(TopologyError) as info:
            await apply_topology(settings)
    message = str(info.value)
    assert "management API at http://127.0.0.1:1 is not reachable" in message
    assert "rabbitmq-plugins enable rabbitmq_management" in message


async def test_a_management_api_that_does_not_answer_in_time_is_called_busy() -> None:
    """It took the connection but answered nothing (a busy broker): not "is the plugin
    enabled?", which would send the operator after the wrong thing."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    api = ManagementAPI(f"http://127.0.0.1:{port}", "guest", "guest", timeout_s=0.5)
    try:
        async with asyncio.timeout(20):
            with pytest.raises(TopologyError) as info:
                await api.check()
    finally:
        await api.aclose()
        server.close()
    message = str(info.value)
    assert "did not answer within 0.5 s" in message and "busy" in message, message
    assert "rabbitmq-plugins" not in message


async def test_broker_unreachable(make_settings: SettingsFactory) -> None:
    settings = make_settings(amqp_url="amqp://guest:guest@127.0.0.1:1/")
    async with asyncio.timeout(30):
        with pytest.raises(BrokerUnreachableError, match="cannot connect to RabbitMQ") as info:
            await apply_topology(settings)
    assert "guest:guest@" not in str(info.value)
