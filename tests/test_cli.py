"""The `hutch` command line, run as a user would: as subprocesses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from pipeline.broker.topology import apply_topology
from pipeline.settings import Settings
from pipeline.testing.mock_backend import MockBackend, MockConfig
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
        from urllib.parse import quote

        queues = (await http.get(f"{base}/api/queues/{quote(settings.vhost, safe='')}")).json()
    assert not [q["name"] for q in queues if q["name"].startswith("hutch-demo-")]


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
