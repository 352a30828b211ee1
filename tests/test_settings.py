"""Settings: one TOML file, HUTCH_* environment overrides, errors that name the bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import DEFAULT_AMQP_URL, BackendSettings, Settings, dump_toml, load_settings

# The shape of the example configuration.
EXAMPLE = """\
amqp_url = "amqp://guest:guest@127.0.0.1:5672/"
max_priority = 9

[[pools]]
name = "chat"
models = ["llama-3-8b", "mistral-7b"]
max_queue_length = 10000

[[pools.backends]]
name = "vllm-a"
url = "http://127.0.0.1:8001/v1"
max_concurrency = 8
timeout_s = 120

[[pools.backends]]
name = "vllm-b"
url = "http://127.0.0.1:8002/v1/"
max_concurrency = 4
timeout_s = 60
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HUTCH_* variable of the calling shell may leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("HUTCH_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "hutch.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def pool(name: str = "chat", models: list[str] | None = None,
         backends: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "models": models or ["m1"],
            "backends": backends or [backend(f"{name}-b")], **extra}


def backend(name: str = "b", url: str = "http://127.0.0.1:8001/v1", cap: int = 1,
            **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "max_concurrency": cap, **extra}


def config_error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    return str(info.value)


# -- the example file -----------------------------------------------------------------


def test_loads_the_example_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, EXAMPLE))
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.max_priority == 9
    assert settings.prefix == "llm"
    [chat] = settings.pools
    assert chat.name == "chat"
    assert chat.models == ["llama-3-8b", "mistral-7b"]
    assert chat.max_queue_length == 10000
    assert [(b.name, b.url, b.max_concurrency, b.timeout_s) for b in chat.backends] == [
        ("vllm-a", "http://127.0.0.1:8001/v1", 8, 120.0),
        # A trailing slash is dropped so "/chat/completions" joins cleanly.
        ("vllm-b", "http://127.0.0.1:8002/v1", 4, 60.0),
    ]
    assert settings.pool("chat") is chat
    with pytest.raises(KeyError):
        settings.pool("nope")


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.amqp_url == DEFAULT_AMQP_URL
    assert settings.max_priority == 9
    assert settings.pools == []


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, EXAMPLE))
    with pytest.raises(Exception, match="frozen"):
        settings.max_priority = 3  # type: ignore[misc]


# -- environment overrides ------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.setenv("HUTCH_AMQP_URL", "amqp://app:secret@rabbit.example:5673/prod")
    monkeypatch.setenv("HUTCH_MAX_PRIORITY", "5")
    settings = load_settings(write(tmp_path, EXAMPLE))
    assert settings.amqp_url == "amqp://app:secret@rabbit.example:5673/prod"
    assert settings.max_priority == 5
    assert settings.vhost == "prod"
    # The file still provides what the environment does not override.
    assert settings.pools[0].backends[0].name == "vllm-a"


def test_keyword_overrides_beat_environment_and_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, EXAMPLE)
    monkeypatch.setenv("HUTCH_MAX_PRIORITY", "3")
    assert load_settings(path).max_priority == 3
    assert load_settings(path, max_priority=7).max_priority == 7
    monkeypatch.delenv("HUTCH_MAX_PRIORITY")
    assert load_settings(path).max_priority == 9


