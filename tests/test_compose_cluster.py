"""The compose profile "cluster": three RabbitMQ 4.3 nodes and Hutch on all of them.

Checked without Docker, like the rest of docker-compose.yml (tests/test_compose.py, whose
helpers these tests use): a pinned 4.3.x image with strict quorum priorities, one Erlang
cookie, the node list in cluster.conf equal to the services' host names, every `hutch`
command parses, every mounted file exists, and deploy/hutch-cluster.toml names every node
with a quorum pool.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from pipeline.broker.quorum import priority_semantics
from pipeline.settings import Settings
from tests.test_compose import (
    HUTCH_CONFIG,
    ROOT,
    _bind_mounts,
    _deploy_settings,
    _hutch_services,
    _parse,
    _rabbitmq_conf,
    clean_env,  # noqa: F401  (fixture)
    compose,  # noqa: F401  (fixture)
)

NODES = ["rabbit-1", "rabbit-2", "rabbit-3"]


@pytest.fixture(scope="module")
def cluster(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:  # noqa: F811
    result = {name: service for name, service in compose["services"].items()
              if "cluster" in service.get("profiles", [])}
    return result


def test_three_nodes_of_a_version_with_strict_quorum_priorities(
        cluster: dict[str, dict[str, Any]]) -> None:
    assert set(NODES) <= set(cluster)
    for name in NODES:
        image = str(cluster[name]["image"])
        match = re.fullmatch(r"rabbitmq:(4\.(\d+)\.\d+)-management", image)
        assert match and int(match[2]) >= 3, f"{name}: {image} (4.3.x or later: strict)"
        assert priority_semantics(match[1]).startswith("strict")
        assert cluster[name]["hostname"] == name


def test_nodes_share_a_cookie_and_find_each_other(cluster: dict[str, dict[str, Any]]) -> None:
    cookies = {cluster[name]["environment"]["RABBITMQ_ERLANG_COOKIE"] for name in NODES}
    assert len(cookies) == 1
    for name in NODES:
        conf = _rabbitmq_conf(cluster[name])
        assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
        listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config")}
        assert listed == {f"rabbit@{node}" for node in NODES}, name
        assert int(conf["quorum_queue.initial_cluster_size"]) == len(NODES)
    host_ports = [str(port).split(":")[0] for name in NODES for port in cluster[name]["ports"]]
    assert len(host_ports) == len(set(host_ports)), "host ports collide"


def test_mounted_files_exist_and_commands_parse(cluster: dict[str, dict[str, Any]]) -> None:
    for name, service in cluster.items():
        for target, source in _bind_mounts(service).items():
            assert (ROOT / source).exists(), f"{name}: {source} (at {target}) is missing"
    commands = _hutch_services(cluster)
    used = {_parse(argv, name).command for name, argv in commands.items()}
    assert used == {"topology", "worker"}
    assert sum(_parse(a, n).command == "worker" for n, a in commands.items()) >= 2


def test_hutch_points_at_every_node_with_a_quorum_pool(
        clean_env: pytest.MonkeyPatch,  # noqa: F811
        cluster: dict[str, dict[str, Any]]) -> None:
    for name in _hutch_services(cluster):
        assert HUTCH_CONFIG in _bind_mounts(cluster[name])
        settings: Settings = _deploy_settings(clean_env, cluster[name])
        hosts = [(urlsplit(u).hostname, urlsplit(u).port) for u in settings.amqp_nodes()]
        assert hosts == [(node, 5672) for node in NODES], name
        assert all(pool.queue_type == "quorum" for pool in settings.pools), name
        assert settings.reply_queue_type == "quorum"
        assert urlsplit(settings.management_api()[0]).hostname in NODES
        depends = cluster[name]["depends_on"]
        for node in NODES:
            assert depends[node]["condition"] == "service_healthy", name
        if _parse(_hutch_services(cluster)[name], name).command == "worker":
            assert depends["cluster-topology"]["condition"] == \
                "service_completed_successfully"
