"""What a newcomer tripped on (issue 19, item 5): one-line errors instead of tracebacks,
misspelt variables, which broker an error is about, and the command line's help."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
from pathlib import Path

import aio_pika
import pytest

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.cli.common import settings_of
from pipeline.cli.main import build_parser
from pipeline.client.client import HutchClient
from pipeline.errors import BackendError, ConfigError, RequestCancelledError
from pipeline.ops import dlq
from pipeline.ops.status import format_status, status
from pipeline.settings import load_settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import (
    SettingsFactory,
    amqp,
    drain_queue,
    run_hutch,
    running_worker,
    write_config,
)
from tests.nodes import NodeFactory

URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No HUTCH_* variable of the calling shell (or of conftest) in this test."""
    for name in list(os.environ):
        if name.startswith("HUTCH_"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- finding 2: a backend url without /v1 -------------------------------------------------


async def test_a_backend_url_without_v1_is_the_backends_fault(
        make_settings: SettingsFactory, mock: MockBackend,
        caplog: pytest.LogCaptureFixture) -> None:
    """The worker says "check the backend url" at start; the request's 404 is answered
    backend_error (retried, counted toward the circuit), not invalid_request."""
    caplog.set_level("INFO", logger="hutch.backend")
    root = mock.base_url.removesuffix("/v1")
    settings = make_settings([("b1", root, 4)], pool={
        "attempts_per_delivery": 2, "retry_delays_ms": [], "breaker_failures": 50})
    await apply_topology(settings)
    async with running_worker(settings), HutchClient.from_settings(settings) as client:
        with pytest.raises(BackendError) as failed:
            await client.chat(model="mock-small", timeout=20,
                              messages=[{"role": "user", "content": "hi"}])
    assert failed.value.code == "backend_error"
    assert "check the backend url" in failed.value.message
    assert "after 2 attempts" in failed.value.message  # retried: the backend's fault
    [probe] = [r for r in caplog.records if r.getMessage() == "backend.url_not_found"]
    assert probe.levelname == "WARNING"
    assert probe.fields["backend"] == settings.pools[0].backends[0].name  # type: ignore[attr-defined]


# -- finding 3: one line, never a traceback ---------------------------------------------


@pytest.mark.parametrize(("args", "env", "code", "expected"), [
    (["status", "-c", "CONFIG"], {"HUTCH_POOLS": "[{bad"}, 2,
     "hutch: HUTCH_POOLS: not valid JSON"),
    (["worker", "-c", "CONFIG", "--log-level", "verbose"], {}, 2,
     "argument --log-level: invalid choice: 'VERBOSE'"),
    (["submit", "-m", "mock-small", "-p", "300", "hi"], {}, 2,
     "argument --priority/-p: must be within 0..255, got 300"),
    (["submit", "-m", "mock-small", "--timeout", "0", "hi"], {}, 2,
     "argument --timeout: must be > 0, got 0"),
    (["status", "-c", "DIR"], {}, 2, "is a directory: give the TOML file in it"),
], ids=["pools-json", "log-level", "priority", "timeout", "config-dir"])
async def test_bad_input_is_one_line(args: list[str], env: dict[str, str], code: int,
                                     expected: str, make_settings: SettingsFactory,
                                     tmp_path: Path, hutch_env: dict[str, str]) -> None:
    config = str(write_config(tmp_path / "hutch.toml", make_settings()))
    argv = [{"CONFIG": config, "DIR": str(tmp_path)}.get(a, a) for a in args]
    got, _, err = await run_hutch(argv, {**hutch_env, **env})
    assert "Traceback" not in err
    assert got == code, err
    assert expected in err
    assert len([line for line in err.splitlines() if line.startswith("hutch")]) == 1, err


@pytest.mark.parametrize(("value", "nodes"), [
    (URL, [URL]),
    (f"{URL}, amqp://guest:guest@10.0.0.2:5672/", [URL, "amqp://guest:guest@10.0.0.2:5672/"]),
    (f'["{URL}"]', [URL]),
])
def test_amqp_urls_takes_one_url_or_a_list(clean_env: pytest.MonkeyPatch, value: str,
                                           nodes: list[str]) -> None:
    clean_env.setenv("HUTCH_AMQP_URLS", value)
    assert load_settings().amqp_nodes() == nodes
    clean_env.setenv("HUTCH_TRUSTED_USERS", "ops, replayer")
    assert load_settings().trusted_users == ["ops", "replayer"]


def test_bad_json_in_a_structured_variable_names_it(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HUTCH_POOLS", "[{name: chat}]")
    with pytest.raises(ConfigError, match=r"^HUTCH_POOLS: not valid JSON"):
        load_settings()


async def test_mock_backend_on_a_port_in_use_says_so(hutch_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await run_hutch(["mock-backend", "--port", str(port)], hutch_env)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (f"mock backend: cannot listen on 127.0.0.1:{port}: the port is "
                           "already in use (another process listens there: stop it, or "
                           "pick another port with --port)")
    assert "RabbitMQ" not in err


# -- finding 4: misspelt variables, the broker an error is about ---------------------------


def test_a_misspelt_variable_is_warned_about(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                            make_settings: SettingsFactory,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(pool={"backends": [{
        "name": "b1", "url": "http://127.0.0.1:1/v1", "max_concurrency": 1,
        "api_key_env": "HUTCH_BACKEND_KEY"}]})
    config = write_config(tmp_path / "hutch.toml", settings)
    for name, value in (("HUTCH_AMQP_ULR", URL), ("HUTCH_PREFIX", "llm"),
                        ("HUTCH_BACKEND_KEY", "sk-x"), ("HUTCH_NODES_DIR", "/tmp"),
                        ("HUTCH_GATEWAY__PORT", "8081")):
        clean_env.setenv(name, value)
    settings_of(argparse.Namespace(config=str(config)))
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "hutch: warning: HUTCH_AMQP_ULR is not a Hutch setting and is ignored; did you "
        "mean HUTCH_AMQP_URL?"]


async def test_topology_errors_say_which_broker(make_settings: SettingsFactory,
                                                tmp_path: Path,
                                                hutch_env: dict[str, str]) -> None:
    settings = make_settings()  # nothing applied under this prefix
    config = str(write_config(tmp_path / "hutch.toml", settings))
    code, _, err = await run_hutch(["status", "-c", config], hutch_env)
    assert code == 1 and err.startswith("hutch: topology: ")
    assert f"(broker: {settings.redacted_amqp_url()})" in err
    assert "guest:guest@" not in err  # the password never


# -- finding 5: hutch demo --remove-topology on the wrong broker ---------------------------


async def test_demo_remove_topology_refuses_another_brokers_management_api(
        node_factory: NodeFactory, hutch_env: dict[str, str], amqp_url: str) -> None:
    """HUTCH_AMQP_URL names a broker without the management plugin; the default API address
    (:15672) is the main broker's. Listing that broker found nothing and printed "removed
    0"; now it refuses and says to set HUTCH_MANAGEMENT_URL."""
    node = node_factory.start("demo-nomgmt", management=False)
    env = {**hutch_env, "HUTCH_AMQP_URL": node.amqp_url()}
    code, out, err = await run_hutch(["demo", "--remove-topology", "hutch-demo-1"], env)
    assert code == 1 and out == "", out
    assert "belongs to another broker" in err and "HUTCH_MANAGEMENT_URL" in err
    assert "Traceback" not in err
    # On the right broker, a prefix with nothing left says so rather than "removed 0".
    code, out, _ = await run_hutch(["demo", "--remove-topology", "hutch-demo-1"],
                                   {**hutch_env, "HUTCH_AMQP_URL": amqp_url})
    assert code == 0 and out.startswith("nothing named hutch-demo-1.* in vhost"), out


# -- finding 12: the command line's help ---------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    return dict(sub.choices)  # type: ignore[arg-type]


def test_long_running_commands_describe_themselves() -> None:
    commands = _commands()
    for name in ("worker", "status", "gateway", "demo"):
        assert commands[name].description, f"hutch {name} --help has no description"
    demo = " ".join(commands["demo"].format_help().split())
    for default in ("(default 60)", "(default 10)", "(default 4)", "(default 100)"):
        assert default in demo
    assert "HUTCH_MANAGEMENT_URL" in demo
    worker = " ".join(commands["worker"].format_help().split())
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in worker
    assert "lowest level of the JSON log lines" in worker


def test_dash_m_means_model_wherever_it_exists() -> None:
    """-m is --model (submit) and --models (bench), never --metrics (status)."""
    for name, parser in _commands().items():
        for action in parser._actions:
            if "-m" in action.option_strings:
                assert action.dest in ("model", "models"), (name, action.option_strings)
    status = build_parser().parse_args(["status", "-c", "x", "--metrics", "h:9100"])
    assert status.metrics == ["h:9100"]


# -- findings 15 and 16: a request refused before any backend call --------------------------


async def test_a_request_refused_before_any_call_names_no_backend_and_its_param(
        make_settings: SettingsFactory, mock: MockBackend) -> None:
    """The contract: x-hutch-backend is absent when no backend tried the request (not the
    backend whose consumer happened to pick it up); the error names the field in param."""
    settings = make_settings([("b1", mock.base_url, 4)])
    names = Names(settings.prefix)
    await apply_topology(settings)
    async with running_worker(settings), amqp(settings.amqp_url) as conn:
        channel = await conn.channel()
        replies = await channel.declare_queue(names.reply_queue("raw"), durable=True,
                                              arguments={"x-expires": 60_000})
        exchange = await channel.get_exchange(names.requests_exchange)
        for cid, extra in (("bad", {"temperature": "hot"}), ("good", {})):
            body = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}],
                    **extra}
            await exchange.publish(aio_pika.Message(
                json.dumps(body).encode(), correlation_id=cid, reply_to=replies.name,
                content_type="application/json"), routing_key="mock-small")
        got = {m.correlation_id: m for m in await drain_queue(channel, replies.name,
                                                              at_least=2, timeout=30)}
    bad, good = got["bad"], got["good"]
    assert bad.headers[p.H_OUTCOME] == "error"
    assert p.H_BACKEND not in bad.headers, bad.headers
    assert bad.headers[p.H_ATTEMPTS] == 0
    error = json.loads(bad.body)["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "temperature")
    assert good.headers[p.H_BACKEND] == settings.pools[0].backends[0].name
    assert mock.stats()["served"] == 1


async def test_status_shows_the_lease_holder_without_metrics(
        make_settings: SettingsFactory, mock: MockBackend) -> None:
    """The management API names the connection owning a lease queue: its worker."""
    settings = make_settings([("b1", mock.base_url, 4)])
    b1 = settings.pools[0].backends[0].name
    await apply_topology(settings)
    before = await status(settings, [])
    assert before.backends[0].owner is None
    async with running_worker(settings):
        # The API's queue details are sampled statistics: the owner shows within seconds.
        async with asyncio.timeout(30):
            while (report := await status(settings, [])).backends[0].owner is None:
                await asyncio.sleep(0.5)
    worker = f"hutch-worker {socket.gethostname()}:{os.getpid()}"
    owner = report.backends[0].owner
    assert owner is not None and owner.startswith(f"{worker} (127.0.0.1:"), owner
    row = next(line for line in format_status(report).splitlines() if line.startswith(b1))
    assert row.endswith(owner)


async def test_bench_scenario_help_cites_no_issue(
        hutch_env: dict[str, str]) -> None:
    code, out, _ = await run_hutch(["bench", "scenario", "--help"], hutch_env)
    assert code == 0 and "issue" not in out.lower()


# -- finding 8: the ids `hutch cancel` needs, and what became of a cancel -------------------


async def test_cancel_says_what_became_of_each_id(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="hutch.hooks")
    async with MockBackend(MockConfig(latency_ms=20_000, capacity=1)) as slow:
        settings = make_settings([("b1", slow.base_url, 1)])
        config = str(write_config(tmp_path / "hutch.toml", settings))
        await apply_topology(settings)
        # No worker: the mandatory cancel comes back, and the command says so.
        code, out, _ = await run_hutch(["cancel", "-c", config, "id-1"], hutch_env)
        assert code == 1
        assert out.splitlines()[0] == ("id-1: not delivered: no worker is listening for "
                                       "cancels (is any worker running?); nothing was "
                                       "cancelled")
        async with running_worker(settings), HutchClient.from_settings(settings) as client:
            cid = await client.submit({"model": "mock-small", "messages": [
                {"role": "user", "content": "long"}]}, model="mock-small", timeout=60)
            async with asyncio.timeout(10):
                while not (started := [r for r in caplog.records
                                       if r.getMessage() == "request.started"]):
                    await asyncio.sleep(0.05)
            # The worker's debug line shows the id the operator needs.
            assert started[0].fields["correlation_id"] == cid  # type: ignore[attr-defined]
            code, out, err = await run_hutch(["cancel", "-c", config, cid, "no-such-id"],
                                             hutch_env)
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].startswith(f"{cid}: aborted at a backend (worker "), out
            assert lines[1].startswith("no-such-id: at no backend now (1 worker answered)")
            assert "otherwise the id is unknown" in lines[1]
            with pytest.raises(RequestCancelledError):
                await client.result(cid)


