"""TLS: a local node with only a TLS listener and the management API on HTTPS, both
wanting a client certificate, with a private CA the test makes. Hutch's settings
(``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``) reach every connection; a
certificate failure is reported as one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hutch
from pipeline.broker.connection import CLIENT_CERT_HINT, Reconnect, connect
from pipeline.broker.management import ManagementAPI
from pipeline.broker.topology import apply_topology
from pipeline.errors import (
    BrokerTLSError,
    BrokerUnreachableError,
    ConfigError,
    StatusError,
    TopologyError,
)
from pipeline.ops.status import status
from pipeline.settings import Settings, load_settings
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.pause import pause_pool, paused_pools
from tests.conftest import running_worker
from tests.nodes import LocalNode, NodeFactory, TlsFiles, make_certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_node(node_factory: NodeFactory, certificates: TlsFiles) -> Iterator[LocalNode]:
    node = node_factory.start("tls", tls=certificates)
    try:
        yield node
    finally:
        node.clean()


def _settings(node: LocalNode, **tls: Any) -> Settings:
    pool = {"name": "chat", "models": ["m"],
            "backends": [{"name": "tls-b1", "url": "http://127.0.0.1:9/v1", "max_concurrency": 1}]}
    return load_settings(amqp_url=node.amqp_url(), management_url=node.management_url,
                         prefix="tls", pools=[pool], **tls)


def _mutual(files: TlsFiles) -> dict[str, str]:
    return {"tls_ca_file": str(files.ca), "tls_cert_file": str(files.client_cert),
            "tls_key_file": str(files.client_key)}


async def test_everything_works_over_mutual_tls(tls_node: LocalNode, certificates: TlsFiles
                                                ) -> None:
    settings = _settings(tls_node, **_mutual(certificates))
    assert settings.amqp_url.startswith("amqps://")
    connection = await connect(settings, name="hutch tls test")
    await connection.close()
    report = await apply_topology(settings)  # AMQP and the HTTPS management API
    assert report.policies and report.queues
    await pause_pool(settings, "chat")
    assert await paused_pools(settings) == ["chat"]
    async with ManagementAPI.from_settings(settings) as api:
        assert await api.get_policy("/", report.policies[0]) is not None


async def test_untrusted_certificate_is_reported_as_one(tls_node: LocalNode) -> None:
    settings = _settings(tls_node)  # no CA: the system's store does not know ours
    with pytest.raises(BrokerTLSError, match=r"certificate is not trusted.*tls_ca_file"):
        await connect(settings, name="hutch tls test")
    async with ManagementAPI.from_settings(settings) as api:
        with pytest.raises(TopologyError) as info:
            await api.check()
    assert "certificate is not trusted" in str(info.value)
    assert "management plugin" not in str(info.value)


async def test_missing_client_certificate_says_so(tls_node: LocalNode,
                                                   certificates: TlsFiles) -> None:
    """With TLS 1.3 the broker refuses a missing client certificate after the handshake:
    an alert (a TLS error) or, when the alert is lost, a reset (retryable: a restarting
    broker resets too); either way the message names the client certificate."""
    settings = _settings(tls_node, tls_ca_file=str(certificates.ca))
    with pytest.raises((BrokerTLSError, BrokerUnreachableError)) as amqp:
        await connect(settings, name="hutch tls test")
    # One wording, whichever way it showed, on AMQP and on the management API.
    assert CLIENT_CERT_HINT in str(amqp.value)
    async with ManagementAPI.from_settings(settings) as api:
        with pytest.raises(TopologyError) as http:
            await api.check()
    assert CLIENT_CERT_HINT in str(http.value)


async def test_a_host_name_not_in_the_certificate_says_so(tls_node: LocalNode,
                                                          certificates: TlsFiles) -> None:
    """127.1 reaches the node, but the certificate names 127.0.0.1 and localhost: the CA
    is trusted, so "set tls_ca_file" would be wrong advice."""
    settings = load_settings(
        amqp_url=tls_node.amqp_url().replace("127.0.0.1", "127.1"), prefix="tls",
        management_url=tls_node.management_url.replace("127.0.0.1", "127.1"),
        **_mutual(certificates))
    with pytest.raises(BrokerTLSError) as amqp:
        await connect(settings, name="hutch tls test")
    async with ManagementAPI.from_settings(settings) as api:
        with pytest.raises(TopologyError) as http:
            await api.check()
    for message in (str(amqp.value), str(http.value)):
        assert "certificate does not name the host in the URL" in message, message
        assert "'127.1'" in message and "set tls_ca_file" not in message


async def test_plain_amqp_to_the_tls_port_says_tls_and_is_not_retried(
        tls_node: LocalNode, certificates: TlsFiles) -> None:
    """amqp:// to the TLS listener reads as a reset; it is not a broker that is down, so
    it says "use amqps://" and a worker's reconnect loop raises it instead of retrying."""
    settings = load_settings(amqp_url=tls_node.amqp_url().replace("amqps://", "amqp://"),
                             prefix="tls", **_mutual(certificates))
    with pytest.raises(BrokerTLSError, match="speaks TLS on that port: use amqps://") as info:
        await connect(settings, name="hutch tls test")
    assert "Is RabbitMQ running" not in str(info.value)
    async with asyncio.timeout(30):
        with pytest.raises(BrokerTLSError):
            await Reconnect(settings, name="hutch tls test").connect(asyncio.Event())


