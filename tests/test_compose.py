"""The docker-compose stack and the README, checked without Docker.

There is no Docker engine on the CI machine, so `docker compose up` cannot prove the stack
works. These tests keep it honest instead: images are pinned, every `hutch` command in it
parses with the real CLI parser, every mounted file exists, the compose config loads with
the real settings loader, and the ports and host names the services use for each other
agree. The README's quick start and metric names are checked the same way.
"""

from __future__ import annotations

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

from pipeline.cli import build_parser
from pipeline.metrics import Metrics
from pipeline.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/hutch demo",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest",
)

EXPECTED_SERVICES = {"rabbitmq", "mock-backend", "topology", "worker-1", "worker-2", "prometheus"}
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
HUTCH_CONFIG = "/etc/hutch/hutch.toml"


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), (
        "docker-compose.yml must be a mapping with a 'services' mapping")
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
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
        if "@sha256:" in image:
            return True
        name, _, tag = image.rpartition(":")
        return bool(name) and "/" not in tag and tag not in ("", "latest")

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
            assert (ROOT / source).exists(), f"{name}: {source} (mounted at {target}) is missing"
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


def test_deploy_config_loads(clean_env: pytest.MonkeyPatch,
                             services: dict[str, dict[str, Any]]) -> None:
    settings = load_settings(ROOT / "deploy" / "hutch.toml")
    assert settings.pools, "deploy/hutch.toml defines no pool: the workers would refuse it"
    rabbit_env = _env(services["rabbitmq"])
    user, password = rabbit_env["RABBITMQ_DEFAULT_USER"], rabbit_env["RABBITMQ_DEFAULT_PASS"]
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


def test_metrics_ports_match_prometheus(services: dict[str, dict[str, Any]]) -> None:
    prometheus_file = ROOT / _bind_mounts(services["prometheus"])[PROMETHEUS_CONFIG]
    prometheus = yaml.safe_load(prometheus_file.read_text())
    targets = {
        str(target)
        for job in prometheus["scrape_configs"] if job["job_name"] == "hutch-worker"
        for static in job.get("static_configs", []) for target in static["targets"]
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


def test_readme_names_every_metric() -> None:
    text = README.read_text()
    names = [metric.name for metric in Metrics().registry.collect()]
    assert names, "no metrics collected"
    missing = [name for name in names if name not in text]
    assert not missing, f"README does not document metrics: {missing}"


def test_ci_script_runs_the_readme_test_command() -> None:
    assert CI_RUN.is_file()
    assert CI_RUN.stat().st_mode & stat.S_IXUSR, ".ci/run must be executable"
    script = CI_RUN.read_text()
    assert "set -euo pipefail" in script
    assert QUICK_START[1] in script, ".ci/run must install and test exactly as the README says"
