"""One AMQP connect path: the broker's refusals as clear errors, a worker's quiet backoff,
the management API checked against the AMQP broker, and local nodes that fail loudly
where RabbitMQ is not installed."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from pipeline.broker.connection import Reconnect, broker_identity, connect
from pipeline.broker.topology import apply_topology
from pipeline.errors import (
    BrokerAccessError,
    BrokerAuthError,
    BrokerUnreachableError,
    TopologyError,
)
from pipeline.settings import Settings, load_settings
from pipeline.worker.worker import Worker
from tests.conftest import SettingsFactory, run_hutch, write_config
from tests.nodes import SCRIPT, LocalNode, NodeFactory

UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"


def _with_url(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"amqp_url": url})


async def test_connects_and_names_the_broker(make_settings: SettingsFactory) -> None:
    connection = await connect(make_settings(), name="hutch test")
    async with connection:
        identity = broker_identity(connection)
    assert identity.product == "RabbitMQ" and identity.cluster_name


async def test_missing_vhost_says_so(make_settings: SettingsFactory) -> None:
    settings = make_settings().with_vhost(f"no-such-{uuid.uuid4().hex[:6]}")
    with pytest.raises(BrokerAccessError) as info:
        await connect(settings, name="hutch test")
    message = str(info.value)
    assert settings.vhost in message and "does not exist" in message and "'guest'" in message
    assert "InvalidFrameError" not in message


async def test_bad_credentials_say_so(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    url = settings.amqp_url.replace("guest:guest@", "guest:wrong-password@")
    with pytest.raises(BrokerAuthError, match="refused the credentials") as info:
        await connect(_with_url(settings, url), name="hutch test")
    assert "wrong-password" not in str(info.value)


async def test_unreachable_broker_is_one_line_with_the_hint() -> None:
    with pytest.raises(BrokerUnreachableError) as info:
        await connect(load_settings(amqp_url=UNREACHABLE), name="hutch test", timeout_s=5)
    assert isinstance(info.value, ConnectionError)  # what retrying callers catch
    assert "rabbitmq-server -detached" in str(info.value) and "\n" not in str(info.value)


async def test_reconnect_backs_off_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    """Several failed attempts: one structured ``amqp.unreachable`` line, no per-attempt
    line from aiormq; stopping ends the wait at once."""
    reconnect = Reconnect(load_settings(amqp_url=UNREACHABLE), name="hutch test",
                          first_delay_s=0.05, max_delay_s=0.2, log_every_s=60)
    stop = asyncio.Event()
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(reconnect.connect(stop))
    await asyncio.sleep(1.5)
    stop.set()
    assert await asyncio.wait_for(task, 5) is None
    assert reconnect.attempts >= 4
    lines = [r for r in caplog.records if r.name.startswith(("aiormq", "hutch"))]
    assert [r.getMessage() for r in lines] == ["amqp.unreachable"]
    assert getattr(lines[0], "fields", {})["attempts"] == 1


async def test_worker_stops_on_a_missing_vhost(make_settings: SettingsFactory) -> None:
    """A vhost that does not exist is not retried forever: the worker raises."""
    settings = make_settings().with_vhost(f"no-such-{uuid.uuid4().hex[:6]}")
    with pytest.raises(BrokerAccessError):
        await asyncio.wait_for(Worker(settings).run(), 20)


async def test_cli_says_missing_vhost_in_one_line(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    settings = make_settings().with_vhost("no-such-vhost-here")
    config = write_config(tmp_path / "hutch.toml", settings)
    code, _, err = await run_hutch(["topology", "apply", "--config", str(config)], hutch_env)
    assert code == 1
    assert err.count("\n") == 1 and "'no-such-vhost-here'" in err, err
    assert "Traceback" not in err


async def test_cli_unreachable_broker_prints_one_line_and_no_json(
        tmp_path: Path, hutch_env: dict[str, str], make_settings: SettingsFactory) -> None:
    config = write_config(tmp_path / "hutch.toml", _with_url(make_settings(), UNREACHABLE))
    code, out, err = await run_hutch(["topology", "apply", "--config", str(config)], hutch_env)
    assert code == 1
    assert err.count("\n") == 1 and "rabbitmq-server -detached" in err, err
    assert "{" not in err and out == ""


# -- the management API must belong to the AMQP broker -----------------------------------


async def test_apply_refuses_a_management_api_of_another_broker(
        node_factory: NodeFactory, make_settings: SettingsFactory, amqp_url: str) -> None:
    """The issue's case: AMQP on a second broker without the management plugin, the
    management API (its default address, port 15672) the main broker's. Nothing may be
    written to the main broker."""
    node = node_factory.start("nomgmt", management=False)
    main = make_settings()
    settings = _with_url(main, node.amqp_url())
    assert settings.management_api()[0] == main.management_api()[0]
    with pytest.raises(TopologyError, match="belongs to another broker") as info:
        await apply_topology(settings)
    message = str(info.value)
    assert f"127.0.0.1:{node.amqp_port}" in message and "15672" in message
    base, user, password = main.management_api()
    async with httpx.AsyncClient(auth=(user, password)) as http:
        policies = (await http.get(f"{base}/api/policies")).json()
    assert not [p for p in policies if p["name"].startswith(settings.prefix + ".")]


async def test_apply_accepts_the_management_api_of_the_same_broker(
        local_node: LocalNode, make_settings: SettingsFactory) -> None:
    settings = make_settings(amqp_url=local_node.amqp_url(),
                             management_url=local_node.management_url)
    report = await apply_topology(settings)
    assert report.policies and report.queues


# -- local nodes: never silently skipped ----------------------------------------------------


def test_node_script_without_rabbitmq_says_what_is_missing(tmp_path: Path) -> None:
    """On a machine without the server binaries the script says so (exit 127)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("cat", "dirname", "grep", "head", "readlink", "sed"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    done = subprocess.run(
        ["/bin/bash", str(SCRIPT), "start", "x", "--amqp-port", "1", "--mgmt-port", "2"],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, capture_output=True, text=True,
        timeout=30, check=False)
    assert done.returncode == 127, done.stderr
    assert "not installed" in done.stderr and "apt-get install rabbitmq-server" in done.stderr


def test_local_node_fails_the_test_when_rabbitmq_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "RABBITMQ_SBIN", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="cannot start one"):
        LocalNode(f"hutch-t{os.getpid()}-missing").start()
