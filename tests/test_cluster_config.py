"""Cluster configuration on one broker: several AMQP URLs, quorum pools, the priority
report, queue-type migrations refused by apply and shown by diff, quorum reply queues.

A quorum queue works on a single node too, so these run against the suite's broker; the
tests that kill nodes are in tests/test_cluster.py (three local nodes of their own).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import pytest

from pipeline.broker.connection import Reconnect, connect, connect_any
from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.quorum import priority_semantics
from pipeline.broker.topology import apply_topology, plan, work_policy
from pipeline.errors import BrokerUnreachableError, ConfigError, TopologyError
from pipeline.settings import load_settings
from pipeline.settings_text import dump_toml
from pipeline.testing.mock.server import MockBackend
from tests.conftest import SettingsFactory, body, hutch
from topology.definitions import export_definitions
from topology.diff import diff_topology, format_diff


def dead(live: str, port: int) -> str:
    """``live``'s URL (same user and vhost) on a port where nothing listens."""
    parts = urlsplit(live)
    return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}").geturl()


def quorum(make_settings: SettingsFactory, **overrides: Any) -> Any:
    return make_settings(pool={"queue_type": "quorum"}, **overrides)


# -- settings ----------------------------------------------------------------------------


def test_one_url_still_works() -> None:
    settings = load_settings(amqp_url="amqp://u:p@h1:5672/v")
    assert settings.amqp_nodes() == ["amqp://u:p@h1:5672/v"]
    assert settings.amqp_urls == []


def test_amqp_url_may_be_a_list() -> None:
    settings = load_settings(amqp_url=["amqp://u:p@h1/v", "amqp://u:p@h2/v", "amqp://u:p@h3/v"])
    assert settings.amqp_url == "amqp://u:p@h1/v"
    assert settings.amqp_nodes() == ["amqp://u:p@h1/v", "amqp://u:p@h2/v", "amqp://u:p@h3/v"]
    assert settings.vhost == "v"


def test_amqp_urls_alone_sets_amqp_url() -> None:
    settings = load_settings(amqp_urls=["amqp://u:p@h2/", "amqp://u:p@h3/"])
    assert settings.amqp_url == "amqp://u:p@h2/"
    assert settings.amqp_nodes() == ["amqp://u:p@h2/", "amqp://u:p@h3/"]


def test_amqp_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_AMQP_URLS", '["amqp://u:p@h1/", "amqp://u:p@h2/"]')
    monkeypatch.delenv("HUTCH_AMQP_URL", raising=False)
    assert load_settings().amqp_nodes() == ["amqp://u:p@h1/", "amqp://u:p@h2/"]


def test_nodes_must_share_user_and_vhost() -> None:
    with pytest.raises(ConfigError, match="same user and vhost"):
        load_settings(amqp_url=["amqp://u:p@h1/v", "amqp://other:p@h2/v"])
    with pytest.raises(ConfigError, match=r"amqp_urls.*must be an amqp"):
        load_settings(amqp_urls=["http://h1/"])


def test_with_vhost_and_dump_keep_every_node(tmp_path: Any) -> None:
    settings = load_settings(amqp_url=["amqp://u:p@h1/a", "amqp://u:p@h2/a"],
                             pools=[{"name": "p", "models": ["m"], "queue_type": "quorum",
                                     "backends": [{"name": "b", "url": "http://x/v1",
                                                   "max_concurrency": 1}]}],
                             reply_queue_type="quorum")
    moved = settings.with_vhost("b")
    assert moved.amqp_nodes() == ["amqp://u:p@h1/b", "amqp://u:p@h2/b"]
    path = tmp_path / "h.toml"
    path.write_text(dump_toml(settings))
    assert load_settings(path) == settings


# -- connecting to any node ----------------------------------------------------------------


async def test_connect_skips_a_dead_node(make_settings: SettingsFactory,
                                         caplog: pytest.LogCaptureFixture) -> None:
    live = make_settings().amqp_url
    settings = make_settings(amqp_url=[dead(live, 9), live])
    caplog.set_level(logging.WARNING, logger="hutch.broker")
    connection, index = await connect_any(settings, name="hutch test failover", timeout_s=5)
    async with connection:
        assert index == 1
    failover = [r for r in caplog.records if r.getMessage() == "amqp.failover"]
    assert failover, caplog.records


async def test_every_node_dead_names_them_all(make_settings: SettingsFactory) -> None:
    live = make_settings().amqp_url
    settings = make_settings(amqp_url=[dead(live, 9), dead(live, 19)])
    with pytest.raises(BrokerUnreachableError, match="any of the 2 RabbitMQ nodes") as info:
        await connect(settings, name="hutch test", timeout_s=5)
    assert "127.0.0.1:9" in str(info.value) and "127.0.0.1:19" in str(info.value)


async def test_reconnect_moves_to_the_next_node(make_settings: SettingsFactory) -> None:
    """After a connection is handed out, the next connect starts at the following node."""

    live = make_settings().amqp_url
    other = live.replace("127.0.0.1", "localhost") if "127.0.0.1" in live else live
    settings = make_settings(amqp_url=[live, other])
    assert len(settings.amqp_nodes()) == 2, "needs the broker at 127.0.0.1"
    reconnect = Reconnect(settings, name="hutch test rotation")
    stop = asyncio.Event()
    first = await reconnect.connect(stop)
    assert first is not None and reconnect.node == 0
    await first.close()
    second = await reconnect.connect(stop)
    assert second is not None and reconnect.node == 1
    await second.close()