# -- finding 7: replaying requests nobody can be answered for ------------------------------


async def test_replay_leaves_requests_whose_reply_queue_is_gone(
        make_settings: SettingsFactory, mock: MockBackend, tmp_path: Path,
        hutch_env: dict[str, str]) -> None:
    """A completion for a reply queue that is gone is parked as the client's (not as
    backend_error); `dlq replay` leaves it parked (it would call the backend again for
    nobody) unless --force, and says how many it left."""
    settings = make_settings([("b1", mock.base_url, 4)])
    names = Names(settings.prefix)
    gone, alive = names.reply_queue("gone"), names.reply_queue("alive")
    await apply_topology(settings)
    async with amqp(settings.amqp_url) as conn, amqp(settings.amqp_url) as other:
        channel = await conn.channel()
        await channel.declare_queue(alive, durable=True, arguments={"x-expires": 60_000})
        # A one-shot client's exclusive queue, held by its connection: it exists.
        held = names.reply_queue("held")
        await (await other.channel()).declare_queue(held, exclusive=True)
        exchange = await channel.get_exchange(names.requests_exchange)
        async with running_worker(settings):
            body = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]}
            await exchange.publish(aio_pika.Message(
                json.dumps(body).encode(), correlation_id="to-gone", reply_to=gone,
                content_type="application/json"), routing_key="mock-small")
            [parked] = await drain_queue(channel, names.parked_queue, at_least=1)
        assert mock.stats()["served"] == 1
        assert parked.headers[p.H_REASON] == "no_reply_to"
        assert parked.headers[p.H_ERROR_CODE] == "invalid_request"  # not backend_error
        assert "could not be delivered" in str(parked.headers[p.H_ERROR_MESSAGE])
        # Three parked: the undeliverable one, and two whose reply queues exist.
        for cid, reply_to in (("to-gone", gone), ("to-alive", alive), ("to-held", held)):
            await channel.default_exchange.publish(aio_pika.Message(
                json.dumps({"model": "mock-small", "messages": []}).encode(),
                correlation_id=cid, reply_to=reply_to, headers={
                    p.H_REASON: "backend_error", p.H_ORIGINAL_ROUTING_KEY: "mock-small"}),
                routing_key=names.parked_queue)
        config = str(write_config(tmp_path / "hutch.toml", settings))
        code, out, err = await run_hutch(["dlq", "replay", "-c", config], hutch_env)
        assert code == 0, err
        assert out.strip() == ("replayed 2 (skipped 0 with other reasons, 0 unroutable, 1 "
                               "whose reply queue is gone: left parked, --force replays "
                               "them)")
        assert [m.correlation_id for m in await dlq.list_parked(settings)] == ["to-gone"]
        assert await dlq.replay(settings, force=True) == dlq.ReplayResult(replayed=1)
        work = await drain_queue(channel, names.work_queue("chat"))
        assert sorted(m.correlation_id or "" for m in work) == [
            "to-alive", "to-gone", "to-held"]
