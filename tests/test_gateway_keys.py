"""Gateway security basics (issue 21 item 6): API keys reloaded without a restart (the
keys file watched, and SIGHUP), failed authentications counted by reason, keys compared in
constant time, and no key, header or body in any log line."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.broker.topology import apply_topology
from pipeline.errors import ConfigError
from pipeline.gateway import auth
from pipeline.gateway.auth import Client, KeyRing, hash_key
from pipeline.gateway.keyfile import read_keys_file
from pipeline.gateway.metrics import GatewayMetrics
from pipeline.gateway.server import GatewayServer
from pipeline.gateway.settings import GatewaySettings
from pipeline.observe.log import configure_logging
from tests.conftest import HUTCH, SettingsFactory, write_config
from tests.gateway_support import KEY_A, KEY_B, gateway_stack, keyed, until

KEY_C = "sk-team-c-5555555555"
SECRET_TEXT = "the-secret-prompt-7f3a"  # in request bodies: must never reach a log


def _keys_file(path: Path, keys: dict[str, str]) -> None:
    """Write ``identity -> key`` as a keys file (hashed, as an operator would)."""
    tables = [f'[[keys]]\nidentity = "{identity}"\nkey_hash = "{hash_key(key)}"\n'
              for identity, key in keys.items()]
    path.write_text("\n".join(tables))


def _failures(metrics: GatewayMetrics) -> dict[str, float | None]:
    return {reason: metrics.registry.get_sample_value(
        "hutch_gateway_auth_failures_total", {"reason": reason}) for reason in auth.AUTH_FAILURES}


def _reloads(metrics: GatewayMetrics, result: str) -> float | None:
    return metrics.registry.get_sample_value("hutch_gateway_key_reloads_total",
                                             {"result": result})


async def _models(http: httpx.AsyncClient, key: str) -> int:
    return (await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            ).status_code


async def test_the_keys_file_is_reloaded_when_it_changes(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    _keys_file(keys, {"team-a": KEY_A})
    gateway = {"keys_file": str(keys), "keys_reload_s": 0.05}
    async with gateway_stack(make_settings, gateway=gateway) as stack, \
            httpx.AsyncClient(base_url=stack.root, timeout=10) as http:
        metrics = stack.gateway.metrics
        before = (await _models(http, KEY_A), await _models(http, KEY_C))
        _keys_file(keys, {"team-c": KEY_C})  # team-a revoked, team-c added
        await until(lambda: _reloads(metrics, "ok") == 1)
        after = (await _models(http, KEY_A), await _models(http, KEY_C))
        chat = await http.post("/v1/chat/completions", headers={
            "Authorization": f"Bearer {KEY_C}"}, json={
            "model": "mock-small", "messages": [{"role": "user", "content": "hi"}]})
        keys.write_text('[[keys]]\nidentity = "half-writ')  # a broken file: keys kept
        await until(lambda: _reloads(metrics, "error") == 1)
        kept = await _models(http, KEY_C)
        keys.unlink()  # gone: kept too
        await until(lambda: _reloads(metrics, "error") == 2)
        still = await _models(http, KEY_C)
        counted = metrics.registry.get_sample_value("hutch_gateway_requests_total", {
            "endpoint": "chat.completions", "client": "team-c", "status": "200"})
    assert before == (200, 401) and after == (401, 200)
    assert chat.status_code == 200 and counted == 1
    assert (kept, still) == (200, 200)
    assert not stack.gateway.keys.open  # an empty or missing file never opens the gateway


def test_an_empty_keys_file_admits_nobody(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text("")
    ring = KeyRing(GatewaySettings(keys_file=str(keys)))
    assert not ring.open and ring.client("Bearer anything") is None
    assert ring.identities() == []


def test_a_bad_keys_file_fails_at_start_naming_the_entry(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    secret = "sk-" + "9" * 30
    keys.write_text(f'[[keys]]\nidentity = "a"\nkey_hash = "{secret}"\n')
    with pytest.raises(ConfigError) as bad:
        read_keys_file(str(keys))
    assert "gateway.keys_file" in str(bad.value) and "keys.0.key_hash" in str(bad.value)
    assert secret not in str(bad.value)
    with pytest.raises(ConfigError, match="cannot read it"):
        KeyRing(GatewaySettings(keys_file=str(tmp_path / "missing.toml")))
    keys.write_text(f'[[keys]]\nidentity = "a"\nkey_hash = "{hash_key("x")}"\n'
                    f'[[keys]]\nidentity = "a"\nkey_hash = "{hash_key("y")}"\n')
    with pytest.raises(ConfigError, match=r"keys\.1\.identity: 'a' is defined twice"):
        read_keys_file(str(keys))
    keys.write_text('[gateway]\nport = 1\n')
    with pytest.raises(ConfigError, match="only \\[\\[keys\\]\\] tables"):
        read_keys_file(str(keys))


@contextlib.asynccontextmanager
async def _gateway_process(config: Path, env: dict[str, str]
                           ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``hutch gateway`` on a free port; its base URL, read from its listening line."""
    proc = await asyncio.create_subprocess_exec(
        *HUTCH, "gateway", "--config", str(config), "--port", "0", env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "the gateway ended before it listened"
                if '"gateway.listening"' in line:
                    yield proc, json.loads(line)["url"].removesuffix("/v1")
                    break
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_sighup_reloads_the_keys_of_a_running_gateway(
        make_settings: SettingsFactory, tmp_path: Path, hutch_env: dict[str, str]) -> None:
    keys = tmp_path / "keys.toml"
    _keys_file(keys, {"team-a": KEY_A})
    settings = make_settings(gateway={"keys_file": str(keys), "keys_reload_s": 3600})
    config = write_config(tmp_path / "hutch.toml", settings)
    await apply_topology(settings)
    async with _gateway_process(config, hutch_env) as (proc, root), \
            httpx.AsyncClient(base_url=root, timeout=10) as http:
        before = (await _models(http, KEY_A), await _models(http, KEY_B))
        _keys_file(keys, {"team-b": KEY_B})  # the poll is an hour away: only SIGHUP
        proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if await _models(http, KEY_B) == 200:
                break
            await asyncio.sleep(0.05)
        after = (await _models(http, KEY_A), await _models(http, KEY_B))
    assert before == (200, 401) and after == (401, 200)


async def test_failed_authentications_are_counted_by_reason(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]}
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack, \
            httpx.AsyncClient(base_url=stack.root, timeout=10) as http:
        metrics = stack.gateway.metrics
        zero = _failures(metrics)  # before any request: every reason exists, at 0
        await http.post("/v1/chat/completions", json=body)
        await http.post("/v1/chat/completions", json=body,
                        headers={"Authorization": "Basic dXNlcjpwYXNz"})
        await http.get("/v1/models", headers={"Authorization": b"Bearer \xff\xfe"})
        for _ in range(3):
            await http.post("/v1/embeddings", json=body,
                            headers={"Authorization": "Bearer sk-guessed"})
        ok = await http.post("/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY_A}"})
        counted = _failures(metrics)
    assert zero == {"missing": 0, "malformed": 0, "unknown_key": 0}
    assert ok.status_code == 200
    assert counted == {"missing": 1, "malformed": 2, "unknown_key": 3}


