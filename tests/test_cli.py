"""The `hutch` command line, run as a user would: as subprocesses."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import quote

import httpx

import pipeline
from pipeline import errors
from pipeline.broker.topology import apply_topology
from pipeline.cli.main import build_parser
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import HUTCH, SettingsFactory, run_hutch, running_worker, write_config


async def test_submit_prints_the_reply_and_errors(make_settings: SettingsFactory,
                                                  tmp_path: Path,
                                                  hutch_env: dict[str, str]) -> None:
    async with MockBackend(MockConfig(latency_ms=10, capacity=2)) as mock:
        settings = make_settings([("b1", mock.base_url, 2)])
        config = str(write_config(tmp_path / "hutch.toml", settings))
        await apply_topology(settings)
        async with running_worker(settings):
            code, out, err = await run_hutch(
                ["submit", "-c", config, "-m", "mock-small", "-p", "7", "hi from the cli"],
                hutch_env)
            assert (code, out.strip()) == (0, "mock reply to: hi from the cli"), err
            assert "queue wait" in err
            code, out, err = await run_hutch(
                ["submit", "-c", config, "-m", "no-such-model", "hello"], hutch_env)
            assert code == 1
            assert "unknown_model" in err and "no-such-model" in err
            assert "Traceback" not in err


async def test_worker_refuses_to_start_without_topology(make_settings: SettingsFactory,
                                                        tmp_path: Path,
                                                        hutch_env: dict[str, str]) -> None:
    config = str(write_config(tmp_path / "hutch.toml", make_settings()))
    code, _, err = await run_hutch(["worker", "-c", config], hutch_env, timeout=30)
    assert code == 1
    assert "hutch topology apply" in err and "Traceback" not in err


async def test_demo_shows_high_priority_overtaking(amqp_url: str,
                                                   hutch_env: dict[str, str]) -> None:
    env = dict(hutch_env, HUTCH_AMQP_URL=amqp_url)
    code, out, err = await run_hutch(["demo", "--low", "40", "--high", "6"], env, timeout=90)
    assert code == 0, out + err
    assert "overtook" in out
    high = next(line for line in out.splitlines() if line.strip().startswith("high 9"))
    low = next(line for line in out.splitlines() if line.strip().startswith("low 0"))
    assert high.split()[2:5] == ["6", "6", "0"]  # sent, ok, errors
    assert low.split()[2:5] == ["40", "40", "0"]
    assert float(high.split()[5]) < float(low.split()[5])  # p50
    # The demo cleans up after itself: no queue of its own is left in the vhost.
    settings = Settings(amqp_url=amqp_url)
    base, user, password = settings.management_api()
    async with httpx.AsyncClient(auth=(user, password)) as http:
        queues = (await http.get(f"{base}/api/queues/{quote(settings.vhost, safe='')}")).json()
    assert not [q["name"] for q in queues if q["name"].startswith("hutch-demo-")]
    # The table's last column is explained under it.
    assert "finish positions: ranks in the order all 46 answers arrived" in out


async def test_demo_keep_topology_says_how_to_remove_it(amqp_url: str,
                                                        hutch_env: dict[str, str]) -> None:
    env = dict(hutch_env, HUTCH_AMQP_URL=amqp_url)
    _, out, err = await run_hutch(["demo", "--low", "8", "--high", "2", "--keep-topology"],
                                  env, timeout=90)
    lines = out.splitlines()
    command = lines[lines.index(next(x for x in lines if x.startswith("topology kept"))) + 1]
    assert command.split()[:3] == ["hutch", "demo", "--remove-topology"], out + err
    prefix = command.split()[3]
    settings = Settings(amqp_url=amqp_url)
    base, user, password = settings.management_api()
    vhost = quote(settings.vhost, safe="")

    async def kept() -> list[str]:
        async with httpx.AsyncClient(auth=(user, password)) as http:
            found = []
            for kind in ("queues", "exchanges", "policies"):
                listed = (await http.get(f"{base}/api/{kind}/{vhost}")).json()
                found += [x["name"] for x in listed if x["name"].startswith(prefix + ".")]
            return found

    assert len(await kept()) > 5  # queues, exchanges and the pool's policy
    code, out, err = await run_hutch(command.split()[1:], env)
    assert code == 0 and out.startswith("removed "), err
    assert await kept() == []
    # Only a demo's prefix: a real deployment's cannot be removed this way.
    code, _, err = await run_hutch(["demo", "--remove-topology", "llm"], env)
    assert code == 1 and "not a demo's prefix" in err


def test_bad_config_names_the_key(tmp_path: Path, hutch_env: dict[str, str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[pools]]\nname = "chat"\nmodels = ["m"]\n[[pools.backends]]\n'
                    'name = "b"\nurl = "http://127.0.0.1:1/v1"\nmax_concurrency = 0\n')
    result = subprocess.run([*HUTCH, "worker", "-c", str(path)], env=hutch_env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "pools.0.backends.0.max_concurrency" in result.stderr
    assert "Traceback" not in result.stderr




async def test_client_user_commands(make_settings: SettingsFactory, tmp_path: Path,
                                    hutch_env: dict[str, str], prefix: str) -> None:
    """`hutch client add/list/remove`: the password is shown once, never in `list`."""
    config = str(write_config(tmp_path / "hutch.toml", make_settings()))
    name = f"app-{prefix}"
    code, out, err = await run_hutch(["client", "add", "-c", config, name], hutch_env)
    try:
        assert code == 0, err
        password = next(line.split(": ", 1)[1] for line in out.splitlines()
                        if line.strip().startswith("password:"))
        assert len(password) >= 24
        code, out, _ = await run_hutch(["client", "list", "-c", config], hutch_env)
        assert code == 0 and name in out and password not in out
        code, _, err = await run_hutch(["client", "add", "-c", config, "bad.name"], hutch_env)
        assert code == 2 and "Traceback" not in err
    finally:
        code, out, err = await run_hutch(["client", "remove", "-c", config, name], hutch_env)
    assert code == 0, err
    code, out, _ = await run_hutch(["client", "list", "-c", config], hutch_env)
    assert name not in out


async def test_topology_export_and_diff_commands(make_settings: SettingsFactory,
                                                 tmp_path: Path,
                                                 hutch_env: dict[str, str]) -> None:
    settings = make_settings()
    config = str(write_config(tmp_path / "hutch.toml", settings))
    code, out, _ = await run_hutch(["topology", "diff", "-c", config], hutch_env)
    assert code == 1 and "fixed by `hutch topology apply`" in out  # nothing applied yet
    await apply_topology(settings)
    code, out, err = await run_hutch(["topology", "diff", "-c", config], hutch_env)
    assert code == 0, out + err
    target = tmp_path / "definitions.json"
    code, out, err = await run_hutch(["topology", "export", "-c", config, "-o", str(target)],
                                     hutch_env)
    assert code == 0, err
    assert settings.prefix + ".requests" in target.read_text()


# -- the CLI's shape: fast help, every command, one-way imports ----------------------------

ROOT = Path(__file__).resolve().parent.parent

#: Loaded only when a command runs, never by `hutch --help` (nor by `import pipeline.cli`).
HEAVY = ("pipeline.bench.", "pipeline.testing", "pipeline.worker", "pipeline.client",
         "aio_pika", "aiormq", "httpx", "aiohttp", "matplotlib", "pydantic", "topology.")
#: The bench package's light registration, the exception to ``pipeline.bench.``.
BENCH_REGISTRATION = "pipeline.bench.commands"

_HELP_PROBE = """
import contextlib, io, json, sys
import pipeline.cli
from pipeline.cli.main import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(["--help"])
print(json.dumps({"help": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def _documented_commands() -> set[str]:
    """The commands of the docs' command table: the word after each `hutch `."""
    text = (ROOT / "docs" / "reference" / "cli.md").read_text()
    table = text[text.index("| Command | What it does |"):]
    table = table[:table.index("\n\n")]
    return set(re.findall(r"`hutch ([a-z-]+)", table))


def test_help_lists_every_command_and_imports_nothing_heavy(hutch_env: dict[str, str]
                                                            ) -> None:
    result = subprocess.run([sys.executable, "-c", _HELP_PROBE], env=hutch_env, cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=True)
    probe = json.loads(result.stdout)
    heavy = [m for m in probe["modules"]
             if m.startswith(HEAVY) and m != BENCH_REGISTRATION and m != "topology.commands"]
    assert heavy == [], f"`hutch --help` imported {heavy}"
    listed = set(re.findall(r"^    ([a-z-]+)", probe["help"], re.MULTILINE))
    commands = {"worker", "submit", "mock-backend", "status", "pool", "bench", "demo", "dlq",
                "cancel", "gateway",
                "topology", "client", "worker-user"}
    assert listed == commands == _documented_commands(), probe["help"]


def test_submit_help_documents_every_option() -> None:
    submit = build_parser()._subparsers._group_actions[0].choices["submit"]  # type: ignore[union-attr]
    text = " ".join(submit.format_help().split())
    assert "--model MODEL, -m MODEL model name: the routing key" in text
    assert "0 (lowest, the default) to the configuration's max_priority (default 9)" in text
    assert "--max-tokens MAX_TOKENS max_tokens for the backend" in text
    assert "PROMPT the user message" in text


def test_lazily_filled_commands_parse_their_options() -> None:
    """mock-backend's and the scenarios' options are added once the command is chosen."""
    mock = build_parser().parse_args(["mock-backend", "--port", "0", "--fail-rate", "0.5"])
    assert (mock.command, mock.port, mock.fail_rate, mock.host) == (
        "mock-backend", 0, 0.5, "127.0.0.1")
    scenario = build_parser().parse_args(["bench", "scenario", "overload", "--quick"])
    assert (scenario.bench_command, scenario.scenario, scenario.quick) == (
        "scenario", "overload", True)
    plot = build_parser().parse_args(["bench", "plot", "f.json", "--plot-dir", "d"])
    assert (plot.json_file, plot.plot_dir) == ("f.json", "d")


def test_pipeline_never_imports_topology() -> None:
    """Imports go one way: topology -> pipeline (topology's commands reach the CLI through
    the hutch.commands entry point)."""
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                      if name == "topology" or name.startswith("topology.")]
    assert found == []


def test_package_exports_the_public_api_lazily(hutch_env: dict[str, str]) -> None:
    probe = ("import sys, pipeline; print(sorted(m for m in sys.modules "
             "if m.startswith(('pipeline.', 'pydantic', 'aio_pika'))))")
    result = subprocess.run([sys.executable, "-c", probe], env=hutch_env, cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "['pipeline.errors']"
    from pipeline.client.client import HutchClient
    from pipeline.settings import Settings, load_settings

    assert (pipeline.HutchClient, pipeline.Settings, pipeline.load_settings) == (
        HutchClient, Settings, load_settings)
    assert set(errors.__all__) <= set(pipeline.__all__)
    assert all(getattr(pipeline, name) is getattr(errors, name) for name in errors.__all__)
    assert (ROOT / "pipeline" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in package_data["package-data"]["pipeline"]
