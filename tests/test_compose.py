"""The docker-compose stack, the README and the docs, checked without Docker.

There is no Docker engine on the CI machine, so `docker compose up` cannot prove the stack
works. These tests keep it honest instead: images are pinned to exact versions (RabbitMQ a
4.x management image), every `hutch` command in it parses with the real CLI parser, every
mounted file exists, the compose config loads with the real settings loader, the broker's
config, plugins and boot-time definitions agree with each other and with the Hutch config
(the user the workers log in with, the queues and policies the UI shows), and the ports and
host names the services use for each other agree: Prometheus' targets, Grafana's
datasource and dashboards. The README's quick start and the metric names of the docs are
checked the same way (the metrics in detail: tests/test_metrics.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.broker.names import Names
from pipeline.cli.main import build_parser
from pipeline.observe.metrics import Metrics
from pipeline.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/hutch demo",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest",
)

EXPECTED_SERVICES = {"rabbitmq", "mock-backend", "topology", "worker-1", "worker-2", "prometheus",
                     "grafana"}
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
#: The alerting rules (tests/test_alerts.py), loaded through prometheus.yml's rule_files.
ALERT_RULES = "./deploy/prometheus/alerts.yml"
HUTCH_CONFIG = "/etc/hutch/hutch.toml"
RABBITMQ_PLUGINS = "/etc/rabbitmq/enabled_plugins"
#: Where the image's RabbitMQ reads configuration: the main file and the conf.d directory.
RABBITMQ_CONFIGS = re.compile(r"^/etc/rabbitmq/(rabbitmq\.conf|conf\.d/[^/]+\.conf)$")
RABBITMQ_PROMETHEUS_PORT = 15692
#: The file `hutch topology export` writes, mounted into the broker's definitions directory.
EXPORTED_DEFINITIONS = "./deploy/definitions.json"
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), (
        "docker-compose.yml must be a mapping with a 'services' mapping")
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stack's services; those of the profile "cluster" (a second broker, three nodes)
    are checked by tests/test_compose_cluster.py."""
    result: dict[str, dict[str, Any]] = {
        name: service for name, service in compose["services"].items()
        if "cluster" not in service.get("profiles", [])}
    return result


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No HUTCH_* variable of the developer's shell may change what the tests load."""
    for key in list(os.environ):
        if key.startswith("HUTCH_"):
            monkeypatch.delenv(key)
    return monkeypatch


def _argv(command: Any) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    assert isinstance(command, list), f"command must be a string or a list: {command!r}"
    return [str(part) for part in command]


def _dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return ROOT / context / name


def _entrypoint(dockerfile: Path) -> list[str]:
    """The exec-form ENTRYPOINT of a Dockerfile (the last one wins)."""
    entrypoint: list[str] = []
    for line in dockerfile.read_text().splitlines():
        if line.strip().upper().startswith("ENTRYPOINT"):
            value = json.loads(line.strip()[len("ENTRYPOINT"):].strip())
            assert isinstance(value, list), f"{dockerfile}: use the exec form of ENTRYPOINT"
            entrypoint = [str(part) for part in value]
    return entrypoint


def _hutch_argv(service: dict[str, Any]) -> list[str] | None:
    """The arguments given to `hutch` by this service, or None if it does not run hutch."""
    command = _argv(service.get("command"))
    if "build" in service:
        entrypoint = _argv(service.get("entrypoint")) or _entrypoint(_dockerfile(service))
    else:
        entrypoint = _argv(service.get("entrypoint"))
    full = entrypoint + command
    if not full or Path(full[0]).name != "hutch":
        return None
    return full[1:]