def test_invalid_environment_value_names_the_key(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_MAX_PRIORITY", "0")
    with pytest.raises(ConfigError, match=r"max_priority: .*greater than or equal to 1"):
        load_settings(write(tmp_path, EXAMPLE))
    monkeypatch.setenv("HUTCH_MAX_PRIORITY", "high")
    with pytest.raises(ConfigError, match=r"max_priority: .*valid integer"):
        load_settings(write(tmp_path, EXAMPLE))
    monkeypatch.setenv("HUTCH_MAX_PRIORITY", "256")
    with pytest.raises(ConfigError, match=r"max_priority"):
        load_settings(write(tmp_path, EXAMPLE))


def test_invalid_amqp_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_AMQP_URL", "http://127.0.0.1:5672/")
    with pytest.raises(ConfigError, match=r"amqp_url: must be an amqp:// or amqps:// URL"):
        load_settings()


def test_invalid_environment_value_names_the_variable(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is not blamed for what a HUTCH_* variable set."""
    path = write(tmp_path, EXAMPLE)
    monkeypatch.setenv("HUTCH_MAX_PRIORITY", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    header, line = str(info.value).splitlines()
    assert header == f"invalid configuration ({path}, overridden by HUTCH_MAX_PRIORITY):"
    assert line.startswith("  max_priority: Input should be a valid integer")
    assert line.endswith("(set by the environment: HUTCH_MAX_PRIORITY)")
    # A nested-style variable is named too; a key the file got wrong is not blamed on it.
    monkeypatch.delenv("HUTCH_MAX_PRIORITY")
    monkeypatch.setenv("HUTCH_POOLS__0__NAME", "x")
    bad_file = write(tmp_path, "heartbeat_s = 0\n" + EXAMPLE, "bad.toml")
    lines = config_error_at(bad_file).splitlines()
    assert lines[0] == f"invalid configuration ({bad_file}, overridden by HUTCH_POOLS__0__NAME):"
    assert "  pools: Input should be a valid list (set by the environment: HUTCH_POOLS__0__NAME)" \
        in lines
    assert next(x for x in lines if x.startswith("  heartbeat_s:")).endswith(
        "greater than or equal to 1")
    # An argument beats the environment: then the variable is not what was wrong.
    monkeypatch.setenv("HUTCH_MAX_PRIORITY", "abc")
    assert "HUTCH_MAX_PRIORITY" not in config_error(max_priority=0)


def config_error_at(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# -- errors name the bad key ----------------------------------------------------------


def test_bad_max_concurrency_in_the_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE.replace("max_concurrency = 8", "max_concurrency = 0"))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert "pools.0.backends.0.max_concurrency: Input should be greater than or equal to 1" \
        in message


def test_every_bad_key_gets_its_own_line() -> None:
    message = config_error(max_priority=0, pools=[
        pool(backends=[backend("a"), backend("b", cap=0, timeout_s=-1)])])
    lines = message.splitlines()
    assert lines[0] == "invalid configuration (defaults and environment):"
    keys = sorted(line.split(":")[0].strip() for line in lines[1:])
    assert keys == ["max_priority", "pools.0.backends.1.max_concurrency",
                    "pools.0.backends.1.timeout_s"]


def test_timeout_must_stay_below_the_consumer_timeout() -> None:
    message = config_error(pools=[pool(backends=[backend(timeout_s=3600)])])
    assert "pools.0.backends.0.timeout_s" in message


@pytest.mark.parametrize(("data", "key"), [
    ({"amqp_urll": "amqp://x"}, "amqp_urll"),
    ({"pools": [pool(colour="red")]}, "pools.0.colour"),
    ({"pools": [pool(backends=[backend(max_conncurrency=2)])]},
     "pools.0.backends.0.max_conncurrency"),
])
def test_unknown_keys_are_refused(data: dict[str, Any], key: str) -> None:
    assert f"{key}: unknown key" in config_error(**data)


def test_unknown_key_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE.replace("timeout_s = 120", "timeout = 120"))
    with pytest.raises(ConfigError, match=r"pools\.0\.backends\.0\.timeout: unknown key"):
        load_settings(path)


def test_duplicate_backend_names_are_refused() -> None:
    message = config_error(pools=[
        pool("a", ["m1"], [backend("gpu-1")]),
        pool("b", ["m2"], [backend("gpu-2"), backend("gpu-1")]),
    ])
    assert "pools.1.backends.1.name: backend 'gpu-1' is already defined in pool 'a'" in message
    assert "(top level)" not in message
    # Within one pool too.
    message = config_error(pools=[pool("a", ["m1"], [backend("x"), backend("x")])])
    assert "pools.0.backends.1.name: backend 'x'" in message


def test_a_model_in_two_pools_is_refused() -> None:
    message = config_error(pools=[
        pool("a", ["llama", "mistral"], [backend("b1")]),
        pool("b", ["qwen", "mistral"], [backend("b2")]),
    ])
    assert "pools.1.models: model 'mistral' is already served by pool 'a'" in message


def test_duplicate_pool_and_model_names() -> None:
    message = config_error(pools=[pool("a", ["m1"], [backend("b1")]),
                                  pool("a", ["m2"], [backend("b2")])])
    assert "pools.1.name: pool 'a' is defined twice" in message
    message = config_error(pools=[pool("a", ["m1", "m1"])])
    assert "pools.0.models: model names must be unique" in message


def test_pools_need_models_and_backends() -> None:
    assert "pools.0.models" in config_error(pools=[pool() | {"models": []}])
    assert "pools.0.backends" in config_error(pools=[{"name": "p", "models": ["m"],
                                                      "backends": []}])


@pytest.mark.parametrize("name", ["", "has space", "slash/name", "-leading", "x" * 101])
def test_names_must_be_boring(name: str) -> None:
    assert "pools.0.name" in config_error(pools=[pool(name)])


@pytest.mark.parametrize("url", ["127.0.0.1:8001/v1", "ftp://host/v1", "http://", "not a url"])
def test_bad_backend_urls(url: str) -> None:
    message = config_error(pools=[pool(backends=[backend(url=url)])])
    assert "pools.0.backends.0.url: must be an http(s) URL" in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:5672/", "amqp://", "rabbit:5672", ""])
def test_bad_amqp_urls(url: str) -> None:
    assert "amqp_url: must be an amqp:// or amqps:// URL" in config_error(amqp_url=url)


def test_bad_management_url() -> None:
    assert "management_url: must be an http(s) URL" in config_error(
        management_url="amqp://127.0.0.1:15672")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="configuration file not found") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, 'amqp_url = "amqp://unterminated\n')
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_wrong_type_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE.replace('models = ["llama-3-8b", "mistral-7b"]',
                                           'models = "llama-3-8b"'))
    with pytest.raises(ConfigError, match=r"pools\.0\.models: "):
        load_settings(path)


# -- derived values ---------------------------------------------------------------------


def test_management_api_defaults_to_the_amqp_host() -> None:
    settings = load_settings(amqp_url="amqp://app:s3cret@rabbit.example:5673/prod")
    assert settings.management_api() == ("http://rabbit.example:15672", "app", "s3cret")
    assert load_settings(amqp_url="amqps://u:p@h/").management_api() == (
        "https://h:15671", "u", "p")
    # No credentials in the URL: RabbitMQ's default user.
    assert load_settings(amqp_url="amqp://h").management_api() == (
        "http://h:15672", "guest", "guest")


def test_management_api_decodes_credentials() -> None:
    settings = load_settings(amqp_url="amqp://user%40corp:p%40ss%2Fw@h:5672/")
    assert settings.management_api() == ("http://h:15672", "user@corp", "p@ss/w")


def test_management_api_override() -> None:
    settings = load_settings(amqp_url="amqp://app:s3cret@rabbit:5672/prod",
                             management_url="https://mgmt.example:8443/rabbit/")
    # Same credentials as the AMQP URL unless the management URL has its own.
    assert settings.management_api() == ("https://mgmt.example:8443/rabbit", "app", "s3cret")
    settings = load_settings(amqp_url="amqp://app:s3cret@rabbit:5672/prod",
                             management_url="http://admin:adm%21n@mgmt:15672")
    assert settings.management_api() == ("http://mgmt:15672", "admin", "adm!n")


def test_management_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_MANAGEMENT_URL", "http://10.0.0.5:15672")
    assert load_settings().management_api()[0] == "http://10.0.0.5:15672"


@pytest.mark.parametrize(("url", "vhost"), [
    ("amqp://guest:guest@127.0.0.1:5672/", "/"),
    ("amqp://guest:guest@127.0.0.1:5672", "/"),
    ("amqp://guest:guest@127.0.0.1:5672/%2F", "/"),
    ("amqp://guest:guest@127.0.0.1:5672/prod", "prod"),
    ("amqp://guest:guest@127.0.0.1:5672/team%2Fa", "team/a"),
])
def test_vhost(url: str, vhost: str) -> None:
    assert load_settings(amqp_url=url).vhost == vhost


def test_with_vhost_round_trips() -> None:
    settings = load_settings(amqp_url="amqp://u:p@h:5672/").with_vhost("a/b c")
    assert settings.vhost == "a/b c"
    assert settings.management_api() == ("http://h:15672", "u", "p")


def test_redacted_amqp_url_hides_the_password() -> None:
    settings = load_settings(amqp_url="amqp://app:hunter2@rabbit.example:5673/prod")
    redacted = settings.redacted_amqp_url()
    assert "hunter2" not in redacted
    assert redacted == "amqp://app:***@rabbit.example:5673/prod"
    # Nothing to hide: unchanged.
    assert load_settings(amqp_url="amqp://rabbit/").redacted_amqp_url() == "amqp://rabbit/"
    assert "hunter2" not in load_settings(amqp_url="amqp://app:hunter2@rabbit/vh"
                                          ).redacted_amqp_url()


# -- API keys -----------------------------------------------------------------------------


def test_api_key_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(pools=[pool(backends=[backend("gpu", api_key_env="GPU_KEY")])])
    b = settings.pools[0].backends[0]
    monkeypatch.setenv("GPU_KEY", "sk-test-123")
    assert b.api_key() == "sk-test-123"
    # Read at call time, never stored in the settings.
    assert "sk-test-123" not in settings.model_dump_json()
    monkeypatch.setenv("GPU_KEY", "sk-rotated")
    assert b.api_key() == "sk-rotated"


def test_missing_api_key_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPU_KEY_MISSING", raising=False)
    b = BackendSettings(name="gpu", url="http://h/v1", max_concurrency=1,
                        api_key_env="GPU_KEY_MISSING")
    with pytest.raises(ConfigError) as info:
        b.api_key()
    assert str(info.value) == ("backends.gpu.api_key_env: environment variable "
                               "GPU_KEY_MISSING is not set")
    monkeypatch.setenv("GPU_KEY_MISSING", "")
    with pytest.raises(ConfigError, match="GPU_KEY_MISSING is not set"):
        b.api_key()


def test_no_api_key_env_means_no_key() -> None:
    assert BackendSettings(name="b", url="http://h/v1", max_concurrency=1).api_key() is None


def test_settings_class_reads_env_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_PREFIX", "other")
    assert Settings().prefix == "other"


def test_dump_toml_round_trips(tmp_path: Path) -> None:
    settings = load_settings(
        amqp_url='amqp://u:p"w@127.0.0.1:5672/v', prefix="rt", trusted_users=["ops"],
        pools=[{"name": "chat", "models": ["m-ä", "m2"], "max_attempts": 2,
                "retry_delays_ms": [100, 1000],
                "backends": [{"name": "b", "url": "http://h:1/v1", "max_concurrency": 3,
                              "timeout_s": 2.5, "api_key_env": "KEY"}]}])
    path = tmp_path / "hutch.toml"
    path.write_text(dump_toml(settings))
    assert load_settings(path) == settings
