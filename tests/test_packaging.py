"""What a user of the package gets: ``import hutch`` (the client API alone, typed, found
by mypy after the documented editable install), ``hutch --version``, ``hutch bench``
through the ``hutch.commands`` entry point, the cluster scenario's script as package data.
The wheel itself is built and used from a clean virtualenv by ``.ci/wheel-check``."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import hutch
from pipeline.cli.main import main

ROOT = Path(__file__).resolve().parent.parent

#: The public API: the client, its TLS files and settings, the shapes it returns, and the
#: errors a client can see (not the worker's backend-call errors, not the operator tools').
PUBLIC = {
    "HutchClient", "ChatStream", "Reply", "RawReply", "TLSFiles", "Settings",
    "load_settings", "ChatCompletion", "ChatCompletionChunk", "ChatMessage", "QueueStatus",
    "HutchError", "ConfigError", "TopologyError", "BrokerConnectionError",
    "BrokerUnreachableError", "BrokerAuthError", "BrokerAccessError", "BrokerTLSError",
    "RequestFailed", "QueueFullError", "QuotaExceededError", "UnknownModelError",
    "BrokerBlockedError",
    "DeadlineExceededError",
    "InvalidRequestError", "BackendError", "StreamInterruptedError", "RequestCancelledError",
    "__version__",
}
#: Never loaded by ``import hutch``: the worker side, the mock, the operator tools, bench.
NOT_IMPORTED = ("pipeline.worker", "pipeline.dispatch", "pipeline.settle",
                "pipeline.backends", "pipeline.testing", "pipeline.ops", "pipeline.cli",
                "hutch_bench", "topology", "prometheus_client", "matplotlib")


def test_hutch_exports_the_client_api_and_nothing_else() -> None:
    assert set(hutch.__all__) == PUBLIC
    assert all(hasattr(hutch, name) for name in hutch.__all__)
    assert hutch.__version__ == importlib.metadata.version("hutch")
    assert issubclass(hutch.QueueFullError, hutch.RequestFailed)
    assert (ROOT / "hutch" / "py.typed").is_file()


def test_import_hutch_loads_no_worker_mock_or_bench() -> None:
    probe = "import hutch, json, sys; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True, cwd=ROOT)
    loaded = json.loads(result.stdout)
    assert "pipeline.client.client" in loaded
    assert [m for m in loaded if m.split(".")[0] in NOT_IMPORTED
            or ".".join(m.split(".")[:2]) in NOT_IMPORTED] == []


def test_version_is_the_distributions() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert out.getvalue() == f"hutch {importlib.metadata.version('hutch')}\n"


def test_bench_joins_the_cli_through_the_entry_point() -> None:
    """Like topology's: declared in pyproject and installed (test_cli.py checks that
    pipeline never imports hutch_bench)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "entry-points"]["hutch.commands"]
    assert declared["bench"] == "hutch_bench.commands:register"
    installed = {e.name: e.value
                 for e in importlib.metadata.entry_points(group="hutch.commands")}
    assert installed["bench"] == declared["bench"]


def test_cluster_scenario_script_is_package_data() -> None:
    """The cluster scenario runs its nodes with the script inside hutch_bench (a copy of
    scripts/rabbitmq-node in the wheel), so it works without a checkout."""
    from hutch_bench.cluster_nodes import SCRIPT

    assert SCRIPT.is_relative_to(ROOT / "hutch_bench")
    assert SCRIPT.read_bytes() == (ROOT / "scripts" / "rabbitmq-node").read_bytes()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    assert str(SCRIPT.relative_to(ROOT / "hutch_bench")) in data["hutch_bench"]


_APP = '''\
import hutch

client = hutch.HutchClient("amqps://app:secret@rabbit.example/",
                           tls=hutch.TLSFiles(ca_file="ca.pem"))
reveal_type(client.chat)
hutch.HutchClient(tls=3)
'''


@pytest.mark.slow
def test_mypy_finds_hutch_after_the_documented_editable_install(tmp_path: Path) -> None:
    """docs/getting-started/install.md: `pip install -e . --config-settings
    editable_mode=compat`. A fresh virtualenv gets the editable install (no dependencies:
    only the finding is checked), and mypy in a separate project sees Hutch's types: a
    wrong argument type is an error, the revealed type is the real signature."""
    venv, project = tmp_path / "venv", tmp_path / "project"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_TARGET")}
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "-e", str(ROOT),
         "--config-settings", "editable_mode=compat"],
        capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stderr[-2000:]
    project.mkdir()
    (project / "app.py").write_text(_APP)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-executable", str(venv / "bin" / "python"), "app.py"],
        capture_output=True, text=True, timeout=300, cwd=project)
    out = checked.stdout
    assert "import-not-found" not in out, out
    assert 'Argument "tls" to "HutchClient" has incompatible type "int"' in out, out
    assert "Coroutine[Any, Any, pipeline.models.ChatCompletion]" in out, out
