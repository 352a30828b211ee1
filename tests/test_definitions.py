"""`hutch topology export` and `hutch topology diff`: the definitions file describes the
topology apply declares (checked against the broker and by importing it), and diff finds
every kind of drift between the config and a live broker."""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology, plan
from pipeline.cli.common import add_subcommands
from pipeline.settings import Settings
from tests.conftest import SettingsFactory, write_config
from topology import definitions as definitions_mod
from topology.commands import register
from topology.definitions import (
    export_definitions,
    parse_definitions,
    rabbit_password_hash,
    write_definitions,
)
from topology.diff import DiffLine, compare_topology, diff_topology, format_diff

KINDS = ("exchanges", "queues", "bindings", "policies")


@pytest.fixture
async def api(make_settings: SettingsFactory) -> AsyncIterator[ManagementAPI]:
    async with ManagementAPI(*make_settings().management_api()) as client:
        yield client


def hutch_objects(document: dict[str, Any], prefix: str) -> dict[str, list[dict[str, Any]]]:
    """The objects of one test's prefix in a definitions document, without their vhost
    key (a per-vhost export leaves it out), in a stable order."""
    mine = f"{prefix}."
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        items = []
        for item in document.get(kind, []):
            name = item["source"] if kind == "bindings" else item["name"]
            if name.startswith(mine):
                items.append({k: v for k, v in item.items() if k != "vhost"})
        out[kind] = sorted(items, key=lambda i: json.dumps(i, sort_keys=True))
    return out


def cli(argv: list[str]) -> int:
    """`hutch topology ...` in this process, as topology/commands.py registers it (errors
    propagate: no `main` turning them into exit codes)."""
    parser = argparse.ArgumentParser(prog="hutch")
    register(add_subcommands(parser, dest="command", required=True))
    args = parser.parse_args(["topology", *argv])
    code: int = args.func(args)
    return code


def two_pools(make_settings: SettingsFactory, prefix: str, **overrides: Any) -> Settings:
    base = make_settings()
    pools = [pool.model_dump(exclude_none=True) for pool in base.pools]
    pools.append({"name": "old", "models": ["old-model"], "retry_delays_ms": [7000],
                  "backends": [{"name": f"{prefix}-b2", "url": "http://127.0.0.1:9/v1",
                                "max_concurrency": 1}]})
    return make_settings(pools=pools, **overrides)


# -- export -------------------------------------------------------------------------------


def test_export_is_a_definitions_file(make_settings: SettingsFactory) -> None:
    settings = make_settings(pool={"message_ttl_ms": 30_000})
    names = Names(settings.prefix)
    exported = export_definitions(settings)
    document = json.loads(json.dumps(exported.definitions))
    assert exported.notes == []
    assert set(document) == {"vhosts", "users", "permissions", *KINDS}
    assert document["vhosts"] == [{"name": settings.vhost}]
    assert document["users"] == [] and document["permissions"] == []
    fields = {
        "exchanges": {"name", "vhost", "type", "durable", "auto_delete", "internal", "arguments"},
        "queues": {"name", "vhost", "durable", "auto_delete", "arguments"},
        "bindings": {"source", "vhost", "destination", "destination_type", "routing_key",
                     "arguments"},
        "policies": {"vhost", "name", "pattern", "apply-to", "definition", "priority"},
    }
    for kind, keys in fields.items():
        assert document[kind], kind
        for item in document[kind]:
            assert set(item) == keys, (kind, item)
            assert item["vhost"] == settings.vhost  # a boot-time import needs it
    exchanges = {e["name"]: e for e in document["exchanges"]}
    assert exchanges[names.requests_exchange]["arguments"] == {
        "alternate-exchange": names.unrouted_exchange}
    assert exchanges[names.retry_exchange]["type"] == "headers"
    queues = {q["name"]: q for q in document["queues"]}
    assert queues[names.work_queue("chat")]["arguments"] == {
        "x-queue-type": "classic", "x-max-priority": settings.max_priority}
    assert all(q["durable"] and not q["auto_delete"] for q in queues.values())
    policy, lanes = document["policies"]
    assert policy["name"] == names.work_policy("chat")
    assert policy["definition"]["message-ttl"] == 30_000
    assert lanes["name"] == names.lane_policy("chat")
    assert lanes["definition"]["overflow"] == "reject-publish"  # a full lane refuses a move
    routes = {(b["source"], b["routing_key"]) for b in document["bindings"]
              if b["destination"] == names.work_queue("chat")}
    assert routes == {(names.requests_exchange, "mock-small"),
                    (names.requests_exchange, "mock-large")}
    # Read back, it is the plan it came from.
    assert parse_definitions(document, settings.vhost) == dataclasses.replace(
        plan(settings), owned_routes=[])