async def test_http_to_the_https_management_port_says_https(
        tls_node: LocalNode, certificates: TlsFiles) -> None:
    settings = _settings(tls_node, **_mutual(certificates)).model_copy(
        update={"management_url": tls_node.management_url.replace("https://", "http://")})
    async with ManagementAPI.from_settings(settings) as api:
        with pytest.raises(TopologyError, match="speaks https on that port: use https://"
                           ) as info:
            await api.check()
    assert "management plugin" not in str(info.value)


async def test_a_wrong_password_on_status_blames_the_password(
        tls_node: LocalNode, certificates: TlsFiles) -> None:
    settings = load_settings(amqp_url=tls_node.amqp_url(password="wrong"), prefix="tls",
                             management_url=tls_node.management_url, **_mutual(certificates))
    with pytest.raises(StatusError, match="login failed, a wrong user or password") as info:
        await status(settings, [])
    assert "tag" not in str(info.value)


def test_certificate_without_key_is_a_config_error(certificates: TlsFiles) -> None:
    from pipeline.broker.connection import tls_context

    settings = load_settings(amqp_url="amqps://h/", tls_cert_file=str(certificates.client_cert))
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file"):
        tls_context(settings)
    with pytest.raises(ConfigError, match="tls_ca_file: cannot read"):
        tls_context(load_settings(tls_ca_file=str(Path(certificates.directory, "nope.pem"))))


# -- HutchClient without settings: its TLS files as arguments ------------------------------


async def test_client_takes_its_tls_files_directly(tls_node: LocalNode,
                                                   certificates: TlsFiles) -> None:
    """``HutchClient(url, tls=TLSFiles(...))``: mutual TLS with no settings object; a
    request goes through a worker and back over amqps."""
    mock = MockBackend(MockConfig(latency_ms=0, models=("m",)))
    await mock.start()
    pool = {"name": "chat", "models": ["m"], "backends": [
        {"name": "tls-c1", "url": mock.base_url, "max_concurrency": 2}]}
    settings = load_settings(amqp_url=tls_node.amqp_url(), prefix="tls-client",
                             management_url=tls_node.management_url, pools=[pool],
                             **_mutual(certificates))
    await apply_topology(settings)
    tls = hutch.TLSFiles(ca_file=certificates.ca, cert_file=certificates.client_cert,
                         key_file=certificates.client_key)
    try:
        async with running_worker(settings), hutch.HutchClient(
                tls_node.amqp_url(), prefix="tls-client", tls=tls,
                temporary_reply_queue=True) as client:
            assert await client.ready()
            completion = await client.chat(
                model="m", messages=[{"role": "user", "content": "over tls"}], timeout=30)
    finally:
        await mock.stop()
    assert completion.choices[0].message.content == "mock reply to: over tls"


async def test_client_without_tls_files_is_refused_as_tls(tls_node: LocalNode) -> None:
    with pytest.raises(hutch.BrokerTLSError, match="certificate is not trusted"):
        async with hutch.HutchClient(tls_node.amqp_url(), prefix="tls-client",
                                     temporary_reply_queue=True):
            pass


def test_client_tls_files_are_checked_naming_the_argument(certificates: TlsFiles) -> None:
    with pytest.raises(hutch.ConfigError, match=r"tls.cert_file and tls.key_file"):
        hutch.HutchClient("amqps://h/", tls=hutch.TLSFiles(cert_file=certificates.client_cert))
    with pytest.raises(hutch.ConfigError, match=r"tls.ca_file: cannot read"):
        hutch.HutchClient("amqps://h/", tls=hutch.TLSFiles(ca_file="/nonexistent/ca.pem"))