def test_every_known_series_exists_before_any_request(monkeypatch: pytest.MonkeyPatch,
                                                      make_settings: SettingsFactory) -> None:
    settings = make_settings(gateway=keyed(monkeypatch))
    server = GatewayServer(settings, host="127.0.0.1", port=0)
    sample = server.metrics.registry.get_sample_value
    for client in ("team-a", "team-b"):
        for status in ("200", "429", "500", "502", "503", "504"):
            assert sample("hutch_gateway_requests_total", {
                "endpoint": "chat.completions", "client": client, "status": status}) == 0
    assert sample("hutch_gateway_requests_total", {
        "endpoint": "embeddings", "client": "-", "status": "401"}) == 0
    assert sample("hutch_gateway_key_reloads_total", {"result": "error"}) == 0


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every presented key is compared with every configured one, by
    ``hmac.compare_digest`` of two SHA-256 digests: the time taken depends neither on
    which key matched nor on how long the presented one is."""
    monkeypatch.setenv("HUTCH_TEST_KEY_A", KEY_A)
    stored = [{"identity": f"stored-{i}", "key_hash": hash_key(f"sk-stored-{i}")}
              for i in range(3)]
    ring = KeyRing(GatewaySettings(keys=[
        {"identity": "env", "key_env": "HUTCH_TEST_KEY_A"}, *stored]))  # type: ignore[list-item]
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    presented = {f"Bearer {KEY_A}": Client("env", 0, 0), "Bearer sk-stored-0": Client(
        "stored-0", 0, 0), "Bearer sk-stored-2": Client("stored-2", 0, 0),
        "Bearer x": None, "Bearer " + "y" * 5000: None, f"Bearer {KEY_A[:-1]}": None}
    for header, expected in presented.items():
        calls.clear()
        assert ring.client(header) == expected, header
        assert calls == [(32, 32)] * 4, header  # all four entries, equal lengths
    source = Path(auth.__file__).read_text()
    assert "==" not in source.split("def client(", 1)[1].split("\n    @staticmethod", 1)[0]


async def test_no_key_header_or_body_reaches_a_log_line(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    secret_body = {"model": "mock-small", "messages": [{"role": "user",
                                                        "content": SECRET_TEXT}]}
    caplog.set_level(logging.DEBUG)
    async with gateway_stack(make_settings, gateway=keyed(monkeypatch)) as stack, \
            httpx.AsyncClient(base_url=stack.root, timeout=10) as http:
        good = {"Authorization": f"Bearer {KEY_A}"}
        await http.post("/v1/chat/completions", json=secret_body, headers=good)
        await http.post("/v1/chat/completions", json={**secret_body, "model": "nope"},
                        headers=good)
        await http.post("/v1/chat/completions", json={**secret_body, "temperature": "hot"},
                        headers=good)
        await http.post("/v1/chat/completions", json=secret_body,
                        headers={"Authorization": f"Bearer {KEY_B}x"})
        await http.post("/v1/chat/completions", content=b'{"x": "' + SECRET_TEXT.encode(),
                        headers={**good, "Content-Type": "application/json"})
        await http.post("/v1/chat/completions", json=secret_body,
                        headers={**good, "x-hutch-timeout": SECRET_TEXT})
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                     b"Bearer " + KEY_A.encode() + b"\r\nX-Pad: " + b"s" * 9000 + b"\r\n\r\n")
        await reader.read()
        writer.close()
        stack.gateway.reload_keys()
        await asyncio.sleep(0.3)
    # Hutch's own lines and aiohttp's; the AMQP libraries log frames (bodies) at debug,
    # which configure_logging keeps off at every --log-level (checked below).
    ours = [r for r in caplog.records if r.name.startswith(("hutch", "aiohttp"))]
    text = "\n".join(_everything(record) for record in ours)
    assert ours, "nothing was logged at all: the test sees nothing"
    for secret in (KEY_A, KEY_B, SECRET_TEXT, "s" * 100):
        assert secret not in text, f"{secret[:12]}... reached a log line"
    assert re.search(r"gateway\.auth_failed", text) and "gateway.bad_http" in text


def _everything(record: logging.LogRecord) -> str:
    """All a log record carries: its message, its structured fields, its traceback."""
    parts = [record.getMessage(), repr(getattr(record, "fields", ""))]
    if record.exc_info and record.exc_info[1] is not None:
        parts.append(repr(record.exc_info[1]))
    return " ".join(parts)


def test_the_amqp_libraries_never_log_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiormq logs each frame (request bodies) at debug: ``hutch gateway --log-level
    DEBUG`` still keeps it (and aio_pika, httpx) at warning."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in ("aiormq", "aio_pika", "httpx"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    configure_logging("DEBUG")
    for name in ("aiormq", "aiormq.connection", "aio_pika", "httpx"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    assert logging.getLogger("hutch.gateway").isEnabledFor(logging.DEBUG)