def test_users_need_a_password_hash(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    hashed = rabbit_password_hash("s3cret")
    users: list[dict[str, Any]] = [
        {"name": "app", "password_hash": hashed, "password": "s3cret",
         "hashing_algorithm": definitions_mod.SHA256, "tags": ["management"]},
        {"name": "clear", "password": "in-clear"},
    ]
    permissions = [
        {"user": "app", "configure": "^$", "write": "^llm\\.requests$", "read": "^llm\\.reply"},
        {"user": "clear", "vhost": "other", "configure": ".*", "write": ".*", "read": ".*"},
    ]
    exported = export_definitions(settings, users=users, permissions=permissions)
    document = exported.definitions
    assert document["users"] == [{"name": "app", "password_hash": hashed,
                                  "hashing_algorithm": definitions_mod.SHA256,
                                  "tags": ["management"], "limits": {}}]
    assert "in-clear" not in json.dumps(document) and "s3cret" not in json.dumps(document)
    assert document["permissions"] == [
        {"user": "app", "vhost": settings.vhost, "configure": "^$",
         "write": "^llm\\.requests$", "read": "^llm\\.reply"}]
    assert any("'clear' left out" in note and "password_hash" in note
               for note in exported.notes), exported.notes
    assert any("permissions of 'clear'" in note for note in exported.notes)
    # The hash is RabbitMQ's: base64(salt + sha256(salt + password)).
    raw = base64.b64decode(hashed)
    assert hashlib.sha256(raw[:4] + b"s3cret").digest() == raw[4:]


async def test_export_matches_what_apply_declared(make_settings: SettingsFactory,
                                                  api: ManagementAPI, prefix: str) -> None:
    settings = make_settings(max_priority=7, pool={"max_queue_length": 50,
                                                   "message_ttl_ms": 60_000})
    report = await apply_topology(settings)
    exported = export_definitions(settings).definitions
    topo = plan(settings)
    # One description: apply declared exactly the plan the file is written from.
    assert report.queues == [q["name"] for q in exported["queues"]] == [
        q.name for q in topo.queues]
    assert report.exchanges == [e["name"] for e in exported["exchanges"]]
    assert report.policies == [p["name"] for p in exported["policies"]]
    assert len(report.bindings) == len(exported["bindings"])

    live = await api.get_definitions(settings.vhost)
    want, got = hutch_objects(exported, prefix), hutch_objects(live, prefix)
    for kind in KINDS:
        assert got[kind] == want[kind], kind
    # 3 retry tiers, triage, parking lot, presence; per pool its queue, its 16 lanes, its
    # presence and its pause state.
    assert len(got["queues"]) == 25 and len(got["bindings"]) == 7


async def test_exported_file_imports_into_a_fresh_vhost(make_settings: SettingsFactory,
                                                        api: ManagementAPI, prefix: str,
                                                        tmp_path: Path) -> None:
    """What the management UI's "Import definitions" does with the file."""
    settings = make_settings(pool={"message_ttl_ms": 5_000})
    path = tmp_path / "definitions.json"
    write_definitions(export_definitions(settings).definitions, path)
    document = json.loads(path.read_text())
    fresh = f"hutch-import-{uuid.uuid4().hex[:8]}"
    user = settings.management_api()[1]
    await api.create_vhost(fresh)
    try:
        await api.set_permissions(fresh, user)
        await api.import_definitions(document, fresh)
        live = await api.get_definitions(fresh)
        want, got = hutch_objects(document, prefix), hutch_objects(live, prefix)
        for kind in KINDS:
            assert got[kind] == want[kind], kind
        # The imported vhost is what apply would have made: diff finds nothing.
        imported = settings.with_vhost(fresh)
        assert await diff_topology(imported) == []
        # And apply on top of it changes nothing.
        assert (await apply_topology(imported)).unbound == []
        assert await diff_topology(imported) == []
    finally:
        await api.delete_vhost(fresh)


async def test_boot_format_creates_vhost_user_and_topology(make_settings: SettingsFactory,
                                                          api: ManagementAPI,
                                                          prefix: str) -> None:
    """The global import (what a node does at boot with definitions.local.path): the file
    creates its vhost, the user from its hash, its permissions and the topology."""
    vhost = f"hutch-boot-{uuid.uuid4().hex[:8]}"
    settings = make_settings().with_vhost(vhost)
    user, password = f"hutch-{prefix}", uuid.uuid4().hex
    exported = export_definitions(
        settings,
        users=[{"name": user, "password_hash": rabbit_password_hash(password),
                "hashing_algorithm": definitions_mod.SHA256, "tags": []}],
        permissions=[{"user": user, "configure": "^$", "write": ".*", "read": ".*"}])
    base, admin, admin_password = settings.management_api()
    try:
        await api.import_definitions(exported.definitions)
        assert await api.get_vhost(vhost) is not None
        live = await api.get_definitions(vhost)
        want, got = hutch_objects(exported.definitions, prefix), hutch_objects(live, prefix)
        for kind in KINDS:
            assert got[kind] == want[kind], kind
        # The user logs in with its password and may publish, not declare.
        parts = settings.amqp_url.split("@", 1)
        url = f"amqp://{user}:{password}@{parts[1]}"
        connection = await aio_pika.connect(url, timeout=10)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(Names(prefix).requests_exchange, ensure=False)
            await exchange.publish(aio_pika.Message(b"{}"), routing_key="mock-small")
    finally:
        async with httpx.AsyncClient(auth=(admin, admin_password), timeout=10) as http:
            await http.delete(f"{base}/api/users/{user}")
        await api.delete_vhost(vhost)


def test_cli_export(make_settings: SettingsFactory, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings()
    config = write_config(tmp_path / "c.toml", settings)
    out = tmp_path / "definitions.json"
    assert cli(["export", "-c", str(config), "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == export_definitions(settings).definitions
    assert f"wrote {out}: vhost {settings.vhost!r}, 5 exchanges, 25 queues" in (
        capsys.readouterr().out)
    assert cli(["export", "-c", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == export_definitions(settings).definitions
    # Written atomically: no temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "definitions.json"]


# -- diff ---------------------------------------------------------------------------------


def only(lines: list[DiffLine], kind: str, obj: str, name: str) -> DiffLine:
    found = [line for line in lines if (line.kind, line.object, line.name) == (kind, obj, name)]
    assert len(found) == 1, (kind, obj, name, [line.text() for line in lines])
    return found[0]


async def test_diff_nothing_after_apply(make_settings: SettingsFactory, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    await apply_topology(settings)
    # What Hutch's processes declare at run time is not drift: a reply queue, a pause flag,
    # a lease (exclusive).
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(names.reply_queue("c1"), durable=True,
                                    arguments={"x-expires": 60_000})
        await channel.declare_queue(names.pause_queue("chat"), durable=True)
        await channel.declare_queue(names.lease_queue("b1"), exclusive=True)
        # A worker's cancel queue and its binding to the cancel exchange (CancelSubscription).
        cancels = await channel.declare_queue(names.cancel_queue("w1"), exclusive=True,
                                              auto_delete=True)
        await cancels.bind(names.cancel_exchange)
        assert await diff_topology(settings) == []
    config = write_config(tmp_path / "c.toml", settings)
    assert await asyncio.to_thread(cli, ["diff", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"no differences: vhost {settings.vhost!r} matches the config")


async def test_diff_before_apply_everything_is_missing(make_settings: SettingsFactory
                                                       ) -> None:
    settings = make_settings()
    lines = await diff_topology(settings)
    topo = plan(settings)
    assert {line.kind for line in lines} == {"missing"}
    assert {line.fix for line in lines} == {"apply"}
    assert sorted((line.object, line.name) for line in lines) == sorted(
        [("exchange", e.name) for e in topo.exchanges]
        + [("queue", q.name) for q in topo.queues]
        + [("binding", b.label()) for b in topo.bindings]
        + [("policy", p.name) for p in topo.policies])
    await apply_topology(settings)
    assert await diff_topology(settings) == []


async def test_diff_changed_max_priority_needs_recreate(make_settings: SettingsFactory,
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    # FIFO pools have no lanes (whose x-max-priority would change too): one line.
    fifo = {"scheduling": {"policy": "fifo"}}
    settings = make_settings(max_priority=5, pool=fifo)
    qname = Names(settings.prefix).work_queue("chat")
    await apply_topology(settings)
    changed = make_settings(max_priority=9, pool=fifo)
    [line] = await diff_topology(changed)
    assert (line.kind, line.object, line.name, line.fix) == ("changed", "queue", qname,
                                                             "recreate")
    assert line.changes == ("x-max-priority: 5 -> 9",)
    assert "needs delete + re-create: messages would be lost" in line.note
    config = write_config(tmp_path / "c.toml", changed)
    assert await asyncio.to_thread(cli, ["diff", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"~ queue {qname}: x-max-priority: 5 -> 9 (needs delete + re-create" in out
    assert "1 difference: 1 needs delete + re-create" in out
    assert await asyncio.to_thread(cli, ["diff", "-c", str(config), "--json"]) == 1
    [item] = json.loads(capsys.readouterr().out)
    assert item["name"] == qname and item["fix"] == "recreate"


async def test_diff_objects_no_longer_in_the_config(make_settings: SettingsFactory,
                                                    prefix: str) -> None:
    """A removed pool leaves its queue, its model's binding and its policy; a retry delay
    no longer used leaves its tier. Apply deletes none of them: diff shows them."""
    names = Names(prefix)
    await apply_topology(two_pools(make_settings, prefix))
    connection = await aio_pika.connect(make_settings().amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(b"{}"),
                                               routing_key=names.work_queue("old"))
    lines = await diff_topology(make_settings())
    old_queue = only(lines, "extra", "queue", names.work_queue("old"))
    assert old_queue.fix == "manual" and "apply leaves it" in old_queue.note
    tier = only(lines, "extra", "queue", names.retry_queue(7000))
    assert tier.fix == "manual"
    binding = only(lines, "extra", "binding",
                   f"{names.requests_exchange} --old-model--> {names.work_queue('old')}")
    assert binding.fix == "manual"
    only(lines, "extra", "binding", f"{names.retry_exchange} --hutch-retry-tier=7000--> "
                                    f"{names.retry_queue(7000)}")
    assert only(lines, "extra", "policy", names.work_policy("old")).fix == "manual"
    # (the old pool's 16 lanes and their policy, presence and pause state queues too)
    assert len(lines) == 24, [line.text() for line in lines]
    text = format_diff(lines, vhost=make_settings().vhost)
    assert f"- queue {names.work_queue('old')}" in text
    assert "24 differences: 24 left to you" in text


async def test_diff_binding_of_a_removed_model(make_settings: SettingsFactory) -> None:
    settings = make_settings(pool={"models": ["mock-small", "mock-large", "old-model"]})
    names = Names(settings.prefix)
    await apply_topology(settings)
    smaller = make_settings()
    [line] = await diff_topology(smaller)
    assert (line.kind, line.object, line.fix) == ("extra", "binding", "apply")
    assert line.name == f"{names.requests_exchange} --old-model--> {names.work_queue('chat')}"
    assert "apply removes it" in line.note
    await apply_topology(smaller)
    assert await diff_topology(smaller) == []


async def test_diff_missing_binding_and_queue(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    await apply_topology(settings)
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        work = await channel.declare_queue(names.work_queue("chat"), passive=True)
        await work.unbind(names.requests_exchange, routing_key="mock-large")
        await channel.queue_delete(names.parked_queue)
    lines = await diff_topology(settings)
    assert sorted(line.text() for line in lines) == sorted([
        f"+ binding {names.requests_exchange} --mock-large--> {names.work_queue('chat')} "
        "(apply binds it)",
        f"+ queue {names.parked_queue} (apply declares it)",
    ])
    await apply_topology(settings)
    assert await diff_topology(settings) == []


async def test_diff_policy_changed_in_the_ui(make_settings: SettingsFactory,
                                            api: ManagementAPI) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    await apply_topology(settings)
    policy = plan(settings).policies[0]
    await api.put_policy(settings.vhost, policy.name, pattern=policy.pattern,
                         definition={**policy.definition, "max-length": 5,
                                     "message-ttl": 1000}, priority=0)
    [line] = await diff_topology(settings)
    assert (line.kind, line.object, line.name, line.fix) == (
        "changed", "policy", names.work_policy("chat"), "apply")
    assert line.changes == ("max-length: 5 -> 10000", "message-ttl: 1000 -> (none)")
    await apply_topology(settings)
    assert await diff_topology(settings) == []


async def test_diff_policy_that_shadows_hutchs(make_settings: SettingsFactory,
                                               api: ManagementAPI, prefix: str) -> None:
    settings = make_settings()
    await apply_topology(settings)
    other = f"ops-{prefix}"
    await api.put_policy(settings.vhost, other, pattern=f"^{prefix}\\.work\\.",
                         definition={"max-length": 1}, priority=1)
    try:
        [line] = await diff_topology(settings)
        assert (line.kind, line.object, line.name, line.fix) == (
            "shadowed", "policy", other, "manual")
        assert Names(prefix).work_queue("chat") in line.note
        assert f"can replace {Names(prefix).work_policy('chat')}" in line.note
        # A lower priority cannot win: no conflict.
        await api.put_policy(settings.vhost, other, pattern=f"^{prefix}\\.work\\.",
                             definition={"max-length": 1}, priority=-1)
        assert await diff_topology(settings) == []
    finally:
        await api.delete_policy(settings.vhost, other)


async def test_diff_exchange_of_another_type(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT,
                                       durable=True)
    line = only(await diff_topology(settings), "changed", "exchange",
                names.dead_letter_exchange)
    assert line.fix == "recreate"
    assert line.changes == ('type: "direct" -> "fanout"',)


async def test_diff_cli_trouble_is_exit_2(make_settings: SettingsFactory, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.toml",
                          make_settings(management_url="http://127.0.0.1:1"))
    assert await asyncio.to_thread(cli, ["diff", "-c", str(config)]) == 2
    assert "management API at http://127.0.0.1:1 is not reachable" in capsys.readouterr().err
    missing = write_config(tmp_path / "m.toml", make_settings().with_vhost("no-such-vhost-x"))
    assert await asyncio.to_thread(cli, ["diff", "-c", str(missing)]) == 2
    assert "vhost 'no-such-vhost-x' does not exist" in capsys.readouterr().err


def test_compare_without_a_broker(make_settings: SettingsFactory) -> None:
    """A queue declared without x-queue-type is classic; other apps' objects are ignored."""
    settings = make_settings()
    want = plan(settings)
    document = export_definitions(settings).definitions
    for queue in document["queues"]:
        queue["arguments"].pop("x-queue-type")
    document["queues"].append({"name": "someone-else", "arguments": {"x-max-priority": 2}})
    document["exchanges"].append({"name": "amq.direct", "type": "direct"})
    document["policies"].append({"name": "theirs", "pattern": "^someone", "priority": 9,
                                 "apply-to": "queues", "definition": {}})
    live = parse_definitions(document, settings.vhost)
    assert compare_topology(want, live, settings.prefix) == []


def test_compose_definitions_file_is_the_export_of_the_compose_config() -> None:
    """deploy/definitions.json (loaded by the compose broker at boot) must stay what
    `hutch topology export -c deploy/hutch.toml` writes: regenerate it when it fails."""
    import json
    from pathlib import Path

    from pipeline.settings import load_settings
    from topology.definitions import export_definitions

    root = Path(__file__).resolve().parent.parent
    exported = export_definitions(load_settings(root / "deploy" / "hutch.toml")).definitions
    committed = json.loads((root / "deploy" / "definitions.json").read_text())
    assert committed == json.loads(json.dumps(exported)), (
        "run: hutch topology export -c deploy/hutch.toml -o deploy/definitions.json")