# -- quorum pools ----------------------------------------------------------------------


def test_quorum_plan(make_settings: SettingsFactory) -> None:
    settings = quorum(make_settings)
    names = Names(settings.prefix)
    topo = plan(settings)
    work = topo.queue(names.work_queue("chat"))
    assert work is not None and work.arguments == {"x-queue-type": "quorum"}
    for shared in (names.triage_queue, names.parked_queue, names.workers_queue):
        spec = topo.queue(shared)
        assert spec is not None and spec.arguments == {"x-queue-type": "quorum"}
    tier = topo.queue(names.retry_queue(1000))
    assert tier is not None and tier.arguments["x-queue-type"] == "quorum"
    assert tier.arguments["x-dead-letter-strategy"] == "at-least-once"
    assert tier.arguments["x-overflow"] == "reject-publish"
    definition = work_policy(settings, settings.pools[0])["definition"]
    assert definition["overflow"] == "reject-publish"
    assert definition["dead-letter-strategy"] == "at-least-once"
    assert definition["delivery-limit"] == 1000
    assert "x-max-priority" not in work.arguments


def test_classic_plan_unchanged(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    topo = plan(settings)
    work = topo.queue(names.work_queue("chat"))
    assert work is not None and work.arguments == {"x-queue-type": "classic",
                                                   "x-max-priority": 9}
    triage = topo.queue(names.triage_queue)
    assert triage is not None and triage.arguments == {"x-queue-type": "classic"}
    assert work_policy(settings, settings.pools[0])["definition"]["overflow"] == \
        "reject-publish-dlx"


@pytest.mark.parametrize(("version", "want"), [
    ("3.10.8", "none"), ("3.13.7", "none"), ("4.0.5", "two levels"), ("4.2.1", "two levels"),
    ("4.3.0", "strict, 32 levels"), ("5.0.0", "strict"), (None, "unknown")])
def test_priority_semantics(version: str | None, want: str) -> None:
    assert priority_semantics(version).startswith(want)


def test_export_knows_quorum_pools(make_settings: SettingsFactory) -> None:
    settings = quorum(make_settings)
    queues = {q["name"]: q for q in export_definitions(settings).definitions["queues"]}
    assert queues[Names(settings.prefix).work_queue("chat")]["arguments"] == {
        "x-queue-type": "quorum"}


async def test_apply_quorum_pool_reports_priority(make_settings: SettingsFactory) -> None:
    settings = quorum(make_settings)
    names = Names(settings.prefix)
    report = await apply_topology(settings)
    assert len(report.priorities) == 1
    assert report.priorities[0].startswith("chat (quorum, RabbitMQ 3.10")
    assert "none" in report.priorities[0]
    assert any(line.startswith("priority chat (quorum") for line in report.lines())
    async with ManagementAPI(*settings.management_api()) as api:
        work = await api.get_queue(settings.vhost, names.work_queue("chat"))
        parked = await api.get_queue(settings.vhost, names.parked_queue)
    assert work is not None and work["type"] == "quorum"
    assert parked is not None and parked["type"] == "quorum"
    assert await diff_topology(settings) == []
    # A classic pool's apply reports no priority line.
    assert (await apply_topology(make_settings(prefix=settings.prefix + "c"))).priorities == []


async def test_queue_type_change_is_a_migration(make_settings: SettingsFactory) -> None:
    classic = make_settings()
    await apply_topology(classic)
    switched = quorum(make_settings)
    lines = await diff_topology(switched)
    migrations = [line for line in lines if line.fix == "migrate"]
    names = Names(classic.prefix)
    assert {line.name for line in migrations} >= {names.work_queue("chat"), names.triage_queue,
                                                   names.parked_queue}
    text = format_diff(lines, vhost=switched.vhost)
    assert "queue type change" in text and "drain, or shovel" in text
    with pytest.raises(TopologyError, match="changes the type of") as info:
        await apply_topology(switched)
    assert "classic on the broker, quorum in the config" in str(info.value)
    assert "Nothing was declared" in str(info.value)
    async with ManagementAPI(*classic.management_api()) as api:
        policy = await api.get_policy(classic.vhost, names.work_policy("chat"))
    assert policy is not None and policy["definition"]["overflow"] == "reject-publish-dlx"


async def test_quorum_pool_serves_requests_and_reply_queue(make_settings: SettingsFactory,
                                                           mock: MockBackend) -> None:
    settings = make_settings(backends=[("b1", mock.base_url, 4)], pool={"queue_type": "quorum"},
                             reply_queue_type="quorum")
    async with hutch(settings) as client:
        reply = await client.request(body(), model="mock-small", priority=5, timeout=20)
        assert reply.completion.choices[0].message.content
        async with ManagementAPI(*settings.management_api()) as api:
            queue = await api.get_queue(settings.vhost, client.reply_queue_name)
    assert queue is not None and queue["type"] == "quorum"
    assert queue["arguments"]["x-expires"] == settings.reply_queue_expires_s * 1000