def _hutch_services(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    result = {}
    for name, service in services.items():
        argv = _hutch_argv(service)
        if argv is not None:
            result[name] = argv
    return result


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of the service's bind mounts."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts[str(volume["target"])] = str(volume["source"])
            continue
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/", "~")):
            mounts[target] = source
    return mounts


def _host_path(mounts: dict[str, str], container_path: str) -> Path | None:
    """Where a container path comes from on the host, through the bind mounts."""
    for target, source in mounts.items():
        if container_path == target or container_path.startswith(target + "/"):
            return ROOT / source / container_path[len(target):].lstrip("/")
    return None


def _container_ports(service: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for entry in [*service.get("expose", []), *service.get("ports", [])]:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def _parse(argv: list[str], service: str) -> Any:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"service {service}: `hutch {shlex.join(argv)}` does not parse with the "
                    f"CLI's own parser (exit {exc.code})")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(str(item).split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _deploy_settings(clean_env: pytest.MonkeyPatch, service: dict[str, Any]) -> Settings:
    """The settings a hutch container would load: its mounted config and its environment."""
    mounts = _bind_mounts(service)
    assert HUTCH_CONFIG in mounts, f"{HUTCH_CONFIG} is not mounted into the service"
    with clean_env.context() as env:
        for key, value in _env(service).items():
            env.setenv(key, value)
        return load_settings(ROOT / mounts[HUTCH_CONFIG])


# -- docker-compose.yml --------------------------------------------------------------------


def test_compose_defines_the_stack(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= EXPECTED_SERVICES


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    def pinned(image: str) -> bool:
        """A digest, or a tag naming an exact version (4.1.4-management, v2.53.0, 3.11-slim
        for a base image's Python minor): never latest, never a bare major."""
        if "@sha256:" in image:
            return True
        name, _, tag = image.rpartition(":")
        return (bool(name) and "/" not in tag
                and re.match(r"^v?\d+\.\d+(\.\d+)?(-[a-z0-9.-]+)?$", tag) is not None)

    for name, service in services.items():
        if "image" in service:
            assert pinned(str(service["image"])), f"{name}: image {service['image']!r} not pinned"
        if "build" in service:
            dockerfile = _dockerfile(service)
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            bases = re.findall(r"^\s*FROM\s+(\S+)", dockerfile.read_text(), re.M | re.I)
            assert bases, f"{dockerfile}: no FROM line"
            for base in bases:
                assert pinned(base), f"{dockerfile}: base image {base!r} is not pinned"
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        if "image" in service and "build" not in service:
            tag = str(service["image"]).rpartition(":")[2]
            assert re.match(r"^v?\d+\.\d+\.\d+", tag), (
                f"{name}: pin {service['image']!r} to a patch release (major.minor.patch)")
    # The design runs RabbitMQ 4.x in compose, with the management UI.
    assert re.match(r"^rabbitmq:4\.\d+\.\d+-management(-alpine)?$",
                    str(services["rabbitmq"]["image"])), services["rabbitmq"]["image"]


def test_the_image_runs_hutch(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            assert _entrypoint(_dockerfile(service)) == ["hutch"], name
            # With ENTRYPOINT ["hutch"], a command starting with "hutch" would run `hutch hutch`.
            assert _argv(service.get("command"))[:1] != ["hutch"], (
                f"{name}: the image's entrypoint is already `hutch`; the command holds only "
                "its arguments")


def test_every_hutch_command_parses(services: dict[str, dict[str, Any]]) -> None:
    commands = _hutch_services(services)
    used = set()
    for name, argv in commands.items():
        args = _parse(argv, name)
        used.add(args.command)
    assert used >= {"worker", "topology", "mock-backend"}, used
    assert _parse(commands["topology"], "topology").topology_command == "apply"


def test_mounted_files_exist(compose: dict[str, Any],
                             services: dict[str, dict[str, Any]]) -> None:
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for target, source in _bind_mounts(service).items():
            hint = (" (generate it: `hutch topology export` of deploy/hutch.toml)"
                    if source == EXPORTED_DEFINITIONS else "")
            assert (ROOT / source).exists(), (
                f"{name}: {source} (mounted at {target}) is missing{hint}")
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":")[0] in named_volumes, f"{name}: undeclared {volume}"
    # Every --config names a file that is mounted into that container.
    for name, argv in _hutch_services(services).items():
        config = getattr(_parse(argv, name), "config", None)
        if config is not None:
            assert config in _bind_mounts(services[name]), (
                f"{name}: --config {config} is not mounted")
    assert _bind_mounts(services["prometheus"]).get(PROMETHEUS_CONFIG) == (
        "./deploy/prometheus.yml")
    for name in ("topology", "worker-1", "worker-2"):
        assert _bind_mounts(services[name]).get(HUTCH_CONFIG) == "./deploy/hutch.toml", name


def _deploy_credentials(clean_env: pytest.MonkeyPatch, services: dict[str, dict[str, Any]]
                        ) -> tuple[str, str]:
    """The user and password the hutch containers connect with (all must agree)."""
    found = set()
    for name, argv in _hutch_services(services).items():
        if _parse(argv, name).command in ("worker", "topology"):
            amqp = urlsplit(_deploy_settings(clean_env, services[name]).amqp_url)
            found.add((amqp.username or "guest", amqp.password or "guest"))
    assert len(found) == 1, f"hutch services log in differently: {found}"
    return found.pop()


def test_deploy_config_loads(clean_env: pytest.MonkeyPatch,
                             services: dict[str, dict[str, Any]]) -> None:
    settings = load_settings(ROOT / "deploy" / "hutch.toml")
    assert settings.pools, "deploy/hutch.toml defines no pool: the workers would refuse it"
    user, password = _deploy_credentials(clean_env, services)
    assert user != "guest", "guest may only connect from localhost: use a user of our own"
    assert 5672 in _container_ports(services["rabbitmq"])
    assert 15672 in _container_ports(services["rabbitmq"])
    for name, argv in _hutch_services(services).items():
        if _parse(argv, name).command not in ("worker", "topology"):
            continue
        settings = _deploy_settings(clean_env, services[name])
        amqp = urlsplit(settings.amqp_url)
        assert (amqp.hostname, amqp.port or 5672) == ("rabbitmq", 5672), name
        assert (amqp.username, amqp.password) == (user, password), name
        base, api_user, api_password = settings.management_api()
        assert base == "http://rabbitmq:15672", name
        assert (api_user, api_password) == (user, password), name


def test_workers_depend_on_the_topology_and_a_healthy_broker(
        services: dict[str, dict[str, Any]]) -> None:
    healthcheck = services["rabbitmq"]["healthcheck"]["test"]
    assert "rabbitmq-diagnostics -q ping" in " ".join(_argv(healthcheck))
    workers = [name for name, argv in _hutch_services(services).items()
               if _parse(argv, name).command == "worker"]
    assert len(workers) >= 2, "the stack shows replicas sharing a backend's lease"
    for name in workers:
        depends = services[name]["depends_on"]
        assert depends["topology"]["condition"] == "service_completed_successfully", name
        assert depends["rabbitmq"]["condition"] == "service_healthy", name


def _prometheus(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    prometheus_file = ROOT / _bind_mounts(services["prometheus"])[PROMETHEUS_CONFIG]
    data: dict[str, Any] = yaml.safe_load(prometheus_file.read_text())
    return data


def _targets(job: dict[str, Any]) -> set[str]:
    return {str(target) for static in job.get("static_configs", [])
            for target in static["targets"]}


def _rule_files(services: dict[str, dict[str, Any]]) -> dict[str, Path | None]:
    """The compose Prometheus' rule_files -> the host file each reads (None: not mounted)."""
    mounts = _bind_mounts(services["prometheus"])
    base = PROMETHEUS_CONFIG.rpartition("/")[0]
    return {name: _host_path(mounts, name if name.startswith("/") else f"{base}/{name}")
            for name in _prometheus(services).get("rule_files", [])}


def test_prometheus_loads_the_alert_rules(services: dict[str, dict[str, Any]]) -> None:
    """The alerts (tests/test_alerts.py checks them) are mounted where rule_files reads."""
    files = _rule_files(services)
    for name, host in files.items():
        assert host is not None, f"rule file {name} is not mounted into the prometheus service"
        assert host.is_file(), f"rule file {name}: {host} does not exist"
    assert ROOT / ALERT_RULES in files.values(), f"prometheus.yml does not load {ALERT_RULES}"


def test_metrics_ports_match_prometheus(services: dict[str, dict[str, Any]]) -> None:
    prometheus = _prometheus(services)
    targets = {
        target for job in prometheus["scrape_configs"] if job["job_name"] == "hutch-worker"
        for target in _targets(job)
    }
    expected = set()
    for name, argv in _hutch_services(services).items():
        args = _parse(argv, name)
        if args.command != "worker":
            continue
        assert args.metrics_port is not None, f"{name}: no --metrics-port"
        assert args.metrics_port in _container_ports(services[name]), (
            f"{name}: serves metrics on {args.metrics_port} but does not expose it")
        expected.add(f"{name}:{args.metrics_port}")
    assert targets == expected, "prometheus.yml must scrape exactly the workers' metrics ports"


def test_backend_url_points_at_the_mock_backend(
        clean_env: pytest.MonkeyPatch, services: dict[str, dict[str, Any]]) -> None:
    mock_argv = _hutch_argv(services["mock-backend"])
    assert mock_argv is not None
    mock = _parse(mock_argv, "mock-backend")
    assert mock.command == "mock-backend"
    assert mock.host == "0.0.0.0", "the mock must listen beyond the container's loopback"
    assert mock.port in _container_ports(services["mock-backend"])
    mock_models = {m.strip() for m in str(mock.models).split(",") if m.strip()}
    settings = _deploy_settings(clean_env, services["worker-1"])
    urls = [urlsplit(b.url) for pool in settings.pools for b in pool.backends]
    assert any((u.hostname, u.port) == ("mock-backend", mock.port) for u in urls), urls
    for url in urls:
        assert url.hostname in services, f"backend host {url.hostname} is not a service"
    for pool in settings.pools:
        assert set(pool.models) <= mock_models, f"the mock does not serve all of {pool.models}"


def test_every_scrape_target_is_a_service_port(services: dict[str, dict[str, Any]]) -> None:
    prometheus = _prometheus(services)
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    for name, job in jobs.items():
        for target in _targets(job):
            host, _, port = target.rpartition(":")
            assert host in services, f"job {name}: {host} is not a compose service"
            assert int(port) in _container_ports(services[host]), (
                f"job {name}: {host} does not expose port {port}")
    # RabbitMQ's own endpoint: aggregated /metrics, and per-queue /metrics/detailed.
    rabbit = f"rabbitmq:{RABBITMQ_PROMETHEUS_PORT}"
    paths = {job.get("metrics_path", "/metrics") for job in jobs.values()
             if rabbit in _targets(job)}
    assert paths == {"/metrics", "/metrics/detailed"}, paths
    assert "rabbitmq_prometheus" in _enabled_plugins(services["rabbitmq"])
    assert {"rabbitmq", "worker-1", "worker-2"} <= set(
        services["prometheus"].get("depends_on", []))


def _enabled_plugins(service: dict[str, Any]) -> set[str]:
    """The plugins of the mounted enabled_plugins file (an Erlang list term)."""
    source = _bind_mounts(service).get(RABBITMQ_PLUGINS)
    assert source is not None, f"{RABBITMQ_PLUGINS} is not mounted into the broker"
    text = (ROOT / source).read_text().strip()
    match = re.fullmatch(r"\[([a-z_,\s]*)\]\.", text)
    assert match, f"{source}: not an Erlang list term like [rabbitmq_management].: {text!r}"
    return {plugin.strip() for plugin in match.group(1).split(",") if plugin.strip()}


def _rabbitmq_conf(service: dict[str, Any]) -> dict[str, str]:
    """key = value pairs of every mounted RabbitMQ config file (sysctl format)."""
    conf: dict[str, str] = {}
    mounted = [source for target, source in _bind_mounts(service).items()
               if RABBITMQ_CONFIGS.match(target)]
    assert mounted, "no rabbitmq.conf is mounted into the broker"
    for source in mounted:
        for number, line in enumerate((ROOT / source).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            assert sep and key.strip() and value.strip(), f"{source}:{number}: not key = value"
            conf[key.strip()] = value.strip()
    return conf


def _definitions(service: dict[str, Any], *, all_present: bool = True
                 ) -> dict[str, dict[str, Any]]:
    """Container path -> parsed JSON of the definitions files the broker imports at boot
    (``all_present=False``: of those that exist, for checks that do not need them all)."""
    conf = _rabbitmq_conf(service)
    assert conf.get("definitions.import_backend") == "local_filesystem", conf
    path = conf["definitions.local.path"].rstrip("/")
    files = {target: source for target, source in _bind_mounts(service).items()
             if target == path or target.rpartition("/")[0] == path}
    assert files, f"definitions.local.path {path} names nothing mounted into the broker"
    result = {}
    for target, source in sorted(files.items()):
        assert target.endswith(".json"), f"{target}: RabbitMQ imports only *.json files"
        if not (ROOT / source).exists():
            if not all_present:
                continue
            pytest.fail(f"{source} is missing (generate it: `hutch topology export` of "
                        "deploy/hutch.toml)")
        data = json.loads((ROOT / source).read_text())
        assert isinstance(data, dict), f"{source}: a definitions file is a JSON object"
        result[target] = data
    return result


def test_the_broker_enables_management_and_prometheus(
        services: dict[str, dict[str, Any]]) -> None:
    rabbit = services["rabbitmq"]
    assert _enabled_plugins(rabbit) >= {"rabbitmq_management", "rabbitmq_prometheus"}
    ports = _container_ports(rabbit)
    assert {5672, 15672, RABBITMQ_PROMETHEUS_PORT} <= ports
    conf = _rabbitmq_conf(rabbit)
    # Per-queue metrics come from /metrics/detailed; /metrics stays aggregated and cheap.
    assert conf.get("prometheus.return_per_object_metrics", "false") == "false"
    assert "15672" in " ".join(_argv(rabbit["healthcheck"]["test"]))


def _password_matches(user: dict[str, Any], password: str) -> bool:
    """RabbitMQ's default hashing: base64(salt + sha256(salt + password)), 4-byte salt."""
    assert user.get("hashing_algorithm", "rabbit_password_hashing_sha256") == (
        "rabbit_password_hashing_sha256"), user
    raw = base64.b64decode(user["password_hash"])
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def test_the_broker_creates_the_user_the_workers_log_in_with(
        clean_env: pytest.MonkeyPatch, services: dict[str, dict[str, Any]]) -> None:
    """A node that imports definitions at boot skips RABBITMQ_DEFAULT_USER ("Will not seed
    default virtual host and user: have definitions to load"): the definitions must hold
    the vhost, the user and its permissions."""
    rabbit = services["rabbitmq"]
    env = _env(rabbit)
    assert "RABBITMQ_DEFAULT_USER" not in env and "RABBITMQ_DEFAULT_PASS" not in env, (
        "RABBITMQ_DEFAULT_USER/PASS are ignored when definitions are imported at boot")
    definitions = list(_definitions(rabbit, all_present=False).values())
    user, password = _deploy_credentials(clean_env, services)
    users = {u["name"]: u for d in definitions for u in d.get("users", [])}
    assert user in users, f"no definitions file creates the user {user!r}"
    assert _password_matches(users[user], password), f"{user}'s password_hash is not {password!r}"
    tags = users[user]["tags"]
    tags = tags.split(",") if isinstance(tags, str) else tags
    assert {"administrator", "policymaker"} & set(tags), (
        "topology apply sets policies: the user needs the administrator or policymaker tag")
    settings = _deploy_settings(clean_env, services["worker-1"])
    vhosts = {v["name"] for d in definitions for v in d.get("vhosts", [])}
    assert settings.vhost in vhosts, f"no definitions file creates the vhost {settings.vhost!r}"
    permissions = [p for d in definitions for p in d.get("permissions", [])
                   if (p["user"], p["vhost"]) == (user, settings.vhost)]
    assert permissions and all(p[k] == ".*" for p in permissions
                               for k in ("configure", "write", "read")), permissions


def test_the_broker_boots_with_the_hutch_topology(
        clean_env: pytest.MonkeyPatch, services: dict[str, dict[str, Any]]) -> None:
    """The UI shows the Hutch queues with their policies as soon as the broker is up: the
    exported definitions are imported at boot, in the global format (every object names
    its vhost, as a boot-time import requires)."""
    rabbit = services["rabbitmq"]
    exported = {target for target, source in _bind_mounts(rabbit).items()
                if source == EXPORTED_DEFINITIONS}
    assert exported, f"{EXPORTED_DEFINITIONS} is not mounted into the broker"
    definitions = _definitions(rabbit)
    assert exported <= set(definitions), (
        f"{EXPORTED_DEFINITIONS} is mounted outside definitions.local.path")
    settings = _deploy_settings(clean_env, services["topology"])
    names = Names(settings.prefix)
    topology = definitions[exported.pop()]
    for kind in ("queues", "exchanges", "bindings", "policies"):
        for item in topology.get(kind, []):
            assert item.get("vhost") == settings.vhost, (
                f"{EXPORTED_DEFINITIONS}: {kind} {item.get('name', item)!r} must name vhost "
                f"{settings.vhost!r} (export for the vhost of deploy/hutch.toml)")
    queues = {q["name"]: q for q in topology.get("queues", [])}
    for queue in (names.triage_queue, names.parked_queue):
        assert queue in queues, f"{EXPORTED_DEFINITIONS} does not declare {queue}"
    exchanges = {e["name"] for e in topology.get("exchanges", [])}
    assert {names.requests_exchange, names.dead_letter_exchange} <= exchanges
    policies = {p["name"]: p for p in topology.get("policies", [])}
    for pool in settings.pools:
        queue = queues.get(names.work_queue(pool.name))
        assert queue is not None, f"{EXPORTED_DEFINITIONS}: no queue for pool {pool.name}"
        assert queue.get("durable") is True
        assert queue.get("arguments", {}).get("x-max-priority") == settings.max_priority
        policy = policies.get(names.work_policy(pool.name))
        assert policy is not None, f"{EXPORTED_DEFINITIONS}: no policy for pool {pool.name}"
        assert re.fullmatch(policy["pattern"], names.work_queue(pool.name))
        assert policy["definition"].get("dead-letter-exchange") == names.dead_letter_exchange
        assert policy["definition"].get("max-length") == pool.max_queue_length


def test_grafana_is_provisioned(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    assert grafana.get("profiles") == ["dashboards"], "Grafana sits behind a compose profile"
    assert 3000 in _container_ports(grafana)
    mounts = _bind_mounts(grafana)
    provisioning = {target: source for target, source in mounts.items()
                    if target.startswith(GRAFANA_PROVISIONING + "/")}
    assert provisioning, "nothing is mounted under /etc/grafana/provisioning"

    def host_path(container_path: str) -> Path | None:
        return _host_path(mounts, container_path)

    def provisioned(kind: str) -> list[dict[str, Any]]:
        directory = host_path(f"{GRAFANA_PROVISIONING}/{kind}")
        assert directory is not None and directory.is_dir(), f"no {kind} provisioning"
        items: list[dict[str, Any]] = []
        for file in sorted(directory.glob("*.y*ml")):
            data = yaml.safe_load(file.read_text())
            assert data.get("apiVersion") == 1, file
            items += data.get("datasources" if kind == "datasources" else "providers", [])
        return items

    [datasource] = provisioned("datasources")
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus"
    assert url.hostname == "prometheus" and url.port in _container_ports(services["prometheus"])
    dashboards: list[Path] = []
    for provider in provisioned("dashboards"):
        directory = host_path(provider["options"]["path"])
        assert directory is not None and directory.is_dir(), provider
        dashboards += sorted(directory.glob("*.json"))
    assert [d.name for d in dashboards] == ["hutch.json"], dashboards
    # Every panel and query uses the provisioned datasource, by its uid.
    dashboard = json.loads(dashboards[0].read_text())
    uids = {str(ds.get("uid")) for ds in _datasources(dashboard)}
    assert uids == {datasource["uid"]}, uids
    home = _env(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or host_path(home) == dashboards[0]


def _datasources(node: Any) -> list[dict[str, Any]]:
    """Every prometheus datasource reference in a Grafana dashboard."""
    found = []
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and ds.get("type") == "prometheus":
            found.append(ds)
        for value in node.values():
            found += _datasources(value)
    elif isinstance(node, list):
        for value in node:
            found += _datasources(value)
    return found


# -- README and CI script --------------------------------------------------------------------


def _shell_blocks(markdown: str) -> list[str]:
    """The contents of fenced code blocks marked as shell (or unmarked)."""
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", markdown, re.M | re.S)
    return [body.strip() for info, body in blocks
            if info.strip() in ("", "bash", "sh", "shell", "console")]


def test_readme_quick_start_commands_are_verbatim() -> None:
    text = README.read_text()
    assert "\n## Quick start\n" in text, "README has no '## Quick start' section"
    quick_start = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    # Exactly two set-up commands, each alone in its own code block, in this order (other
    # blocks, such as sample output, are marked `text`).
    assert _shell_blocks(quick_start) == list(QUICK_START)


def test_docs_name_every_metric() -> None:
    text = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    names = [metric.name for metric in Metrics().registry.collect()]
    assert names, "no metrics collected"
    missing = [name for name in names if name not in text]
    assert not missing, f"docs/reference/metrics.md does not document metrics: {missing}"


def test_ci_script_runs_the_readme_test_command() -> None:
    assert CI_RUN.is_file()
    assert CI_RUN.stat().st_mode & stat.S_IXUSR, ".ci/run must be executable"
    script = CI_RUN.read_text()
    assert "set -euo pipefail" in script
    assert QUICK_START[1] in script, ".ci/run must install and test exactly as the README says"
