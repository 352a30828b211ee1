"""The gateway in the compose stack, its metrics on the dashboard and in the docs, its
settings section, and ``hutch gateway --hash-key``; no Docker, no broker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli.main import build_parser
from pipeline.gateway.auth import Client, KeyRing, hash_key
from pipeline.gateway.metrics import GatewayMetrics
from pipeline.gateway.settings import GatewaySettings
from pipeline.settings import load_settings
from pipeline.settings_text import dump_toml
from tests.test_metrics import _dashboard, _queries

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_compose_runs_the_gateway_with_its_config_and_metrics(
        monkeypatch: pytest.MonkeyPatch) -> None:
    service = COMPOSE["gateway"]
    args = build_parser().parse_args(service["command"])
    assert (args.command, args.host, args.port, args.metrics_port) == (
        "gateway", "0.0.0.0", 8080, 9101)
    assert f"{args.metrics_port}" in [str(p) for p in service["expose"]]
    assert "8080:8080" in service["ports"]
    jobs = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    assert {"job_name": "hutch-gateway", "static_configs": [{"targets": ["gateway:9101"]}]
            } in jobs
    for key in list(__import__("os").environ):
        if key.startswith("HUTCH_"):
            monkeypatch.delenv(key)
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, value)
    settings = load_settings(ROOT / "deploy" / "hutch.toml")
    worker_env = COMPOSE["worker-1"]["environment"]["HUTCH_AMQP_URL"]
    # The gateway publishes as the workers' own user: trusted, its identities believed.
    assert settings.amqp_url == worker_env
    keys = KeyRing(settings.gateway)
    assert keys.client("Bearer sk-hutch-demo") == Client("demo", 0, 9)
    assert keys.client("Bearer sk-other") is None


def test_dashboard_and_docs_show_every_gateway_metric() -> None:
    """Each gateway metric is on the dashboard and in a metrics table of the docs (the
    gateway page, or the gateway's security page), with its labels."""
    queried = {name for query in _queries(_dashboard()) for name in query.names}
    docs = (ROOT / "docs" / "gateway.md").read_text() + (
        ROOT / "docs" / "operations" / "gateway-security.md").read_text()
    for info in GatewayMetrics().catalog:
        assert info.sample_names() & queried, f"no dashboard panel shows {info.name}"
        row = f"| `{info.name}` | {info.type} | "
        assert row in docs, f"the docs do not document {info.name} ({row})"
        line = docs.split(row, 1)[1].split("\n", 1)[0]
        labels = set(re.findall(r"`([a-z_]+)`", line.split("|", 1)[0]))
        assert labels == set(info.labels), (info.name, labels)


def test_keys_hashes_and_the_settings_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = hash_key("sk-secret")
    monkeypatch.setenv("HUTCH_TEST_GATEWAY_KEY", "sk-from-env")
    gateway: dict[str, Any] = {"keys": [
        {"identity": "stored", "key_hash": stored, "default_priority": 2, "max_priority": 4},
        {"identity": "env", "key_env": "HUTCH_TEST_GATEWAY_KEY", "timeout_s": 5}]}
    settings = load_settings(gateway=gateway)
    keys = KeyRing(settings.gateway)
    assert keys.client("Bearer sk-secret") == Client("stored", 2, 4)
    assert keys.client("bearer sk-from-env") == Client("env", 0, 0, 5)
    assert keys.client("Bearer sk-secret2") is None and keys.client(None) is None
    assert Client("stored", 2, 4).priority(9) == 4 and Client("s", 2, 4).priority(None) == 2
    path = Path(__import__("tempfile").mkdtemp()) / "hutch.toml"
    path.write_text(dump_toml(settings))
    assert load_settings(path) == settings
    assert "sk-from-env" not in path.read_text()
    with pytest.raises(ValueError, match="exactly one of key_env, key_hash"):
        GatewaySettings(keys=[{"identity": "x"}])  # type: ignore[list-item]
    open_ring = KeyRing(GatewaySettings())
    assert open_ring.open and open_ring.client(None) == Client("anonymous", 0, 255)


def test_hash_key_command_prints_a_config_line() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "gateway",
                             "--hash-key"], input="sk-abc\n", capture_output=True, text=True,
                            timeout=30, check=True, cwd=ROOT)
    line = result.stdout.strip()
    assert line.startswith('key_hash = "sha256:')
    salt = line.split(":")[1]
    assert line == f'key_hash = "{hash_key("sk-abc", salt)}"'
